"""Log-probabilities through `nanoseek serve` (a server process on loopback, as in test_serve.py): completions'
`logprobs` and `echo` against the model's own forward in this process, streamed and not, with stop strings and
`max_tokens: 0`; chat's answer and reasoning entries against the text they spell."""

from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")
import test_serve  # noqa: E402  (after the skip: it needs the server's dependencies)
from test_serve import (MODEL_NAME, ask, assert_error, auth, collect_stream, post,  # noqa: E402
                        tokens_end_inside_a_character)

# test_serve's module-scoped fixtures: this module gets a server of its own
model_dir, server, client = test_serve.model_dir, test_serve.server, test_serve.client


def test_completion_logprobs_and_echo_match_the_model(server, model_dir):
    """echo + logprobs on token ids (how evaluation harnesses score a continuation): every prompt and completion
    token's log-probability and top 3 equal log_softmax of the model's own forward in this process, the token texts
    and offsets agree with the returned text, and the streamed chunks add up to the same."""
    import torch

    import nanoseek
    from nanoseek.serve.logprobs import TokenText
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    text_of = TokenText(tok)
    prompt = tok.encode("the cat sat on a mat", add_bos=True)
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 5, "temperature": 0, "echo": True, "logprobs": 3}
    r = post(server, body, path="/v1/completions")
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]

    model = nanoseek.load_model(model_dir)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):  # greedy, as the server did
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        want = model(torch.tensor([ids]))[0].log_softmax(-1)  # (T, V): position j predicts token j + 1
    assert lp["tokens"] == [text_of(t)[0] for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for j in range(1, len(ids)):
        assert abs(lp["token_logprobs"][j] - want[j - 1, ids[j]].item()) < 1e-3
        top = want[j - 1].topk(3)
        assert sorted(lp["top_logprobs"][j].values()) == pytest.approx(sorted(top.values.tolist()), abs=1e-3)
        assert set(lp["top_logprobs"][j]) == {text_of(t)[0] for t in top.indices.tolist()}
    raw = b"".join(text_of(t)[1] for t in ids)
    assert choice["text"] == raw.decode("utf-8", errors="replace") == tok.decode(ids)  # prompt as read, then completion
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    for token, at in zip(lp["tokens"], offsets):  # each whole-character token is found at its offset
        assert token.startswith("bytes:") or choice["text"][at:].startswith(token)

    chunks = [json.loads(line[6:]) for line in httpx.post(
        server.url + "/v1/completions", json={**body, "stream": True}, headers=auth(), timeout=30).text.splitlines()
        if line.startswith("data: {")]
    streamed = {k: [x for c in chunks for x in c["choices"][0]["logprobs"][k]] for k in lp}
    assert streamed == lp and "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]

    plain = post(server, {**body, "echo": False}, path="/v1/completions").json()["choices"][0]
    assert plain["logprobs"]["tokens"] == lp["tokens"][len(prompt):]  # without echo: the completion's only
    assert plain["logprobs"]["text_offset"][0] == 0 and plain["text"] == choice["text"][len(tok.decode(prompt)):]
    echo_only = post(server, {**body, "logprobs": None}, path="/v1/completions").json()["choices"][0]
    assert echo_only["text"] == choice["text"] and echo_only["logprobs"] is None

    # max_tokens 0 (HELM's way): the prompt scored, nothing generated; refused without echo
    only = post(server, {**body, "max_tokens": 0}, path="/v1/completions").json()
    assert only["usage"]["completion_tokens"] == 0 and only["choices"][0]["text"] == tok.decode(prompt)
    assert {k: v[: len(prompt)] for k, v in lp.items()} == only["choices"][0]["logprobs"]
    streamed_only = [json.loads(line[6:]) for line in httpx.post(
        server.url + "/v1/completions", json={**body, "max_tokens": 0, "stream": True}, headers=auth(),
        timeout=30).text.splitlines() if line.startswith("data: {")]
    assert [c["choices"][0] for c in streamed_only] == only["choices"]
    assert_error(post(server, {**body, "max_tokens": 0, "echo": False}, path="/v1/completions"), 400, "max_tokens")

    # a text prompt is echoed as sent: the BOS the server put before it is scored against, not echoed
    text_echo = post(server, {**body, "prompt": "the cat sat on a mat"}, path="/v1/completions").json()["choices"][0]
    assert text_echo["text"] == "the cat sat on a mat" + plain["text"]
    assert text_echo["logprobs"]["tokens"] == lp["tokens"][1:]
    assert text_echo["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"][1:], abs=1e-5)
    assert text_echo["logprobs"]["text_offset"][0] == 0 and "".join(lp["tokens"][1:len(prompt)]) == "the cat sat on a mat"

    # a stop string cuts the text: the tokens kept are those that show in it (the last may hold the stop's start)
    words = [t for t in plain["logprobs"]["tokens"][1:] if t.strip() and not t.startswith("bytes:")]
    assert words, plain["logprobs"]["tokens"]
    cut = post(server, {**body, "echo": False, "stop": [words[0]]}, path="/v1/completions").json()["choices"][0]
    kept = ids[len(prompt) :][: len(cut["logprobs"]["tokens"])]
    assert cut["logprobs"]["tokens"] == [text_of(t)[0] for t in kept]
    spelled = lambda toks: b"".join(text_of(t)[1] for t in toks).decode("utf-8", errors="replace")  # noqa: E731
    assert cut["finish_reason"] == "stop" and cut["text"] == plain["text"][: plain["text"].index(words[0])]
    assert spelled(kept).startswith(cut["text"]) and len(spelled(kept[:-1])) < len(cut["text"])
    assert all(at < len(cut["text"]) for at in cut["logprobs"]["text_offset"])
    # a stop string across two tokens: the entries end with the token the stop starts in
    gen = plain["logprobs"]["tokens"]
    k = next(k for k in range(len(gen) - 1) if all(t and not t.startswith("bytes:") for t in gen[k : k + 2]))
    stop = gen[k][-1] + gen[k + 1][0]
    cut = post(server, {**body, "echo": False, "stop": [stop]}, path="/v1/completions").json()["choices"][0]
    assert cut["text"] == plain["text"][: plain["text"].index(stop)]
    kept = ids[len(prompt) :][: len(cut["logprobs"]["tokens"])]
    assert spelled(kept).startswith(cut["text"]) and len(spelled(kept[:-1])) < len(cut["text"])
    assert all(at < len(cut["text"]) for at in cut["logprobs"]["text_offset"])  # were offsets past the text's end


