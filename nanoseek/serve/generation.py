"""One API request's generation on the event loop: n engine jobs whose tokens come back from the engine thread
(`loop.call_soon_threadsafe` into one asyncio queue) and are decoded into reasoning / answer deltas.

`Generation.events()` yields `ChoiceEvent`s (reasoning text, then answer text, then one with the finish reason, per
choice, choices interleaved as their tokens arrive); the streaming endpoints forward them as SSE chunks, the others
`collect()` them. When the consumer goes away (client disconnect, error), the jobs still running are cancelled so
their cache rows are freed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from functools import partial

from .reasoning import CompletionDecoder, SectionTracker, starts_in_reasoning
from .runtime import EngineWorker, Job, Runtime


class GenerationError(Exception):
    """The engine could not run a request (it failed, or refused the request)."""


@dataclass
class ChoiceEvent:
    index: int
    reasoning: str = ""
    content: str = ""
    finish_reason: str | None = None
    # with log-probabilities asked for: [(token id, (log p, top))] of the tokens whose text this event carries (the
    # last event of a choice also carries those of tokens that made no text)
    reasoning_logprobs: list = field(default_factory=list)
    content_logprobs: list = field(default_factory=list)


@dataclass
class Choice:
    index: int
    content: str | None  # None: the completion ended inside its reasoning (OpenAI's and vLLM's null content)
    reasoning: str | None
    finish_reason: str | None
    reasoning_logprobs: list
    content_logprobs: list


class Generation:
    """prompts[i] is sampled with params[i]; choice i. split: separate `<think>` reasoning (chat)."""

    def __init__(self, rt: Runtime, worker: EngineWorker, prompts: list[list[int]], params: list, *,
                 prompt_tokens: int, split: bool, stop: list[str], budget: int | None = None):
        self.worker = worker
        self.prompt_tokens = prompt_tokens
        self._queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        think, end_think = rt.think_ids if split else (None, None)
        force = [end_think, *rt.tokenizer.encode("\n\n")] if end_think is not None else []
        self.decoders: list[CompletionDecoder] = []
        self.jobs: list[Job] = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            in_reasoning = split and starts_in_reasoning(prompt, rt.tokenizer)
            self.decoders.append(CompletionDecoder(rt.tokenizer, split=split, in_reasoning=in_reasoning, stop=stop,
                                                   end_ids=rt.stop_ids))
            tracker = None
            if budget is not None and think is not None and end_think is not None:
                tracker = SectionTracker(think, end_think, in_reasoning, rt.stop_ids, rt.tokenizer)
            self.jobs.append(Job(prompt, p, partial(self._deliver, loop, i), budget, tracker, force))
        self.finish_reasons: list[str | None] = [None] * len(self.jobs)
        # log-probabilities per choice and section not handed out in an event yet
        self._pending = [{"reasoning": [], "content": []} for _ in self.jobs]
        self._live: set[int] = set()

    def _deliver(self, loop: asyncio.AbstractEventLoop, index: int, item) -> None:
        """Called on the engine thread."""
        try:
            loop.call_soon_threadsafe(self._queue.put_nowait, (index, item))
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def cancel(self) -> None:
        """Free the engine slots of the choices still running (idempotent)."""
        for i in sorted(self._live):
            self.worker.cancel(self.jobs[i])
        self._live.clear()

    async def events(self):
        self._live = set(range(len(self.jobs)))
        for job in self.jobs:
            self.worker.submit(job)
        try:
            while self._live:
                i, item = await self._queue.get()
                if i not in self._live:
                    continue
                if isinstance(item, Exception):
                    raise GenerationError(str(item))
                for event in self._on_token(i, *item):
                    yield event
        finally:
            self.cancel()

    def _on_token(self, i: int, tok: int, finished: bool, reason: str | None, logprob) -> list[ChoiceEvent]:
        dec = self.decoders[i]
        start = len(dec.content.text)  # where this token's text begins in the answer
        delta = dec.feed(tok)
        kind = dec.last_kind if logprob is not None else None
        section = getattr(dec, kind) if kind in ("reasoning", "content") else None
        if section is not None and section.strip_leading and not section.text:
            kind = None  # the whitespace after <think> or </think>, which the section drops
        if kind in ("reasoning", "content"):
            self._pending[i][kind].append((tok, logprob, start))
        if dec.stopped:  # a stop string: cut here, with the entries of the tokens whose text it cut away
            self._pending[i]["content"] = [e for e in self._pending[i]["content"] if e[2] < len(dec.content.text)]
            if not finished:
                self.worker.finish(self.jobs[i])
            finished, reason = True, "stop"
        if finished:
            delta = delta + dec.finish()
            self._live.discard(i)
            self.finish_reasons[i] = reason
        out = []
        if delta.reasoning:
            out.append(ChoiceEvent(i, reasoning=delta.reasoning, reasoning_logprobs=self._take(i, "reasoning")))
        if delta.content:
            out.append(ChoiceEvent(i, content=delta.content, content_logprobs=self._take(i, "content")))
        if finished:
            out.append(ChoiceEvent(i, finish_reason=reason, reasoning_logprobs=self._take(i, "reasoning"),
                                   content_logprobs=self._take(i, "content")))
        return out

    def _take(self, i: int, section: str) -> list:
        taken, self._pending[i][section] = self._pending[i][section], []
        return [(tok, logprob) for tok, logprob, _ in taken]

    async def collect(self) -> list[Choice]:
        reasoning, content = [[] for _ in self.jobs], [[] for _ in self.jobs]  # the events' log-probabilities
        async for e in self.events():
            reasoning[e.index] += e.reasoning_logprobs
            content[e.index] += e.content_logprobs
        return [Choice(i, d.content_text if d.in_answer else None, d.reasoning_text, self.finish_reasons[i],
                       reasoning[i], content[i]) for i, d in enumerate(self.decoders)]

    def usage(self) -> dict:
        return usage(self.prompt_tokens, sum(d.num_tokens for d in self.decoders),
                     sum(d.reasoning_tokens for d in self.decoders))


def usage(prompt_tokens: int, completion_tokens: int = 0, reasoning_tokens: int = 0) -> dict:
    """A response's `usage` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }
