"""The inference engine on a tiny random model (CPU, float32): cached decoding against full forwards, greedy parity
with transformers, prefix sharing, continuous batching, MTP speculative decoding, sampling and stop tokens."""

from __future__ import annotations

import shutil

import pytest
import torch

import nanoseek
from nanoseek.engine.cache import LatentCache
from nanoseek.engine.engine import Engine, SamplingParams
from nanoseek.engine.fastpath import FastDecoder, logits
from nanoseek.engine.sampling import filtered_probs, sample

PROMPTS = [[5, 17, 99, 3, 250, 41, 7], [12, 400, 8], [301, 2, 77, 150, 9, 10, 11, 12, 13, 14, 200], [64, 64]]


@pytest.fixture(scope="module")
def model():
    """cpu-tiny with a wider init (std 0.1) and a non-zero routing bias, so logits are far from uniform."""
    torch.manual_seed(0)
    m = nanoseek.build_model(nanoseek.get_preset("cpu-tiny").replace(initializer_range=0.1)).eval()
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return m


@pytest.fixture
def engine(model):
    return Engine(model, max_batch_size=8, max_seq_len=96)


def greedy_reference(model, prompt, n):
    """Plain full-sequence forwards, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_cached_decoding_matches_full_forward(model):
    """Right-padded prompts of different lengths, per-row positions; every decode step's logits equal a full
    forward over the sequence so far."""
    prompts = [PROMPTS[0], PROMPTS[1]]
    T = max(map(len, prompts))
    cache = LatentCache(model.config, 2, 64)
    ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
    seqs = [list(p) for p in prompts]
    with torch.no_grad():
        logits = model(ids, torch.arange(T).expand(2, T), cache)
        last = torch.stack([logits[i, len(p) - 1] for i, p in enumerate(prompts)])
        for _ in range(12):
            for i, s in enumerate(seqs):
                full = model(torch.tensor([s]))[0, -1]
                assert (last[i] - full).abs().max().item() <= 1e-4
            nxt = last.argmax(-1)
            pos = torch.tensor([[len(s)] for s in seqs])
            for s, t in zip(seqs, nxt.tolist()):
                s.append(t)
            last = model(nxt[:, None], pos, cache)[:, 0]


@pytest.mark.parametrize("variant", [{}, {"rope_interleave": False, "q_lora_rank": None, "attention_bias": True}])
def test_fast_decode_path_matches_modules(model, variant):
    """fastpath.FastDecoder: each decode step's final hidden state and cache contents equal the module path's, for
    a batch of rows at different positions (the per-expert grouped branch) and for a single row (the addmm one);
    so do those of the step `compile=True` compiles, run eagerly here (it only reads the past)."""
    m = model
    if variant:
        torch.manual_seed(1)
        m = nanoseek.build_model(model.config.replace(initializer_range=0.1, **variant)).eval()
        if m.config.attention_bias:
            with torch.no_grad():
                for layer in m.main_layers:
                    layer.self_attn.kv_a_proj_with_mqa.bias.normal_(0, 0.1)
                    layer.self_attn.o_proj.bias.normal_(0, 0.1)
    fast = FastDecoder(m)
    for prompts in ([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [PROMPTS[1]]):
        n, T = len(prompts), max(map(len, prompts))
        ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
        caches = [LatentCache(m.config, n, 64) for _ in range(2)]
        with torch.no_grad():
            for c in caches:
                m.hidden_states(ids, torch.arange(T).expand(n, T), c)
            tok, pos = torch.tensor([p[-1] for p in prompts]), torch.tensor([len(p) for p in prompts])
            for _ in range(10):
                past = caches[1].data[: len(m.main_layers), :n, : int(pos.max())].clone()
                ref = m.hidden_states(tok[:, None], pos[:, None], caches[0])[0][:, 0]
                got = fast.hidden(tok, pos, caches[1])
                assert (got - ref).abs().max().item() <= 1e-5
                assert (caches[1].data - caches[0].data).abs().max().item() <= 1e-5
                # the compiled step's math, run eagerly: reads the past only, fused experts (and one row's gemvs)
                h, latents = fast._step(tok, pos, past, past_only=True)
                assert (h - ref).abs().max().item() <= 1e-5
                new = caches[0].data[: len(m.main_layers), torch.arange(n), pos]  # (layers, n, R + Dr)
                assert (torch.stack(latents) - new).abs().max().item() <= 1e-5
                tok, pos = m.lm_head(ref).argmax(-1), pos + 1


@pytest.mark.parametrize("bias", [False, True])
def test_logits_in_mkl_order_equal_lm_head(bias):
    """fastpath.logits computes h Wᵀ as (W hᵀ)ᵀ (one row as two): the same logits as the module, 1 and 3 rows."""
    torch.manual_seed(0)
    head = torch.nn.Linear(48, 300, bias=bias)
    for n in (1, 3):
        h = torch.randn(n, 48)
        got = logits(head, h)
        assert got.shape == (n, 300) and (got - head(h)).abs().max().item() <= 1e-5


def test_fast_decode_follows_weight_updates(model):
    """The engine rebuilds the fast path's absorbed matrices when a parameter changes in place (GRPO's updates)."""
    m = nanoseek.build_model(model.config).eval()
    m.load_state_dict(model.state_dict())
    fast, slow = Engine(m, max_seq_len=64), Engine(m, max_seq_len=64, fast_decode=False)
    assert fast.fast is not None and slow.fast is None
    assert fast.generate(PROMPTS, max_new_tokens=12) == slow.generate(PROMPTS, max_new_tokens=12)
    with torch.no_grad():
        for layer in m.main_layers:
            layer.self_attn.kv_b_proj.weight.mul_(-1.5)
    assert fast.generate(PROMPTS, max_new_tokens=12) == slow.generate(PROMPTS, max_new_tokens=12)


@pytest.mark.skipif(not shutil.which("c++"), reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_decode_matches_modules(model):
    """Engine(compile=True): warm_up() compiles, then decode steps go through the torch.compile'd step (two
    graphs: one sequence, and any batch of 2 or more, each for every cache length: it only reads the past and
    returns the new latents). Greedy tokens equal the module path's for one sequence and for a batch whose requests
    finish at different steps (rows are compacted under it), and every step's hidden states and cache rows equal it
    to 1e-5, for one sequence and for three at different positions, also after an in-place weight change."""
    m = nanoseek.build_model(model.config).eval()
    m.load_state_dict(model.state_dict())
    compiled, slow = Engine(m, max_seq_len=64, compile=True), Engine(m, max_seq_len=64, fast_decode=False)
    fast, stats = compiled.fast, dict(compiled.stats)
    compiled.warm_up()  # compiles both graphs: one step of one sequence, one of two
    assert fast.compiled_steps == 2 and compiled.stats == stats
    assert compiled.generate([PROMPTS[2]], max_new_tokens=20) == slow.generate([PROMPTS[2]], max_new_tokens=20)
    assert fast.compiled_steps == 2 + 19  # every decode step after the first token (which comes from the prefill)

    def staggered(engine):  # four requests of different lengths in one batch
        rids = [engine.submit(p, SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS, (9, 16, 4, 12))]
        reqs = [engine._requests[r] for r in rids]
        while engine.has_work():
            engine.step()
        return [r.out for r in reqs]

    assert staggered(compiled) == staggered(slow)
    assert fast.compiled_steps == 2 + 19 + 15
    for prompts in ([PROMPTS[0]], PROMPTS[:3]):
        n, T = len(prompts), max(map(len, prompts))
        caches = [LatentCache(m.config, n, 64) for _ in range(2)]
        ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
        with torch.no_grad():
            for c in caches:
                m.hidden_states(ids, torch.arange(T).expand(n, T), c)
            tok, pos = torch.tensor([p[-1] for p in prompts]), torch.tensor([len(p) for p in prompts])
            for step in range(12):
                if step == 6:
                    for layer in m.main_layers:
                        layer.self_attn.kv_b_proj.weight.mul_(-1.5)
                    fast.refresh_if_changed()
                ref = m.hidden_states(tok[:, None], pos[:, None], caches[0])[0][:, 0]
                got = fast.hidden(tok, pos, caches[1])
                assert (got - ref).abs().max().item() <= 1e-5
                for i in range(n):  # the filled slots of each row (padding slots of the prefill may differ)
                    filled = slice(0, int(pos[i]) + 1)
                    assert (caches[1].data[:, i, filled] - caches[0].data[:, i, filled]).abs().max().item() <= 1e-5
                tok, pos = m.lm_head(ref).argmax(-1), pos + 1
    assert fast.compiled_steps == 2 + 19 + 15 + 24


def test_compile_on_a_model_without_the_fast_path_warns(model):
    import copy

    with pytest.warns(UserWarning, match="decodes without it"):
        e = Engine(copy.deepcopy(model).to(torch.bfloat16), max_seq_len=32, compile=True)
    assert e.fast is None


def test_engine_greedy_matches_reference_and_transformers(model, engine, tmp_path):
    from transformers import DeepseekV3ForCausalLM

    hf = DeepseekV3ForCausalLM.from_pretrained(nanoseek.save_model(model, tmp_path / "m")).eval()
    eos = model.config.eos_token_id
    ours = engine.generate(PROMPTS, max_new_tokens=24, stop_token_ids=[eos])
    assert len({tuple(o) for o in ours}) == len(ours) and all(len(set(o)) > 3 for o in ours)  # not degenerate
    for p, o in zip(PROMPTS, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, pad_token_id=0)[0, len(p):]
        assert o == ref.tolist()  # transformers stops after eos and includes it; so do we
        assert o == greedy_reference(model, p, 24)[: len(o)]


def test_generate_stops_at_the_configs_eos_by_default_as_transformers_does(model, tmp_path):
    """DESIGN.md's `engine.generate(prompts, max_new_tokens=128, temperature=0.0)` with no stop ids: the config's
    eos ends a completion, as in transformers' greedy generate; stop_token_ids=() runs to max_new_tokens."""
    import copy

    from transformers import DeepseekV3ForCausalLM

    m = copy.deepcopy(model)
    full = Engine(m, max_seq_len=64).generate(PROMPTS[:1], max_new_tokens=24, stop_token_ids=())[0]
    m.config.eos_token_id = full[5]  # a token this prompt's greedy run emits, first at index first
    first = full.index(full[5])
    engine = Engine(m, max_seq_len=64)
    assert engine.generate(PROMPTS[:1], max_new_tokens=24)[0] == full[: first + 1]
    assert engine.generate(PROMPTS[:1], max_new_tokens=24, stop_token_ids=())[0] == full
    hf = DeepseekV3ForCausalLM.from_pretrained(nanoseek.save_model(m, tmp_path / "m")).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor(PROMPTS[:1]), max_new_tokens=24, do_sample=False, pad_token_id=0)[0]
    assert ref[len(PROMPTS[0]):].tolist() == full[: first + 1]


