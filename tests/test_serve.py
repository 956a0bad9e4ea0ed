"""`nanoseek serve` end to end: a real server process on a loopback port over a tiny random model, driven with the
official `openai` client (and httpx for raw HTTP): models, chat (streamed and not, same greedy text), usage, the
reasoning split and thinking budget, errors as 4xx JSON, the API key, concurrent streams, a client that disconnects
mid-stream, plain completions, the history endpoints; plus the incremental decoder.

The model's lm_head rows for the special tokens (bos, eos, <think>, </think>, User, Assistant) are zeroed and the
others scaled up, so with random weights it never emits them by itself, greedy or sampled (some other token always
has a logit far above 0): completions run to max_tokens, the template's `<think>\\n` prefill puts them in the
reasoning, and `</think>` comes only when the thinking budget forces it: the reasoning split is deterministic
without any test hook in the server.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

API_KEY = "test-key-123"
MODEL_NAME = "tiny-r1"
MAX_LEN = 256
ROOT = Path(__file__).resolve().parents[1]


# --- helpers shared with test_webchat.py -----------------------------------------------------------------------------
def tiny_texts(n: int = 300) -> list[str]:
    words = ["the", "cat", "sat", "on", "a", "mat", "two", "plus", "three", "is", "five", "why", "answer", "think",
             "héllo", "wörld", "naïve", "日本", "語", "数学", "🙂"]
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(5 + i % 9)) + f" {i}." for i in range(n)]


def build_model_dir(d: Path) -> Path:
    """A cpu-tiny model + trained tokenizer; special tokens' lm_head rows zeroed (see the module docstring)."""
    import torch

    import nanoseek
    from nanoseek.tokenizer import train_tokenizer

    tok = train_tokenizer(tiny_texts(), vocab_size=400)
    cfg = nanoseek.get_preset("cpu-tiny").replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                                  eos_token_id=tok.eos_id, max_position_embeddings=512)
    torch.manual_seed(0)
    model = nanoseek.build_model(cfg)
    special = [tok.token_id(s) for s in ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>",
                                         "<｜Assistant｜>", "<think>", "</think>")]
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)  # logits of std ~20: the best ordinary token far above 0, even when sampling
        model.lm_head.weight[special] = 0.0
    nanoseek.save_model(model, d)
    tok.save(d)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def verb_command(verb: str, module: str) -> list[str]:
    """`python -m nanoseek VERB` once the verb is registered in nanoseek.cli, else `python -m MODULE`."""
    from nanoseek.cli import VERBS

    return [sys.executable, "-m", "nanoseek", verb] if verb in VERBS else [sys.executable, "-m", module]


