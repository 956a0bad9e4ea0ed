"""The web chat's conversation history: a local SQLite file (stdlib sqlite3), nothing leaves the machine.

Two tables: `conversations(id, title, created_at, updated_at)` and `messages(id, conversation_id, role, content,
reasoning, created_at, finish)` (finish: how an answer ended when not by itself, "stopped" or "length"; a file from
before that column gets it when opened); deleting a conversation deletes its messages, and `secure_delete` overwrites
their text in the file (SQLite's upstream default leaves it in freed pages; Debian's build turns it on, macOS's
python.org one does not). The file is private (mode 0600, made so if it was looser) at `--history`, default
`~/.nanoseek/history.sqlite3`, and survives server restarts. One connection, guarded by a lock, is shared by the
server's threads. `HistoryStore(":memory:")` keeps nothing on disk.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import sys
import threading
import time
import uuid
from pathlib import Path

DEFAULT_PATH = Path("~/.nanoseek/history.sqlite3")

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    reasoning TEXT,
    created_at REAL NOT NULL,
    finish TEXT
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""


class HistoryError(Exception):
    """The history file cannot be opened."""


class HistoryStore:
    def __init__(self, path):
        self.path = Path(path).expanduser() if str(path) != ":memory:" else Path(":memory:")
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not self.path.exists():
                self.path.touch(mode=0o600)
            make_private(self.path)
            _warn_if_listable(self.path.resolve().parent)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            with self._lock:
                self._db.execute("PRAGMA foreign_keys = ON")
                self._db.execute("PRAGMA secure_delete = ON")
                self._db.executescript(SCHEMA)
                if "finish" not in {r["name"] for r in self._db.execute("PRAGMA table_info(messages)")}:
                    self._db.execute("ALTER TABLE messages ADD COLUMN finish TEXT")  # a file from an earlier version
        except sqlite3.Error as e:  # a directory, or a file that is not an SQLite database
            raise HistoryError(f"{self.path}: cannot open it as the chat history's SQLite file ({e})") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _query(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def _write(self, statements: list[tuple[str, tuple]]) -> int:
        """Run statements in one transaction; returns the row count of the last."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                cur = None
                for sql, args in statements:
                    cur = self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return cur.rowcount if cur is not None else 0

    # --- conversations ----------------------------------------------------------------------------------------
    def list_conversations(self) -> list[dict]:
        return self._query("SELECT id, title, created_at, updated_at FROM conversations "
                           "ORDER BY updated_at DESC, created_at DESC")

    def create_conversation(self, title: str) -> dict:
        now = time.time()
        conv = {"id": uuid.uuid4().hex, "title": title.strip() or "New chat", "created_at": now, "updated_at": now}
        self._write([("INSERT INTO conversations (id, title, created_at, updated_at) VALUES (?, ?, ?, ?)",
                      (conv["id"], conv["title"], now, now))])
        return conv

    def get_conversation(self, conv_id: str) -> dict | None:
        rows = self._query("SELECT id, title, created_at, updated_at FROM conversations WHERE id = ?", (conv_id,))
        if not rows:
            return None
        conv = rows[0]
        conv["messages"] = self._query("SELECT id, role, content, reasoning, created_at, finish FROM messages "
                                       "WHERE conversation_id = ? ORDER BY id", (conv_id,))
        return conv

    def rename_conversation(self, conv_id: str, title: str) -> str | None:
        """The title as stored (stripped; blank is "New chat"); None if the conversation does not exist."""
        title = title.strip() or "New chat"
        found = self._write([("UPDATE conversations SET title = ?, updated_at = ? WHERE id = ?",
                              (title, time.time(), conv_id))]) > 0
        return title if found else None

    def delete_conversation(self, conv_id: str) -> bool:
        return self._write([("DELETE FROM conversations WHERE id = ?", (conv_id,))]) > 0

    # --- messages ---------------------------------------------------------------------------------------------
    def add_message(self, conv_id: str, role: str, content: str, reasoning: str | None = None,
                    finish: str | None = None) -> dict | None:
        """Append a message; None if the conversation does not exist."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN")
            try:
                if self._db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?",
                                    (now, conv_id)).rowcount == 0:
                    self._db.execute("ROLLBACK")
                    return None
                cur = self._db.execute("INSERT INTO messages (conversation_id, role, content, reasoning, created_at, "
                                       "finish) VALUES (?, ?, ?, ?, ?, ?)", (conv_id, role, content, reasoning, now,
                                                                             finish))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return {"id": cur.lastrowid, "role": role, "content": content, "reasoning": reasoning, "created_at": now,
                "finish": finish}


def make_private(path: Path) -> None:
    """Mode 0600 for a file of ours that is looser (one restored from a backup, copied, or made by hand), as a new one
    is made; a warning where it is not ours to change."""
    if os.name != "posix" or not path.is_file():
        return
    st = path.stat()
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077 and st.st_uid == os.getuid():
        path.chmod(0o600)
    elif mode & 0o077:
        _warn(f"{path} is open to other users (mode {mode:o}) and not yours to chmod")


def _warn_if_listable(folder: Path) -> None:
    """Other users cannot read a 0600 file, but in a folder they can list they see what is there, and when."""
    mode = stat.S_IMODE(folder.stat().st_mode)
    if os.name == "posix" and mode & 0o044:
        _warn(f"other users can list {folder} (mode {mode:o}), the chat history's folder; chmod 700 it or choose "
              f"another --history")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def default_path() -> Path:
    return Path(os.environ.get("NANOSEEK_HISTORY", str(DEFAULT_PATH))).expanduser()