@pytest.mark.parametrize("kw", [{}, {"fast_decode": False}, {"speculative": True}])
def test_training_mode_is_restored(model, kw):
    """A model in training mode (GRPO) stays so, and no routing stats are recorded: the module forwards run in eval
    mode, the fast decode path calls the router directly."""
    model.train()
    try:
        fast = kw.get("fast_decode", True)
        Engine(model, max_seq_len=32, fast_decode=fast).generate([[1, 2, 3]], max_new_tokens=3,
                                                                  speculative=kw.get("speculative", False))
        assert model.training and all(m.load is None for m in model.moe_layers())  # no routing stats recorded
    finally:
        model.eval()


def test_prefix_sharing_equals_no_sharing(model):
    """Also: prefill in chunks of 3 positions gives the same tokens as one forward per prompt batch."""
    # the longest prompt repeated too, as GRPO's G copies of one prompt are (a shared prefix one position short
    # passed when the copies were shorter than the batch's longest)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[2]]
    results, prefill = {}, {}
    for share, chunk in ((True, 512), (False, 512), ("chunked", 3)):
        e = Engine(model, max_batch_size=8, max_seq_len=96, prefill_chunk=chunk)
        e.share_prefix = bool(share)
        results[share] = (e.generate(prompts, max_new_tokens=12),
                          e.generate(prompts, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7))
        prefill[share] = e.stats["prefill_tokens"]
    assert results[True] == results[False] == results["chunked"]
    greedy, sampled = results[True]
    assert greedy[0] == greedy[2] == greedy[3] and sampled[0] != sampled[2]  # seed + i per prompt
    assert prefill[True] == 2 * sum(map(len, PROMPTS[:3])) and prefill[False] == 2 * sum(map(len, prompts))


