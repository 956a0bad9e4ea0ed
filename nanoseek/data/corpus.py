"""Corpora: JSONL/Parquet readers, token shards on disk, and a packed, resumable, data-parallel batch loader.

Records are `{"text": ...}` (pretraining) or `{"messages": [...]}` (chat, rendered with the tokenizer's template).

Token shards (`build_shards`) are a directory of flat `.bin` files (numpy uint16, or uint32 for vocabularies above
65536 tokens) holding every document as `bos + ids + eos`, back to back, the tokenizer that made them (tokenizer.json,
tokenizer_config.json; `nanoseek pretrain --data RUN/data` trains another run on them), plus `meta.json`:
    {"version", "dtype", "shards": [{"file", "tokens"}], "total_tokens", "n_docs", "vocab_size", "bos_id", "eos_id",
     "fingerprint"}
The fingerprint hashes the tokenizer and every text, so a cache is reused exactly when it holds the same tokens.
The directory is built under a temporary name and renamed into place: a killed build never leaves a half cache.

`PackedLoader` cuts the concatenated stream into chunks of seq_len + 1 tokens (inputs and labels shifted by one),
visits them in a seeded per-epoch permutation, and gives data-parallel rank r chunks r, r + W, r + 2W, ... of each
global batch, so the ranks together see exactly what one process with batch_size × W would see. Its state (epoch,
chunks consumed in the epoch) is the same on every rank, JSON-serialisable, and resumes batch for batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

META = "meta.json"
SHARD_FILES = r"meta\.json|shard-\d+\.bin|tokenizer(_config)?\.json"  # what a shard directory holds
FORMAT_VERSION = 1
ENCODE_BATCH = 512  # documents tokenized per call (the Rust tokenizer parallelises within a call)


# --- reading records -----------------------------------------------------------------------------------------------
def read_records(path, columns: Sequence[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(where, record) for the records of a JSONL (.jsonl/.json, one object a line; where: "PATH:LINE") or Parquet
    (.parquet; where: "PATH: row N") file: errors about a record name its line, blank lines counted. `columns`: the
    fields the caller reads; of a Parquet file only those are read (a dataset's ids, URLs and metadata cost nothing)."""
    path = Path(path)
    if path.is_dir():  # e.g. a Parquet dataset as Spark or HF datasets write it
        raise ValueError(f"{path} is a directory; give the files in it (e.g. {path}/*.parquet or {path}/*.jsonl)")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if suffix == ".parquet":
        return _read_parquet(path, columns)
    raise ValueError(f"{path}: unknown data format {suffix or '(no suffix)'!r}; expected .jsonl, .json or .parquet")


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, "rb") as f:  # bytes, so that a decoding error can name its line
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # -sig: skip a byte-order mark
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text ({e.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from e
            except RecursionError:
                raise ValueError(f"{where}: JSON nested too deeply (a record is {{'text': ...}} or "
                                 "{'messages': [...]})") from None
            if not isinstance(record, dict):
                lines = " (one JSON object a line, also in a .json file: jq -c '.[]' turns an array into lines)"
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}{lines}")
            # A lone \ud800 escape is valid JSON, but no tokenizer can encode it (e.g. text cut inside an emoji).
            # Only an escape can make one (strict UTF-8 refuses encoded surrogates), so other lines skip the check.
            bad = "\\u" in line and _SURROGATE.search(json.dumps(record, ensure_ascii=False))
            if bad:
                raise ValueError(f"{where}: text is not valid Unicode (lone surrogate \\u{ord(bad.group()):04x}); "
                                 "fix or remove that record")
            yield where, record


def _read_parquet(path: Path, columns: Sequence[str] | None) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install 'nanoseek[parquet]', or pyarrow)") from e
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        table = pq.ParquetFile(path)
        wanted = None if columns is None else [c for c in table.schema_arrow.names if c in columns]
        rows = (row for batch in table.iter_batches(columns=wanted) for row in batch.to_pylist())
        yield from ((f"{path}: row {i}", row) for i, row in enumerate(rows, 1))
    except pa.ArrowException as e:
        raise ValueError(f"{path}: cannot read as Parquet: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: a string column is not UTF-8 text ({e.reason})") from None


def _paths(paths) -> list:
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


def check_paths(paths) -> None:
    """ValueError for the first data path that cannot be read (missing, a folder, an unknown format), before any is
    read: a typo in the last of several files must not wait for the others to be read."""
    for path in _paths(paths):
        read_records(path)  # a folder or an unknown suffix (reading itself starts only when iterated)
        if not Path(path).exists():
            raise ValueError(f"{path}: no such file")


