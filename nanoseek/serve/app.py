"""`nanoseek serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with a local web chat.

Endpoints: `GET /health` (public), `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, the web
chat's history under `/api/conversations` (see webui.py) and the page itself at `/`.

Chat prompts are rendered with the model directory's own chat template (`add_generation_prompt=True`); the answer's
`<think>…</think>` reasoning comes back in `message.reasoning_content` and `message.reasoning` (vLLM's name), the rest
in `content` (reasoning.py). Log-probabilities (chat `logprobs` / `top_logprobs`, completions `logprobs` and `echo`,
which scores a prompt's own tokens as evaluation harnesses do, with `max_tokens: 0` alone) come in OpenAI's shapes
(logprobs.py). Sampling defaults come from the directory's generation_config.json. Bad input never gives a 500:
every error is a 4xx with OpenAI's `{"error": {...}}` body. Parameters the server does not implement (penalties,
logit_bias, response_format, tools and functions, best_of, suffix, vLLM's min_p / min_tokens / ignore_eos /
stop_token_ids, continuing a partial assistant message) are accepted only at their "off" values (schemas.UNSUPPORTED).
With `--api-key` (or NANOSEEK_API_KEY) every endpoint but `/health` and the static page needs `Authorization: Bearer
KEY`; without one `/v1` is open and the web chat's history needs a token (access.py). Bound to a loopback address,
requests must also name a loopback host (so a web page elsewhere cannot reach the server through DNS rebinding), and
a write from another site's page is refused.

One background thread owns the engine (runtime.EngineWorker); each request's tokens reach the event loop through an
asyncio queue (generation.py). A client that disconnects mid-stream has its requests cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from . import add_arguments
from .access import TOKEN_HINT, BrowserGuard, bearer_checker, history_token, is_loopback, new_token
from .errors import BodyLimit, install_error_handlers
from .generation import Generation, GenerationError, usage
from .logprobs import CompletionLogprobs, TokenText, chat_entries
from .runtime import EngineWorker, Runtime
from .schemas import ApiError, ChatRequest, CompletionRequest, error_body

log = logging.getLogger("nanoseek.serve")
MAX_CHOICES = 256  # prompts × n in one request


# --- building engine requests ----------------------------------------------------------------------------------------
def _message_text(message, index: int) -> str:
    content = message.content
    if content is None and message.role != "assistant":  # only an assistant turn may come without content
        raise ApiError(400, f"a {message.role} message needs content", param=f"messages.{index}.content")
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"only text content is supported (got a {part.type!r} part)",
                           param=f"messages.{index}.content")
        texts.append(part.text)
    return "\n".join(texts)  # as vLLM joins a message's text parts


def chat_prompt(rt: Runtime, req: ChatRequest) -> list[int]:
    """The directory's chat template over the messages; old reasoning fields are dropped (not fed back)."""
    import jinja2

    from ..tokenizer import TokenizerError

    if not req.messages:
        raise ApiError(400, "messages must contain at least one message", param="messages")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m, i)}
                for i, m in enumerate(req.messages)]
    kwargs = req.chat_template_kwargs or {}
    key = "thinking" if "thinking" in kwargs else "enable_thinking"
    thinking = kwargs.get(key)  # None: the template's own default
    if thinking is not None and not isinstance(thinking, bool):  # the string "false" would be truthy
        raise ApiError(400, f"chat_template_kwargs.{key} must be true or false, not {thinking!r}",
                       param=f"chat_template_kwargs.{key}")
    try:
        text = rt.tokenizer.apply_chat_template(messages, add_generation_prompt=True, thinking=thinking, tokenize=False)
    except (TokenizerError, jinja2.TemplateError) as e:
        raise ApiError(400, f"cannot apply the model's chat template: {e}", param="messages") from None
    return _encode(rt, text, param="messages")


def _encode(rt: Runtime, text: str, param: str, add_bos: bool = False) -> list[int]:
    """Tokenize a prompt; one far longer than the context is refused by its length in characters, untokenized."""
    limit = 4 * rt.max_model_len  # (a cheap first test: longest_token reads the whole vocabulary once)
    if len(text) > limit and len(text) > limit * rt.tokenizer.longest_token:
        raise ApiError(400, f"the prompt has {len(text)} characters, far more than this server's context of "
                            f"{rt.max_model_len} tokens holds (--max-model-len)", param=param,
                       code="context_length_exceeded")
    return rt.tokenizer.encode(text, add_bos=add_bos)


