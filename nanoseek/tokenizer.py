"""Tokenizer: byte-level BPE trained with HF `tokenizers`, DeepSeek's special tokens, and an R1-style chat template.

A tokenizer lives in a Hugging Face model directory as `tokenizer.json` + `tokenizer_config.json` (the latter holds
the Jinja `chat_template`), so `transformers.AutoTokenizer` loads what we write and we load any directory that has a
`tokenizer.json` (DeepSeek's own included). Chat rendering follows transformers' semantics exactly: same sandboxed
Jinja environment options, same template variables (`messages`, `add_generation_prompt`, `bos_token`, ...), and the
rendered text is tokenized with special-token strings parsed as their ids and no automatic BOS.

The template (R1 style):
    <bos>{system}<｜User｜>{q}<｜Assistant｜>{answer}<eos><｜User｜>{q2}<｜Assistant｜><think>\\n
Earlier assistant turns (before the last user turn) lose their `…</think>` reasoning (R1 does not feed old reasoning
back) and are not trained on: they are not what the model generated. The generation prompt prefills `<think>\\n`
unless the template variable `thinking` (or `enable_thinking`, as Qwen-style clients name it) is false. A final
assistant turn's reasoning is its content's `<think>…</think>`, else its `reasoning_content` (or `reasoning`) field as
DeepSeek's API and vLLM return it; one without any is rendered with an empty `<think>\\n\\n</think>\\n\\n` before
its answer, as the model will write it. Final assistant content is wrapped in `{% generation %}` blocks, which is
how `chat_sample` (and transformers' `return_assistant_tokens_mask`) find the tokens to train on (the prefilled
`<think>\\n` among them: a model prompted without the prefill opens it itself); SFT makes one sample per assistant
turn of a multi-turn chat, so every turn is trained as it is generated.

CLI: `nanoseek tokenizer train --out DIR [--data FILE ...] [--vocab-size N] [--n-docs N] [--seed S]`.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import secrets
import sys
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

LONG_TEXT = 10_000  # characters; longer texts are tokenized without holding the GIL (`Tokenizer.encode`)
SPECIAL_TOKENS: dict[str, str] = {
    "bos": "<｜begin▁of▁sentence｜>",
    "eos": "<｜end▁of▁sentence｜>",
    "user": "<｜User｜>",
    "assistant": "<｜Assistant｜>",
    "think": "<think>",
    "end_think": "</think>",
}
# Like DeepSeek-R1, the reasoning tags are ordinary (non-special) added tokens: decode(skip_special_tokens=True)
# keeps them, so reasoning can still be split from the answer.
NON_SPECIAL = ("think", "end_think")
MODEL_MAX_LENGTH = 131072
N_BYTES = 256
MIN_VOCAB = N_BYTES + len(SPECIAL_TOKENS)  # every byte and every special token

CHAT_TEMPLATE = (
    "{%- if thinking is not defined %}{% set thinking = enable_thinking if enable_thinking is defined else true %}"
    "{%- endif %}"
    "{%- set ns = namespace(system='', last_user=-1) %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + message['content'] %}"
    "{%- elif message['role'] == 'user' %}{% set ns.last_user = loop.index0 %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{{- bos_token + ns.system }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- set content = message['content'] or '' %}"
    "{%- if loop.index0 < ns.last_user %}"
    "{%- if '</think>' in content %}{% set content = content.split('</think>')[-1].lstrip() %}{% endif %}"
    "{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- else %}"
    "{%- set reasoning = message['reasoning_content'] or message['reasoning'] %}"
    "{%- if '<think>' not in content and '</think>' not in content %}"
    "{%- if reasoning is string and reasoning.strip() %}"
    "{%- set content = '<think>\\n' + reasoning.strip() + '\\n</think>\\n\\n' + content.lstrip() %}"
    "{%- else %}{% set content = '<think>\\n\\n</think>\\n\\n' + content %}{% endif %}"
    "{%- endif %}"
    "{{- '<｜Assistant｜>' }}"
    "{%- generation %}{{ content + '<｜end▁of▁sentence｜>' }}{% endgeneration %}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<｜Assistant｜>' + ('<think>\\n' if thinking else '') }}"
    "{%- endif %}"
)


class TokenizerError(ValueError):
    """A tokenizer directory is missing a file, or a file cannot be read."""


# --- chat template rendering ---------------------------------------------------------------------------------------
# Markers that bracket `{% generation %}` output while tracking, removed before tokenizing: random per process, so
# no chat can hold them (fixed private-use characters refused chats with Nerd Font icons)
_GEN_OPEN, _GEN_CLOSE = (f"\x00nanoseek-{kind}-{secrets.token_hex(8)}\x00" for kind in ("open", "close"))
_TRACK_VAR = "nanoseek_track_generation"


class _GenerationTag(Extension):
    """`{% generation %}…{% endgeneration %}`: a no-op, unless the render is tracking assistant spans."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_mark", [nodes.Name(_TRACK_VAR, "load")])
        return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _mark(self, track, caller):
        text = caller()
        return f"{_GEN_OPEN}{text}{_GEN_CLOSE}" if track else text


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """The template compiled in an environment configured as transformers configures its own."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_template(template: str, messages: list[dict], **variables) -> str:
    """Render a chat template with `messages` and template variables (bos_token, add_generation_prompt, ...)."""
    return compile_template(template).render(messages=messages, **variables)


def _split_tracked(text: str) -> tuple[str, list[tuple[int, int]]]:
    """Remove generation markers; return the clean text and the character spans they bracketed."""
    clean, spans, pos = [], [], 0
    markers = f"({re.escape(_GEN_OPEN)}|{re.escape(_GEN_CLOSE)})"
    pieces = re.split(markers, text)  # text, marker, text, marker, ...
    for i, piece in enumerate(pieces[::2]):
        if i % 2:
            spans.append((pos, pos + len(piece)))
        clean.append(piece)
        pos += len(piece)
    if pieces[1::2] != [_GEN_OPEN, _GEN_CLOSE] * len(spans):
        raise TokenizerError("the chat template nests {% generation %} blocks")
    return "".join(clean), spans


# --- the tokenizer -------------------------------------------------------------------------------------------------
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_encodable(texts: Sequence[str]) -> None:
    """A TokenizerError (a user error) for a lone UTF-16 surrogate, which the Rust tokenizer refuses with a bare
    TypeError: a JSON "\\ud800" escape, or a non-UTF-8 byte in a command-line argument (Python's surrogateescape)."""
    for text in texts:
        if isinstance(text, str) and (m := _LONE_SURROGATE.search(text)) is not None:
            raise TokenizerError(f"the text holds a lone UTF-16 surrogate (\\u{ord(m.group()):04x}) at character "
                                 f"{m.start()}: not valid Unicode, cannot be tokenized") from None


def _token_string(value) -> str | None:
    """A special token as stored in tokenizer_config.json: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read tokenizer config: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _read_chat_template(path: Path, config: dict) -> str | None:
    """The directory's chat template, found where transformers looks first: chat_template.jinja (which newer
    transformers write), else tokenizer_config.json's, else chat_template.json."""
    if (path / "chat_template.jinja").is_file():  # transformers reads this file before tokenizer_config.json's
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (path / "chat_template.json").is_file():
        template = _read_json(path / "chat_template.json").get("chat_template")
    return template


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the special-token ids and the chat template."""

    def __init__(self, tok: HFTokenizer, *, bos_token: str | None = SPECIAL_TOKENS["bos"],
                 eos_token: str | None = SPECIAL_TOKENS["eos"], pad_token: str | None = None,
                 chat_template: str | None = None, model_max_length: int = MODEL_MAX_LENGTH):
        self.hf = tok
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token or eos_token
        self.model_max_length = model_max_length
        if chat_template is None and all(tok.token_to_id(s) is not None for s in SPECIAL_TOKENS.values()):
            chat_template = CHAT_TEMPLATE  # a DeepSeek-style vocabulary without a template of its own
        self.chat_template = chat_template

    # ids (None where a directory's vocabulary lacks the token)
    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.hf.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self.token_id(self.pad_token)

    @property
    def think_id(self) -> int | None:
        return self.token_id(SPECIAL_TOKENS["think"])

    @property
    def end_think_id(self) -> int | None:
        return self.token_id(SPECIAL_TOKENS["end_think"])

    # loading and saving
    @classmethod
    def from_dir(cls, path) -> Tokenizer:
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            hint = f"; a run directory's model is {path / 'model'}" if (path / "model" / "tokenizer.json").is_file() \
                else "" if path.is_dir() else f"; {path} is a file, not a directory" if path.exists() \
                else f"; {path} does not exist"
            raise TokenizerError(f"{tj}: not found (a tokenizer directory needs tokenizer.json{hint})")
        try:
            tok = HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{tj}: cannot read: {e}") from e
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            if (path / name).is_file():
                config.update(_read_json(path / name))
        bos = _token_string(config["bos_token"]) if "bos_token" in config else SPECIAL_TOKENS["bos"]
        eos = _token_string(config["eos_token"]) if "eos_token" in config else SPECIAL_TOKENS["eos"]
        return cls(tok, bos_token=bos, eos_token=eos, pad_token=_token_string(config.get("pad_token")),
                   chat_template=_read_chat_template(path, config),
                   model_max_length=int(config.get("model_max_length", MODEL_MAX_LENGTH)))

    def config(self) -> dict:
        """The tokenizer_config.json that transformers needs to load this tokenizer with the same behaviour."""
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos_token": self.adds_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
            "chat_template": self.chat_template,
        }

    def save(self, path) -> None:
        """tokenizer.json and tokenizer_config.json, each written whole under a temporary name and then renamed, so
        a full disk or a kill leaves no half-written file that a rerun would take for a tokenizer."""
        from .atomic import write_json, write_text

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # tokenizer.json last: its presence is what says a directory holds a (complete) tokenizer
        write_json(path / "tokenizer_config.json", self.config(), indent=2)
        write_text(path / "tokenizer.json", self.hf.to_str(pretty=True))

    # text <-> ids
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        # encode_batch releases the GIL and encode holds it: a server thread tokenizing a megabyte prompt with
        # encode stalled every stream for seconds
        if len(text) > LONG_TEXT:
            return self.encode_batch([text], add_bos)[0]
        try:
            ids = self.hf.encode(text, add_special_tokens=False).ids
        except TypeError:
            _check_encodable([text])
            raise
        return [self._require(self.bos_id, "bos")] + ids if add_bos else ids

    @functools.cached_property
    def adds_bos(self) -> bool:
        """Whether HF's own encoding (`tok(text)` in transformers, vLLM) puts BOS first: a post-processor that does."""
        post = json.loads(self.hf.to_str()).get("post_processor") or {}
        first = (post.get("single") or [{}])[0]
        return post.get("type") == "TemplateProcessing" and first.get("SpecialToken", {}).get("id") == self.bos_token

    def needs_bos(self, text: str) -> bool:
        """Does a raw-text prompt get a BOS put first (as HF tokenizers and /v1/completions do)? Not if it has one."""
        return self.bos_id is not None and not text.startswith(self.bos_token)

    @functools.cached_property
    def longest_token(self) -> int:
        """The most characters of a vocabulary entry: a text of more than 4 × n × this cannot be n tokens or fewer
        (the 4 covers normalizers that merge characters, e.g. NFC)."""
        return max(len(self.hf.id_to_token(i) or "") for i in range(self.hf.get_vocab_size(with_added_tokens=True)))

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """`encode` over many texts at once (parallel in the Rust library)."""
        try:
            encs = self.hf.encode_batch(list(texts), add_special_tokens=False)
        except TypeError:
            _check_encodable(texts)
            raise
        head = [self._require(self.bos_id, "bos")] if add_bos else []
        return [head + e.ids for e in encs]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def _require(self, token_id: int | None, name: str) -> int:
        if token_id is None:
            raise TokenizerError(f"this tokenizer has no {name} token")
        return token_id

    # chat
    def _render(self, messages: list[dict], add_generation_prompt: bool, thinking: bool | None = None,
                track: bool = False) -> str:
        """thinking None leaves the template's own default (ours thinks; DeepSeek-V3.1's does not); a bool is given
        under both names templates use, `thinking` (DeepSeek) and `enable_thinking` (Qwen)."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat_template")
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                     "add_generation_prompt": add_generation_prompt}
        if thinking is not None:
            variables["thinking"] = variables["enable_thinking"] = thinking
        if track:
            variables[_TRACK_VAR] = True
        return render_template(self.chat_template, messages, **variables)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            thinking: bool | None = None, tokenize: bool = True) -> list[int] | str:
        text = self._render(messages, add_generation_prompt, thinking)
        return self.encode(text) if tokenize else text

    def chat_sample(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """(ids, mask) of a whole conversation for SFT: mask is 1 on assistant content and its closing eos.

        Assistant spans come from the template's `{% generation %}` blocks; a template without them (another
        model's) falls back to marking, per assistant message, all the text its turn adds to the rendering.
        """
        text, spans = _split_tracked(self._render(messages, False, track=True))
        if not re.search(r"\{%-?\s*generation\s*-?%\}", self.chat_template):
            spans = self._spans_by_prefix(messages, text)
        inside = bytearray(len(text) + 1)
        for start, end in spans:
            inside[start:end] = b"\x01" * (end - start)
        # tokenized in pieces cut where a generation prompt ends, so that the prefill's tokens are those generation
        # starts from (`<think>` `\n`, then `\n` `</think>`), never one merged `\n\n` the model would not see
        cuts = sorted({0, len(text), *self._prompt_ends(messages, text)})  # (a token across a span's edge is trained)
        ids, mask = [], []
        for a, b in zip(cuts, cuts[1:]):
            enc = self.hf.encode(text[a:b], add_special_tokens=False)
            ids += enc.ids
            mask += [int(any(inside[a + s : a + e])) for s, e in enc.offsets]
        return ids, mask

    def _prompt_ends(self, messages: list[dict], text: str) -> Iterator[int]:
        """Where, in a conversation's rendering, the generation prompt of each of its assistant turns ends."""
        for i, message in enumerate(messages):
            if message.get("role") == "assistant":
                prompt = self._render(messages[:i], True)
                if text.startswith(prompt):
                    yield len(prompt)

    def _spans_by_prefix(self, messages: list[dict], full: str) -> list[tuple[int, int]]:
        spans, prev = [], ""
        for i, message in enumerate(messages):
            text = full if i == len(messages) - 1 else self._render(messages[: i + 1], False)
            if not text.startswith(prev):
                raise TokenizerError("chat template has no {% generation %} blocks and renders conversation "
                                     "prefixes inconsistently: cannot tell which tokens are the assistant's")
            if message.get("role") == "assistant":
                spans.append((len(prev), len(text)))
            prev = text
        return spans