def test_generated_special_tokens_take_no_characters(model_dir):
    """A completion's text leaves out the special tokens it generated (<｜User｜>, BOS): their entries stay, at the
    offset where they would be, and the next token's offset is unmoved; an echoed prompt spells them out."""
    from nanoseek.serve.logprobs import CompletionLogprobs, TokenText
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    text_of = TokenText(tok)
    user = tok.hf.token_to_id("<｜User｜>")
    ids = [*tok.encode("ab"), user, *tok.encode("cd")]
    generated = CompletionLogprobs(text_of).add([(t, (-1.0, [])) for t in ids], generated=True)
    text = tok.decode(ids, skip_special_tokens=True)
    assert text == "abcd" and len(generated["tokens"]) == len(ids)
    for token, at in zip(generated["tokens"], generated["text_offset"]):
        assert at <= len(text) and (token == "<｜User｜>" or text[at:].startswith(token))
    echoed = CompletionLogprobs(text_of).add([(t, None) for t in ids])
    assert echoed["text_offset"][-1] == len(tok.decode(ids)) - len(text_of(ids[-1])[0])


def test_chat_logprobs(client):
    """Greedy chat with logprobs: the answer's entries spell message.content and the reasoning's spell
    reasoning_content (byte for byte), each chosen token is its own top-1, and a stream carries the same entries."""
    kw = dict(max_tokens=12, logprobs=True, top_logprobs=2, extra_body={"thinking_token_budget": 3})
    r = ask(client, **kw)
    msg, lp = r.choices[0].message, r.choices[0].logprobs
    reasoning = lp.model_extra["reasoning_content"]
    assert bytes(b for e in lp.content for b in e.bytes).decode(errors="replace") == msg.content and msg.content
    assert bytes(b for e in reasoning for b in e["bytes"]).decode(errors="replace") == msg.reasoning_content
    # the budget's three reasoning tokens (more only to finish a character this random model's bytes began); the
    # tags and "\n\n" have no entries
    n = len(reasoning)
    assert n == r.usage.completion_tokens_details.reasoning_tokens
    assert n == 3 or 3 < n <= 6 and tokens_end_inside_a_character(client, 3)
    for e in lp.content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob) and e.token == e.top_logprobs[0].token
        assert e.logprob <= 0
    chunks = collect_stream(ask(client, stream=True, **kw))[-1]
    entries = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in lp.content]
    assert ask(client, max_tokens=2).choices[0].logprobs is None
