"""Memory of SFT's tokenized conversations: the old way (a Python list of (ids, mask) lists per conversation, as
`nanoseek sft` held them before `data/chat_tokens.py`) against the current one (flat arrays written to disk and
memory-mapped). Same conversations, one process; checks that both hold the same tokens and prints bytes per token
of Python heap (tracemalloc's peak while building) and of the cache's files (page cache, shared by torchrun ranks).

    .venv/bin/python bench/chat_memory.py --tokenizer RUN/sft/model [--n 40000]
"""

import argparse
import tempfile
import time
import tracemalloc

from nanoseek.data import chat_tokens
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.sft import default_conversations

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--tokenizer", required=True, help="a model or tokenizer directory (the speedrun's sft/model)")
ap.add_argument("--n", type=int, default=40000, help="task-suite conversations")
args = ap.parse_args()
tok = Tokenizer.from_dir(args.tokenizer)
chats = [c["messages"] for c in default_conversations(args.n, seed=1)]


def measured(fn):
    tracemalloc.start()
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, peak, seconds


lists, lists_peak, lists_s = measured(lambda: [tok.chat_sample(m) for m in chats])
n_tokens = sum(len(ids) for ids, _ in lists)
with tempfile.TemporaryDirectory() as d:
    cache, cache_peak, cache_s = measured(lambda: chat_tokens.build(iter(chats), tok, f"{d}/c", "bench"))
    assert [cache[i] for i in range(len(cache))] == lists
    files = sum(a.nbytes for a in (cache.ids, cache.mask, cache.offsets, cache.answer_at))
print(f"{len(chats)} conversations, {n_tokens} tokens")
print(f"lists:       Python heap {lists_peak / 2**20:6.1f} MB ({lists_peak / n_tokens:.1f} bytes/token), {lists_s:.1f} s")
print(f"chat_tokens: Python heap {cache_peak / 2**20:6.1f} MB at most while building (a buffer, whatever the size) + "
      f"{files / 2**20:.1f} MB of memory-mapped files ({files / n_tokens:.1f} bytes/token), {cache_s:.1f} s")
print(f"ratio (lists heap / chat_tokens heap + files): {lists_peak / (cache_peak + files):.1f}x")
