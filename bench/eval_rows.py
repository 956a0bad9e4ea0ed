"""How many sequences to decode at once in evaluation and local-teacher traces: the old way (the prompts in static
chunks of 64 through a 64-row engine, each chunk waiting for its longest completion) against the current one
(`Engine.for_batch` via `evaluate.engine_for`: up to 512 rows, prompts handed over in chunks of twice that, rows refilled as completions
end). Same model, same problems, one process; checks that the completions are identical and prints the speedup.

    .venv/bin/python bench/eval_rows.py --model RUN/sft/model [--n 1000] [--traces 1024]
"""

import argparse
import json
import time

import torch

from nanoseek.data.tasks import mixture
from nanoseek.engine.engine import Engine
from nanoseek.eval.evaluate import completion_text, engine_for, prompts_for, run_eval, summarize
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.teacher import LocalTeacher, Trace, split_reasoning

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--model", required=True, help="a chat model directory (the speedrun's sft/model)")
ap.add_argument("--n", type=int, default=1000, help="evaluation problems (greedy, 320 new tokens)")
ap.add_argument("--traces", type=int, default=1024, help="teacher traces (T 0.6, 256 new tokens)")
args = ap.parse_args()
tok = Tokenizer.from_dir(args.model)
families = ["arithmetic", "word", "countdown"]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


# evaluation: the speedrun's held-out set
problems = mixture(args.n, seed=4242, split="eval", families=families)
old_engine = Engine.from_pretrained(args.model, max_batch_size=64)


def old_eval():  # run_eval's former loop: static chunks of 64
    prompts = prompts_for(problems, tok, "chat")
    return [o for s in range(0, len(prompts), 64)
            for o in old_engine.generate(prompts[s : s + 64], max_new_tokens=320, stop_token_ids=[tok.eos_id])]


old, t_old = timed(old_eval)
new_engine = engine_for(args.model, "cpu", prompts_for(problems, tok, "chat"), 320)
res, t_new = timed(lambda: run_eval(new_engine, tok, problems, max_new_tokens=320, progress=False))
same_eval = ["<think>\n" + completion_text(tok, o) for o in old] == [r.completions[0] for r in res]  # (the prefill)

# teacher traces: training-split questions, sampled
questions = [p.question for p in mixture(args.traces, seed=7, split="train", families=families)]
chat = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in questions]


def old_traces():  # LocalTeacher's former loop: static chunks of 64 through a 64-row engine
    return [o for s in range(0, len(chat), 64)
            for o in old_engine.generate(chat[s : s + 64], max_new_tokens=256, temperature=0.6, seed=s,
                                         stop_token_ids=[tok.eos_id])]


old_t, t_old_tr = timed(old_traces)
teacher = LocalTeacher(args.model)
new_t, t_new_tr = timed(lambda: list(teacher.traces(questions, 256, 0.6, list(range(len(questions))))))


def as_trace(out):
    finished = bool(out) and out[-1] == tok.eos_id
    return Trace(*split_reasoning(tok.decode(out[:-1] if finished else out), prefilled=True), finished)


same_traces = [as_trace(o) for o in old_t] == [t for _, t in new_t]

print(json.dumps({
    "threads": torch.get_num_threads(), "eval_n": args.n, "pass@1": summarize(res)["pass@1"],
    "eval_s_old": round(t_old, 1), "eval_s_new": round(t_new, 1), "eval_speedup": round(t_old / t_new, 2),
    "eval_identical": same_eval, "traces": args.traces, "traces_s_old": round(t_old_tr, 1),
    "traces_s_new": round(t_new_tr, 1), "traces_speedup": round(t_old_tr / t_new_tr, 2), "traces_identical": same_traces,
}))
