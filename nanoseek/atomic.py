"""Files written whole or not at all: the text goes to a temporary name beside the file, then a rename swaps it in,
so a kill or a full disk leaves the old file (or none) and never half of one; the temporary file is removed if the
write fails."""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from pathlib import Path


def write_text(path, text: str) -> None:
    """`text` into `path`, whole or not at all; a file it replaces keeps its permissions (a private 0600 file stays
    private)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # a new name ("x": never someone's file)
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        if path.is_file():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except OSError as e:
        if e.filename not in (None, str(tmp)):
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None  # the file the user named, not our temporary one
    finally:
        with contextlib.suppress(OSError):  # (a read-only disk refuses even this: its error is the one above)
            tmp.unlink(missing_ok=True)


def write_json(path, obj, indent: int = 1) -> None:
    """`obj` as JSON (values JSON does not know, such as paths, as their str)."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


def is_temporary(entry: Path, *names: str) -> bool:
    """Whether `entry` is the temporary file of a write_text of one of the files `names` that a kill (SIGKILL) cut
    short: a run directory whose first write was killed holds only that."""
    pattern = rf"\.({'|'.join(map(re.escape, names))})\.[0-9a-f]{{12}}\.tmp"
    return re.fullmatch(pattern, entry.name) is not None and entry.is_file()


def entries(directory, first: str) -> list[Path]:
    """What `directory` holds, less the temporary files of a write of `first` (the file a run writes first) that a
    kill cut short, which are removed: a directory whose first write was killed is empty again."""
    kept = []
    for p in Path(directory).iterdir():
        if is_temporary(p, first):
            p.unlink(missing_ok=True)
        else:
            kept.append(p)
    return kept
