"""Teachers for distillation: a local model directory (our engine) or any OpenAI-compatible endpoint.

Both turn a list of chat prompts into (reasoning, answer, finished) traces. The URL teacher sends concurrent
requests with retries, exponential backoff with jitter, and the wait a 429/503's Retry-After asks for; the API key
comes from an environment variable (NANOSEEK_TEACHER_API_KEY, else OPENAI_API_KEY), never from the command line, and
never appears in an error message. Reasoning is read from the response's `reasoning_content` (DeepSeek, SGLang) or
`reasoning` (vLLM) field, or from `<think>…</think>` in the content. Nothing leaves the machine except the requests to
the URL the user names: a redirect is reported, not followed (it would carry the key elsewhere).
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import random
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

MAX_RETRY_AFTER = 300.0  # seconds: the longest a server's Retry-After is waited for
TIMEOUT = 600.0  # seconds a URL teacher has for one whole reply (--timeout)
FAILURES_BEFORE_ABORT = 8  # requests the server failed on (after retries) that stop a run: it is down, not one question


@dataclass
class Trace:
    reasoning: str
    answer: str
    finished: bool  # ended by itself rather than by the token limit
    error: str = ""  # the server refused this one request (e.g. HTTP 400 for a prompt too long for it), or kept
    # failing on it (a 5xx or no reply in time, retried, while it answers others): no trace
    failed: bool = False  # the latter
    closed: bool = True  # the reasoning ended (`content` came, perhaps empty); not when cut off inside it (null)


class Refused(ConnectionError):
    """The server refused one request (HTTP 400, 413, 422): that request's fault, not the run's."""


class Failed(ConnectionError):
    """The server, which has answered other requests, kept failing on this one (a 5xx, a 429 or no reply in time, on
    every retry)."""


def split_reasoning(text: str, prefilled: bool = False) -> tuple[str, str]:
    """'<think>r</think>a' (or 'r</think>a' when the prompt prefilled <think>) -> (r, a); no tags -> ('', text)."""
    if prefilled and "<think>" not in text:
        text = "<think>" + text
    m = re.match(r"\s*<think>(.*?)</think>(.*)", text, flags=re.DOTALL)
    return (m.group(1).strip(), m.group(2).strip()) if m else ("", text.strip())


class LocalTeacher:
    """A model directory run through our engine, prompted with its own chat template (which prefills <think>).
    The engine decodes up to `rows` traces at once and refills a row as soon as a trace ends (`Engine.for_batch`).
    `flops` adds up what its generation cost, for the cost table."""

    def __init__(self, path: str, device: str = "cpu", rows: int | None = None):
        from ..engine.engine import BATCH_ROWS, load_for_inference
        from ..tokenizer import Tokenizer

        self.tok = Tokenizer.from_dir(path)
        self.model = load_for_inference(path, device)
        self.rows = rows or BATCH_ROWS
        self.flops = 0.0

    def traces(self, questions: list[str], max_tokens: int, temperature: float, seeds: list[int]
               ) -> Iterator[tuple[int, Trace]]:
        """(index into questions, trace) for each question, question i sampled with seeds[i]."""
        from ..cli import Interrupted
        from ..engine.engine import Engine
        from ..eval.evaluate import check_context
        from ..flops import generation_flops

        prompts = [self.tok.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
        if not prompts:
            return
        check_context(prompts, max_tokens, self.model.config.max_position_embeddings, "the teacher")
        engine = Engine.for_batch(self.model, len(prompts), max(map(len, prompts)), max_tokens, self.rows)
        step = 2 * engine.max_batch_size  # traces are yielded (and saved) per chunk
        for start in range(0, len(prompts), step):
            chunk = prompts[start : start + step]
            interrupted = None
            try:
                outs = dict(enumerate(engine.generate(chunk, max_new_tokens=max_tokens, temperature=temperature,
                                                      seed=seeds[start : start + step],
                                                      stop_token_ids=[self.tok.eos_id])))
            except Interrupted as e:  # Ctrl-C: the chunk's traces that had finished are still handed out (and saved)
                outs, interrupted = e.done, e
            self.flops += sum(generation_flops(self.model.config, len(chunk[i]), [len(o)]) for i, o in outs.items())
            for i, out in outs.items():
                finished = bool(out) and out[-1] == self.tok.eos_id
                text = self.tok.decode(out[:-1] if finished else out)
                reasoning, answer = split_reasoning(text, prefilled=True)
                yield start + i, Trace(reasoning, answer, finished)
            if interrupted is not None:
                raise interrupted


class URLTeacher:
    """Any OpenAI-compatible /v1/chat/completions endpoint (nanoseek serve, vLLM, SGLang, DeepSeek's API).

    A request that fails for the network or the server (5xx, 429, a dropped connection, no reply within `timeout`
    seconds) is retried with backoff; one the server refuses as such (400, 413, 422: a prompt too long for its
    context, a content filter), or one it keeps failing on while it answers others, becomes a Trace with `error`, so
    one bad question does not stop the run. When the consumer stops (an error, Ctrl-C), queued requests are
    cancelled and retries end; at most `concurrency` requests in flight are still answered, unused."""

    def __init__(self, url: str, model: str | None = None, concurrency: int = 8, retries: int = 5,
                 timeout: float = TIMEOUT, top_p: float = 0.95):
        self.base = api_base(url)
        self.top_p = top_p  # R1's sampling is temperature 0.6 with top-p 0.95
        self.key = os.environ.get("NANOSEEK_TEACHER_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.concurrency, self.retries, self.timeout = concurrency, retries, timeout
        self.answered = False  # until the server has answered once, a refused connection is a wrong URL: no retry
        self.stop = threading.Event()  # set when the consumer of traces() stops: retries end, nothing new is asked
        self.model = model or self._first_model()

    def _request(self, path: str, body: dict | None = None) -> dict:
        """The reply to one request, retried while the failure may pass; ConnectionError (Refused, Failed) else."""
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = None if body is None else json.dumps(body).encode()
        url, delay, timeouts = self.base + path, 1.0, 0
        for attempt in range(self.retries + 1):
            wait = delay * random.uniform(0.5, 1.0)  # jitter: concurrent requests do not retry in lockstep
            try:
                raw = self._read(urllib.request.Request(url, data=data, headers=headers))
            except urllib.error.HTTPError as e:
                detail = self._detail(e)
                if 300 <= e.code < 400:
                    raise ConnectionError(f"{url}: HTTP {e.code}: redirected to {e.headers.get('Location')}, which "
                                          "is not followed (it would be sent the API key); name that URL") from None
                if e.code < 500 and e.code != 429:  # our mistake: no retry can fix it
                    error = Refused if e.code in (400, 413, 422) and path == "/chat/completions" else ConnectionError
                    raise error(f"{url}: HTTP {e.code}: {detail}{_hint(e.code, path, self.base)}") from None
                if attempt == self.retries:
                    raise Failed(f"{url}: HTTP {e.code}: {detail}") from None
                wait = max(wait, min(_retry_after(e.headers.get("Retry-After")), MAX_RETRY_AFTER))
            except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, a reply cut short, ...
                reason = getattr(e, "reason", e)
                # before any answer: no server there, or not an HTTP(S) one at that address
                wrong_url = isinstance(reason, (ConnectionRefusedError, socket.gaierror, ssl.SSLError,
                                                http.client.BadStatusLine, http.client.InvalidURL))
                if wrong_url and not self.answered:
                    raise ConnectionError(f"cannot reach {url}: {reason!r} (is the server running, and is the URL "
                                          "right?)") from None
                timeouts += isinstance(reason, TimeoutError)
                if timeouts > 1 and self.answered:  # stuck on this request (twice): not asked again
                    raise Failed(f"{url}: {e!r}") from None
                if attempt == self.retries or timeouts > 1:  # the server went away, or never answered in time
                    raise ConnectionError(f"{url}: {e!r}") from None
            else:
                self.answered = True
                return _reply(raw, url, self.key)  # a reply that is not the API's will not heal: no retry
            if self._backoff(wait):
                raise ConnectionError(f"{url}: stopped")
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    def _read(self, req: urllib.request.Request) -> bytes:
        """The body of the reply; TimeoutError if it has not all come `timeout` seconds after its headers (a server
        that sends a byte now and then never trips the socket's own timeout)."""
        with _OPENER.open(req, timeout=self.timeout) as resp:
            deadline, chunks = time.monotonic() + self.timeout, []
            while chunk := resp.read1(1 << 16):
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no whole reply within {self.timeout:g} s")
            return b"".join(chunks)

    def _detail(self, e: urllib.error.HTTPError) -> str:
        """An error reply's body on one line, at most 300 characters, with the API key masked if the server echoed
        it."""
        try:
            text = e.read().decode(errors="replace")
        except (OSError, http.client.HTTPException):  # the body cut short
            text = ""
        if self.key:
            text = text.replace(self.key, "***")
        return " ".join(text.split())[:300]

    def _backoff(self, delay: float) -> bool:
        """Wait `delay` seconds before a retry; True if the run stopped meanwhile (then no retry)."""
        return self.stop.wait(delay)

    def _first_model(self) -> str:
        models = self._request("/models").get("data")
        if not isinstance(models, list) or not models or not isinstance(models[0], dict) or "id" not in models[0]:
            raise ConnectionError(f"{self.base}/models lists no model (name one: distill --teacher-model, "
                                  "eval --served-model)")
        return models[0]["id"]

    def ask(self, question: str, max_tokens: int, temperature: float, seed: int) -> Trace:
        body = {"model": self.model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                "temperature": temperature, "top_p": self.top_p, "seed": seed}
        try:
            reply = self._request("/chat/completions", body)
        except (Refused, Failed) as e:
            return Trace("", "", False, error=str(e), failed=isinstance(e, Failed))
        choices = reply.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        msg = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(msg, dict):
            raise ConnectionError(f"{self.base}/chat/completions: a reply without choices[0].message: "
                                  f"{json.dumps(reply)[:200]}")
        reasoning = _text(msg.get("reasoning_content")) or _text(msg.get("reasoning"))
        content = _text(msg.get("content"))
        closed = msg.get("content") is not None
        if not reasoning:  # '<think>r</think>a', or 'r</think>a' from a template that prefilled <think>
            closed = "</think>" in content or "<think>" not in content
            reasoning, content = split_reasoning(content, prefilled="</think>" in content)
        return Trace(reasoning.strip(), content.strip(), choice.get("finish_reason") == "stop", closed=closed)

    def traces(self, questions: list[str], max_tokens: int, temperature: float, seeds: list[int]
               ) -> Iterator[tuple[int, Trace]]:
        """(index into questions, trace) as the answers arrive; question i is asked with seeds[i]. A failed request
        raises once the answers before it are yielded. However it ends (an error, Ctrl-C, a consumer that stops),
        nothing more is asked, and the requests in flight are left to daemon threads, which the process does not
        wait for: Ctrl-C ends a run at once, not after the slowest request (up to its 300 s timeout)."""
        stop = self.stop = threading.Event()  # this call's: workers of an abandoned earlier call keep theirs, set
        todo, done = queue.SimpleQueue(), queue.SimpleQueue()
        for i in range(len(questions)):
            todo.put(i)

        def work() -> None:
            while not stop.is_set():
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    done.put((i, self.ask(questions[i], max_tokens, temperature, seeds[i]), None))
                except Exception as e:  # noqa: BLE001 (handed to the consumer)
                    done.put((i, None, e))

        for _ in range(min(self.concurrency, len(questions))):
            threading.Thread(target=work, daemon=True).start()
        try:
            for _ in range(len(questions)):
                i, trace, error = done.get()
                if error is not None:
                    raise error
                yield i, trace
        finally:
            stop.set()  # no new question, no retry


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed (urllib then raises the 3xx as an HTTPError): urllib would send the request's
    Authorization header on to wherever one points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _retry_after(value: str | None) -> float:
    """The seconds a 429/503 asks to wait: Retry-After as seconds or as an HTTP date; 0 if absent or unreadable."""
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return 0.0


def _hint(code: int, path: str, base: str) -> str:
    if code == 401:
        return " (the API key comes from $NANOSEEK_TEACHER_API_KEY or $OPENAI_API_KEY)"
    if code != 404:
        return ""
    hints = ["a server without /models: name its model with --teacher-model, or --served-model in eval"] if (
        path == "/models") else []
    if not base.endswith("/v1"):
        hints.append(f"or is the API's base URL {base}/v1?")
    return f" ({'; '.join(hints)})" if hints else ""


def _text(value) -> str:
    """A message field as text: a string, or the text parts of a list of content parts; anything else ''."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(p.get("text", "") for p in value if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def api_base(url: str) -> str:
    """The API's base URL: 'http://h:p' or 'http://h:p/' -> 'http://h:p/v1'; a URL with a path ('…/v1',
    '…/v1beta/openai') is the base as given, as the OpenAI SDK reads its base_url, less an endpoint it may end with
    ('…/v1/chat/completions' -> '…/v1'). ConnectionError at once for a URL that no retry can fix."""
    check_url(url)
    base = re.sub(r"/chat/completions/*$", "", url.rstrip("/"))
    return base if urllib.parse.urlsplit(base).path else base + "/v1"


def check_url(url: str) -> None:
    """ConnectionError at once for a URL that no retry can fix: no host, a port that is not a number, bad IPv6,
    whitespace, control or non-ASCII characters, a query string."""
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url) or not url.isascii():
        raise ConnectionError(f"{url!r}: not a valid URL (it holds a space, a control character or a non-ASCII one: "
                              "percent-encode a path, write a host name in its xn-- punycode)")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError as e:
        raise ConnectionError(f"{url}: not a valid URL ({e})") from None
    if parts.username is not None or parts.password is not None:  # not sent; said without the password
        raise ConnectionError(f"{parts.scheme}://…@{parts.hostname}: a base URL takes no user:password@ (give the API "
                              "key in $NANOSEEK_TEACHER_API_KEY or $OPENAI_API_KEY)")
    if parts.query or parts.fragment:
        raise ConnectionError(f"{url}: a base URL takes no query string or fragment")
    if not parts.hostname:
        raise ConnectionError(f"{url}: no host in the URL (e.g. http://127.0.0.1:8000)")


def _reply(raw: bytes, url: str, key: str | None = None) -> dict:
    """A JSON object from a server, or ConnectionError saying what came instead (an HTML login page, a bare list, a
    gateway's `{"error": …}` with status 200), the API key masked should the server echo it."""
    masked = (lambda text: text.replace(key, "***")) if key else (lambda text: text)  # noqa: E731 (what it sent)
    try:
        reply = json.loads(raw)
    except ValueError:
        raise ConnectionError(f"{url}: the reply is not JSON (is this the API's base URL?): "
                              f"{masked(raw.decode(errors='replace'))[:120]!r}") from None
    if not isinstance(reply, dict):
        raise ConnectionError(f"{url}: the reply is not a JSON object: {masked(json.dumps(reply))[:120]}")
    if "error" in reply:
        raise ConnectionError(f"{url}: the server answered with an error: {masked(json.dumps(reply['error']))[:300]}")
    return reply


def is_url(spec: str) -> bool:
    """A teacher named by an OpenAI-compatible base URL, not a model directory."""
    return spec.startswith(("http://", "https://"))


def check_scheme(spec: str, option: str) -> None:
    """A model named with another scheme (ftp://…) would otherwise be read as a directory path."""
    from ..cli import UserError

    if "://" in spec and not is_url(spec):
        raise UserError(f"{option} {spec}: a model behind a URL is reached over http:// or https://")


def make_teacher(spec: str, device: str = "cpu", concurrency: int = 8, model: str | None = None,
                 timeout: float = TIMEOUT) -> LocalTeacher | URLTeacher:
    """A URL teacher asks for `model` (default: the first one its /models lists); a directory is a local teacher."""
    if is_url(spec):
        return URLTeacher(spec, model=model, concurrency=concurrency, timeout=timeout)
    return LocalTeacher(spec, device=device)
