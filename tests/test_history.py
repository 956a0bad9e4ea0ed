"""The web chat's history file across versions: a file written before the `finish` column existed opens, keeps its
messages, and takes the new column."""

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
