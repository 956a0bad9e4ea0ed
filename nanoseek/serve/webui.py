"""The web chat: the page at `/` (static/, all local: a strict Content-Security-Policy forbids anything from
elsewhere) and the JSON endpoints of its conversation history (history.py):

    GET    /api/conversations                 {"data": [{id, title, created_at, updated_at}, ...]}, newest first
    POST   /api/conversations                 {"title"} -> the new conversation
    GET    /api/conversations/{id}            the conversation with its "messages"
    PATCH  /api/conversations/{id}            {"title"} -> rename
    DELETE /api/conversations/{id}
    POST   /api/conversations/{id}/messages   {"role", "content", "reasoning"?, "finish"?: "stopped"|"length"}
                                              -> the stored message

The page streams answers from `/v1/chat/completions` itself and stores each turn here. These endpoints need the API
key, or without one the history token (access.py): the page takes it from its address (`/#token=…`) on load.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from .history import HistoryStore
from .schemas import ApiError, ConversationCreate, ConversationUpdate, MessageCreate

STATIC = Path(__file__).parent / "static"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _not_found(conv_id: str) -> ApiError:
    return ApiError(404, f"no conversation {conv_id!r}", param="id", code="not_found")


def add_web_routes(app: FastAPI, history: HistoryStore, auth: list) -> None:
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/conversations", dependencies=auth)
    def list_conversations():
        return {"data": history.list_conversations()}

    @app.post("/api/conversations", dependencies=auth, status_code=201)
    def create_conversation(body: ConversationCreate):
        return history.create_conversation(body.title)

    @app.get("/api/conversations/{conv_id}", dependencies=auth)
    def get_conversation(conv_id: str):
        conv = history.get_conversation(conv_id)
        if conv is None:
            raise _not_found(conv_id)
        return conv

    @app.patch("/api/conversations/{conv_id}", dependencies=auth)
    def rename_conversation(conv_id: str, body: ConversationUpdate):
        title = history.rename_conversation(conv_id, body.title)
        if title is None:
            raise _not_found(conv_id)
        return {"id": conv_id, "title": title}

    @app.delete("/api/conversations/{conv_id}", dependencies=auth)
    def delete_conversation(conv_id: str):
        if not history.delete_conversation(conv_id):
            raise _not_found(conv_id)
        return {"id": conv_id, "deleted": True}

    @app.post("/api/conversations/{conv_id}/messages", dependencies=auth, status_code=201)
    def add_message(conv_id: str, body: MessageCreate):
        message = history.add_message(conv_id, body.role, body.content, body.reasoning, body.finish)
        if message is None:
            raise _not_found(conv_id)
        return message