# --- training ------------------------------------------------------------------------------------------------------
_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPECIAL_TOKENS.values()))


# BPE training time grows with the square of a word's length (a 200 kB run of "-" took 24 s, 10 MB hours): a run of
# more non-space characters than this is cut for training (no token can be that long anyway; other text is untouched)
_LONG_RUN = re.compile(r"\S{1000}(?=\S)")


def _without_special_tokens(texts: Iterable[str]) -> Iterator[str]:
    """Training text with special-token strings cut out, so no merges are spent on their spellings."""
    for text in texts:
        for piece in _SPECIAL_RE.split(text):
            start = 0
            for m in _LONG_RUN.finditer(piece) if len(piece) > 1000 else ():
                yield piece[start : m.end()]
                start = m.end()
            if piece[start:]:
                yield piece[start:]


def _new_bpe() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _mark_non_special(tok: HFTokenizer, contents: Iterable[str]) -> HFTokenizer:
    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:
        if added["content"] in contents:
            added["special"] = False
    return HFTokenizer.from_str(json.dumps(spec))


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 2,
                    show_progress=False) -> Tokenizer:
    """Train a byte-level BPE: 256 byte tokens, the 6 special tokens (ids 0-5), then merges up to `vocab_size`."""
    specials = list(SPECIAL_TOKENS.values())
    if vocab_size < N_BYTES + len(specials):
        raise ValueError(f"vocab_size must be at least {N_BYTES + len(specials)} (bytes + special tokens)")
    tok = _new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
    )
    tok.train_from_iterator(_without_special_tokens(texts), trainer=trainer)
    tok = _mark_non_special(tok, [SPECIAL_TOKENS[k] for k in NON_SPECIAL])
    # transformers' `tok(text)` and vLLM's /v1/completions put BOS first, as our engine does with raw text (and as
    # DeepSeek's tokenizer does); our own encode() never applies it (add_special_tokens=False)
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return Tokenizer(tok, chat_template=CHAT_TEMPLATE)