def completion_prompts(rt: Runtime, prompt) -> list[list[int]]:
    """A completions `prompt`: text (BOS prepended, as HF tokenizers do), texts, token ids, or lists of ids."""
    tok = rt.tokenizer
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            ids = _encode(rt, p, "prompt", add_bos=tok.needs_bos(p))
        else:
            ids = list(p)
            if any(not 0 <= t < rt.engine.cfg.vocab_size for t in ids):
                raise ApiError(400, f"token ids must be in [0, {rt.engine.cfg.vocab_size})", param="prompt")
        if not ids:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        out.append(ids)
    return out


def sampling_params(rt: Runtime, req, prompt_len: int, *, max_tokens: int | None, max_tokens_param: str,
                    prompt_param: str, n: int):
    """SamplingParams for the n choices of one prompt; 400 if prompt + max_tokens does not fit the context."""
    from ..engine.engine import SamplingParams

    limit = rt.max_model_len
    if prompt_len >= limit:
        raise ApiError(400, f"the prompt has {prompt_len} tokens but this server's context is {limit} tokens "
                            f"(--max-model-len), which leaves no room for an answer", param=prompt_param,
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = limit - prompt_len
    elif prompt_len + max_tokens > limit:
        raise ApiError(400, f"{max_tokens_param}={max_tokens} plus the prompt's {prompt_len} tokens exceeds this "
                            f"server's context of {limit} tokens", param=max_tokens_param,
                       code="context_length_exceeded")
    d = rt.defaults
    temperature = d["temperature"] if req.temperature is None else req.temperature
    top_p = d["top_p"] if req.top_p is None else req.top_p
    top_k = d["top_k"] if req.top_k is None else max(req.top_k, 0)
    return [SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                           seed=None if req.seed is None else req.seed + i, stop_token_ids=rt.stop_ids,
                           logprobs=req.logprobs_k)
            for i in range(n)]


@dataclass
class Echo:
    """What `echo` puts before a completion: the prompt as sent (a text as it was, token ids decoded, special tokens
    spelled out), and with logprobs its tokens' own. The BOS the server puts before a text is not echoed; the text's
    first token then has a log-probability, given that BOS."""

    text: str = ""
    entries: list = field(default_factory=list)  # [(token id, (log p, top) or None)]


def echoes(rt: Runtime, req: CompletionRequest, prompts: list[list[int]]) -> list[Echo]:
    """One Echo per prompt (empty ones without echo). Runs on a worker thread: scoring is a forward per prompt."""
    if not req.echo:
        return [Echo() for _ in prompts]
    sent = [req.prompt] if isinstance(req.prompt, str) or isinstance(req.prompt[0], int) else req.prompt
    out = []
    for ids, original in zip(prompts, sent, strict=True):
        text = original if isinstance(original, str) else rt.tokenizer.decode(ids)
        added = int(isinstance(original, str) and rt.tokenizer.needs_bos(original))  # the BOS is not echoed
        scored = [] if req.logprobs_k is None else list(zip(ids, rt.engine.score(ids, req.logprobs_k)))[added:]
        out.append(Echo(text, scored))
    return out


# --- responses -------------------------------------------------------------------------------------------------------
def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def chat_logprobs(text: TokenText | None, reasoning: list, content: list) -> dict | None:
    """A chat choice's `logprobs` (None unless asked for): the answer's tokens in `content`, as OpenAI has it, and the
    reasoning's apart in `reasoning_content`."""
    if text is None:
        return None
    return {"content": chat_entries(text, content), "reasoning_content": chat_entries(text, reasoning), "refusal": None}


def _chat_deltas(event, text: TokenText | None) -> list[tuple[dict, dict | None]]:
    """(delta, logprobs) of each chunk a ChoiceEvent makes: its reasoning, its answer, then its finish."""
    out = []
    if event.reasoning:
        out.append(({"reasoning_content": event.reasoning, "reasoning": event.reasoning},
                    chat_logprobs(text, event.reasoning_logprobs, [])))
    if event.content:
        out.append(({"content": event.content}, chat_logprobs(text, [], event.content_logprobs)))
    if event.finish_reason:  # with the entries of tokens that made no text (rarely any)
        out.append(({}, chat_logprobs(text, event.reasoning_logprobs, event.content_logprobs)))
    return out


