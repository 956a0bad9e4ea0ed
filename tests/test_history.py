"""The web chat's history file: across versions (a file written before the `finish` column existed opens, keeps its
messages, and takes the new column), and kept private."""

from __future__ import annotations

import sqlite3

from nanoseek.serve.history import HistoryStore

OLD_SCHEMA = """
CREATE TABLE conversations (id TEXT PRIMARY KEY, title TEXT NOT NULL, created_at REAL NOT NULL,
                            updated_at REAL NOT NULL);
CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT,
                       conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
                       role TEXT NOT NULL, content TEXT NOT NULL, reasoning TEXT, created_at REAL NOT NULL);
INSERT INTO conversations VALUES ('c1', 'old chat', 1.0, 1.0);
INSERT INTO messages (conversation_id, role, content, reasoning, created_at) VALUES ('c1', 'user', 'hi', NULL, 1.0);
"""


def test_a_history_file_from_before_the_finish_column_opens_and_takes_it(tmp_path):
    path = tmp_path / "history.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.close()
    path.chmod(0o600)
    store = HistoryStore(path)
    assert store.add_message("c1", "assistant", "an answer cut short", "thinking", finish="length")["finish"] == "length"
    messages = store.get_conversation("c1")["messages"]
    assert [(m["content"], m["finish"]) for m in messages] == [("hi", None), ("an answer cut short", "length")]
    store.close()
    again = HistoryStore(path)  # the column is added once
    assert [m["finish"] for m in again.get_conversation("c1")["messages"]] == [None, "length"]
    again.close()


def test_history_survives_a_restart(tmp_path, monkeypatch, capsys):
    """The history is kept private: a file made looser since (restored from a backup, copied) is made 0600 again, a
    folder others can list is warned about, and a deleted conversation's text is gone from the file, also under
    SQLite's upstream default secure_delete=OFF (emulated here: Debian's build turns it on)."""
    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **kw: connect(*a, **kw).execute(
        "PRAGMA secure_delete = OFF").connection)
    path = tmp_path / "sub" / "history.sqlite3"
    store = HistoryStore(path)
    conv = store.create_conversation("kept")
    store.add_message(conv["id"], "user", "hello, a secret")
    store.close()
    assert oct(path.stat().st_mode & 0o777) == "0o600" and not capsys.readouterr().err  # private
    path.chmod(0o644), path.parent.chmod(0o755)
    again = HistoryStore(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600" and "other users can list" in capsys.readouterr().err
    assert [c["title"] for c in again.list_conversations()] == ["kept"]
    assert [m["content"] for m in again.get_conversation(conv["id"])["messages"]] == ["hello, a secret"]
    assert again.add_message("missing", "user", "x") is None
    assert again.delete_conversation(conv["id"]) and again.list_conversations() == []
    again.close()
    assert b"a secret" not in path.read_bytes()