def run_until_done(engine, events=None):
    out = {}
    while engine.has_work():
        for rid, tok, fin, reason, _ in engine.step():
            out.setdefault(rid, []).append(tok)
            if events is not None and fin:
                events[rid] = reason
    return out


def test_continuous_batching_matches_running_alone(model, engine):
    alone = [engine.generate([p], max_new_tokens=n)[0] for p, n in zip(PROMPTS, (10, 14, 6, 9))]
    e = Engine(model, max_batch_size=2, max_seq_len=96)  # 2 slots: the 3rd/4th requests wait for a free row
    out, reasons = {}, {}
    rids = [e.submit(PROMPTS[0], SamplingParams(max_new_tokens=10))]
    for step in range(200):
        if step == 2:
            rids.append(e.submit(PROMPTS[1], SamplingParams(max_new_tokens=14)))
        if step == 3:
            rids += [e.submit(p, SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS[2:], (6, 9))]
            assert e.num_waiting == 2
        for rid, tok, fin, reason, _ in e.step():
            out.setdefault(rid, []).append(tok)
            if fin:
                reasons[rid] = reason
        assert e.num_active <= 2
        if step > 3 and not e.has_work():
            break
    assert [out[r] for r in rids] == alone
    assert all(reasons[r] == "length" for r in rids)