# --- CLI: nanoseek tokenizer train ---------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import POSITIVE_INT, SEED, HelpFormatter, bounded

    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", formatter_class=HelpFormatter,
                       help="train a byte-level BPE tokenizer and write it as an HF tokenizer directory",
                       description="Train a byte-level BPE tokenizer with DeepSeek's special tokens and R1 chat "
                                   "template; write tokenizer.json + tokenizer_config.json to --out.")
    t.add_argument("--out", required=True, help="directory to write")
    t.add_argument("--data", nargs="+", action="extend", default=[], metavar="FILE",
                   help="JSONL/Parquet files with {'text'} or {'messages'} records (repeated --data add up); "
                        "default: the task suite")
    t.add_argument("--vocab-size", type=bounded(int, MIN_VOCAB), default=512,
                   help=f"vocabulary size, at least {MIN_VOCAB} (256 bytes + 6 special tokens) (default 512)")
    t.add_argument("--n-docs", type=POSITIVE_INT, default=10000, help="task-suite problems to train on without --data")
    t.add_argument("--seed", type=SEED, default=0, help="task-suite seed")
    t.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")


def task_suite_texts(n_docs: int, seed: int) -> list[str]:
    """Plain and chat renderings of task-suite problems, so both prose and the chat/`<think>` format are covered."""
    from .data.tasks import mixture, to_chat, to_text

    problems = mixture(n_docs, seed=seed, split="train")
    return [to_text(p) for p in problems] + [render_chat(to_chat(p)["messages"]) for p in problems]