class ServerProcess:
    """`nanoseek serve` in a subprocess on a free loopback port; `stop()` ends it. Decoding eagerly (`--no-compile`,
    quick to start) unless compile=True, which leaves the CLI's default: compiling the decode step at start-up. env:
    variables to set (NANOSEEK_API_KEY is not passed on otherwise)."""

    def __init__(self, model_dir: Path, log_path: Path, *extra: str, history: Path | None = None,
                 compile: bool = False, env: dict | None = None):
        self.port, self.model_dir = free_port(), model_dir
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = verb_command("serve", "nanoseek.serve") + [
            "--model", str(model_dir), "--port", str(self.port), "--device", "cpu",
            "--history", str(history or log_path.with_suffix(".sqlite3")), "--log-level", "warning", *extra,
            *([] if compile else ["--no-compile"])]
        inherited = {k: v for k, v in os.environ.items() if k != "NANOSEEK_API_KEY"}  # a key only where asked for
        env = {**inherited, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        self.wait_healthy(600 if compile else 60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{self.log()}")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# --- fixtures --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("tiny-r1"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("serve") / "server.log", "--served-model-name", MODEL_NAME,
                        "--max-model-len", str(MAX_LEN), "--max-batch-size", "4", env={"NANOSEEK_API_KEY": API_KEY})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def auth() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


def ask(client, content="hi there", **kw):
    kw.setdefault("max_tokens", 24)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": content}], **kw)


def collect_stream(stream):
    """-> (role, reasoning, content, finish_reasons by index, usage, chunks)."""
    role, reasoning, content, finish, usage, chunks = None, "", "", {}, None, []
    for chunk in stream:
        chunks.append(chunk)
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            d = c.delta
            role = role or d.role
            r = getattr(d, "reasoning_content", None)
            if r:
                assert getattr(d, "reasoning", None) == r
                assert not content, "reasoning after the answer started"
                reasoning += r
            content += d.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return role, reasoning, content, finish, usage, chunks


# --- the API ---------------------------------------------------------------------------------------------------------
def test_health_is_public_and_models_listed(server, client):
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and "model" not in health  # this server has an API key: the model is not public
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_text_parts_are_joined_as_vllm_joins_them(client):
    parts = ask(client, [{"type": "text", "text": "What is"}, {"type": "text", "text": "2 + 2?"}])
    joined = ask(client, "What is\n2 + 2?")
    assert parts.usage.prompt_tokens == joined.usage.prompt_tokens
    assert parts.choices[0].message.reasoning_content == joined.choices[0].message.reasoning_content


def test_chat_streamed_equals_non_streamed_greedy(client):
    full = ask(client, max_tokens=30)
    choice = full.choices[0]
    assert choice.finish_reason == "length" and full.usage.completion_tokens == 30
    assert full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + 30
    # the template prefilled <think>, the model never closes it: everything is reasoning, and no answer (null) came
    assert choice.message.reasoning_content and choice.message.reasoning == choice.message.reasoning_content
    assert choice.message.content is None
    assert full.usage.completion_tokens_details.reasoning_tokens == 30
    role, reasoning, content, finish, usage, chunks = collect_stream(
        ask(client, max_tokens=30, stream=True, stream_options={"include_usage": True}))
    assert role == "assistant"
    assert (reasoning, content) == (choice.message.reasoning_content, "")
    assert finish == {0: "length"}
    assert chunks[-1].choices == [] and usage.completion_tokens == 30
    assert usage.prompt_tokens == full.usage.prompt_tokens
    assert usage.completion_tokens_details.reasoning_tokens == 30


def test_thinking_budget_forces_end_of_reasoning(client):
    budget = 7
    full = ask(client, max_tokens=30, extra_body={"thinking_token_budget": budget})
    msg = full.choices[0].message
    n = full.usage.completion_tokens_details.reasoning_tokens
    assert msg.reasoning_content == msg.reasoning and msg.reasoning_content
    # the budget, and more only to finish a character (this random model writes byte tokens that end inside one)
    assert n == budget or budget < n <= budget + 3 and tokens_end_inside_a_character(client, budget)
    assert not msg.reasoning_content.endswith("\ufffd")
    assert msg.content and "</think>" not in msg.content and "<think>" not in msg.content
    assert not msg.content[0].isspace()  # the forced "\n\n" after </think> is not part of the answer
    ungated = ask(client, max_tokens=n)  # the same greedy reasoning, cut by length instead
    assert ungated.choices[0].message.reasoning_content == msg.reasoning_content
    # streamed: reasoning deltas first, then content, same text
    _, reasoning, content, finish, _, _ = collect_stream(
        ask(client, max_tokens=30, stream=True, extra_body={"thinking_token_budget": budget}))
    assert (reasoning, content) == (msg.reasoning_content, msg.content) and finish == {0: "length"}
    # budget 0: the answer starts at once
    zero = ask(client, max_tokens=10, extra_body={"thinking_token_budget": 0})
    assert zero.choices[0].message.reasoning_content == ""
    assert zero.usage.completion_tokens_details.reasoning_tokens == 0
    # budget 1: exactly one reasoning token, even though it is the first token the engine emits
    one = ask(client, max_tokens=10, extra_body={"thinking_token_budget": 1})
    n = one.usage.completion_tokens_details.reasoning_tokens
    assert n == 1 or 1 < n <= 4 and tokens_end_inside_a_character(client, 1)


def tokens_end_inside_a_character(client, n: int) -> bool:
    """Whether the first n greedy reasoning tokens of `ask`'s prompt end inside a multi-byte character."""
    return ask(client, max_tokens=n).choices[0].message.reasoning_content.endswith("\ufffd")


def test_stop_strings_cut_the_answer(server, client):
    msg = ask(client, max_tokens=40, extra_body={"thinking_token_budget": 2}).choices[0].message
    assert len(msg.content) > 4
    stop = msg.content[2:4]
    before = server.health()
    sixteen = [stop] + [f"never-appears-{i}" for i in range(15)]  # the most a request may send
    cut = ask(client, max_tokens=40, stop=sixteen, extra_body={"thinking_token_budget": 2})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == msg.content[: msg.content.find(stop)]
    _, _, content, finish, _, _ = collect_stream(
        ask(client, max_tokens=40, stop=stop, stream=True, extra_body={"thinking_token_budget": 2}))
    assert content == cut.choices[0].message.content and finish == {0: "stop"}
    deadline = time.monotonic() + 10  # the engine frees a stopped request's slot between its steps
    while (h := server.health())["finished"] < before["finished"] + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (h["finished"], h["cancelled"]) == (before["finished"] + 2, before["cancelled"])  # not client cancels


def test_n_and_seed(client):
    a = ask(client, n=3, temperature=1.0, seed=11, max_tokens=12)
    b = ask(client, n=3, temperature=1.0, seed=11, max_tokens=12)
    texts = [c.message.reasoning_content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.reasoning_content for c in b.choices]  # seeded
    assert len(set(texts)) > 1  # seed + i per choice
    assert a.usage.completion_tokens == 36
    _, _, _, finish, _, _ = collect_stream(ask(client, n=2, max_tokens=5, stream=True))
    assert finish == {0: "length", 1: "length"}


def test_plain_completions(client):
    r = client.completions.create(model=MODEL_NAME, prompt="the cat sat", max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8 and r.choices[0].text
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL_NAME, prompt="the cat sat", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert text == r.choices[0].text
    two = client.completions.create(model=MODEL_NAME, prompt=["a", "b"], max_tokens=3, temperature=0)
    assert len(two.choices) == 2


# --- errors ----------------------------------------------------------------------------------------------------------
def post(server, body, path="/v1/chat/completions", headers=None, **kw):
    kw.setdefault("timeout", 30)
    return httpx.post(server.url + path, headers={**auth(), **(headers or {})},
                      **({"json": body} if isinstance(body, dict) else {"content": body}), **kw)


def assert_error(r, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert param is None or err["param"] == param, err
    return err


@pytest.mark.parametrize("body, param", [
    ('{"messages": [', None),  # malformed JSON
    ("[1, 2]", None),  # not an object
    ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**12}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10_000}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, "messages"),  # longer than the context
    ('{"messages": [{"role": "user", "content": "a \\ud83d b"}]}', "messages.0.content"),  # a lone surrogate
    ('{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\udc00"]}', "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["x"] * 17}, "stop"),  # each is looked for per token
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": True}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"}, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f"}]}, "functions"),
    ({"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1.3}, "repetition_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "min_tokens": 30}, "min_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}, "ignore_eos"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The", "prefix": True}]},
     "messages.1.prefix"),  # DeepSeek's prefix completion
    ({"messages": [{"role": "user", "content": "hi"}], "continue_final_message": True}, "continue_final_message"),
    ({"messages": [{"role": "user", "content": [{"text": "a part without its type"}]}]}, "messages.0.content.0.type"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["ok", 1]}, "stop.1"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"thinking": "false"}},
     "chat_template_kwargs.thinking"),  # a string "false" would have turned thinking on
])
def test_bad_chat_requests_are_4xx(server, body, param):
    assert_error(post(server, body, headers={"Content-Type": "application/json"}), 400, param)


