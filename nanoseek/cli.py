"""The `nanoseek` command: one dispatch table from verb to the module that implements it.

Each module named in VERBS defines `add_arguments(parser)` and `run(args) -> int`; it is imported only when its
verb runs, so `nanoseek --help` stays fast. Errors a user can cause (bad paths, bad configs) are raised as
`UserError` (or the error types `_user_errors` lists) and printed as one line, not a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import io
import math
import os
import sys
import warnings

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "speedrun": ("nanoseek.speedrun", "the whole recipe in one command: pretrain, SFT, GRPO, distill, evaluate, report"),
    "tasks": ("nanoseek.data.export", "write task-suite problems to JSONL: GSM8K-style, chat (SFT) or text (pretraining)"),
    "tokenizer": ("nanoseek.tokenizer", "train a byte-level BPE tokenizer with DeepSeek's special tokens and chat template"),
    "pretrain": ("nanoseek.train.pretrain", "pretrain a DeepSeek-V3-architecture model (NTP + MTP, aux-loss-free MoE)"),
    "sft": ("nanoseek.train.sft", "supervised fine-tuning on chat data (loss on assistant turns only), e.g. R1's cold start"),
    "grpo": ("nanoseek.train.grpo", "reasoning RL with verifiable rewards: GRPO, Dr. GRPO or DAPO (R1 / R1-Zero recipes)"),
    "distill": ("nanoseek.train.distill", "distill a teacher (model dir or OpenAI-compatible URL) into a student via verified traces"),
    "serve": ("nanoseek.serve", "OpenAI-compatible server (chat/completions, reasoning split) with a private web chat"),
    "generate": ("nanoseek.generate", "complete prompts (raw text or through the chat template) from the command line or a file"),
    "chat": ("nanoseek.chat", "chat with a model in the terminal, thinking shown dimmed"),
    "eval": ("nanoseek.eval.evaluate", "pass@1 / maj@k / pass@k of a model on held-out task-suite problems or GSM8K-format JSONL"),
    "report": ("nanoseek.eval.report", "report card (markdown + PNG plots + cost table) of a run or speedrun directory"),
    "bench": ("nanoseek.bench", "measure this machine: prefill and decode tokens/s (plain and MTP-speculative), training tokens/s and MFU"),
    "convert": ("nanoseek.convert", "re-write a model directory: dtype, FP8 block quantisation, or dequantisation"),
}


# Verbs that run without torch; the others import it (with their module) while a Ctrl-C waits (`signals_deferred`)
WITHOUT_TORCH = {"tasks"}

# Verbs that train data-parallel under `torchrun --nproc_per_node=N`; the others refuse to run as N copies of
# themselves (which would ask a teacher N times, or write one file from N processes)
DISTRIBUTED = {"pretrain", "sft", "grpo"}

# The options the running command's line set (those that differ from their defaults; None outside the CLI), so a
# resumed run can say which of them it does not use
GIVEN: set[str] | None = None


class UserError(Exception):
    """A mistake in the user's input; printed as `error: <message>`."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm, Kubernetes, `docker stop`, `timeout`), raised where a Ctrl-C's KeyboardInterrupt is: every verb
    keeps what it keeps on Ctrl-C (finished rows, traces, a training checkpoint), then exits 143."""


TERMINATED = False  # a SIGTERM came: exit 143, not 130


def _terminate(signum, frame) -> None:
    global TERMINATED
    TERMINATED = True
    raise Terminated


@contextlib.contextmanager
def signals_deferred():
    """While torch and the verb's module load: a Ctrl-C inside a C extension's import (numpy's) could leave it half
    initialised, a traceback or a Ctrl-C lost; blocked until then, it arrives as a plain KeyboardInterrupt after."""
    import signal
    import threading

    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield  # (Windows)
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during long work, carrying what had finished: the verb keeps it (writes its --out), then exits 130."""

    def __init__(self, done):
        super().__init__()
        self.done = done


@contextlib.contextmanager
def ctrl_c_ignored():
    """While a Ctrl-C's partial results are put together: a second SIGINT (GNU timeout sends two) would lose them."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def bounded(kind: type, low: float, high: float | None = None, low_open: bool = False):
    """An argparse `type` for a number in [low, high] ((low, high] with low_open): a value outside is a usage error
    naming the option, before anything runs (a zero batch size or a negative learning rate would otherwise train
    nothing and exit 0, or fail deep inside with a traceback)."""

    def parse(text: str):
        value = kind(text)  # ValueError: argparse says "invalid int value"
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text}: must be a finite number")
        if (value <= low if low_open else value < low) or (high is not None and value > high):
            show = (lambda v: f"{v:g}") if kind is float else str  # noqa: E731
            if high is not None:
                raise argparse.ArgumentTypeError(f"{text} is outside {'(' if low_open else '['}{show(low)}, {show(high)}]")
            raise argparse.ArgumentTypeError(f"{text}: must be {'greater than' if low_open else 'at least'} {show(low)}")
        return value

    parse.__name__ = kind.__name__
    return parse


class OneFile(argparse.Action):
    """--data FILE of a verb that reads one file: given twice it is an error, not the second silently replacing the
    first (`sft` and `pretrain` add their --data files up, so a user may well expect that here)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, self.dest, None)  # (absent when the parser suppresses defaults)
        if given is not None:
            parser.error(f"{option_string} takes one file (given {given} and {values}); put the records in one file")
        setattr(namespace, self.dest, values)