def render_chat(messages: list[dict]) -> str:
    """A conversation as our chat template writes it, before any tokenizer exists (to train one on it)."""
    return render_template(CHAT_TEMPLATE, messages, bos_token=SPECIAL_TOKENS["bos"], eos_token=SPECIAL_TOKENS["eos"],
                           add_generation_prompt=False)


def _training_texts(args: argparse.Namespace) -> list[str]:
    from .cli import UserError
    from .data.corpus import check_paths, read_texts

    if not args.data:
        return task_suite_texts(args.n_docs, args.seed)
    try:
        check_paths(args.data)  # before reading any: a typo in the last file should not wait for the others
        return list(read_texts(args.data))
    except ValueError as e:  # bad JSON line, unknown suffix, missing pyarrow
        raise UserError(str(e)) from e


def run(args: argparse.Namespace) -> int:
    from .checkpoint import TOKENIZER_FILES, copy_tokenizer
    from .cli import UserError, writable_dir
    from .data.corpus import read_meta

    if args.action != "train":
        raise UserError(f"unknown action {args.action!r}")
    if not args.out.strip():
        raise UserError("--out must name a directory")
    if Path(args.out).exists() and not Path(args.out).is_dir():  # found now, not after training
        raise UserError(f"--out {args.out} is a file; name a directory")
    if (Path(args.out) / "config.json").is_file():
        raise UserError(f"{args.out} is a model directory: a new tokenizer would no longer match its embeddings; "
                        "choose another --out")
    if "shards" in (read_meta(args.out) or {}):  # an earlier run's RUN/data
        raise UserError(f"{args.out} holds token shards: a new tokenizer would no longer match their ids; "
                        "choose another --out")
    present = [n for n in TOKENIZER_FILES if (Path(args.out) / n).exists()]
    if present and not args.overwrite:
        raise UserError(f"{args.out} already holds tokenizer files ({', '.join(present)}); pass --overwrite to "
                        "replace them")
    writable_dir(args.out, "--out")
    texts = _training_texts(args)
    if not texts:
        raise UserError("no training text")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(texts, vocab_size=args.vocab_size, show_progress=True)
    if tok.vocab_size < args.vocab_size:
        print(f"tokenizer: the text allows only {tok.vocab_size} of the {args.vocab_size} tokens asked for (every "
              "pair seen at least twice is merged); give more --data or --n-docs for more", file=sys.stderr)
    copy_tokenizer(None, Path(args.out))  # an earlier tokenizer's files would be read beside the new one's
    tok.save(args.out)
    print(json.dumps({"out": str(args.out), "vocab_size": tok.vocab_size}))
    return 0
