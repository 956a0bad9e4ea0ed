"""`nanoseek chat --model DIR`: talk to a model in the terminal, in process (no server).

Each answer streams as it is generated, the `<think>` reasoning dimmed (ANSI faint, on a terminal only; on a pipe or
with NO_COLOR it goes between <think> tags) and the answer in normal text. Earlier turns stay in the conversation
without their reasoning, as R1 expects; the oldest turns leave when the rest would leave the answer less than a
quarter of the context (or --max-tokens), and the chat says so. Commands: `/clear` starts over, `/exit` (or EOF,
Ctrl-D) quits; Ctrl-C stops an answer being generated, and quits at the prompt.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys

from .serve import COMPILE_HELP

DIM, RESET = "\x1b[2m", "\x1b[0m"
# control characters a model might emit (escape sequences could restyle or rewrite the terminal; C1's U+009B and
# U+009D start them too); \t and \n stay
CONTROLS = {c: None for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in "\t\n"}
HELP = "commands: /clear (start over), /exit (quit)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import POSITIVE_INT, TEMPERATURE, bounded
    from .device import add_dtype_argument

    p.add_argument("--model", required=True, help="HF model directory (weights, config, tokenizer)")
    p.add_argument("--temperature", type=TEMPERATURE, default=None,
                   help="sampling temperature, 0 = greedy (default: the model's generation_config.json, else 1)")
    p.add_argument("--top-p", type=bounded(float, 0, 1, low_open=True), default=None,
                   help="nucleus sampling (default: generation_config.json)")
    p.add_argument("--max-tokens", type=POSITIVE_INT, default=2048,
                   help="most tokens per answer, reasoning included (default 2048; the context bounds it too)")
    p.add_argument("--max-model-len", type=POSITIVE_INT, default=None,
                   help="context length (default: the model's, ≤ 4096)")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")
    add_dtype_argument(p)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help=COMPILE_HELP)


class Printer:
    """Writes reasoning deltas dimmed and answer deltas plain, switching style only when the section changes. Without
    color (a pipe, NO_COLOR) the reasoning goes between R1's <think> tags instead, or it would read as the answer."""

    def __init__(self, out=sys.stdout, color: bool = True):
        self.out, self.color, self.section, self.line_ended = out, color, None, True

    def _close_reasoning(self) -> None:
        self.out.write(RESET if self.color else ("" if self.line_ended else "\n") + "</think>")

    def write(self, section: str, text: str) -> None:
        if not text:
            return
        if section != self.section:
            if self.section == "reasoning":
                self._close_reasoning()
                self.out.write("\n\n")
            if section == "reasoning":
                self.out.write(DIM if self.color else "<think>\n")
        self.section = section
        self.out.write(text.translate(CONTROLS))
        self.line_ended = text.endswith("\n")
        self.out.flush()

    def end(self) -> None:
        if self.section == "reasoning":
            self._close_reasoning()
        self.out.write("\n")
        self.out.flush()
        self.section, self.line_ended = None, True


