"""Tokenized conversations for SFT: flat arrays in a directory of the run (RUN/chat_tokens/), memory-mapped.

Held as Python lists, a token of a tokenized chat cost about 26 bytes (100 MB of chats: 1.9 GB of RAM), and every
torchrun rank and every --resume tokenized the whole set again. Here a token costs 3 bytes (a uint16 id and a uint8
mask; 5 with a vocabulary above 65536), written as it is tokenized and read back through the page cache, which the
processes of a run share. The directory:
    ids.bin        (N,) uint16|uint32   every conversation's tokens, back to back
    mask.bin       (N,) uint8           1 on the tokens SFT learns (assistant content and its closing eos)
    offsets.bin    (n + 1,) int64       conversation i is tokens [offsets[i], offsets[i + 1])
    answer_at.bin  (n,) int64           where conversation i's first supervised token is (-1: none)
    meta.json      {"version", "dtype", "n", "tokens", "key", "sha256": {file: digest}}
The key hashes the format version, the tokenizer (vocabulary, special tokens, chat template) and the conversations'
source (the bytes of every --data file, or the default conversations themselves), so a cache is reused exactly when
a rebuild would write the same tokens, and the files' digests are checked before a run reuses them (a file damaged
in place is rebuilt, never trained on). It is built under a temporary name and renamed into place, as the pretraining
shards are (`corpus.build_shards`): a killed build never leaves a half cache.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from array import array
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .corpus import META, install_build, new_build_dir, shard_dtype

VERSION = 1
FILES = r"meta\.json|(ids|mask|offsets|answer_at)\.bin"  # what the directory holds
FLUSH_TOKENS = 1 << 20  # tokens held in memory before they are appended to the files


class ChatTokens:
    """A sequence of conversations: `tokens[i]` is (ids, mask) as lists of ints, `len(tokens)` how many. `subset`
    keeps some of them in order without copying the arrays."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray, answer_at: np.ndarray,
                 index: np.ndarray | None = None):
        self.ids, self.mask, self.offsets, self.answer_at = ids, mask, offsets, answer_at
        self.index = np.arange(len(answer_at)) if index is None else index  # (n,) which conversations, in order

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        j = self.index[i]
        a, b = self.offsets[j], self.offsets[j + 1]
        return self.ids[a:b].tolist(), self.mask[a:b].tolist()

    def lengths(self) -> np.ndarray:
        """(n,) tokens per conversation."""
        return self.offsets[self.index + 1] - self.offsets[self.index]

    def answers_at(self) -> np.ndarray:
        """(n,) position of each conversation's first supervised token, -1 where there is none."""
        return self.answer_at[self.index]

    def first_tokens(self) -> np.ndarray:
        """(n,) each conversation's first token id (every conversation has at least one token)."""
        return self.ids[self.offsets[self.index]]

    def subset(self, keep: np.ndarray) -> ChatTokens:
        """The conversations where `keep` (n,) bool is True, in the same order."""
        return ChatTokens(self.ids, self.mask, self.offsets, self.answer_at, self.index[keep])


def cache_key(tokenizer, sources: Iterable[bytes]) -> str:
    """sha256 of the format, the tokenizer and each source (length-prefixed, so boundaries count)."""
    h = hashlib.sha256(f"nanoseek-chat-tokens-v{VERSION}\0".encode())
    for part in (tokenizer.hf.to_str(), tokenizer.chat_template or "", str(tokenizer.bos_id), str(tokenizer.eos_id)):
        h.update(part.encode("utf-8", "surrogatepass") + b"\0")
    for data in sources:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def file_bytes(paths) -> Iterable[bytes]:
    """Each file's content in 16 MB pieces, with a separator between files (for `cache_key`)."""
    for path in paths:
        with open(path, "rb") as f:
            while piece := f.read(1 << 24):
                yield piece
        yield b"\0end of file\0"


