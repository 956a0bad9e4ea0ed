"""`nanoseek generate`: complete prompts from the command line or a file, batched through the engine.

Raw text is continued as it is (BOS prepended, as `/v1/completions` does); `--chat` (and any `{"messages": ...}`
record) goes through the model's chat template with the generation prompt, as `eval` and the server do, and the
`<think>` reasoning is split from the answer. One prompt and sample prints just the completion; several print one
block each. `--out` writes a JSONL record per completion, and the last stdout line is one JSON object for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PROGRESS_ABOVE = 4  # completions; more than this shows a progress bar on stderr


@dataclass
class Prompt:
    where: str  # "prompt 2", "p.jsonl line 7": named in errors
    shown: str | list  # the record's "prompt": the text, or the messages
    messages: list[dict] | None = None  # chat: rendered through the template; None: raw text


@dataclass
class Completion:
    text: str  # the answer (chat: after </think>), cut before a stop string
    reasoning: str | None  # chat: the <think> section, None if there is none
    new_tokens: int
    finish_reason: str  # "stop" (eos or a stop string) or "length"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import NONNEGATIVE_INT, POSITIVE_INT, SEED, TEMPERATURE, HelpFormatter, OneFile, bounded
    from .device import add_dtype_argument

    p.add_argument("--model", required=True, help="HF model directory (weights, config, tokenizer)")
    p.add_argument("prompt", nargs="*", metavar="PROMPT",
                   help="text to complete, one argument per prompt (or use --prompts); a prompt that starts with "
                        "'-' goes after '--', which ends the options: give them all before it")
    p.add_argument("--prompts", metavar="FILE", action=OneFile,
                   help='prompts from a file: .jsonl (any case) with {"prompt": ...} or {"messages": [...]} (chat) '
                        "records, else one prompt per line (blank lines skipped); '-' reads lines from standard "
                        "input (--jsonl: records)")
    p.add_argument("--jsonl", action="store_true", help="read --prompts as JSONL records whatever its name")
    p.add_argument("--chat", action="store_true",
                   help="render each prompt as one user message through the chat template (with the generation "
                        "prompt) and split the <think> reasoning from the answer; default: raw text completion")
    p.add_argument("--system", metavar="TEXT", help="a system message for chat prompts (needs --chat or messages)")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=256, metavar="N",
                   help="most new tokens per completion")
    p.add_argument("--temperature", type=TEMPERATURE, default=0.0, metavar="T",
                   help="0 = greedy, up to 2; R1 suggests 0.6")
    p.add_argument("--top-p", type=bounded(float, 0, 1, low_open=True), default=1.0, metavar="P",
                   help="nucleus sampling: keep the smallest set of tokens with this much probability (1 = off)")
    p.add_argument("--top-k", type=NONNEGATIVE_INT, default=0, metavar="K",
                   help="sample from the k likeliest tokens (0 = off)")
    p.add_argument("--seed", type=SEED, default=0, metavar="N",
                   help="sampling seed: completion i (prompt-major) uses seed + i, so runs are reproducible")
    p.add_argument("--samples", type=POSITIVE_INT, default=1, metavar="N",
                   help="completions per prompt (needs --temperature > 0)")
    p.add_argument("--speculative", action="store_true",
                   help="greedy decoding with MTP drafts (same tokens, fewer steps); needs --temperature 0 and a "
                        "model with MTP layers")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a completion at this text, which is cut off (repeat for several; in bash $'\\n' is a "
                        "newline); chat: applies to the answer. The model's eos always ends a completion")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    add_dtype_argument(p)
    p.add_argument("--out", metavar="FILE.jsonl",
                   help="also write one JSON record per completion here (Ctrl-C keeps those that finished)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--no-progress", action="store_true",
                   help=f"no progress bar (shown on stderr for more than {PROGRESS_ABOVE} completions)")
    # keep the epilog's line breaks, and the defaults cli.HelpFormatter states
    p.formatter_class = type("RawHelpFormatter", (argparse.RawDescriptionHelpFormatter, HelpFormatter), {})
    p.epilog = ("stdout: the completion (several: one '==> prompt i (sample s of n): PROMPT <==' block each), then "
                "one JSON line:\n"
                "completions, n_prompts, samples, new_tokens, seconds, tokens_per_s (+ acceptance_rate).\n"
                "examples:\n  nanoseek generate --model DIR 'The capital of France is' --max-new-tokens 20\n"
                "  nanoseek generate --model DIR --chat 'What is 12 times 3?' --temperature 0.6 --samples 4\n"
                "  nanoseek generate --model DIR --prompts questions.jsonl --out answers.jsonl")


def read_prompts(args: argparse.Namespace) -> list[Prompt]:
    """The prompts of the command line or of --prompts FILE; UserError for an empty or malformed one."""
    from .cli import UserError

    if args.prompt and args.prompts:
        raise UserError("give prompts on the command line or with --prompts, not both")
    if args.jsonl and args.prompts is None:
        raise UserError("--jsonl reads --prompts FILE as JSONL; no --prompts was given")
    if args.prompts is None:
        if not args.prompt:
            raise UserError("no prompt: give PROMPT arguments or --prompts FILE")
        return [_text_prompt(t, f"prompt {i}", args) for i, t in enumerate(args.prompt, 1)]
    name = "standard input" if args.prompts == "-" else args.prompts
    try:
        text = sys.stdin.read() if args.prompts == "-" else Path(args.prompts).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts {name}: cannot read: {e}") from None
    # lines end at \n only (str.splitlines would also split at U+2028 or a form feed inside a JSON string)
    lines = [(n, line.removesuffix("\r")) for n, line in enumerate(text.removeprefix("\ufeff").split("\n"), 1)
             if line.strip()]
    jsonl = args.jsonl or args.prompts.lower().endswith(".jsonl")
    out = [(_record(line, f"{name} line {n}", args) if jsonl else _text_prompt(line, f"{name} line {n}", args))
           for n, line in lines]
    if not out:
        raise UserError(f"--prompts {name}: no prompts")
    return out


def _text_prompt(text: str, where: str, args) -> Prompt:
    from .cli import UserError

    if not text:
        raise UserError(f"{where} is empty")
    return Prompt(where, text, _with_system([{"role": "user", "content": text}], args.system) if args.chat else None)


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    has_system = messages and messages[0].get("role") == "system"
    return messages if system is None or has_system else [{"role": "system", "content": system}, *messages]


def _record(line: str, where: str, args) -> Prompt:
    """One JSONL line: {"prompt": text} (chat with --chat) or {"messages": [{"role", "content"}, ...]} (chat)."""
    from .cli import UserError
    from .data.corpus import chat_messages

    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict) or ("prompt" in rec) == ("messages" in rec):
        raise UserError(f'{where}: a record needs either "prompt" (text) or "messages" (a list)')
    if "prompt" in rec:
        if not isinstance(rec["prompt"], str):
            raise UserError(f'{where}: "prompt" must be a string')
        return _text_prompt(rec["prompt"], where, args)
    try:  # as SFT reads them and the server takes them: text parts joined, a developer message a system one
        msgs = chat_messages(rec["messages"])
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None
    if msgs[-1]["role"] == "assistant":  # it would be rendered closed, then a second assistant turn opened
        raise UserError(f"{where}: the conversation ends with an assistant turn; a prompt ends with the user's (its "
                        "answer is what generate writes)")
    return Prompt(where, msgs, _with_system(msgs, args.system))


def encode(prompts: list[Prompt], tok) -> list[list[int]]:
    """Token ids per prompt: raw text with BOS in front (unless it starts with it), as /v1/completions does; chat
    messages through the tokenizer's chat template with the generation prompt, as eval and the server do."""
    import jinja2

    from .cli import UserError
    from .tokenizer import TokenizerError

    ids = []
    for p in prompts:
        if p.messages is None:
            ids.append(tok.encode(p.shown, add_bos=tok.needs_bos(p.shown)))
            continue
        if tok.chat_template is None:
            raise UserError(f"{p.where}: this model's tokenizer has no chat template (drop --chat / use prompts)")
        try:
            ids.append(tok.apply_chat_template(p.messages, add_generation_prompt=True))
        except (TokenizerError, jinja2.TemplateError) as e:
            raise UserError(f"{p.where}: cannot apply the chat template: {e}") from None
    return ids