def output_file(text: str, replace_ok=None, overwrite: bool = False):
    """The Path of a file the user asked a command to write, checked before any work: its directory exists, it is
    not a directory or a device, and an existing file is replaced only with --overwrite or when `replace_ok(path)`
    says an earlier run of the same command wrote it."""
    from pathlib import Path

    if not text.strip():
        raise UserError("--out must name a file")
    path = Path(text)
    if path.is_dir():
        raise UserError(f"--out {text} is a directory; name a file")
    if not path.parent.is_dir():
        raise UserError(f"--out {text}: there is no directory {path.parent}")
    where = path.resolve().parent  # (through a link: where the file is written)
    if not os.access(where, os.W_OK | os.X_OK):  # found now, not when the work is done and would be lost
        raise UserError(f"--out {text}: the directory {where} is not writable")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise UserError(f"--out {text} is not a regular file")
        if not overwrite and not (replace_ok and replace_ok(path)):
            raise UserError(f"--out {text} already exists; pass --overwrite to replace it" if replace_ok is None else
                            f"--out {text} already exists and is not this command's output; choose another name")
    return path


def writable_dir(text: str, option: str) -> None:
    """A directory a command will write: one that exists must be writable, else the nearest folder above it that
    does. Checked before the work, which would be lost (a tokenizer trained, a model loaded)."""
    from pathlib import Path

    path = Path(text)
    while not path.exists() and path != path.parent:
        path = path.parent
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{option} {text}: the directory {path} is not writable")


POSITIVE_INT, NONNEGATIVE_INT = bounded(int, 1), bounded(int, 0)
POSITIVE, NONNEGATIVE = bounded(float, 0, low_open=True), bounded(float, 0)
TEMPERATURE = bounded(float, 0, 2)
SEED = bounded(int, 0, 2**32 - 1)  # numpy's and Python's generators take any of these


def _user_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .tokenizer import TokenizerError

    # OSErrors a path the user gave or the disk can cause: "error: [Errno 17] File exists: 'out.txt'", "[Errno 28] No
    # space left on device" is the whole story (and SafetensorError is how safetensors says the same)
    return (UserError, CheckpointError, ConfigError, TokenizerError, OSError, SafetensorError)