def load(out_dir, key: str | None = None) -> ChatTokens | None:
    """The cache in `out_dir`, memory-mapped, or None if there is no complete one. With `key` (the process that built
    or checks it): None unless it has that key and every file its recorded digest."""
    out_dir = Path(out_dir)
    try:
        meta = json.loads((out_dir / META).read_text())
        n, tokens, dtype, digests = int(meta["n"]), int(meta["tokens"]), np.dtype(meta["dtype"]), dict(meta["sha256"])
    except (OSError, ValueError, KeyError, TypeError):  # missing, not JSON, or not what build writes
        return None
    if meta.get("version") != VERSION or dtype not in (np.uint16, np.uint32):
        return None
    if key is not None and meta.get("key") != key:
        return None
    sizes = {"ids.bin": tokens * dtype.itemsize, "mask.bin": tokens, "offsets.bin": (n + 1) * 8, "answer_at.bin": n * 8}
    if any(not (out_dir / f).is_file() or (out_dir / f).stat().st_size != size for f, size in sizes.items()):
        return None
    if key is not None and any(_file_digest(out_dir / f) != digests.get(f) for f in sizes):
        return None

    def mapped(name: str, dt, count: int) -> np.ndarray:
        return np.memmap(out_dir / name, dtype=dt, mode="r", shape=(count,)) if count else np.zeros(0, dtype=dt)

    return ChatTokens(mapped("ids.bin", dtype, tokens), mapped("mask.bin", np.uint8, tokens),
                      np.fromfile(out_dir / "offsets.bin", dtype=np.int64), mapped("answer_at.bin", np.int64, n))


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _Writer:
    """Appends conversations to the four files of a build directory, and hashes what it writes."""

    def __init__(self, directory: Path, dtype: np.dtype):
        self.dir = directory
        self.ids = array("H" if dtype == np.uint16 else "I")
        self.mask, self.offsets, self.answer_at = bytearray(), array("q", [0]), array("q")
        self.n_tokens = 0
        self.digests = {name: hashlib.sha256() for name in ("ids.bin", "mask.bin", "offsets.bin", "answer_at.bin")}

    def add(self, ids: list[int], mask: list[int]) -> None:
        self.ids.extend(ids)
        self.mask.extend(mask)
        self.n_tokens += len(ids)
        self.offsets.append(self.n_tokens)
        try:
            self.answer_at.append(mask.index(1))
        except ValueError:  # a prompt-only record: nothing to learn
            self.answer_at.append(-1)
        if len(self.mask) >= FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        self._append("ids.bin", self.ids)
        self._append("mask.bin", self.mask)
        del self.ids[:], self.mask[:]

    def close(self) -> None:
        self.flush()
        self._append("offsets.bin", self.offsets)
        self._append("answer_at.bin", self.answer_at)

    def _append(self, name: str, data) -> None:
        path = self.dir / name
        data = memoryview(data).cast("B")
        self.digests[name].update(data)
        try:
            with open(path, "ab") as f:
                f.write(data)
        except OSError as e:  # "[Errno 28] No space left on device: PATH"
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def build(conversations: Iterable[list[dict]], tokenizer, out_dir, key: str, progress: bool = False) -> ChatTokens:
    """Tokenize each conversation (a list of messages) with `tokenizer.chat_sample` into `out_dir`, unless a cache
    with `key` is there already; returns the cache, memory-mapped. An error from `conversations` (a bad record)
    leaves no build behind."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if (cached := load(out_dir, key)) is not None:
        return cached
    tmp = new_build_dir(out_dir)
    try:
        dtype = shard_dtype(tokenizer.vocab_size)
        writer = _Writer(tmp, dtype)
        bar = tqdm(desc="sft: tokenizing", unit="conversation", file=sys.stderr, dynamic_ncols=True, leave=False,
                   disable=not progress, delay=2)  # shown only when it takes a while (a user's large --data)
        skewed = 0  # samples whose inference prompt is not where their training tokens start
        with bar:
            for messages in conversations:
                ids, mask = tokenizer.chat_sample(messages)
                if messages[-1].get("role") == "assistant" and len(messages) > 1:
                    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
                    skewed += ids[: len(prompt)] != prompt
                writer.add(ids, mask)
                bar.update()
        writer.close()
        if skewed:
            print(f"sft: in {skewed} samples the chat template's generation prompt (what inference starts from) is not "
                  "a prefix of the trained tokens (reasoning dropped by the template, or content not in the "
                  "<think>\\n…\\n</think>\\n\\n format): the model is trained on text it never sees at inference",
                  file=sys.stderr)
        meta = {"version": VERSION, "dtype": dtype.name, "n": len(writer.answer_at), "tokens": writer.n_tokens,
                "key": key, "sha256": {name: h.hexdigest() for name, h in writer.digests.items()}}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        install_build(tmp, out_dir, FILES)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load(out_dir)