class ChatSession:
    """A conversation with one model: `reply(text, printer)` streams the answer and keeps the turn."""

    def __init__(self, rt, temperature: float, top_p: float, max_tokens: int, system: str | None = None):
        self.rt, self.temperature, self.top_p, self.max_tokens = rt, temperature, top_p, max_tokens
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict] = []

    def clear(self) -> None:
        self.turns = []

    def _prompt(self, messages: list[dict]) -> list[int] | None:
        """The prompt ids, dropping the oldest turns until there is room to answer (--max-tokens, or a quarter of the
        context if less), and saying so; None if even the last message leaves no room at all."""
        tok, limit = self.rt.tokenizer, self.rt.max_model_len
        room, dropped = min(self.max_tokens, limit // 4), 0
        while True:
            ids = tok.apply_chat_template(self.system + messages, add_generation_prompt=True)
            if len(ids) + room <= limit or (len(messages) <= 1 and len(ids) < limit):
                if dropped:
                    print(f"(the {dropped} oldest turn{'s' * (dropped > 1)} left the conversation: the context holds "
                          f"{limit} tokens)")
                return ids
            if len(messages) <= 1:
                return None
            messages[:] = messages[2:] if len(messages) > 2 else messages[1:]
            dropped += 1

    def reply(self, text: str, printer: Printer) -> None:
        from .engine.engine import SamplingParams
        from .serve.reasoning import CompletionDecoder, starts_in_reasoning

        rt = self.rt
        messages = self.turns + [{"role": "user", "content": text}]
        prompt = self._prompt(messages)
        if prompt is None:
            print(f"(that message is longer than the context of {rt.max_model_len} tokens)")
            return
        tok = rt.tokenizer
        dec = CompletionDecoder(tok, in_reasoning=starts_in_reasoning(prompt, tok),
                                end_ids=rt.stop_ids)
        params = SamplingParams(max_new_tokens=min(self.max_tokens, rt.max_model_len - len(prompt)),
                                temperature=self.temperature, top_p=self.top_p, top_k=rt.defaults["top_k"],
                                stop_token_ids=rt.stop_ids)
        rid = rt.engine.submit(prompt, params)
        try:
            reason = self._stream(rid, dec, printer)
        finally:
            rt.engine.cancel(rid)  # a no-op once finished; frees the row after Ctrl-C
            printer.end()
        if reason is None:
            print("(stopped)")
        elif reason == "length":  # the server says finish_reason "length"; here, in words
            print(f"(cut off at {params.max_new_tokens} tokens: "
                  + ("--max-tokens" if params.max_new_tokens == self.max_tokens else "the context is full") + ")")
        shown = dec.content.text[: dec.content.sent]  # not the first bytes of a character Ctrl-C cut off
        self.turns = messages + [{"role": "assistant", "content": shown}]  # what was shown stays

    def _stream(self, rid: int, dec, printer: Printer) -> str | None:
        """Step the engine, printing deltas, until the answer ends (its finish reason: "stop" or "length") or Ctrl-C
        stops it (None). Ctrl-C only sets a flag here, so the engine is never interrupted halfway through a step."""
        interrupted: list[bool] = []
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
        try:
            while not interrupted:
                for r, token, finished, reason, _ in self.rt.engine.step():
                    if r != rid:
                        continue
                    delta = dec.feed(token)
                    if finished:
                        delta = delta + dec.finish()
                    printer.write("reasoning", delta.reasoning)
                    printer.write("content", delta.content)
                    if finished:
                        return reason
            return None
        finally:
            signal.signal(signal.SIGINT, previous)


def _read(prompt: str) -> str | None:
    """The next line typed, "" for one that is not UTF-8 text (said so), None to quit (EOF, Ctrl-C)."""
    try:
        line = input(prompt)
        line.encode()  # stdin reads undecodable bytes as lone surrogates (see `terminal_text`)
        return line
    except (EOFError, KeyboardInterrupt):
        print()
        return None
    except UnicodeError:
        print("(that line is not UTF-8 text: type it again)")
        return ""


def terminal_text(typed: bool = True) -> None:
    """Text the terminal's encoding cannot show (a CJK answer on an ASCII locale) goes out as '?', not a
    UnicodeEncodeError; with `typed`, undecodable bytes typed in come in as lone surrogates, not a UnicodeDecodeError
    that ends the chat."""
    for stream, errors in [(sys.stdout, "replace")] + [(sys.stdin, "surrogateescape")] * typed:
        with contextlib.suppress(AttributeError, ValueError):  # not a TextIOWrapper (a test's StringIO)
            stream.reconfigure(errors=errors)


def run(args: argparse.Namespace) -> int:
    from .cli import UserError
    from .serve.runtime import load_runtime

    if args.max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    rt = load_runtime(args.model, device=args.device, max_model_len=args.max_model_len, max_batch_size=1,
                      compile=args.compile, dtype=args.dtype)
    if rt.tokenizer.chat_template is None:
        raise UserError(f"{args.model}: the tokenizer has no chat template")
    temperature = rt.defaults["temperature"] if args.temperature is None else args.temperature
    top_p = rt.defaults["top_p"] if args.top_p is None else args.top_p
    if temperature < 0 or not 0 < top_p <= 1:
        raise UserError("need --temperature >= 0 and 0 < --top-p <= 1")
    session = ChatSession(rt, temperature, top_p, args.max_tokens, args.system)
    if args.system and len(rt.tokenizer.apply_chat_template(session.system + [{"role": "user", "content": "x"}],
                                                             add_generation_prompt=True)) >= rt.max_model_len:
        raise UserError(f"--system is longer than the context of {rt.max_model_len} tokens")
    terminal_text()
    printer = Printer(color=sys.stdout.isatty() and not os.environ.get("NO_COLOR"))  # no escapes into a pipe
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):  # (Windows has none)
            importlib.import_module("readline")  # input() then edits lines: arrow keys move, not type escape codes
    print(f"nanoseek chat with {args.model} on {rt.engine.device}. {HELP}; Ctrl-C stops an answer.")
    while (line := _read("> ")) is not None:
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/clear":
            session.clear()
            print("(conversation cleared)")
        elif text.startswith("/"):
            print(HELP)
        elif text:
            session.reply(text, printer)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m nanoseek.chat ...`: the same as `nanoseek chat ...`."""
    from .cli import _user_errors

    parser = argparse.ArgumentParser(prog="nanoseek chat", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv)) or 0
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