def test_other_errors(server):
    err = assert_error(post(server, {"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}), 404, "model")
    assert err["code"] == "model_not_found"
    assert_error(post(server, {"prompt": "x" * 2000}, path="/v1/completions"), 400, "prompt")
    assert_error(post(server, {"prompt": [10**9]}, path="/v1/completions"), 400, "prompt")
    assert_error(post(server, {"prompt": []}, path="/v1/completions"), 400, "prompt")
    assert_error(httpx.get(server.url + "/v1/nothing-here", headers=auth()), 404)
    assert_error(httpx.get(server.url + "/health", headers={"Host": "evil.example"}), 400)  # DNS-rebinding guard
    ok = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "frobnicate": [1],
                       "messages_extra": {}, "model": MODEL_NAME})
    assert ok.status_code == 200, ok.text  # unknown fields are ignored
    ok = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": None, "stream": None})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1  # null: "not given", as OpenAI's SDK sends it
    ok = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": False,
                       "frequency_penalty": 0, "presence_penalty": 0.0, "response_format": {"type": "text"},
                       "tools": [], "tool_choice": "none", "repetition_penalty": 1.0, "min_p": 0,
                       "add_generation_prompt": True})
    assert ok.status_code == 200, ok.text  # the unsupported parameters at their "off" values are fine
    err = assert_error(post(server, {"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1}), 400)
    assert err["message"] == "presence_penalty: presence_penalty is not supported by this server"
    assert "empty" in assert_error(post(server, "", headers={"Content-Type": "application/json"}), 400)["message"]
    assert_error(post(server, {"prompt": "a", "suffix": " END"}, path="/v1/completions"), 400, "suffix")
    err = assert_error(post(server, {"prompt": [1, "x"]}, path="/v1/completions"), 400, "prompt.1")
    assert "integer" in err["message"]  # the token ids' item that is not one, not item 0 read as a list of strings
    for off in ({"response_format": {"type": "text", "strict": False}}, {"logit_bias": []}, {"ignore_eos": False}):
        r = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **off})
        assert r.status_code == 200, off
    assert_error(post(server, {"messages": [{"role": "user", "content": "hi"}], "best_of": True}), 400, "best_of")
    assert_error(post(server, {"prompt": "a", "logprobs": 21}, path="/v1/completions"), 400, "logprobs")
    assert_error(post(server, '{"prompt": ["ok", "a \\udc00"]}', path="/v1/completions",
                      headers={"Content-Type": "application/json"}), 400, "prompt")
    from nanoseek.serve.errors import MAX_BODY_BYTES

    huge = post(server, b'{"prompt": "' + b"x" * MAX_BODY_BYTES + b'"}', path="/v1/completions",
                headers={"Content-Type": "application/json"})
    assert assert_error(huge, 413)["code"] == "request_too_large"

    def chunked(data: bytes, size=1 << 20):  # httpx sends an iterator with Transfer-Encoding: chunked, no length
        return iter([data[i:i + size] for i in range(0, len(data), size)])

    hdr = {"Content-Type": "application/json"}
    huge = post(server, chunked(b'{"prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'), path="/v1/completions", headers=hdr)
    assert assert_error(huge, 413)["code"] == "request_too_large"
    ok = post(server, chunked(json.dumps({"prompt": "a b", "max_tokens": 2}).encode(), 4), path="/v1/completions",
              headers=hdr)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2, ok.text
    # far past the context in characters: refused by its length, before tokenizing (which would take seconds)
    for body, param in (({"prompt": "1 + 2 = 3. " * 100_000}, "prompt"),
                        ({"messages": [{"role": "user", "content": "1 + 2 = 3. " * 100_000}]}, "messages")):
        r = post(server, body, path="/v1/completions" if "prompt" in body else "/v1/chat/completions")
        err = assert_error(r, 400, param)
        assert err["code"] == "context_length_exceeded" and " characters, far more" in err["message"]


def test_api_key(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers)
        assert assert_error(r, 401)["code"] == "invalid_api_key"
        assert_error(httpx.get(server.url + "/v1/models", headers=headers), 401)
        assert_error(httpx.get(server.url + "/api/conversations", headers=headers), 401)
    assert httpx.post(server.url + "/v1/chat/completions", json=body, headers=auth()).status_code == 200
    assert httpx.get(server.url + "/").status_code == 200  # the page itself is public; its API calls are not
    assert "`ps`" not in server.log() and "#token=" not in server.log()  # a key from the environment: no token
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_cross_site_writes_are_refused(server):
    """Any page can make a browser post here (no CORS preflight): writes from another origin are refused; reads, the
    page's own posts (behind a proxy that rewrites Host too) and clients without Origin pass."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": "http://localhost:3000", "Sec-Fetch-Site": "same-site"}):
        assert_error(post(server, body, headers=headers), 403)
        assert_error(httpx.delete(server.url + "/api/conversations/x", headers={**auth(), **headers}), 403)
        assert httpx.get(server.url + "/v1/models", headers={**auth(), **headers}).status_code == 200
    for headers in ({"Origin": server.url}, {"Origin": "https://chat.example", "Sec-Fetch-Site": "same-origin"}):
        assert post(server, body, headers=headers).status_code == 200
    assert_error(post(server, json.dumps(body)), 400)  # no Content-Type: not taken as JSON


def test_without_an_api_key_the_history_needs_the_printed_token(model_dir, tmp_path, capsys):
    """Other users reach a loopback port too: /v1 stays open (it stores nothing), the history needs the token in the
    printed address, kept 0600 beside it for the next start. A key on the command line (`ps` shows it) is warned of."""
    from nanoseek.serve.access import history_token
    from nanoseek.serve.app import main

    srv = ServerProcess(model_dir, tmp_path / "server.log")
    try:
        token_file = tmp_path / "server.sqlite3.token"
        token = token_file.read_text().strip()
        assert f"web chat: {srv.url}/#token={token}\n" in srv.log() and oct(token_file.stat().st_mode) == "0o100600"
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            assert "#token=" in assert_error(httpx.get(srv.url + "/api/conversations", headers=headers), 401)["message"]
        ok = httpx.post(srv.url + "/api/conversations", json={}, headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 201 and httpx.get(srv.url + "/v1/models").status_code == 200
    finally:
        srv.stop()
    memory = history_token(Path(":memory:"))  # in memory: a fresh one each start
    assert history_token(tmp_path / "server.sqlite3") == token and history_token(Path(":memory:")) != memory
    assert main(["--model", str(tmp_path / "none"), "--api-key", "k", "--history", str(tmp_path / "h.sqlite3")]) == 1
    assert "other users of this machine can read --api-key with `ps`" in capsys.readouterr().err


# --- load and disconnects --------------------------------------------------------------------------------------------
def test_concurrent_streams_all_finish(client, server):
    results, errors = {}, []

    def one(i):
        try:
            stream = ask(client, f"client {i}", max_tokens=10 + i, temperature=0.8, seed=i, stream=True,
                         stream_options={"include_usage": True})
            results[i] = collect_stream(stream)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 12
    for i, (_, _, _, finish, usage, _) in results.items():
        assert finish == {0: "length"} and usage.completion_tokens == 10 + i
    assert server.health()["running"] == 0


@pytest.mark.skipif(not shutil.which("c++"), reason="torch.compile on the CPU needs a C++ compiler")
def test_default_server_compiles_its_decode_step(model_dir, server, client, tmp_path):
    """Without --no-compile, `nanoseek serve` on the CPU compiles the decode step before it listens; its greedy
    answers equal the eager server's, also for concurrent requests of different lengths decoded as one batch."""
    compiled = ServerProcess(model_dir, tmp_path / "server.log", "--api-key", API_KEY, "--served-model-name",
                             MODEL_NAME, "--max-model-len", str(MAX_LEN), "--max-batch-size", "4", compile=True)
    try:
        assert "compiling the decode step" in compiled.log() and "failed" not in compiled.log()
        fast = openai.OpenAI(base_url=compiled.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
        for content in ("hi there", "a longer question about the weather"):
            assert ask(fast, content, max_tokens=40).choices[0].message == \
                ask(client, content, max_tokens=40).choices[0].message
        lengths = [5 + 3 * i for i in range(6)]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:  # one batch, its rows finishing at different steps
            answers = list(pool.map(lambda i: ask(fast, f"client {i}", max_tokens=lengths[i]), range(6)))
        assert [a.usage.completion_tokens for a in answers] == lengths
        assert [a.choices[0].message for a in answers] == \
            [ask(client, f"client {i}", max_tokens=lengths[i]).choices[0].message for i in range(6)]
    finally:
        compiled.stop()


def wait_idle(server, cancelled_before: int, timeout: float = 10) -> dict:
    """/health once a request was cancelled after `cancelled_before` and nothing runs (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        h = server.health()
        if (h["cancelled"] > cancelled_before and h["running"] == 0 and h["waiting"] == 0) or \
                time.monotonic() > deadline:
            return h
        time.sleep(0.05)


def test_disconnect_mid_stream_frees_the_slot(server, client):
    before = server.health()["cancelled"]
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "long"}], "max_tokens": 200,
            "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=auth(), timeout=30) as r:
        assert r.status_code == 200
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got >= 5:
                break
    h = wait_idle(server, before)
    assert h["cancelled"] > before and h["running"] == 0, h
    assert ask(client, max_tokens=3).choices[0].finish_reason == "length"  # still serving


def test_disconnect_before_a_non_streamed_answer_frees_the_slot(server, client):
    before = server.health()["cancelled"]
    # 4 × 230 tokens take ~0.3 s on the eager decode path of a fast 2-core VM (0.2 s for one choice); give up at
    # 0.05 s: the server must notice at once, not at its next look
    body = {"messages": [{"role": "user", "content": "long"}], "max_tokens": 230, "temperature": 0, "n": 4}
    with pytest.raises(httpx.ReadTimeout):
        post(server, body, timeout=httpx.Timeout(10, read=0.05))
    assert wait_idle(server, before)["cancelled"] > before
    assert ask(client, max_tokens=3).choices[0].finish_reason == "length"


# --- history endpoints -----------------------------------------------------------------------------------------------
def test_history_endpoints(server):
    h = auth()
    conv = httpx.post(server.url + "/api/conversations", json={"title": "first"}, headers=h).json()
    r = httpx.post(f"{server.url}/api/conversations/{conv['id']}/messages", headers=h,
                   json={"role": "user", "content": "hello"})
    assert r.status_code == 201
    assert_error(httpx.post(f"{server.url}/api/conversations/{conv['id']}/messages", content='{"role": "user", '
                            '"content": "a \\ud83d"}', headers={**h, "Content-Type": "application/json"}), 400)
    for finish, code in (("cut", 400), ("stopped", 201)):  # how the web chat's answer ended: stopped, or length
        assert httpx.post(f"{server.url}/api/conversations/{conv['id']}/messages", headers=h, json={
            "role": "assistant", "content": "hi!", "reasoning": "greet back", "finish": finish}).status_code == code
    got = httpx.get(f"{server.url}/api/conversations/{conv['id']}", headers=h).json()
    assert [(m["role"], m["content"], m["reasoning"], m["finish"]) for m in got["messages"]] == [
        ("user", "hello", None, None), ("assistant", "hi!", "greet back", "stopped")]
    assert conv["id"] in [c["id"] for c in httpx.get(server.url + "/api/conversations", headers=h).json()["data"]]
    for title, stored in (("renamed", "renamed"), ("  padded ", "padded"), ("   ", "New chat")):
        r = httpx.patch(f"{server.url}/api/conversations/{conv['id']}", json={"title": title}, headers=h)
        assert r.status_code == 200 and r.json()["title"] == stored  # what is stored, not what was sent
        assert httpx.get(f"{server.url}/api/conversations/{conv['id']}", headers=h).json()["title"] == stored
    assert httpx.delete(f"{server.url}/api/conversations/{conv['id']}", headers=h).status_code == 200
    assert_error(httpx.get(f"{server.url}/api/conversations/{conv['id']}", headers=h), 404)
    assert_error(httpx.post(f"{server.url}/api/conversations/nope/messages", json={"role": "user"}, headers=h), 404)


# --- the decoder, in process -----------------------------------------------------------------------------------------
def test_incremental_decoder_splits_and_never_breaks_utf8(model_dir):
    from nanoseek.serve.reasoning import CompletionDecoder, starts_in_reasoning
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    reasoning_ids = tok.encode("héllo 日本語 🚀Ωж think")
    answer_ids = tok.encode("\n\nthe 🙂 answer is five")
    # byte-level pieces of multi-byte characters: some tokens decode to U+FFFD on their own
    assert any("\ufffd" in tok.decode([t]) for t in reasoning_ids)
    cases = {  # model emits <think> itself, and the newline the prefill has / template prefilled "<think>\n"
        False: [tok.think_id, *tok.encode("\n"), *reasoning_ids, tok.end_think_id, *answer_ids, tok.eos_id],
        True: [*reasoning_ids, tok.end_think_id, *answer_ids, tok.eos_id],
    }
    for prefilled, ids in cases.items():
        prompt = tok.apply_chat_template([{"role": "user", "content": "q"}], thinking=prefilled)
        assert starts_in_reasoning(prompt, tok) == prefilled
        typed = tok.apply_chat_template([{"role": "user", "content": "q <think>"}], thinking=prefilled)
        assert starts_in_reasoning(typed, tok) == prefilled  # a tag the user typed opens nothing
        dec = CompletionDecoder(tok, in_reasoning=prefilled, end_ids=[tok.eos_id])
        deltas = [dec.feed(t) for t in ids] + [dec.finish()]
        assert all("\ufffd" not in d.reasoning + d.content for d in deltas)
        assert "".join(d.reasoning for d in deltas) == dec.reasoning_text == "héllo 日本語 🚀Ωж think"
        assert "".join(d.content for d in deltas) == dec.content_text == "the 🙂 answer is five"
        assert dec.reasoning_tokens == ids.index(tok.end_think_id) - (not prefilled) and dec.num_tokens == len(ids)
    # stop strings: cut where they begin, never leak a prefix of one, even across tokens
    dec = CompletionDecoder(tok, split=False, stop=["answer"])
    out = "".join(dec.feed(t).content for t in tok.encode("the 🙂 ans ans answer is five"))
    assert dec.stopped and out + dec.finish().content == "the 🙂 ans ans "
