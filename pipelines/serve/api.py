"""The HTTP API of `clpipe serve` (FastAPI): request and answer models, limits, errors, bearer token.

A bad item gets a 422 whose `detail` is FastAPI's (`loc` ["body", item, field] for a list,
["body", field] for one object) and whose `error` says it in a line; a body over
`Limits.max_body_bytes` (FastAPI's `max_body_size`) or a list over `Limits.max_items` gets a 413
before any compute.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated, Union

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

LIST, OBJECT = "list", "object"  # the union's branches; FastAPI puts the branch in `loc`, dropped here


class Row(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(description="the text to classify")
    task: str | None = Field(None, description="its task (a task of the bank); omit it where the method locates it")
    id: int | str | None = Field(None, description="echoed in the answer")


class Answer(BaseModel):
    id: int | str | None = Field(None, description="the row's id, where it had one")
    label: str
    probs: dict[str, float] = Field(description="every label's probability")
    task: str = Field(description="the task answered: the row's, or the one the method located")
    decided: bool = Field(description="the label's probability reaches the bank's calibrated threshold")


Rows = Annotated[Union[Annotated[list[Row], Tag(LIST)], Annotated[Row, Tag(OBJECT)]],
                 Discriminator(lambda body: LIST if isinstance(body, list) else OBJECT)]


@dataclass(frozen=True)
class Limits:
    """What one request may ask, and how long and how many wait (Ray Serve's own options)."""

    max_body_bytes: int = 1 << 20
    max_items: int = 256
    request_timeout_s: float = 120.0  # Serve's HTTP proxy answers 408 after it
    max_queued_requests: int = 256  # requests waiting for the replica beyond its max_ongoing_requests: 503

    def check(self) -> None:
        for field in ("max_body_bytes", "max_items", "request_timeout_s", "max_queued_requests"):
            if getattr(self, field) <= 0:
                raise ValueError(f"--{field.replace('_', '-')}: must be positive, got {getattr(self, field)}")


def where(loc: list) -> str:
    """'request item 3: field 'text'' for ["body", 3, "text"]."""
    item = [p for p in loc[1:] if isinstance(p, int)]
    fields = [p for p in loc[1:] if isinstance(p, str)]
    return (f"request item {item[0]}" if item else "request") + (f": field {fields[-1]!r}" if fields else "")


def unprocessable(errors: list[dict]) -> JSONResponse:
    """422 with FastAPI's `detail` and a line naming the first bad item and field."""
    first = errors[0]
    if first["type"] == "json_invalid":  # loc ["body", character]
        message = f"request: malformed JSON at character {first['loc'][-1]}: {first.get('ctx', {}).get('error', '')}"
    else:
        message = f"{where(first['loc'])}: {first['msg']}"
    return JSONResponse({"error": message, "detail": errors}, 422)


def item_error(is_list: bool, index: int, field: str | None, message: str) -> JSONResponse:
    """A row that passed the schema but not the run's checks (e.g. a task the bank does not have)."""
    loc = ["body"] + ([index] if is_list else []) + ([field] if field else [])
    return JSONResponse({"error": message, "detail": [{"type": "value_error", "loc": loc, "msg": message}]}, 422)


def too_many_items(count: int, limit: int) -> HTTPException:
    return HTTPException(413, f"{count} items in one request; the server takes at most {limit} (--max-items)")


def build_app(max_body_bytes: int) -> FastAPI:
    """The app without routes: body limit, and 422s that name the item and field."""
    # FastAPI's own body limit: 413 from Content-Length at once, or as a body without one is read.
    app = FastAPI(title="clpipe serve", summary="Classify texts with a clpipe run's latest bank",
                  max_body_size=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def bad_items(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{**e, "loc": [p for p in e["loc"] if p not in (LIST, OBJECT)]} for e in jsonable_encoder(exc.errors())]
        kind = request.headers.get("content-type", "application/json")
        if "json" not in kind:  # FastAPI reads such a body as bytes, never as JSON
            return JSONResponse({"error": f"request: Content-Type {kind!r}; send JSON with Content-Type: "
                                          f"application/json", "detail": errors}, 422)
        return unprocessable(errors)

    return app


bearer = HTTPBearer(auto_error=False, description="the token `clpipe serve` was started with")


def token_digest(token: str | None) -> str | None:
    """What a replica keeps of the token: its sha256, so the token itself never leaves the CLI."""
    return None if token is None else hashlib.sha256(token.encode()).hexdigest()


def require_token(digest: str | None) -> Depends:
    """A route dependency: 401 unless the server needs no token or the request carries the right one
    (checked before the body is validated)."""

    def authorize(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if digest is None:
            return
        given = token_digest(credentials.credentials) if credentials is not None else ""
        if not hmac.compare_digest(given, digest):
            raise HTTPException(401, "a bearer token is required: Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})

    return Depends(authorize)

