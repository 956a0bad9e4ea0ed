"""Batched generation on token ids over the latent KV cache: `generate()` for scripts and RL, and a continuous-
batching API (`submit` / `step` / `cancel` / `force_next`) that an HTTP server drives from one background thread.

Cache layout: one preallocated `LatentCache` of `max_batch_size` rows × `max_seq_len` positions. Active requests
always occupy the compact rows [0, n) (row = index in `self._active`), so the model's "write rows [0, B)"
convention is the whole slot table. A finished or cancelled request's row is refilled by moving the last active
row into it (one copy of that row's valid positions, all layers); newcomers are prefilled straight into rows
[n, n + k) through a `LatentCache.rows` view.

One `step()` does one of two things:
1. when requests wait and rows are free (and the last step did not admit while others ran), admit them: a
   right-padded prefill over the distinct prompts, one forward per `prefill_chunk` positions (identical prompts,
   e.g. GRPO's G samples of one prompt, are prefilled once and their cache rows copied), then each newcomer's
   first token is chosen from its prompt's last logits;
2. otherwise one joint decode forward for every active request: feed each request's last token at its own
   position, choose the next token. For float32 models this forward is `fastpath.FastDecoder` (the same
   math in far fewer ops, tested equal to the modules); `Engine(..., fast_decode=False)` uses the modules.
   `Engine(..., compile=True)`: that forward is compiled with torch.compile (the fast path's compiled step).
Each chosen token is emitted as an event `(request_id, token_id, finished, finish_reason, logprob)`. A request
finishes with reason "stop" when it emits one of its stop tokens — the stop token IS included as its last token, as
transformers does with eos — or "length" after max_new_tokens tokens (or when the cache row is full).

Choosing a token: forced tokens (`force_next`) first, else `sampling.sample` with the request's own temperature /
top-p / top-k and its own seeded generator (so a seeded request's tokens do not depend on its batch-mates; in
float32, that is: in bfloat16 the batch's shape can move a logit by a rounding step, which at a near tie of MoE
routing or of two tokens changes the pick).

Log-probabilities (`SamplingParams.logprobs = k`): the event's `logprob` is `(log p(token), [(id, log p), ...] of the k
likeliest tokens)` under the model's own distribution, log_softmax of the raw logits (before temperature, top-k and
top-p; vLLM's default "raw_logprobs"), else None. `score(prompt, k)` gives the same for each token of a prompt from
the tokens before it (a chunked prefill into a one-row cache of its own): what `echo` with `logprobs` returns, and
how evaluation harnesses score a continuation.

Speculative decoding (`SamplingParams.speculative`, greedy only, needs an MTP module): the request carries a draft
d of the token after next, made by MTP module 1 from the last verified hidden state. A step feeds [t, d] at
positions [p, p+1]; the main model's greedy token y0 at p is always right; if y0 == d the draft is accepted and the
greedy token y1 at p+1 is right too (2 tokens from one forward), otherwise the stale slot p+1 is overwritten by the
next step. The MTP module then runs on the same two positions (hidden h_p, h_p+1 with embeddings of y0, y1) to
draft again from the last verified one. The tokens are exactly those of plain greedy decoding. Speculative steps
run batched when every active request is speculative; the scheduler never mixes the two kinds in one batch.
`engine.stats` counts "drafted" / "accepted" (plus "prefill_tokens", "decode_steps"); see `acceptance_rate`.

Threads: submit / cancel / force_next may be called from any thread; they and step() serialise on one lock, so a
cancel waits for the step in flight. generate() runs the same steps itself and needs an idle engine.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from .cache import LatentCache
from .fastpath import FastDecoder, logits
from .sampling import sample

TokenLogprob = tuple[float, list[tuple[int, float]]]  # (log p(token), the k likeliest [(token id, log p)])
Event = tuple[int, int, bool, "str | None", "TokenLogprob | None"]  # (request_id, token_id, finished, reason, logprob)


# rows for batch jobs: a decode step of a small model costs little more for 512 rows than for 64 (eval_rows.md)
BATCH_ROWS = 512


def load_for_inference(path, device="cpu", dtype=None):
    """A model directory's weights for decoding; dtype None or "auto": bfloat16 on an accelerator, float32 on the
    CPU; else a torch dtype or its name (`--dtype`)."""
    from ..checkpoint import load_model
    from ..device import inference_dtype

    return load_model(path, device=device, dtype=inference_dtype(dtype, device))


GREEDY_BELOW = 1e-5  # a temperature under this samples as greedy (vLLM's _SAMPLING_EPS): logits / 1e-40 overflow


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy; below GREEDY_BELOW counts as 0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off; at least the vocabulary size is off too
    seed: int | None = None  # None: the global torch RNG
    stop_token_ids: Sequence[int] | None = None  # emitted, then the request finishes with "stop"
    speculative: bool = False  # MTP draft + verify; greedy only
    logprobs: int | None = None  # None: off; k >= 0: each token's log-probability and the k likeliest alternatives


@dataclass(eq=False)  # compared by identity
class _Request:
    rid: int
    prompt: list[int]
    params: SamplingParams
    max_new: int  # max_new_tokens clipped to the cache row
    stop: frozenset
    generator: torch.Generator | None
    out: list[int] = field(default_factory=list)
    forced: deque = field(default_factory=deque)
    pos: int = 0  # slots [0, pos) of its row hold this request's latents; out[-1] is fed at pos next
    draft: int | None = None  # speculative: draft for position pos + 1
    logprob: TokenLogprob | None = None  # of the token being emitted (params.logprobs set)
    done: bool = False


class Engine:
    def __init__(self, model, max_batch_size: int = 32, max_seq_len: int | None = None, prefill_chunk: int = 512,
                 fast_decode: bool = True, compile: bool = False):
        self.model = model  # a model in training mode (GRPO) is switched to eval for each step, then back
        self.cfg = cfg = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if max_batch_size < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch_size and prefill_chunk must be >= 1, got {max_batch_size}, {prefill_chunk}")
        if max_seq_len is not None and max_seq_len > cfg.max_position_embeddings:  # score() refuses the same
            raise ValueError(f"max_seq_len {max_seq_len} is past the model's context of {cfg.max_position_embeddings} "
                             "tokens (max_position_embeddings)")
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len or min(cfg.max_position_embeddings, 4096)
        self.cache = LatentCache(cfg, max_batch_size, self.max_seq_len, device=self.device, dtype=self.dtype)
        self.share_prefix = True  # prefill identical prompts once (results are the same either way)
        self.prefill_chunk = prefill_chunk  # positions per prefill forward
        # plain decode steps through the few-op path of fastpath.py (float32 models); same math as the modules;
        # compile: the fast path's steps through torch.compile (compiled on first use)
        self.fast = FastDecoder(model, compile) if fast_decode and FastDecoder.supports(model) else None
        if compile and self.fast is None:
            warnings.warn("compile applies to the float32 decode path only; this model decodes without it")
        self.stats = {"drafted": 0, "accepted": 0, "prefill_tokens": 0, "decode_steps": 0}
        self._waiting: deque[_Request] = deque()
        self._active: list[_Request] = []  # index == cache row
        self._requests: dict[int, _Request] = {}
        self._next_id = 0
        self._lock = threading.RLock()
        self._decode_next = False  # the last step admitted newcomers while others ran: those decode next

    @classmethod
    def for_batch(cls, model, n_seqs: int, longest_prompt: int, max_new_tokens: int,
                  max_rows: int = BATCH_ROWS) -> "Engine":
        """An engine sized for one batch job (evaluation, teacher traces): min(n_seqs, max_rows) cache rows of
        longest_prompt + max_new_tokens positions, capped by the model's context. Sized to the job, 512 rows of a
        small model's cache are a few hundred MB, where 512 rows of its whole context could be tens of GB. Hand
        generate() more prompts than rows (callers use chunks of 2 × max_batch_size): it refills a row as soon
        as a completion ends (bench/results/eval_rows.md)."""
        return cls(model, max_batch_size=max(1, min(n_seqs, max_rows)),
                   max_seq_len=min(model.config.max_position_embeddings, longest_prompt + max_new_tokens))

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None, **kw) -> "Engine":
        """dtype None: bfloat16 on an accelerator, float32 on the CPU (see load_for_inference)."""
        return cls(load_for_inference(path, device, dtype), **kw)

    # --- public API ---------------------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> int:
        """Queue a request; returns its id. It is admitted by a later `step()` when a cache row is free."""
        params = params or SamplingParams()
        prompt = _token_ids(prompt_ids, self.cfg.vocab_size)
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit max_seq_len={self.max_seq_len}")
        if params.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if not params.temperature >= 0 or not 0 < params.top_p <= 1 or params.top_k < 0:  # NaN fails too
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0")
        if 0 < params.temperature < GREEDY_BELOW:
            params = replace(params, temperature=0.0)
        if params.top_k >= self.cfg.vocab_size:  # keeps every token, so off (a huge k would overflow a long)
            params = replace(params, top_k=0)
        if params.logprobs is not None and not 0 <= params.logprobs <= self.cfg.vocab_size:
            raise ValueError(f"logprobs must be in [0, {self.cfg.vocab_size}]")
        if params.speculative:
            if params.temperature > 0:
                raise ValueError("speculative decoding is greedy only (temperature=0)")
            if len(self.model.mtp_layers) == 0:
                raise ValueError("speculative decoding needs a model with MTP layers (num_nextn_predict_layers > 0)")
            if params.logprobs is not None:
                raise ValueError("speculative decoding does not compute log-probabilities")
        gen = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            req = _Request(rid, prompt, params, min(params.max_new_tokens, self.max_seq_len - len(prompt)),
                           frozenset(params.stop_token_ids or ()), gen)
            self._requests[rid] = req
            self._waiting.append(req)
        return rid

    def force_next(self, request_id: int, token_ids: Sequence[int]) -> bool:
        """The request's next emitted tokens will be exactly `token_ids` (fed through the model like sampled ones,
        one per step, counted against max_new_tokens; a stop token among them still stops it). False if the
        request is unknown or already finished."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is not None:
                req.forced.extend(int(t) for t in token_ids)
            return req is not None

    def cancel(self, request_id: int) -> bool:
        """Drop a waiting or running request and free its cache row; False if it is unknown or already done."""
        with self._lock:
            req = self._requests.pop(request_id, None)
            if req is None:
                return False
            if req in self._waiting:
                self._waiting.remove(req)
            else:
                req.done = True
                self._release([req])
            return True

    @property
    def num_active(self) -> int:
        return len(self._active)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._active or self._waiting)

    def warm_up(self) -> None:
        """With compile=True: compile the decode graphs now (one sequence, and a batch of two, which serves every
        batch of 2 or more) instead of during the first requests. Needs an idle engine; leaves the stats alone."""
        if self.fast is None or not self.fast.compiling or self.max_seq_len < 5:
            return
        stats = dict(self.stats)
        for n in (1, 2)[: self.max_batch_size]:
            self.generate([[0, 0, 0]] * n, max_new_tokens=2, stop_token_ids=())  # one decode step at position 3
        self.stats = stats

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted MTP drafts so far (speculative decoding)."""
        return self.stats["accepted"] / max(self.stats["drafted"], 1)

    @torch.inference_mode()
    def score(self, prompt_ids: Sequence[int], k: int = 0) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given the tokens before it, with the k likeliest alternatives (the
        first token, which nothing predicts, gets None): a chunked prefill into a one-row cache of its own, so it
        may run between the steps of requests in flight, and a long prompt's attention scores stay (chunk, T)."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        ids = torch.tensor(_token_ids(prompt_ids, self.cfg.vocab_size), device=self.device)[None]  # (1, T)
        if not 0 < ids.shape[1] <= self.cfg.max_position_embeddings:
            raise ValueError(f"a prompt to score needs 1 to {self.cfg.max_position_embeddings} tokens")
        with self._lock, self._eval_mode():
            cache = LatentCache(self.cfg, 1, ids.shape[1], device=self.device, dtype=self.dtype)
            h = self._prefill(ids, cache)[0, :-1]  # (T-1, D): position i predicts token i + 1
            out: list[TokenLogprob | None] = [None]
            c = self.prefill_chunk  # positions per lm_head call: bounds the (c, V) logits
            for a in range(0, h.shape[0], c):
                out += _logprobs(self._logits(h[a : a + c]), ids[0, a + 1 : a + 1 + c].tolist(), k)
            return out

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One step: admit waiting requests (prefill; each newcomer emits its first token), or, when none is
        admitted, one joint decode step of the running ones. Returns the tokens emitted, in order. Keeping the two
        apart lets a caller act on a newcomer's first token (stop it, force what follows) before its second. A step
        that admitted while others ran is followed by a decode step, so that a stream of newcomers that finish at
        once (1-token requests) cannot hold the running ones back for ever."""
        with self._lock:
            events: list[Event] = []
            decode_first, self._decode_next = self._decode_next and bool(self._active), False
            if not decode_first and self._waiting and len(self._active) < self.max_batch_size:
                running = len(self._active)
                with self._eval_mode():  # only the module forwards care (MoE counts expert load in training)
                    self._admit(events)
                self._decode_next = running > 0 and bool(events)
            if self._active and not events:
                if self._active[0].params.speculative:
                    with self._eval_mode():
                        self._speculative_step(events)
                elif self.fast is not None:
                    self._decode_step(events)  # calls the router directly: the mode does not matter
                else:
                    with self._eval_mode():
                        self._decode_step(events)
            return events

    @contextlib.contextmanager
    def _eval_mode(self):
        """The model in eval mode for the block, then back: switching walks every module (about 1 ms a round
        trip for a small model), so the fast decode path, which needs no switch, does not pay it every step."""
        training = self.model.training
        if training:
            self.model.eval()
        try:
            yield
        finally:
            if training:
                self.model.train()

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | Sequence[int] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        speculative: bool = False,
    ) -> list[list[int]]:
        """New tokens only, per prompt; a stop token that ends a completion is its last element. stop_token_ids
        None stops at the config's eos_token_id, as transformers' generate does; () generates max_new_tokens
        always. Prompt i is seeded with seed + i (so repeated prompts give different samples), or with seed[i]
        when seed is a list. Uses the step machinery, so it needs an idle engine (do not mix with server
        requests). A completion also stops where the engine's cache row ends (`max_seq_len`; a warning says so).
        `speculative` requires temperature 0. Ctrl-C raises cli.Interrupted with the completions that
        had finished ({prompt index: new tokens})."""
        from ..cli import Interrupted

        if isinstance(prompts, (str, bytes)) or (isinstance(prompts, torch.Tensor) and prompts.dim() != 2) or any(
                isinstance(p, (int, str)) for p in prompts):
            raise TypeError("prompts is a list of prompts, each a list of token ids (e.g. [[1, 2, 3]])")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if max_new_tokens == 0:
            return [[] for _ in prompts]
        if stop_token_ids is None:
            eos = self.cfg.eos_token_id
            stop_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        with self._lock:
            if self.has_work():
                raise RuntimeError("generate() needs an idle engine (requests are in flight)")
            seeds = list(seed) if isinstance(seed, Sequence) else [
                None if seed is None else seed + i for i in range(len(prompts))]
            if len(seeds) != len(prompts):
                raise ValueError(f"seed is a list of {len(seeds)} seeds for {len(prompts)} prompts")
            rids: list[int] = []
            reqs: list[_Request] = []
            try:  # a bad prompt raises in submit: the ones queued before it are cancelled below
                for p, s in zip(prompts, seeds):
                    rids.append(self.submit(
                        p, SamplingParams(max_new_tokens, temperature, top_p, top_k, s, stop_token_ids, speculative)))
                reqs = [self._requests[rid] for rid in rids]
                if any(r.max_new < max_new_tokens for r in reqs):  # (Python shows a repeated message once)
                    warnings.warn(f"a prompt plus max_new_tokens exceeds this engine's max_seq_len={self.max_seq_len}: "
                                  "its completion stops there (Engine(model, max_seq_len=...) for more)", stacklevel=2)
                while self.has_work():
                    self.step()
            except KeyboardInterrupt:
                raise Interrupted({i: r.out for i, r in enumerate(reqs) if r.done}) from None
            finally:
                for rid in rids:
                    self.cancel(rid)
            return [r.out for r in reqs]

    # --- internals ----------------------------------------------------------------------------------------------
    def _choose(self, reqs: list[_Request], logits: torch.Tensor) -> list[int]:
        """logits (n, V) float -> one token per request: forced, else sampled/greedy. Sets each request's
        `logprob` of the token chosen when it asked for log-probabilities."""
        temps = [r.params.temperature for r in reqs]
        if any(t > 0 for t in temps):
            toks = sample(logits, temps, [r.params.top_p for r in reqs], [r.params.top_k for r in reqs],
                          [r.generator for r in reqs]).tolist()
        else:
            toks = logits.argmax(dim=-1).tolist()
        toks = [r.forced.popleft() if r.forced else t for r, t in zip(reqs, toks)]
        rows = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        if rows:
            k = max(reqs[i].params.logprobs for i in rows)
            for i, lp in zip(rows, _logprobs(logits[rows], [toks[i] for i in rows], k)):
                reqs[i].logprob = (lp[0], lp[1][: reqs[i].params.logprobs])
        return toks

    def _emit(self, req: _Request, tok: int, events: list[Event]) -> None:
        req.out.append(tok)
        reason = "stop" if tok in req.stop else "length" if len(req.out) >= req.max_new else None
        req.done = reason is not None
        events.append((req.rid, tok, req.done, reason, req.logprob))
        if req.done:
            self._requests.pop(req.rid, None)

    def _release(self, reqs: list[_Request]) -> None:
        """Free the rows of finished/cancelled active requests, keeping rows compact (highest row first)."""
        rows = sorted((self._active.index(r) for r in reqs if r in self._active), reverse=True)
        for row in rows:
            last = len(self._active) - 1
            if row != last:
                mover = self._active[last]
                self.cache.copy_rows(last, row, length=mover.pos)
                self._active[row] = mover
            self._active.pop()

    def _admit(self, events: list[Event]) -> None:
        """Move waiting requests (FIFO, same speculative mode as the running ones) into free rows: prefill the
        distinct prompts, copy rows for repeated ones, choose each newcomer's first token."""
        free = self.max_batch_size - len(self._active)
        if free <= 0 or not self._waiting:
            return
        spec = (self._active or self._waiting)[0].params.speculative
        new: list[_Request] = []
        while self._waiting and len(new) < free and self._waiting[0].params.speculative == spec:
            new.append(self._waiting.popleft())
        if not new:  # the queue's head is of the other mode: it waits until the running batch is done
            return
        # distinct prompts first (they are prefilled), repeats after (their rows are copies)
        keys = [tuple(r.prompt) if self.share_prefix else r.rid for r in new]
        first: dict = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        order = [i for i, k in enumerate(keys) if first[k] == i] + [i for i, k in enumerate(keys) if first[k] != i]
        new, keys = [new[i] for i in order], [keys[i] for i in order]
        u = len(first)
        slot = {k: j for j, k in enumerate(keys[:u])}
        src = torch.tensor([slot[k] for k in keys], device=self.device)  # (k,) prefill row of each newcomer
        n0 = len(self._active)
        lens = torch.tensor([len(r.prompt) for r in new], device=self.device)  # (k,)
        T = int(lens[:u].max())
        ids = torch.zeros(u, T, dtype=torch.long, device=self.device)  # right-padded distinct prompts
        for i, r in enumerate(new[:u]):
            ids[i, : len(r.prompt)] = torch.tensor(r.prompt, device=self.device)
        h = self._prefill(ids, self.cache.rows(n0, n0 + u))  # (u, T, D)
        self.stats["prefill_tokens"] += int(lens[:u].sum())
        if len(new) > u:
            self.cache.copy_rows((n0 + src[u:]).tolist(), list(range(n0 + u, n0 + len(new))), length=T)
        h_last = h[src, lens - 1]  # (k, D)
        toks = self._choose(new, self._logits(h_last))
        if spec:
            self._draft_prompts(new, h[src], ids[src], lens, toks, self.cache.rows(n0, n0 + len(new)))
        for r, t in zip(new, toks):
            r.pos = len(r.prompt)
            self._active.append(r)
            self._emit(r, t, events)
        self._release([r for r in new if r.done])

    def _prefill(self, ids: torch.Tensor, cache: LatentCache) -> torch.Tensor:
        """ids (u, T) right-padded -> final hidden (u, T, D), writing the latents of positions [0, T) into the
        cache rows. Chunks of `prefill_chunk` positions bound the (u, H, chunk, S) attention scores; the padding
        slots [len, T) of a row get stale latents, each overwritten before any query of that row reads it."""
        u, T = ids.shape
        pos = torch.arange(T, device=self.device).expand(u, T)
        c = self.prefill_chunk
        return torch.cat([self.model.hidden_states(ids[:, a : a + c], pos[:, a : a + c], cache)[0]
                          for a in range(0, T, c)], dim=1)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (n, D) -> float logits (n, V); in float32 on the CPU in MKL's faster order (fastpath.logits)."""
        if self.fast is not None and h.device.type == "cpu":
            return logits(self.model.lm_head, h)
        return self.model.lm_head(h).float()

    def _decode_step(self, events: list[Event]) -> None:
        act = self._active
        ids = torch.tensor([r.out[-1] for r in act], device=self.device)  # (n,)
        pos = torch.tensor([r.pos for r in act], device=self.device)  # (n,)
        if self.fast is not None:
            self.fast.refresh_if_changed()  # the weights may have been trained since the last step (GRPO)
            h = self.fast.hidden(ids, pos, self.cache)  # (n, D); writes rows [0, n)
        else:
            h = self.model.hidden_states(ids[:, None], pos[:, None], self.cache)[0][:, 0]
        toks = self._choose(act, self._logits(h))
        self.stats["decode_steps"] += 1
        for r, t in zip(act, toks):
            r.pos += 1
            self._emit(r, t, events)
        self._release([r for r in act if r.done])

    # --- speculative (MTP) --------------------------------------------------------------------------------------
    def _mtp_draft(self, cache, h, next_ids, pos, pick) -> list[int]:
        """MTP module 1 over rows [0, n) of the cache: h (n, T, D) main hiddens at positions pos (n, T), next_ids
        (n, T) the tokens one ahead; returns the greedy draft at index pick (n,) of each row."""
        layer = self.model.mtp_layers[0]
        cos, sin = self.model.rotary(pos)
        emb = self.model.model.embed_tokens(next_ids)
        out = layer(h, emb, cos, sin, pos, cache, int(pos.max()) + 1)  # (n, T, D)
        last = out[torch.arange(out.shape[0], device=out.device), pick]  # (n, D)
        return self.model.lm_head(layer.shared_head.norm(last)).argmax(-1).tolist()

    def _draft_prompts(self, new, h, ids, lens, toks, cache) -> None:
        """Fill the MTP cache rows of the newcomers over their prompts (position i sees h_i (k, T, D) and token
        i+1, at the last position the first generated token) and make each newcomer's first draft."""
        k, T = ids.shape
        nxt = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)  # (k, T)
        nxt[torch.arange(k, device=self.device), lens - 1] = torch.tensor(toks, device=self.device)
        pos = torch.arange(T, device=self.device).expand(k, T)
        c, drafts = self.prefill_chunk, torch.zeros(k, dtype=torch.long)
        for a in range(0, T, c):  # chunked like the prefill; a row's draft comes from the chunk holding len-1
            last = (lens - 1 - a).clamp(0, min(c, T - a) - 1)
            d = self._mtp_draft(cache, h[:, a : a + c], nxt[:, a : a + c], pos[:, a : a + c], last)
            inside = ((lens - 1 >= a) & (lens - 1 < a + c)).cpu()
            drafts = torch.where(inside, torch.tensor(d), drafts)
        for r, d in zip(new, drafts.tolist()):
            r.draft = d

    def _speculative_step(self, events: list[Event]) -> None:
        act = self._active
        ids = torch.tensor([[r.out[-1], r.draft] for r in act], device=self.device)  # (n, 2): [verified, draft]
        pos = torch.tensor([[r.pos, r.pos + 1] for r in act], device=self.device)  # (n, 2)
        h = self.model.hidden_states(ids, pos, self.cache)[0]  # (n, 2, D)
        greedy = self.model.lm_head(h).argmax(-1).tolist()  # (n, 2)
        self.stats["decode_steps"] += 1
        nxt, pick = [], []
        for r, (g0, g1) in zip(act, greedy):
            y0 = r.forced.popleft() if r.forced else g0
            accept = y0 == r.draft
            self.stats["drafted"] += 1
            self.stats["accepted"] += int(accept)
            r.pos += 1
            self._emit(r, y0, events)
            y1 = y0
            if accept and not r.done:
                y1 = r.forced.popleft() if r.forced else g1
                r.pos += 1
                self._emit(r, y1, events)
            nxt.append([y0, y1])
            pick.append(1 if accept else 0)
        nxt_t, pick_t = torch.tensor(nxt, device=self.device), torch.tensor(pick, device=self.device)
        drafts = self._mtp_draft(self.cache, h, nxt_t, pos, pick_t)  # from h_p+1 if accepted, else h_p
        for r, d in zip(act, drafts):
            r.draft = d
        self._release([r for r in act if r.done])


