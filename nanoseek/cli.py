"""The `nanoseek` command: one dispatch table from verb to the module that implements it.

Each module named in VERBS defines `add_arguments(parser)` and `run(args) -> int`; it is imported only when its
verb runs, so `nanoseek --help` stays fast. Errors a user can cause (bad paths, bad configs) are raised as
`UserError` (or the stage's own error types listed in USER_ERRORS) and printed as one line, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "convert": ("nanoseek.convert", "re-write a model directory: dtype, FP8 block quantisation, or dequantisation"),
}


class UserError(Exception):
    """A mistake in the user's input; printed as `error: <message>`."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .config import ConfigError

    return (UserError, CheckpointError, ConfigError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanoseek",
        description="DeepSeek-V3 / R1 in one package: train, reason with GRPO, distill, evaluate, self-host.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return 2
    try:
        return importlib.import_module(args._module).run(args) or 0
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