def test_cancel_frees_slot_and_force_next(model, engine):
    e = Engine(model, max_batch_size=2, max_seq_len=96)
    a = e.submit(PROMPTS[0], SamplingParams(max_new_tokens=50))
    b = e.submit(PROMPTS[1], SamplingParams(max_new_tokens=50))
    c = e.submit(PROMPTS[2], SamplingParams(max_new_tokens=5))
    e.step()
    assert e.num_active == 2 and e.num_waiting == 1
    assert e.cancel(a) and not e.cancel(a)
    assert e.num_active == 1
    events = e.step()  # c takes a's row and emits its first token; b (moved to row 0) waits for the next step
    assert [r for r, *_ in events] == [c] and e.num_active == 2
    assert {r for r, *_ in e.step()} == {b, c}  # then both decode together
    assert e.cancel(b)
    got = run_until_done(e)
    assert got[c] == engine.generate([PROMPTS[2]], max_new_tokens=5)[0][2:]  # c's first 2 tokens came above
    # forced tokens are emitted verbatim and fed through the model: the greedy continuation after them equals
    # plain greedy decoding of prompt + forced tokens
    d = e.submit(PROMPTS[3], SamplingParams(max_new_tokens=10))
    forced = [7, 8, 9]
    e.force_next(d, forced)
    toks = run_until_done(e)[d]
    assert toks[:3] == forced and toks[3:] == engine.generate([PROMPTS[3] + forced], max_new_tokens=7)[0]