def read_once(paths) -> list:
    """The data paths that can be read only once (a named pipe, /dev/stdin): those that are not regular files."""
    return [p for p in _paths(paths) if not Path(p).is_file()]


ROLES = ("system", "developer", "user", "assistant")


def chat_messages(messages) -> list[dict]:
    """A record's messages, each's content a string: OpenAI's list of text parts is joined with newlines, as the
    server (and vLLM) join them, and a developer message is a system one. ValueError unless `messages` is a non-empty
    list of {"role": system|developer|user|assistant, "content": a string or a list of {"type": "text", "text": str}}.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    out = []
    for j, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "\n".join(p["text"] for p in content)
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(content, str):
            raise ValueError(f"message {j + 1} must be {{'role': one of {', '.join(ROLES)}, 'content': a string or "
                             f"text parts}}, got {json.dumps(m)[:80]}")
        role = "system" if m["role"] == "developer" else m["role"]  # OpenAI's newer name, as the server reads it
        out.append({**m, "role": role, "content": content})
    return out


def inline_reasoning(messages: list[dict]) -> list[dict]:
    """Assistant turns as R1 trains on them, `<think>\nreasoning\n</think>\n\nanswer` in `content` (what the
    generation prompt's `<think>\n` starts): from reasoning in a field (DeepSeek's API writes `reasoning_content`,
    vLLM `reasoning`) or in content written otherwise (`<think>r</think>a`, a raw completion `r\n</think>\n\na`)."""
    out = []
    for m in messages:
        if m.get("role") != "assistant":
            out.append(m)
            continue
        r, content = m.get("reasoning_content") or m.get("reasoning"), m["content"]
        field = isinstance(r, str) and bool(r.strip())
        opens = content.lstrip().startswith("<think>")
        # a raw completion closes its reasoning on a line of its own (`r\n</think>\n\na`); an answer that only
        # mentions the tag ("it writes the </think> tag"), or one beside a reasoning field, is not reasoning
        raw = not field and "<think>" not in content and re.search(r"\n</think>\s*\n", content) is not None
        if "</think>" in content and (opens or raw):  # `<think>r</think>a`, `\n<think>…`, or a raw completion
            reasoning, answer = content.split("</think>", 1)
            reasoning = reasoning.lstrip().removeprefix("<think>").strip()
            m = {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer.lstrip()}"}
        elif field and not opens:
            m = {"role": "assistant", "content": f"<think>\n{r.strip()}\n</think>\n\n{content.lstrip()}"}
        out.append(m)
    return out


def render_messages(messages: list[dict], tokenizer=None) -> str:
    """A chat as training text: the tokenizer's chat template without its opening BOS and closing EOS (build_shards
    puts every document between the two); without a tokenizer (training one), our chat template as it is."""
    if tokenizer is None:
        from ..tokenizer import render_chat

        return render_chat(messages)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    return text.removeprefix(tokenizer.bos_token or "").removesuffix(tokenizer.eos_token or "")


def read_texts(paths, tokenizer=None) -> Iterator[str]:
    """Training texts from one path or many: `text` records as they are, `messages` records rendered."""
    for path in _paths(paths):
        for where, record in read_records(path, columns=("text", "messages")):
            if isinstance(record.get("text"), str):
                if record["text"].strip():  # an empty one would train p(eos | bos), nothing else
                    yield record["text"]
            elif isinstance(record.get("messages"), list):
                try:
                    messages = chat_messages(record["messages"])
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
                yield render_messages(inline_reasoning(messages), tokenizer)
            else:
                raise ValueError(f"{where}: the record has neither a 'text' string nor a 'messages' list")


# --- token shards --------------------------------------------------------------------------------------------------
def shard_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class _Fingerprint:
    """sha256 over the tokenizer and every text (length-prefixed, so boundaries count)."""

    def __init__(self, tokenizer):
        self.h = hashlib.sha256(f"nanoseek-shards-v{FORMAT_VERSION}\0".encode())
        self.h.update(tokenizer.hf.to_str().encode())
        self.h.update(f"\0{tokenizer.bos_id}\0{tokenizer.eos_id}\0".encode())

    def update(self, text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")
        self.h.update(len(data).to_bytes(8, "little"))
        self.h.update(data)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def read_meta(shard_dir) -> dict | None:
    """A shard directory's meta.json, or None if there is no complete cache there (or the file is someone else's)."""
    try:
        meta = json.loads((Path(shard_dir) / META).read_text())
    except (OSError, ValueError):  # (not JSON, not UTF-8)
        return None
    return meta if isinstance(meta, dict) else None


def cache_complete(shard_dir) -> bool:
    """A finished build whose every shard file is whole (a copy or disk fault can cut one short)."""
    meta = read_meta(shard_dir)
    return meta is not None and not damaged_shards(Path(shard_dir), meta)


def damaged_shards(shard_dir: Path, meta: dict) -> list[str]:
    """The shard files of `meta` that are missing or not the size it records."""
    size = np.dtype(meta.get("dtype", "uint16")).itemsize
    bad = []
    for s in meta.get("shards", []):
        path = shard_dir / s["file"]
        if not path.is_file() or path.stat().st_size != s["tokens"] * size:
            bad.append(s["file"])
    return bad


def _cache_matches(out_dir: Path, fingerprint: str) -> bool:
    meta = read_meta(out_dir)
    return meta is not None and meta.get("fingerprint") == fingerprint and not damaged_shards(out_dir, meta)


class _ShardWriter:
    """Appends token arrays and cuts them into files of `shard_tokens` tokens."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int):
        self.dir, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.shards: list[dict] = []

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids.astype(self.dtype, copy=False))
        self.n_pending += len(ids)
        while self.n_pending >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> list[dict]:
        if self.n_pending:
            self._flush(self.n_pending)
        return self.shards

    def _flush(self, n: int) -> None:
        data = np.concatenate(self.pending)
        name = f"shard-{len(self.shards):05d}.bin"
        try:  # not ndarray.tofile, whose full disk reads "1048576 requested and 1034240 written"
            with open(self.dir / name, "wb") as f:
                f.write(memoryview(data[:n]))  # a prefix of a 1-D array: contiguous
        except OSError as e:  # "[Errno 28] No space left on device: PATH"
            raise OSError(e.errno, e.strerror or str(e), str(self.dir / name)) from None
        self.shards.append({"file": name, "tokens": int(n)})
        rest = data[n:]
        self.pending, self.n_pending = ([rest] if len(rest) else []), len(rest)


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _remove_stale_builds(out_dir: Path) -> None:
    """Temporary build directories left by killed processes (their pid is in the name)."""
    for old in out_dir.parent.glob(f".{out_dir.name}.old-*"):  # a replaced cache whose removal was cut short
        shutil.rmtree(old, ignore_errors=True)
    for tmp in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 2)[-2])
            if pid == os.getpid():  # a killed process's pid come back (PID 1 of a restarted container): not ours yet
                raise ProcessLookupError
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue


def new_build_dir(out_dir: Path) -> Path:
    """An empty temporary directory beside out_dir to build a cache in (install_build then moves it into place),
    after removing those that killed processes left."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def install_build(tmp: Path, out_dir: Path, own: str = SHARD_FILES) -> None:
    """Move a finished build into place, replacing an outdated or damaged cache (`own`: a regex of the names a cache
    holds), never a directory of someone else's files."""
    old = None
    if out_dir.exists():
        if not (out_dir / META).is_file() and not all(re.fullmatch(own, f.name) for f in out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} holds files that are not a token cache; not replacing it (choose "
                                  "another run directory)")
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _digest(texts: Iterable[str], tokenizer) -> str:
    fp = _Fingerprint(tokenizer)
    for text in texts:
        fp.update(text)
    return fp.hexdigest()


def build_shards(texts: Iterable[str], tokenizer, out_dir, shard_tokens: int = 1 << 20,
                 progress: bool = True) -> Path:
    """Tokenize documents (bos + ids + eos each) into `.bin` shards under `out_dir`; returns `out_dir`.

    An existing cache with the same fingerprint is reused. With a list (any Sequence) of texts that is decided
    before tokenizing; a one-shot iterator is hashed while it is tokenized, and the finished build is dropped in
    favour of an identical cache already in place (so readers of that cache are never disturbed).
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if shard_tokens < 1:
        raise ValueError("shard_tokens must be positive")
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    if bos is None or eos is None:
        raise ValueError("build_shards needs a tokenizer with bos and eos tokens")
    digest = None
    if isinstance(texts, Sequence) and not isinstance(texts, str):
        digest = _digest(texts, tokenizer)
        if _cache_matches(out_dir, digest):
            return out_dir

    tmp = new_build_dir(out_dir)
    try:
        dtype = shard_dtype(tokenizer.vocab_size)
        writer = _ShardWriter(tmp, dtype, shard_tokens)
        fingerprint = _Fingerprint(tokenizer) if digest is None else None
        n_docs = 0
        total = len(texts) if isinstance(texts, Sequence) else None
        with tqdm(total=total, desc="tokenize", unit="doc", disable=not progress, file=sys.stderr) as bar:
            for batch in _batches(texts, ENCODE_BATCH):
                if fingerprint is not None:
                    for text in batch:
                        fingerprint.update(text)
                for ids in tokenizer.encode_batch(batch):
                    writer.add(np.array([bos, *ids, eos], dtype=np.int64))
                n_docs += len(batch)
                bar.update(len(batch))
        shards = writer.close()
        digest = digest or fingerprint.hexdigest()
        meta = {"version": FORMAT_VERSION, "dtype": dtype.name, "shards": shards,
                "total_tokens": sum(s["tokens"] for s in shards), "n_docs": n_docs,
                "vocab_size": tokenizer.vocab_size, "bos_id": bos, "eos_id": eos, "fingerprint": digest}
        tokenizer.save(tmp)  # the shards carry their tokenizer: another run can train on them as they are
        (tmp / META).write_text(json.dumps(meta, indent=1))
        if _cache_matches(out_dir, digest):
            shutil.rmtree(tmp)
        else:
            install_build(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# --- packed batches ------------------------------------------------------------------------------------------------
class PackedLoader:
    """Fixed-length (inputs, labels) batches over memory-mapped token shards; seeded, rank-sharded, resumable.

    Chunk k is tokens [k·T, k·T + T + 1) of the concatenated stream: inputs its first T tokens, labels its last T.
    Every call consumes batch_size × world_size chunks of the epoch's permutation; this rank takes positions
    rank, rank + world_size, ... of them. An optimiser step of step_chunks chunks (all micro-batches of all ranks;
    default one call's) starts a new epoch when fewer than step_chunks remain, so a step sees the same chunks
    however it is split into micro-batches and processes.
    """

    def __init__(self, shard_dir, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 step_chunks: int | None = None):
        if batch_size < 1 or seq_len < 1:
            raise ValueError("batch_size and seq_len must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.dir = Path(shard_dir)
        meta = read_meta(self.dir)
        if meta is None:
            raise FileNotFoundError(f"{self.dir / META}: no token shards here (build them with build_shards)")
        bad = damaged_shards(self.dir, meta)
        if bad:
            raise FileNotFoundError(f"{self.dir}: token shard {bad[0]} is missing or cut short ({len(bad)} damaged); "
                                    f"delete {self.dir} and it is rebuilt")
        self.meta = meta
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.shards = [np.memmap(self.dir / s["file"], dtype=meta["dtype"], mode="r", shape=(s["tokens"],))
                       for s in meta["shards"] if s["tokens"]]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.total_tokens = int(self.starts[-1])
        self.n_chunks = max(self.total_tokens - 1, 0) // seq_len
        self.global_batch = batch_size * world_size
        self.step_chunks = step_chunks or self.global_batch
        if self.step_chunks % self.global_batch:
            raise ValueError(f"step_chunks {self.step_chunks} is not a multiple of {batch_size} × {world_size}")
        if self.n_chunks < self.step_chunks:
            raise ValueError(f"{self.dir}: {self.total_tokens} tokens make {self.n_chunks} sequences of "
                             f"{seq_len}+1, fewer than one global batch of {self.step_chunks}")
        self.epoch, self.position = 0, 0
        self._order = None

    @property
    def steps_per_epoch(self) -> int:
        return self.n_chunks // self.step_chunks

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of chunk indices for an epoch (the same on every rank)."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_chunks)

    def _tokens(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the concatenated stream, across shard boundaries."""
        out = np.empty(n, dtype=np.int64)
        i, done = int(np.searchsorted(self.starts, start, side="right")) - 1, 0
        while done < n:
            offset = start + done - int(self.starts[i])
            piece = self.shards[i][offset: offset + n - done]
            out[done: done + len(piece)] = piece
            done += len(piece)
            i += 1
        return out

    def next_batch(self):
        """(inputs, labels): int64 tensors of shape (batch_size, seq_len)."""
        import torch

        step_start = self.position % self.step_chunks == 0
        if (step_start and self.position + self.step_chunks > self.n_chunks) or (
                self.position + self.global_batch > self.n_chunks):  # (a run saved mid-epoch by older code)
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self.order(self.epoch)
        chunks = self._order[self.position: self.position + self.global_batch][self.rank:: self.world_size]
        self.position += self.global_batch
        rows = np.stack([self._tokens(int(c) * self.seq_len, self.seq_len + 1) for c in chunks])
        rows = torch.from_numpy(rows)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()

    @property
    def fingerprint(self) -> str | None:
        return self.meta.get("fingerprint")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "n_chunks": self.n_chunks, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """ValueError if the state is for other shards (other text or tokenizer) or another chunking."""
        for key in ("fingerprint", "seed", "seq_len", "n_chunks"):
            if state.get(key) is not None and state[key] != getattr(self, key):
                raise ValueError(f"loader state is for {key}={state[key]}, this loader has {getattr(self, key)}")
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None
