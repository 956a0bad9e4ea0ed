"""Generated token ids -> text: the reasoning / answer split of R1-style output and safe incremental decoding.

An R1-style completion is `<think>` reasoning `</think>` answer, where the chat template usually prefills `<think>\\n`
so the completion starts inside the reasoning (`starts_in_reasoning` looks at the prompt). `<think>` and `</think>`
are single tokens, so the split works on token ids (`SectionTracker`): the tags themselves are dropped, reasoning
tokens go to `reasoning`, the rest to `content` (leading whitespace of an answer that follows reasoning is dropped).

`IncrementalText` turns one section's growing token list into text deltas: it decodes everything so far (cheaply:
text that ends on a complete character is committed and only the ids after it, with a little context, are
re-decoded), hands out the new suffix, and holds back a trailing U+FFFD (an incomplete UTF-8 character whose
remaining bytes come in the next tokens) and any suffix that could be the start of a stop string. So the
concatenated deltas always equal the final text. Stop strings cut the text where they begin; they apply to the
answer, not to the reasoning.

`CompletionDecoder` combines both for one completion; the server, the terminal chat and the tests all use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

REPLACEMENT = "\ufffd"


def starts_in_reasoning(prompt_ids: Sequence[int], tokenizer) -> bool:
    """True when the prompt ends inside an open `<think>` block that the template prefilled: the last tag is
    `<think>` and only whitespace follows it. (A `<think>` the user typed is followed by more of the prompt, such as
    `<｜Assistant｜>`: the completion then starts outside the reasoning.)"""
    think_id, end_think_id = tokenizer.think_id, tokenizer.end_think_id
    if think_id is None or end_think_id is None:
        return False
    tags = [i for i, t in enumerate(prompt_ids) if t in (think_id, end_think_id)]
    if not tags or prompt_ids[tags[-1]] != think_id:
        return False
    return not tokenizer.decode(list(prompt_ids[tags[-1] + 1:]), skip_special_tokens=False).strip()


class SectionTracker:
    """Classifies each generated token as "reasoning", "content", "tag" (`<think>` / `</think>`) or "end" (a stop
    token). The first `<think>` the model emits opens the reasoning; `</think>` closes it."""

    def __init__(self, think_id: int | None, end_think_id: int | None, in_reasoning: bool = False,
                 end_ids: Iterable[int] = (), tokenizer=None):
        self.think_id, self.end_think_id = think_id, end_think_id
        self.splits = think_id is not None and end_think_id is not None
        self.in_reasoning = self.opened = bool(in_reasoning and self.splits)
        self.closed = False
        self.end_ids = frozenset(end_ids)
        self.reasoning_tokens = 0
        self.tokenizer = tokenizer  # given: `mid_character` can be asked
        self._recent: list[int] = []  # the last 4 reasoning ids: a character's bytes (at most 4) are among them

    @property
    def mid_character(self) -> bool:
        """Whether the reasoning ends inside a multi-byte character (a byte-level token holds part of one): a budget
        that closed it there would leave a U+FFFD in it and invalid bytes in the model's context. (Also True after
        bytes that start no character, or a U+FFFD the model wrote: the budget waits only a few tokens for it.)"""
        return self.tokenizer is not None and self.tokenizer.decode(self._recent).endswith(REPLACEMENT)

    def feed(self, tok: int) -> str:
        if tok in self.end_ids:
            return "end"
        if self.in_reasoning:
            if tok == self.end_think_id:
                self.in_reasoning, self.closed = False, True
                return "tag"
            self.reasoning_tokens += 1
            if self.tokenizer is not None:
                self._recent = [*self._recent[-3:], tok]
            return "reasoning"
        if self.splits and tok == self.think_id and not self.opened:
            self.in_reasoning = self.opened = True
            return "tag"
        return "content"


class IncrementalText:
    """One section's token ids -> text deltas that never split a UTF-8 character or leak part of a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), strip_leading: bool = False):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._longest_stop = max(map(len, self.stop), default=0)  # once, not at every token
        self.strip_leading = strip_leading
        self.ids: list[int] = []
        self._committed_ids = 0  # ids[:n] decode to _committed_text, which ends on a complete character
        self._committed_text = ""
        self._context_start = 0  # ids[start:_committed_ids] are decoded along with the new ones
        self._raw = ""  # decoded text of all ids
        self.sent = 0  # characters of `text` handed out so far
        self.stopped = False  # a stop string was found; `text` is cut before it
        self._cut: int | None = None

    @property
    def text(self) -> str:
        """The section's visible text so far (leading whitespace stripped if asked, cut at a stop string)."""
        t = self._raw.lstrip() if self.strip_leading else self._raw
        return t if self._cut is None else t[: self._cut]

    def add(self, tok: int) -> str:
        """Append one token; return the text that became final."""
        if self.stopped:
            return ""
        self.ids.append(int(tok))
        self._raw = self._decode()
        self._find_stop()
        return self._release(final=self.stopped)

    def _decode(self) -> str:
        """All ids decoded, re-decoding only since the last commit point. The ids before it (the context) are
        decoded along, so decoders that treat a sequence's first token specially (SentencePiece's leading space)
        still join pieces right."""
        decode = self.tokenizer.decode
        start, end = self._context_start, self._committed_ids
        context = decode(self.ids[start:end], skip_special_tokens=True)
        window = decode(self.ids[start:], skip_special_tokens=True)
        if not window.startswith(context):  # should not happen; stay correct anyway
            window, context, self._committed_text = decode(self.ids, skip_special_tokens=True), "", ""
        text = self._committed_text + window[len(context):]
        if not text.endswith(REPLACEMENT):  # ends on a complete character: commit
            self._context_start, self._committed_ids, self._committed_text = end, len(self.ids), text
        return text

    def flush(self) -> str:
        """Everything not handed out yet (call when the completion ends)."""
        return self._release(final=True)

    def _find_stop(self) -> None:
        if not self.stop:
            return
        text = self.text
        start = max(0, self.sent - self._longest_stop)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self._cut, self.stopped = max(min(hits), self.sent), True

    def _release(self, final: bool) -> str:
        text = self.text
        end = len(text)
        if not final:
            while end > self.sent and text[end - 1] == REPLACEMENT:
                end -= 1
            end -= self._stop_prefix_len(text[self.sent:end])
        delta, self.sent = text[self.sent:end], max(end, self.sent)
        return delta

    def _stop_prefix_len(self, pending: str) -> int:
        """Length of the longest suffix of `pending` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(pending)), best, -1):
                if pending.endswith(s[:k]):
                    best = k
                    break
        return best


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)

    def __add__(self, other: "Delta") -> "Delta":
        return Delta(self.reasoning + other.reasoning, self.content + other.content)


class CompletionDecoder:
    """Token ids of one completion -> reasoning and answer deltas.

    split: separate `<think>…</think>` (chat); False puts every token in `content` (plain completions).
    in_reasoning: the prompt ended inside `<think>` (see `starts_in_reasoning`).
    stop: stop strings for the answer; once one is found `stopped` is True and later tokens are ignored.
    end_ids: stop token ids (eos): they end the completion and produce no text.
    """

    def __init__(self, tokenizer, *, split: bool = True, in_reasoning: bool = False, stop: Sequence[str] = (),
                 end_ids: Iterable[int] = ()):
        think_id = tokenizer.think_id if split else None
        end_think_id = tokenizer.end_think_id if split else None
        self.tracker = SectionTracker(think_id, end_think_id, in_reasoning, end_ids)
        # "<think>\nReasoning": the reasoning is "Reasoning", whether the template's prefill or the model wrote the tag
        self.reasoning = IncrementalText(tokenizer, strip_leading=True)
        self.content = IncrementalText(tokenizer, stop, strip_leading=self.tracker.opened)
        self.num_tokens = 0
        self.last_kind: str | None = None

    @property
    def stopped(self) -> bool:
        return self.content.stopped

    @property
    def reasoning_tokens(self) -> int:
        return self.tracker.reasoning_tokens

    @property
    def reasoning_text(self) -> str | None:
        """The reasoning so far, or None if the completion has no reasoning section."""
        return self.reasoning.text if self.tracker.opened else None

    @property
    def in_answer(self) -> bool:
        """Past the reasoning, or never in one: the completion has an answer section, perhaps empty."""
        return not self.tracker.in_reasoning

    @property
    def content_text(self) -> str:
        return self.content.text

    def feed(self, tok: int) -> Delta:
        """One generated token -> the text it makes final; `last_kind` says which section took it ("reasoning",
        "content", "tag", "end", or None once a stop string has ended the answer)."""
        self.last_kind = None
        if self.stopped:
            return Delta()
        self.num_tokens += 1
        self.last_kind = kind = self.tracker.feed(tok)
        if kind == "reasoning":
            return Delta(reasoning=self.reasoning.add(tok))
        if kind == "content":
            return Delta(content=self.content.add(tok))
        if kind == "tag" and self.tracker.closed:  # </think>: the reasoning is complete
            if self.content.sent == 0:  # "</think>\n\nAnswer": the answer is "Answer"
                self.content.strip_leading = True
            return Delta(reasoning=self.reasoning.flush())
        return Delta()

    def finish(self) -> Delta:
        return Delta(self.reasoning.flush(), self.content.flush())