def test_a_speculative_request_waits_for_a_plain_batch(model, engine):
    """One batch never mixes the two modes: a request of the other mode waits for the running batch to finish."""
    e = Engine(model, max_batch_size=4, max_seq_len=96)
    a = e.submit(PROMPTS[0], SamplingParams(max_new_tokens=6))
    e.step()
    b = e.submit(PROMPTS[1], SamplingParams(max_new_tokens=6, speculative=True))
    got = run_until_done(e)
    assert got[b] == engine.generate([PROMPTS[1]], max_new_tokens=6)[0]
    assert len(got[a]) == 5  # the first token came from the step above


@pytest.mark.parametrize("kw", [{"max_batch_size": 0}, {"prefill_chunk": 0}])
def test_engine_refuses_empty_batches_or_chunks(model, kw):
    with pytest.raises(ValueError):
        Engine(model, max_seq_len=32, **kw)


def test_engine_refuses_a_cache_past_the_models_context(model):
    """Decoding past max_position_embeddings would go on with no word (score() refuses it)."""
    with pytest.raises(ValueError, match="past the model's context"):
        Engine(model, max_seq_len=model.config.max_position_embeddings + 1)


def test_speculative_equals_greedy(model, engine):
    plain = engine.generate(PROMPTS, max_new_tokens=20)
    assert engine.generate(PROMPTS, max_new_tokens=20, speculative=True) == plain
    assert engine.stats["drafted"] > 0 and 0 <= engine.stats["accepted"] <= engine.stats["drafted"]
    chunked = Engine(model, max_batch_size=8, max_seq_len=96, prefill_chunk=4)  # MTP prompt pass in chunks too
    assert chunked.generate(PROMPTS, max_new_tokens=20, speculative=True) == plain

    # An oracle drafter (right every other step) exercises the accept path: still exactly plain greedy.
    e = Engine(model, max_batch_size=8, max_seq_len=96)
    oracle = dict(zip(range(len(PROMPTS)), plain))
    inner, calls = e._speculative_step, [0]

    def cheat(events):
        calls[0] += 1
        for r in e._active:
            if calls[0] % 2 and len(r.out) < len(oracle[r.rid]):
                r.draft = oracle[r.rid][len(r.out)]
        inner(events)

    e._speculative_step = cheat
    assert e.generate(PROMPTS, max_new_tokens=20, speculative=True) == plain
    assert e.stats["accepted"] > 0.3 * e.stats["drafted"]
    with pytest.raises(ValueError):
        engine.generate(PROMPTS, max_new_tokens=4, temperature=0.7, speculative=True)
    no_mtp = nanoseek.build_model(nanoseek.get_preset("cpu-tiny").replace(num_nextn_predict_layers=0))
    with pytest.raises(ValueError):
        Engine(no_mtp, max_seq_len=32).generate([[1, 2]], max_new_tokens=4, speculative=True)


def test_sampling(engine):
    a = engine.generate(PROMPTS, max_new_tokens=10, temperature=1.0, top_k=50, seed=3)
    assert a == engine.generate(PROMPTS, max_new_tokens=10, temperature=1.0, top_k=50, seed=3)
    assert a != engine.generate(PROMPTS, max_new_tokens=10, temperature=1.0, top_k=50, seed=4)
    assert engine.generate(PROMPTS, max_new_tokens=10, temperature=1.0, top_k=1, seed=3) == \
        engine.generate(PROMPTS, max_new_tokens=10)

    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(3, 1)
    cooled = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2  # temperature 0.5 squares the probabilities, renormalised
    assert torch.allclose(filtered_probs(logits[:1], temperature=0.5)[0], cooled / cooled.sum())
    p = filtered_probs(logits, temperature=1.0, top_p=[0.7, 0.85, 1.0])
    assert (p > 0).tolist() == [[True, True, False, False], [True, True, True, False], [True] * 4]
    assert torch.allclose(p[0], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    # top-p is measured on the renormalised top-k set: (0.625, 0.375), so 0.6 keeps one token (0.5 + 0.3 would keep 2)
    assert (filtered_probs(logits[:1], top_k=2, top_p=0.6) > 0).tolist() == [[True, False, False, False]]
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample(logits, 1.0, 1.0, [0, 2, 3], generator=g) for _ in range(300)]).view(-1, 3)
    assert set(draws[:, 1].tolist()) == {0, 1} and set(draws[:, 2].tolist()) == {0, 1, 2}
    assert abs((draws[:, 0] == 0).float().mean().item() - 0.5) < 0.1
    rows = torch.randn(4, 512)
    picked = sample(rows, temperature=[0.0, 1.0, 0.0, 1.0], top_k=[0, 1, 5, 1])  # per-row: greedy or top-1
    assert picked.dtype == torch.long and picked.tolist() == rows.argmax(-1).tolist()


