"""Log-probabilities in the OpenAI API's two shapes, from the engine's `(log p, [(id, log p), ...])` per token.

- Chat (`logprobs: true`, `top_logprobs: k`): `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`,
  one entry per token of the answer, so the entries line up with `message.content` (OpenAI's rule; SGLang's issue
  #25055 is what mixing in the reasoning breaks). The reasoning's tokens come apart, in `reasoning_content`, as the
  text does; the `<think>` / `</think>` tags and the end-of-sequence token have no entry, as they have no text.
- Completions (`logprobs: k`): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, where `top_logprobs`
  maps token text to log p and `text_offset` is each token's character offset in the returned text. With `echo`
  the prompt's tokens come first; a first token that nothing predicts has null entries (a BOS sent as a token id; the
  BOS the server puts before a text is not echoed, so that text's first token is scored given it).

Values are the model's raw distribution (log_softmax of the logits, before temperature and top-k/top-p; vLLM's
default), floored at -9999.0 as OpenAI does, since JSON has no -Infinity. A token's `bytes` are its exact UTF-8 bytes;
a byte-level BPE piece may hold part of a character, and its `token` text is then spelled `bytes:\\xe6\\x97` as vLLM
does, so two such pieces never share a key of `top_logprobs`.
"""

from __future__ import annotations

import codecs
from functools import lru_cache

FLOOR = -9999.0


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character -> the byte it stands for (what ByteLevel BPE vocabularies spell)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenText:
    """Token id -> (text, bytes), cached per id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        hf = tokenizer.hf
        self.byte_level = type(hf.decoder).__name__ == "ByteLevel"
        self.added = {i: t.content for i, t in hf.get_added_tokens_decoder().items()}
        self.special = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}  # generated text skips them
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, tok: int) -> tuple[str, bytes]:
        hit = self._cache.get(tok)
        if hit is None:
            hit = self._cache[tok] = self._lookup(tok)
        return hit

    def _lookup(self, tok: int) -> tuple[str, bytes]:
        piece = self.tokenizer.hf.id_to_token(tok)
        if tok in self.added or piece is None:
            raw = (self.added.get(tok) or self.tokenizer.decode([tok])).encode("utf-8")
        elif self.byte_level:
            alphabet = _byte_level_alphabet()
            raw = bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else piece.encode("utf-8")
        else:
            raw = self.tokenizer.decode([tok]).encode("utf-8")
        try:
            return raw.decode("utf-8"), raw
        except UnicodeDecodeError:  # part of a character: spelled by its bytes, so distinct tokens stay distinct keys
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


def _value(lp: float) -> float:
    return max(lp, FLOOR)


def chat_entries(text: TokenText, entries: list) -> list[dict]:
    """entries [(token id, (log p, [(id, log p), ...]))] -> OpenAI chat `logprobs.content` items."""

    def item(tok: int, lp: float) -> dict:
        s, raw = text(tok)
        return {"token": s, "logprob": _value(lp), "bytes": list(raw)}

    return [{**item(tok, lp), "top_logprobs": [item(t, v) for t, v in top]} for tok, (lp, top) in entries]


class CompletionLogprobs:
    """The completions `logprobs` object, built in pieces (one per streamed chunk, or one for the whole text): each
    piece's `text_offset` continues where the last one ended. Offsets count characters; a token that starts inside a
    multi-byte character gets that character's offset."""

    def __init__(self, text: TokenText):
        self.text = text
        self.offset = 0
        self._chars = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds a split character's bytes

    def add(self, entries: list, generated: bool = False) -> dict:
        """entries [(token id, (log p, [(id, log p), ...]) or None)] -> {"tokens", "token_logprobs", ...}.
        generated: the completion's tokens, whose text leaves out special tokens (<｜User｜>, BOS), so theirs take no
        characters; an echoed prompt spells them out."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tok, lp in entries:
            s, raw = self.text(tok)
            out["tokens"].append(s)
            out["text_offset"].append(self.offset)
            out["token_logprobs"].append(None if lp is None else _value(lp[0]))
            out["top_logprobs"].append(None if lp is None else {self.text(t)[0]: _value(v) for t, v in lp[1]})
            if not (generated and tok in self.text.special):
                self.offset += len(self._chars.decode(raw))
        return out