def _token_ids(prompt_ids, vocab_size: int) -> list[int]:
    """A prompt as a list of token ids in [0, vocab_size); a ValueError/TypeError that says what is wrong."""
    if isinstance(prompt_ids, (str, bytes)) or not (
            isinstance(prompt_ids, (Sequence, torch.Tensor)) or hasattr(prompt_ids, "__array__")):  # numpy too
        raise TypeError(f"a prompt is a list of token ids, got {type(prompt_ids).__name__} (tokenize text first)")
    if getattr(prompt_ids, "ndim", 1) != 1:
        raise ValueError(f"a prompt is a 1-D list of token ids, got a tensor of shape {tuple(prompt_ids.shape)}")
    try:
        ids = [int(t) for t in prompt_ids]
    except (TypeError, ValueError):
        raise TypeError("a prompt is a list of int token ids (generate() takes a list of such lists)") from None
    if not ids:
        raise ValueError("empty prompt")
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab_size})")
    return ids


def _logprobs(logits: torch.Tensor, toks: list[int], k: int) -> list[TokenLogprob]:
    """logits (n, V), the n tokens chosen -> each one's log-probability and the k likeliest [(id, log p)]."""
    lp = logits.float().log_softmax(dim=-1)  # (n, V)
    chosen = lp.gather(1, torch.tensor(toks, device=lp.device)[:, None])[:, 0].tolist()  # (n,)
    top_lp, top_id = lp.topk(min(k, lp.shape[1]), dim=-1)  # (n, k)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, top_id.tolist(), top_lp.tolist())]