async def stream_chat(gen: Generation, head: dict, include_usage: bool, text: TokenText | None):
    """SSE chunks: a role chunk per choice, reasoning deltas, answer deltas, a finish chunk, [usage], [DONE].
    text: turns token ids into the chunks' logprobs (None: not asked for)."""
    usage = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, logprobs: dict | None = None, finish: str | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse({**head, "object": "chat.completion.chunk", "choices": [choice], **usage})

    try:
        for i in range(len(gen.jobs)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for ev in gen.events():
            for delta, logprobs in _chat_deltas(ev, text):
                yield chunk(ev.index, delta, logprobs, ev.finish_reason if not delta else None)
        if include_usage:
            yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": gen.usage()})
    except GenerationError as e:
        yield sse(error_body(str(e), type="server_error"))
    finally:
        gen.cancel()
    yield "data: [DONE]\n\n"


def echoed_logprobs(lp: CompletionLogprobs, echoed: list, generated: list) -> dict:
    """One choice's logprobs object: its echoed prompt's entries, then its completion's."""
    a, b = lp.add(echoed), lp.add(generated, generated=True)
    return {k: a[k] + b[k] for k in a}


async def stream_completion(gen: Generation, head: dict, include_usage: bool, echo: list[Echo],
                            logprobs: list[CompletionLogprobs] | None):
    """SSE chunks: each choice's echoed prompt (with echo), its text deltas, a finish chunk, [usage], [DONE].
    logprobs: one builder per choice (None: not asked for)."""
    usage = {"usage": None} if include_usage else {}

    def chunk(index: int, text: str, entries: list, finish: str | None = None, generated: bool = True) -> str:
        lp = None if logprobs is None else logprobs[index].add(entries, generated)
        choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}
        return sse({**head, "object": "text_completion", "choices": [choice], **usage})

    try:
        for i, e in enumerate(echo):
            if e.text:
                yield chunk(i, e.text, e.entries, generated=False)
        async for ev in gen.events():
            if ev.finish_reason:  # with the entries of tokens that made no text (rarely any)
                yield chunk(ev.index, "", ev.content_logprobs, ev.finish_reason)
            else:
                yield chunk(ev.index, ev.reasoning + ev.content, ev.content_logprobs)
        if include_usage:
            yield sse({**head, "object": "text_completion", "choices": [], "usage": gen.usage()})
    except GenerationError as e:
        yield sse(error_body(str(e), type="server_error"))
    finally:
        gen.cancel()
    yield "data: [DONE]\n\n"