class HelpFormatter(argparse.HelpFormatter):
    """--help states each option's default, unless its text already speaks of it or there is none."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if not action.option_strings or "default" in text or default is None or default is False or \
                default == argparse.SUPPRESS or default in ("", []):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default {shown.replace('%', '%%')})"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every verb's options, or (only=VERB) just that verb's: the others keep their one-line help, and their modules
    (torch among what they import) are not imported for `nanoseek --help` or `nanoseek tasks`."""
    parser = argparse.ArgumentParser(
        prog="nanoseek",
        description="DeepSeek-V3 / R1 in one package: train, reason with GRPO, distill, evaluate, self-host.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"nanoseek {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text, formatter_class=HelpFormatter)
        p.set_defaults(_module=module)
        if only is None or verb == only:
            importlib.import_module(module).add_arguments(p)
    return parser


_PYTHON_FORMAT_WARNING = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Our own warnings as one line, like our errors (not a path and a line of nanoseek's source under them)."""
    if str(filename).startswith(os.path.dirname(__file__)):
        return f"warning: {message}\n"
    return _PYTHON_FORMAT_WARNING(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    import signal

    warnings.formatwarning = _format_warning
    if argv is None and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:  # the command (not a test), and
        signal.signal(signal.SIGTERM, _terminate)  # not told to ignore it
    try:
        code = run_verb(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt as e:  # while a verb runs or its module loads (torchrun forwards its own Ctrl-C)
        close_bars()
        if rank() == 0:  # on a line of its own, not after a progress bar (a Stopped run's notice ended that line)
            print(getattr(e, "message", "\n" + ("terminated" if TERMINATED else "interrupted")), file=sys.stderr)
        code = 128 + getattr(e, "signum", signal.SIGINT)  # a training run's Stopped says which signal stopped it
    if TERMINATED and code == 130:  # a verb that kept its partial results on SIGTERM as on Ctrl-C
        code = 143
    if argv is None:  # its work is done, and a late Ctrl-C or SIGTERM would only be a traceback from teardown
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    distributed = sys.modules.get("nanoseek.train.distributed")
    if distributed is not None and distributed.STARTED_PROCESS_GROUP:
        # Under torchrun, gloo's worker threads outlive destroy_process_group (torch 2.13) and, torn down with the
        # interpreter, abort a finished run now and then ("terminate called without an active exception", exit -6).
        # Everything is written and closed by now: leave without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def stdout_reader_left() -> bool:
    """Whether our stdout is a pipe whose reader has gone (`nanoseek generate ... | head -1`). If so, stdout now goes
    to /dev/null, or the interpreter's last flush would fail with the same error."""
    import select

    try:
        poll = select.poll()  # a pipe's writing end with no reader polls as an error (Linux, macOS)
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        if not any(event & select.POLLERR for _, event in poll.poll(0)):
            return False
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return True
    except (AttributeError, OSError, ValueError):  # no poll() (Windows), or no stdout
        return False


def close_bars() -> None:
    """Close the progress bars still open, so that a message printed now starts a line of its own (and a bar
    collected later is not drawn again after it)."""
    if "tqdm" in sys.modules:
        for bar in list(getattr(sys.modules["tqdm"].tqdm, "_instances", [])):
            bar.close()


def rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    return int(os.environ.get("RANK", "0"))


def peer_failed(e: BaseException) -> bool:
    """Whether e is a collective that broke because another process of the run exited (its error says why)."""
    return isinstance(e, RuntimeError) and any(
        m in str(e) for m in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def verb_parser(parser: argparse.ArgumentParser, verb: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[verb]


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, but an unknown option is reported with the verb's usage (argparse gives the top level's) and the
    option it is closest to: `nanoseek eval: error: unrecognized arguments: --temprature (did you mean
    --temperature?)`."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        target = verb_parser(parser, args.verb) if getattr(args, "verb", None) else parser
        known = [o for a in target._actions for o in a.option_strings]
        guesses = [m[0] for x in extra if x.startswith("--") and len(x) > 3
                   and (m := difflib.get_close_matches(x.split("=")[0], known, n=1, cutoff=0.8))]
        hint = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
        target.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def given_options(parser: argparse.ArgumentParser, argv: list[str], verb: str) -> set[str]:
    """The dests of the options the command line gave, whatever their values (`--steps 300` is given even when 300
    is the default): argv parsed again with every default of the verb's options suppressed."""
    defaults = [(a, a.default) for a in verb_parser(parser, verb)._actions]
    try:
        for a, _ in defaults:
            a.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv))) & {a.dest for a, _ in defaults}
    finally:
        for a, default in defaults:
            a.default = default


def run_verb(argv: list[str]) -> int:
    verb = next((a for a in argv if not a.startswith("-")), None)
    with signals_deferred():
        parser = build_parser(verb if verb in VERBS else "")
        if verb in VERBS and verb not in WITHOUT_TORCH and "--help" not in argv and "-h" not in argv:
            importlib.import_module("torch")
    if rank() > 0:  # under torchrun every rank parses the same argv: rank 0 alone prints a usage error or --help
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            args = parse(parser, argv)
    else:
        args = parse(parser, argv)
    if not args.verb:
        if rank() == 0:
            parser.print_help()
        return 2
    global GIVEN
    GIVEN = given_options(parser, argv, args.verb)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.verb not in DISTRIBUTED:
            hint = (" (train the student data-parallel with `torchrun ... nanoseek sft --data RUN/kept.jsonl`)"
                    if args.verb == "distill" else "")
            raise UserError(f"nanoseek {args.verb} runs in one process; under torchrun run "
                            f"{', '.join(sorted(DISTRIBUTED))}{hint}")
        return importlib.import_module(args._module).run(args) or 0
    except _user_errors() as e:
        if isinstance(e, BrokenPipeError) and stdout_reader_left():
            return 141  # as a command stopped by SIGPIPE (`yes | head`): quietly, the reader wanted no more
        close_bars()  # an error found mid-run (a diverged step, a full disk) goes under the bar, not onto its line
        if rank() == 0:  # every rank checks the same things: one copy of the message
            print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if not peer_failed(e):
            raise
        if rank() == 0:  # the process that exited first said why (if it could); a traceback would only bury that
            print("error: another process of this run exited; continue the run with --resume", file=sys.stderr)
        return 1
    finally:
        GIVEN = None


if __name__ == "__main__":
    sys.exit(main())