def test_extreme_sampling_values_are_greedy_or_off(engine):
    """A temperature of 1e-40 (logits / t overflow to inf, softmax NaN) samples as greedy, and a top-k past the
    vocabulary (2^80 overflows a long) is off: neither may fail the step that the batch's other requests share."""
    assert engine.generate(PROMPTS, max_new_tokens=6, temperature=1e-40, seed=1) == \
        engine.generate(PROMPTS, max_new_tokens=6)
    assert engine.generate(PROMPTS, max_new_tokens=6, temperature=1.0, top_k=2**80, seed=1) == \
        engine.generate(PROMPTS, max_new_tokens=6, temperature=1.0, seed=1)


def test_stop_tokens(engine):
    full = engine.generate(PROMPTS[:2], max_new_tokens=16)
    stop = full[0][5]
    cut = engine.generate(PROMPTS[:2], max_new_tokens=16, stop_token_ids=[stop, 10_000])
    for f, c in zip(full, cut):
        n = f.index(stop) + 1 if stop in f else len(f)
        assert c == f[:n]  # stops at and includes the first stop token
    assert len(cut[0]) <= 6
    rid = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=16, stop_token_ids=[stop]))
    reasons = {}
    run_until_done(engine, reasons)
    assert reasons[rid] == "stop"


def test_logprobs_of_generated_tokens(model, engine):
    """Sampled at T 0.8 in a batch: each event's log-probability and top-5 are log_softmax of a full forward over the
    sequence so far (the raw distribution, not the tempered one), and asking for them changes no token."""
    params = [SamplingParams(max_new_tokens=8, temperature=0.8, seed=i, logprobs=5) for i in range(3)]
    rids = {engine.submit(p, sp): p for p, sp in zip(PROMPTS[:3], params)}
    got = {rid: [] for rid in rids}
    while engine.has_work():
        for rid, tok, _, _, lp in engine.step():
            got[rid].append((tok, lp))
    plain = engine.generate(PROMPTS[:3], max_new_tokens=8, temperature=0.8, seed=0)
    for (rid, prompt), ref in zip(rids.items(), plain):
        assert [t for t, _ in got[rid]] == ref
        seq = list(prompt)
        for tok, (chosen, top) in got[rid]:
            with torch.no_grad():
                want = model(torch.tensor([seq]))[0, -1].log_softmax(-1)
            assert abs(chosen - want[tok].item()) < 1e-4
            ids, values = zip(*top)
            assert list(ids) == want.topk(5).indices.tolist()
            assert torch.allclose(torch.tensor(values), want.topk(5).values, atol=1e-4)
            seq.append(tok)
    assert all(lp is None for *_, lp in [ev for ev in _events(engine, PROMPTS[0])])
    with pytest.raises(ValueError):
        engine.submit(PROMPTS[0], SamplingParams(speculative=True, logprobs=1))


def _events(engine, prompt):
    engine.submit(prompt, SamplingParams(max_new_tokens=3))
    events = []
    while engine.has_work():
        events += engine.step()
    return events