async def _client_gone(request: Request) -> None:
    """Returns when the client closes the connection (the request body is read, so the next ASGI message is the
    disconnect: the server learns of it at once, as Starlette's streaming responses do)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(gen: Generation, request: Request):
    """All choices of a non-streamed request; gives up (freeing the slots) as soon as the client goes away."""
    task = asyncio.ensure_future(gen.collect())
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            raise ApiError(499, "the client closed the connection", code="client_closed_request")
        return task.result()
    except GenerationError as e:
        raise ApiError(500, str(e), type="server_error") from None
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()  # its generator's cleanup cancels the engine requests


def _event_stream(body) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --- the app ---------------------------------------------------------------------------------------------------------
def create_app(rt: Runtime, *, model_name: str, api_key: str | None = None, history=None,
               history_token: str | None = None, restrict_host: bool = True) -> FastAPI:
    """The FastAPI app over a loaded runtime. `history`: a HistoryStore for the web chat (None: in memory).
    Without an api_key the history endpoints need `history_token` (None: a fresh one, in app.state.history_token)."""
    from .history import HistoryStore
    from .webui import add_web_routes

    worker = EngineWorker(rt.engine)
    history = history if history is not None else HistoryStore(":memory:")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            history.close()

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.add_middleware(BrowserGuard, loopback_only=restrict_host)
    app.add_middleware(BodyLimit)
    auth = [Depends(bearer_checker(api_key))]
    app.state.history_token = None if api_key else (history_token or new_token())
    history_auth = auth if api_key else [Depends(bearer_checker(app.state.history_token, TOKEN_HINT))]
    created = int(time.time())
    token_text = TokenText(rt.tokenizer)  # token id -> text and bytes, for log-probabilities

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def head(prefix: str) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

    @app.get("/health")
    async def health():  # public: with an API key set, it names no model (the default name is the model's path)
        return {"status": "ok", **({} if api_key else {"model": model_name}), **worker.counts()}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=auth)
    async def model(name: str):
        check_model(name)
        return model_card()

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "nanoseek",
                "root": str(rt.model_dir), "max_model_len": rt.max_model_len}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(req: ChatRequest, request: Request):
        check_model(req.model)
        prompt = await run_in_threadpool(chat_prompt, rt, req)  # a long prompt's tokenizing must not stall streams
        max_tokens, param = ((req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens
                             else (req.max_tokens, "max_tokens"))
        params = sampling_params(rt, req, len(prompt), max_tokens=max_tokens, max_tokens_param=param,
                                 prompt_param="messages", n=req.n)
        gen = Generation(rt, worker, [prompt] * req.n, params, prompt_tokens=len(prompt), split=True,
                         stop=req.stop_list, budget=req.thinking_token_budget)
        h = head("chatcmpl")
        text = token_text if req.logprobs_k is not None else None
        if req.stream:
            return _event_stream(stream_chat(gen, h, req.include_usage, text))
        choices = await _collect(gen, request)
        return {**h, "object": "chat.completion", "usage": gen.usage(), "choices": [
            {"index": c.index, "logprobs": chat_logprobs(text, c.reasoning_logprobs, c.content_logprobs),
             "finish_reason": c.finish_reason,
             "message": {"role": "assistant", "content": c.content, "reasoning_content": c.reasoning,
                         "reasoning": c.reasoning}}
            for c in choices]}

    @app.post("/v1/completions", dependencies=auth)
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        prompts = await run_in_threadpool(completion_prompts, rt, req.prompt)
        if len(prompts) * req.n > MAX_CHOICES:
            raise ApiError(400, f"at most {MAX_CHOICES} completions per request (prompts × n)", param="n")
        if req.max_tokens == 0:  # scoring only (echo): the prompts and their log-probabilities, nothing generated
            return await score_prompts(req, prompts)
        all_prompts, all_params = [], []
        for p in prompts:
            max_tokens = req.max_tokens
            if "max_tokens" not in req.model_fields_set or max_tokens is None:
                max_tokens = max(1, min(16, rt.max_model_len - len(p)))
            all_params += sampling_params(rt, req, len(p), max_tokens=max_tokens, max_tokens_param="max_tokens",
                                          prompt_param="prompt", n=req.n)
            all_prompts += [p] * req.n
        echo = [e for e in await run_in_threadpool(echoes, rt, req, prompts) for _ in range(req.n)]
        gen = Generation(rt, worker, all_prompts, all_params, prompt_tokens=sum(map(len, prompts)), split=False,
                         stop=req.stop_list)
        h = head("cmpl")
        logprobs = None if req.logprobs_k is None else [CompletionLogprobs(token_text) for _ in all_prompts]
        if req.stream:
            return _event_stream(stream_completion(gen, h, req.include_usage, echo, logprobs))
        choices = await _collect(gen, request)
        return {**h, "object": "text_completion", "usage": gen.usage(), "choices": [
            {"index": c.index, "text": echo[c.index].text + c.content, "finish_reason": c.finish_reason,
             "logprobs": None if logprobs is None else
             echoed_logprobs(logprobs[c.index], echo[c.index].entries, c.content_logprobs)}
            for c in choices]}

    async def score_prompts(req: CompletionRequest, prompts: list[list[int]]):
        """`max_tokens: 0` with `echo` (how HELM and older harnesses score a text): each prompt as a choice."""
        if not req.echo:
            raise ApiError(400, "max_tokens 0 generates nothing: it is for scoring a prompt, with echo: true",
                           param="max_tokens")
        for p in prompts:
            if len(p) > rt.max_model_len:
                raise ApiError(400, f"the prompt has {len(p)} tokens but this server's context is {rt.max_model_len}",
                               param="prompt", code="context_length_exceeded")
        echo = [e for e in await run_in_threadpool(echoes, rt, req, prompts) for _ in range(req.n)]
        choices = [{"index": i, "text": e.text, "finish_reason": "length",
                    "logprobs": None if req.logprobs_k is None else CompletionLogprobs(token_text).add(e.entries)}
                   for i, e in enumerate(echo)]
        used = usage(sum(map(len, prompts)))
        h = {**head("cmpl"), "object": "text_completion"}
        if not req.stream:
            return {**h, "usage": used, "choices": choices}

        async def chunks():
            for c in choices:
                yield sse({**h, "choices": [c], **({"usage": None} if req.include_usage else {})})
            if req.include_usage:
                yield sse({**h, "choices": [], "usage": used})
            yield "data: [DONE]\n\n"

        return _event_stream(chunks())

    add_web_routes(app, history, history_auth)
    return app


# --- CLI -------------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..cli import UserError
    from .history import HistoryError, HistoryStore, default_path
    from .runtime import load_runtime

    if not 0 <= args.port < 65536:
        raise UserError("--port must be in 0..65535")
    if args.api_key:  # argv is public: /proc/PID/cmdline, unlike the environment, is readable by every user
        print("warning: other users of this machine can read --api-key with `ps`; set NANOSEEK_API_KEY instead",
              file=sys.stderr, flush=True)
    api_key = args.api_key or os.environ.get("NANOSEEK_API_KEY") or None
    try:  # before the model loads (and compiles): a wrong --history is told at once
        history = HistoryStore(args.history or default_path())
        token = None if api_key else history_token(history.path)
    except HistoryError as e:
        raise UserError(f"--history {e}") from None
    socks = bind(args.host, args.port)  # a port in use is told before the model loads, not after
    with contextlib.ExitStack() as opened:  # closed however the rest ends
        for sock in socks:
            opened.enter_context(sock)
        rt = load_runtime(args.model, device=args.device, max_model_len=args.max_model_len,
                          max_batch_size=args.max_batch_size, compile=args.compile, dtype=args.dtype)
        name = args.served_model_name or args.model
        app = create_app(rt, model_name=name, api_key=api_key, history=history, history_token=token,
                         restrict_host=is_loopback(args.host))
        shown = f"[{args.host}]" if ":" in args.host else args.host or "0.0.0.0"
        url = f"http://{shown}:{socks[0].getsockname()[1]}"  # (--port 0: the one the system chose)
        print(f"nanoseek: serving {name!r} on {rt.engine.device} (context {rt.max_model_len} tokens)\n"
              f"  web chat: {url}/" + (f"#token={token}" if token else "") + f"\n  API:      {url}/v1" +
              ("  (API key required)" if api_key else "  (no API key: open to all who can connect)") +
              "\n  (Ctrl-C to stop)", flush=True)
        if not is_loopback(args.host) and not api_key:
            print("warning: listening beyond this machine without --api-key", file=sys.stderr, flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)).run(sockets=socks)
    return 0


def bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address `host` names (localhost: 127.0.0.1 and ::1, as uvicorn binds them, skipping
    one whose family the machine has off), on one port (--port 0: the one the system picks for the first);
    UserError if none can be had. uvicorn makes them listen once the model is ready, so until then a client is
    refused rather than kept waiting. As with uvicorn, "::" is IPv6 only and "0.0.0.0" IPv4."""
    from ..cli import UserError

    socks: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart need not wait
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((address[0], socks[0].getsockname()[1] if socks else port, *address[2:]))
            except OSError as e:
                sock.close()
                if e.errno == errno.EADDRNOTAVAIL and len(infos) > 1:  # e.g. ::1 where IPv6 is off (asyncio too)
                    continue
                raise
            socks.append(sock)
        if not socks:
            raise OSError(errno.EADDRNOTAVAIL, "no address of it can be bound")
    except OSError as e:
        for sock in socks:
            sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --port or --host)"
                        ) from None
    return socks


def main(argv: list[str] | None = None) -> int:
    """`python -m nanoseek.serve ...`: the same as `nanoseek serve ...`."""
    from .. import cli
    from ..cli import _user_errors

    parser = argparse.ArgumentParser(prog="nanoseek serve", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = cli.parse(parser, argv)
    try:
        return run(args) or 0
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
