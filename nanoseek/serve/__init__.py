"""Self-hosting: `nanoseek serve`, an OpenAI-compatible server with a local web chat (see app.py).

This module is the CLI entry (`add_arguments` / `run`) and stays cheap to import: FastAPI, uvicorn and the model are
loaded only when the server runs. Layout: app.py (HTTP endpoints), generation.py (requests on the event loop),
runtime.py (model loading, the engine thread), reasoning.py (token ids -> reasoning / answer text), schemas.py
(request bodies, errors), webui.py + static/ (the web chat), history.py (its SQLite history), access.py (API key,
history token, Host and Origin checks).
"""

from __future__ import annotations

import argparse

COMPILE_HELP = ("decode through torch.compile: on the CPU (float32) 2-3x faster tokens, one chat or many. Default: on "
                "where it applies (CPU, a C++ compiler found); start-up then compiles the decode step first, ~50 s "
                "on 2 cores the first time, a few seconds once inductor's cache holds it. --no-compile: start at once")
API_KEY_HELP = ("require 'Authorization: Bearer KEY' on /v1 and the web chat's history (default: $NANOSEEK_API_KEY, "
                "which other users cannot read, as they can a command line with `ps`). Without a key, /v1 is open to "
                "whoever can connect, every user of this machine included, as vLLM's is (it stores nothing), and "
                "the web chat's history needs the token in the address printed at start-up (kept in HISTORY.token)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import POSITIVE_INT
    from ..device import add_dtype_argument

    p.add_argument("--model", required=True, help="HF model directory (weights, config, tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, metavar="KEY", help=API_KEY_HELP)
    p.add_argument("--max-model-len", type=POSITIVE_INT, default=None,
                   help="context length in tokens, prompt + answer (default: the model's, at most 4096)")
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: --model)")
    p.add_argument("--history", default=None,
                   help="SQLite file for the web chat's conversations (default ~/.nanoseek/history.sqlite3)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default)")
    add_dtype_argument(p)
    p.add_argument("--max-batch-size", type=POSITIVE_INT, default=16, help="requests decoded together (default 16)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help=COMPILE_HELP)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")


def run(args: argparse.Namespace) -> int:
    from .app import run as run_server

    return run_server(args)