def complete(engine, tok, prompts: list[list[int]], samples: int = 1, *, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0, speculative: bool = False,
             stop_ids: list[int] = (), stop: list[str] = (), chat: list[bool] | None = None, progress: bool = False
             ) -> list[Completion]:
    """`samples` completions of each prompt (ids), prompt-major: completion i = prompt i // samples, seeded with
    seed + i. chat[j]: split prompt j's completions into reasoning and answer. All are queued at once; the engine
    fills its rows from the queue as completions end, and one whose answer reaches a stop string is cancelled."""
    from .cli import Interrupted
    from .engine.engine import SamplingParams
    from .serve.reasoning import CompletionDecoder, starts_in_reasoning

    chat = chat or [False] * len(prompts)
    flat = [(p, c) for p, c in zip(prompts, chat, strict=True) for _ in range(samples)]
    decoders, reasons, rids = [], {}, {}  # reasons: completion index -> finish reason
    for i, (p, split) in enumerate(flat):
        in_reasoning = split and starts_in_reasoning(p, tok)  # the template opened <think>
        decoders.append(CompletionDecoder(tok, split=split, in_reasoning=in_reasoning, stop=stop, end_ids=stop_ids))
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=None if temperature == 0 else seed + i, stop_token_ids=stop_ids,
                                speculative=speculative)
        rids[engine.submit(p, params)] = i
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(flat), desc="generate", unit="completion", file=sys.stderr, dynamic_ncols=True)
    try:
        while engine.has_work():
            for rid, tok_id, finished, reason, *_ in engine.step():  # *_: the logprob, unused
                i = rids[rid]
                if i in reasons:  # already cut at a stop string (a speculative step emits two tokens)
                    continue
                dec = decoders[i]
                dec.feed(tok_id)
                if dec.stopped and not finished:
                    engine.cancel(rid)
                    finished, reason = True, "stop"
                if finished:
                    reasons[i] = "stop" if dec.stopped else reason
                    if bar is not None:
                        bar.update()
    except KeyboardInterrupt:  # the completions that had finished, by index
        raise Interrupted({i: _completion(decoders[i], reasons[i]) for i in sorted(reasons)}) from None
    finally:
        if bar is not None:
            bar.close()
    return [_completion(d, reasons[i]) for i, d in enumerate(decoders)]