def test_score_matches_transformers(model, engine, tmp_path):
    """score(): each prompt token's log-probability given the ones before, against transformers' log_softmax over the
    same weights; chunked (prefill_chunk 4) like a long prompt; None for the first token."""
    from transformers import DeepseekV3ForCausalLM

    hf = DeepseekV3ForCausalLM.from_pretrained(nanoseek.save_model(model, tmp_path / "m")).eval()
    prompt = PROMPTS[2]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].log_softmax(-1)  # (T, V)
    engine.prefill_chunk = 4
    scored = engine.score(prompt, k=3)
    assert scored[0] is None and len(scored) == len(prompt)
    for i, (chosen, top) in enumerate(scored[1:]):
        assert abs(chosen - ref[i, prompt[i + 1]].item()) < 1e-4
        assert [t for t, _ in top] == ref[i].topk(3).indices.tolist()
    assert engine.score([7]) == [None]


def test_newcomers_that_finish_at_once_do_not_starve_the_running(model):
    """One 1-token request arriving every step kept a running request from ever decoding (it admitted each time)."""
    e = Engine(model, max_batch_size=2, max_seq_len=96)
    long = e.submit(PROMPTS[0], SamplingParams(max_new_tokens=20))
    got = []
    for _ in range(60):
        e.submit(PROMPTS[1], SamplingParams(max_new_tokens=1))
        got += [tok for rid, tok, *_ in e.step() if rid == long]
    assert len(got) == 20 and e.stats["decode_steps"] >= 19


def test_bad_input_is_a_clear_error_and_leaves_the_engine_usable(model):
    """Found by an audit of the Python API: a batch refused at its second prompt left the first queued, so every later
    generate() failed with "needs an idle engine"; an out-of-vocabulary id was an IndexError from inside torch."""
    e = Engine(model, max_batch_size=4, max_seq_len=64)
    V = model.config.vocab_size
    for prompts, kwargs, error in [
        ([[5, 6], []], {}, "empty prompt"),
        ([[5, 6], [7, V]], {}, f"token id {V} is outside the vocabulary"),
        ([[5, 6], [-1]], {}, "token id -1 is outside"),
        ([[5, 6], [7]], {"seed": [1]}, "1 seeds for 2 prompts"),
        ([[5, 6]], {"temperature": float("nan")}, "temperature >= 0"),
        ([[5, 6]], {"max_new_tokens": -1}, "max_new_tokens must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=error):
            e.generate(prompts, max_new_tokens=kwargs.pop("max_new_tokens", 4), **kwargs)
        assert not e.has_work()
    for prompts in ("hello", [5, 6, 7], torch.tensor([5, 6, 7])):
        with pytest.raises(TypeError, match="list of prompts"):
            e.generate(prompts, max_new_tokens=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        e.score([5, V + 3])
    with pytest.raises(ValueError, match="k must be >= 0"):
        e.score([5, 6], k=-1)
    assert e.generate([[5, 6]], max_new_tokens=3, stop_token_ids=()) == [greedy_reference(model, [5, 6], 3)]
    import numpy as np  # a tokenizer's return_tensors="np" output, as before the checks

    assert e.generate(np.array([[5, 6]]), max_new_tokens=3, stop_token_ids=()) == [greedy_reference(model, [5, 6], 3)]


def test_a_completion_cut_by_the_cache_row_warns(model):
    e = Engine(model, max_batch_size=2, max_seq_len=16)
    with pytest.warns(UserWarning, match="exceeds this engine's max_seq_len=16"):
        out = e.generate([list(range(1, 13))], max_new_tokens=10, stop_token_ids=())
    assert len(out[0]) == 4  # 12 prompt tokens + 4 fill the 16 positions


def test_top_k_keeps_ties_and_top_p_one_keeps_the_tail_as_transformers_does():
    """top-k kept exactly k tokens by rank, so which of several tied with the k-th survived depended on the sort;
    top_p 1.0 (off) still cut the tail where the float sum reached 1 first."""
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0, -1.0]])
    want = TopKLogitsWarper(top_k=1)(None, logits.clone()).softmax(-1)
    assert torch.allclose(filtered_probs(logits, top_k=1), want) and (want > 0).sum() == 3
    big = torch.linspace(30, -30, 129280)[None]  # a long tail of tiny probabilities
    assert bool((filtered_probs(big, top_p=1.0) > 0).all())
