"""How the server answers a bad request: OpenAI's error body for every failure (a validation error names the field
path the client sent), and a 413 for a body over MAX_BODY_BYTES before it is parsed."""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .schemas import ApiError, error_body

log = logging.getLogger("nanoseek.serve")
MAX_BODY_BYTES = 8 * 2**20  # a request body this large is refused (413) before it is read


def _validation_error(exc: RequestValidationError, content_type: str) -> ApiError:
    # a field of several types (content: str | list[part], stop, prompt) fails once per type; the deepest error,
    # furthest into a list, is the one about the type the client sent (a list's bad item, not "Input should be a
    # valid string"; prompt [1, "x"]: item 1 as a token id, not item 0 as a string)
    first = max(exc.errors(), default={"type": "", "loc": (), "msg": ""},
                key=lambda e: (len(e.get("loc", ())), [x for x in e.get("loc", ()) if isinstance(x, int)]))
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({first.get('msg', '')})")
    if tuple(first.get("loc", ())) == ("body",):
        if content_type and "json" not in content_type:
            # FastAPI parses only JSON-typed bodies (which also keeps cross-site form posts out)
            return ApiError(400, "send the body as JSON with 'Content-Type: application/json'")
        if first.get("type") == "missing":
            return ApiError(400, "the request body is empty: send a JSON object")
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _TYPE_IN_LOC.fullmatch(str(x))]
    param = ".".join(loc) or None
    msg = str(first["msg"]).removeprefix("Value error, ") or "invalid request"
    return ApiError(400, f"{param}: {msg}" if param else msg, param=param)


_TYPE_IN_LOC = re.compile(r"str|int|float|bool|(list|dict)\[.*\]")  # pydantic's name of the type that failed


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        err = _validation_error(exc, request.headers.get("content-type", ""))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(json.JSONDecodeError)
    async def bad_json(request: Request, exc: json.JSONDecodeError):
        return JSONResponse(error_body(f"the request body is not valid JSON ({exc})"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(str(exc.detail), param=None, code=code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception):  # a bug in the server, not the client's fault
        log.exception("internal error")
        return JSONResponse(error_body("internal server error", type="server_error"), status_code=500)


class BodyLimit:
    """ASGI middleware: answer 413 to a request body over MAX_BODY_BYTES. A Content-Length says so before the body
    is read; a chunked body (no length) is read here up to the limit and handed on whole (a multi-megabyte body would
    otherwise be parsed, tokenized or stored only to be refused for the context length)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length", b"0")
            chunked = b"content-length" not in headers and b"transfer-encoding" in headers
            if chunked:  # read it here, stopping once past the limit
                chunks, size, more = [], 0, True
                while more and size <= MAX_BODY_BYTES:
                    message = await receive()
                    if message["type"] != "http.request":  # the client went away
                        return
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    more = message.get("more_body", False)
                length = str(size).encode()
                receive = _replay(b"".join(chunks), receive)
            if length.isdigit() and int(length) > MAX_BODY_BYTES:
                body = error_body(f"the request body has {'over ' if chunked else ''}{int(length)} bytes; this server "
                                  f"takes at most {MAX_BODY_BYTES} (no model context holds more)",
                                  code="request_too_large")
                await JSONResponse(body, status_code=413)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _replay(body: bytes, receive):
    """An ASGI receive that gives `body` as the whole request, then defers to `receive` (to see a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