def _completion(decoder, reason: str) -> Completion:
    decoder.finish()
    return Completion(decoder.content_text, decoder.reasoning_text, decoder.num_tokens, reason)


def _write(path: Path, prompts: list[Prompt], chat: list[bool], samples: int, done: dict[int, Completion]) -> None:
    """One JSONL record per completion (i: its index, prompt-major)."""
    with open(path, "w", encoding="utf-8") as f:
        for i, c in done.items():
            rec = {"prompt": prompts[i // samples].shown, "sample": i % samples, "text": c.text}
            if chat[i // samples]:
                rec |= {"reasoning": c.reasoning, "answer": c.text}
            f.write(json.dumps({**rec, "new_tokens": c.new_tokens, "finish_reason": c.finish_reason},
                               ensure_ascii=False) + "\n")


def _show(prompts: list[Prompt], completions: dict[int, Completion], samples: int, total: int) -> None:
    """The completions {index: completion} of `total` for a reader: one alone as is, several as `==> prompt i
    (sample s of n): … <==` blocks; reasoning dimmed on a terminal (as `nanoseek chat` shows it), else between
    <think> tags."""
    from .chat import Printer, terminal_text

    terminal_text(typed=False)
    printer = Printer(sys.stdout, color=sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    for n, (i, c) in enumerate(sorted(completions.items())):
        if total > 1:
            p = prompts[i // samples]
            shown = p.shown if isinstance(p.shown, str) else p.shown[-1]["content"]
            shown = " ".join(shown.split())
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            sample = f" (sample {i % samples + 1} of {samples})" if samples > 1 else ""
            print(("\n" if n else "") + f"==> prompt {i // samples + 1}{sample}: {shown} <==", flush=True)
        if c.reasoning is not None:  # dimmed on a terminal, else in R1's tags
            printer.write("reasoning", c.reasoning.strip("\n"))
        printer.write("content", c.text)
        printer.end()


def run(args: argparse.Namespace) -> int:
    from .checkpoint import read_config
    from .cli import Interrupted, UserError, output_file
    from .device import resolve_device
    from .eval.evaluate import check_context, engine_for
    from .serve.runtime import stop_ids
    from .tokenizer import Tokenizer

    if args.samples > 1 and args.temperature == 0:
        raise UserError(f"--samples {args.samples} with greedy decoding gives {args.samples} identical completions; "
                        "pass --temperature (R1 used 0.6)")
    if args.speculative and args.temperature > 0:
        raise UserError("--speculative is greedy only: use --temperature 0")
    if any(not s for s in args.stop):
        raise UserError("--stop must not be empty")
    device = resolve_device(args.device)
    earlier = args.out is not None and Path(args.out).exists()  # an interrupted run leaves it whole
    out = output_file(args.out, overwrite=args.overwrite) if args.out is not None else None
    cfg = read_config(args.model)
    if args.speculative and cfg.num_nextn_predict_layers == 0:
        raise UserError(f"--speculative needs a model with MTP layers; {args.model} has none")
    prompts = read_prompts(args)
    if args.system is not None and all(p.messages is None for p in prompts):
        raise UserError("--system applies to chat prompts: add --chat")
    tok = Tokenizer.from_dir(args.model)
    ids = encode(prompts, tok)
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    try:
        check_context([ids[longest]], args.max_new_tokens, cfg.max_position_embeddings, args.model)
    except UserError as e:
        raise UserError(f"{prompts[longest].where}: {e}") from None
    engine = engine_for(args.model, device, ids, args.max_new_tokens, args.samples, args.dtype)
    ends = stop_ids(Path(args.model), cfg, tok)
    chat = [p.messages is not None for p in prompts]
    start = time.perf_counter()
    try:
        completions = complete(engine, tok, ids, args.samples, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                               speculative=args.speculative, stop_ids=ends, stop=args.stop, chat=chat,
                               progress=not args.no_progress and len(ids) * args.samples > PROGRESS_ABOVE)
    except Interrupted as e:  # keep what finished (unless that would replace an earlier file)
        written = out is not None and bool(e.done) and not earlier
        if written:
            _write(out, prompts, chat, args.samples, e.done)
        where = (f"; they are in {out}" if written else f" ({out} keeps what it held: they are shown here instead)"
                 if out is not None and earlier and e.done else "")
        print(f"\ninterrupted: {len(e.done)} of {len(ids) * args.samples} completions finished{where}", file=sys.stderr)
        if not written:  # nowhere else to keep them
            _show(prompts, e.done, args.samples, len(ids) * args.samples)
        return 130
    seconds = time.perf_counter() - start
    if out is not None:
        _write(out, prompts, chat, args.samples, dict(enumerate(completions)))
    _show(prompts, dict(enumerate(completions)), args.samples, len(completions))
    new_tokens = sum(c.new_tokens for c in completions)
    summary = {"completions": [c.text for c in completions], "n_prompts": len(prompts), "samples": args.samples,
               "new_tokens": new_tokens, "seconds": round(seconds, 3), "tokens_per_s": round(new_tokens / seconds, 1)}
    if args.speculative:
        summary["acceptance_rate"] = round(engine.acceptance_rate, 4)
    print(json.dumps(summary))  # \u escapes: read whole on any terminal encoding (the text above may show '?')
    return 0
