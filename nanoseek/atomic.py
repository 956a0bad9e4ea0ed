"""Files written whole or not at all: the text goes to a temporary name beside the file, then a rename swaps it in,
so a kill or a full disk leaves the old file (or none) and never half of one; the temporary file is removed if the
write fails."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path


def write_text(path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # a new name ("x": never someone's file)
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj, indent: int = 1) -> None:
    """`obj` as JSON (values JSON does not know, such as paths, as their str)."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")
