"""A chat backend: conversations with an LLM, stored in SQLite or Postgres, replies streamed as SSE.

Read top to bottom: settings, database, models (the LLM kind), shutdown, the app, then one
section a capability: conversations, messages, branches, live replies, generation, following a
reply, the OpenAI-compatible front (/v1), search/export/import, the Responses API, browsers.
"""

import asyncio
import base64
import hashlib
import io
import itertools
import json
import logging
import re
import secrets
import signal
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from html import escape as html_escape
from ipaddress import ip_address
from pathlib import Path as FilePath
from select import select as readable  # the socket kind; queries use sqlmodel's select
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import anyio
import openai
import psycopg
from alembic import command
from alembic.config import Config as AlembicConfig
from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    Header,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
)
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, format_sse_event
from fastapi_offline import FastAPIOffline
from openai.types.chat import ChatCompletionChunk
from pydantic import (
    AfterValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import and_, event, exc, func, insert, true, tuple_
from sqlalchemy import column as sa_column
from sqlalchemy import table as sa_table
from sqlalchemy import text as sql
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import aliased
from sqlalchemy.orm.exc import StaleDataError
from sqlmodel import SQLModel, col, select, update
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from models import (
    INT32_MAX,
    MAX_TEXT_CHARS,
    UNSTORABLE,
    ChatGPTConversation,
    ChatRequest,
    Conversation,
    ConversationCreate,
    ConversationExport,
    ConversationPublic,
    ConversationRef,
    ConversationReplace,
    ConversationUpdate,
    ErrorDetail,
    ExportImport,
    GenerateQuery,
    GenerateRequest,
    ImportResult,
    InputItem,
    InputItemList,
    Message,
    MessageCreate,
    MessagePublic,
    OpenAIErrorBody,
    OutputMessage,
    OutputText,
    RegenerateRequest,
    ResponseDeleted,
    ResponseError,
    ResponseObject,
    ResponseRequest,
    ResponseUsage,
    Sampling,
    SearchHit,
    developer_is_system,
    iso_timestamp,
    storable_piece,
    storable_text,
    utc_now,
)

logger = logging.getLogger("app")


# Settings --------------------------------------------------------------------------------


class Settings(BaseSettings):
    """Read from the environment or a .env file; an empty variable counts as unset."""

    model_config = SettingsConfigDict(
        env_file=".env", env_ignore_empty=True, extra="ignore"
    )

    database_url: str = "sqlite:///chat.db"
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None  # None: OpenAI's
    default_model: str = "echo"
    system_prompt: str = ""
    history_turns: int = Field(default=10, ge=0)
    max_prompt_chars: int = Field(default=32_000, ge=1, le=MAX_TEXT_CHARS)
    openai_timeout: float = Field(default=60, gt=0)
    max_tokens: int | None = Field(default=None, ge=1)
    api_key: SecretStr | None = None
    cors_origins: str = ""  # comma-separated; see "Browsers" below
    allowed_hosts: str = ""  # comma-separated; see "Browsers" below
    max_body_bytes: int = Field(default=16_000_000, ge=1)
    checkpoint_ms: int = Field(default=500, ge=10)
    dead_turn_seconds: float = Field(default=30, ge=3)
    max_live_replies: int = Field(default=100, ge=1)
    max_import_bytes: int = Field(default=100_000_000, ge=1)

    @field_validator("api_key")
    @classmethod
    def key_can_be_typed(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            why = "no client could send it (unset it for no auth)"
            raise ValueError(f"API_KEY is only whitespace: {why}")
        return value


settings = Settings()


# Database --------------------------------------------------------------------------------

ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
}


def async_database_url(url: str) -> str:
    """Let users write sqlite:// and postgresql:// and still get the async drivers."""
    parsed = make_url(url)
    driver = ASYNC_DRIVERS.get(parsed.drivername, parsed.drivername)
    return parsed.set(drivername=driver).render_as_string(hide_password=False)


# A database that stops answering (a hung server, a dead network path) should cost a request
# seconds, not minutes: each wait for it (to connect, for an answer, for a free pooled
# connection) gives up after this long, and the request answers 503.
DATABASE_TIMEOUT = 5  # seconds


class BoundedConnection(psycopg.AsyncConnection):
    """A psycopg connection that gives up when an answer takes over `answer_timeout` seconds.

    `connect_timeout` bounds only connecting: a query on an open connection waits on the socket
    for minutes. psycopg does every such wait in `wait()`, which takes a timeout (asyncio.timeout
    would not do: cancelled, psycopg first asks the silent server to cancel). On timeout the
    connection is closed: SQLAlchemy sees a disconnect and connects anew when asked.
    """

    answer_timeout: float | None = DATABASE_TIMEOUT  # None: wait as long as it takes

    async def wait(
        self, gen: Any, interval: float = 0.1, timeout: float | None = None
    ) -> Any:
        if timeout is not None or self.answer_timeout is None:  # a bound of its own
            return await super().wait(gen, interval, timeout)
        try:
            return await super().wait(gen, interval, self.answer_timeout)
        except psycopg.errors._WaitTimeout:  # what psycopg raises when `timeout` passes
            await self.close()
            silent = f"The database did not answer in {self.answer_timeout} s"
            raise psycopg.OperationalError(silent) from None


database_url = async_database_url(settings.database_url)
is_sqlite = database_url.startswith("sqlite")
if is_sqlite:
    # SQLite takes one writer at a time and makes the others poll for the lock, sleeping up
    # to 100 ms a try: under load some wait for seconds. One connection makes them queue.
    engine = create_async_engine(database_url, pool_size=1, max_overflow=0)
else:
    engine = create_async_engine(
        database_url,
        # On a frozen database every pooled connection is stuck: do not queue for 30 s
        # (the default) for one.
        pool_timeout=DATABASE_TIMEOUT,
        connect_args={
            "connect_timeout": DATABASE_TIMEOUT,
            "async_creator_fn": BoundedConnection.connect,
        },
    )


if not is_sqlite:

    @event.listens_for(engine.sync_engine, "checkout")
    def closed_by_the_server(connection: Any, record: Any, proxy: Any) -> None:
        """An idle connection with something to read was closed by the server (a restart,
        pg_terminate_backend): the pool replaces it. A pool_pre_ping without a round trip."""
        if readable([record.driver_connection.fileno()], [], [], 0)[0]:
            raise exc.DisconnectionError("closed by the server")


if is_sqlite:

    @event.listens_for(engine.sync_engine, "connect")
    def configure_sqlite(dbapi_connection: Any, _: Any) -> None:
        cursor = dbapi_connection.cursor()
        # Without it SQLite ignores ON DELETE CASCADE.
        cursor.execute("PRAGMA foreign_keys = ON")
        # Readers and the writer do not block each other. Several processes switching a new
        # file at once are refused at once ("database is locked", without waiting): retry.
        for attempt in range(50):
            try:
                cursor.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError:
                if attempt == 49:
                    raise
                time.sleep(0.02)
        # Safe with WAL: a crash loses nothing, a power cut at most the last commits.
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()


async def get_session() -> AsyncIterator[AsyncSession]:
    # Sessions hold a connection only inside a transaction, so a long stream holds none.
    async with AsyncSession(engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


def migrate_to_head(connection: Any) -> None:
    """Run on a connection outside any transaction: migrations/env.py begins and commits it."""
    config = AlembicConfig(FilePath(__file__).with_name("alembic.ini"))
    config.attributes["connection"] = connection  # migrations/env.py runs on it
    command.upgrade(config, "head")


# Models ----------------------------------------------------------------------------------

ECHO = "echo"
openai_api_key = settings.openai_api_key
llm = openai.AsyncOpenAI(
    base_url=settings.openai_base_url,
    # Local servers (Ollama, vLLM, llama.cpp) take any key, but the SDK insists on one.
    api_key=openai_api_key.get_secret_value() if openai_api_key else "not-set",
    timeout=settings.openai_timeout,  # also the longest wait between two pieces of a reply
    max_retries=0,  # a retry would replay the turn; the caller sees the error and decides
)


async def open_llm_reply(
    model: str, messages: list[dict], sampling: dict | None = None
) -> openai.AsyncStream[ChatCompletionChunk]:
    """`sampling`: more fields of the request (temperature, max_tokens, ...), from a /v1 call."""
    body = {
        **(sampling or {}),
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cap := settings.max_tokens:
        limits = [n for n in ("max_tokens", "max_completion_tokens") if n in body]
        for name in limits or ["max_tokens"]:
            body[name] = min(body.get(name, cap), cap)
    # The same request as llm.chat.completions.create(**body), without the type-driven
    # rewrite of every message that create() runs first: 3 ms of CPU per reply with ten
    # turns of history, for plain JSON that needs no rewriting.
    return await llm.post(
        "/chat/completions",
        body=body,
        cast_to=ChatCompletionChunk,
        stream=True,
        stream_cls=openai.AsyncStream[ChatCompletionChunk],
    )


def chat_messages(prompt: str, history: list[tuple[str, str]]) -> list[dict]:
    """SYSTEM_PROMPT, then the earlier (prompt, reply) pairs, oldest first, then the prompt."""
    messages = []
    if settings.system_prompt:
        messages.append({"role": "system", "content": settings.system_prompt})
    for earlier_prompt, earlier_reply in history:
        messages.append({"role": "user", "content": earlier_prompt})
        messages.append({"role": "assistant", "content": earlier_reply})
    messages.append({"role": "user", "content": prompt})
    return messages


def one_line(text: str, width: int) -> str:
    """The text's first characters on one line, cut at a word where one ends near the limit."""
    line = " ".join(storable_piece(text).split())
    if len(line) <= width:
        return line
    cut = line[: width - 3]
    # A first word longer than the whole width (a URL, Chinese) is cut inside the word.
    head = cut.rsplit(" ", 1)[0] if " " in cut[width // 2 :] else cut
    return head.rstrip() + "..."


# The title of a conversation that has none yet (the page's new chats): its next turn titles it.
UNTITLED = "New conversation"


def short_title(text: str) -> str:
    """At most 60 characters; the prompt's own words serve until the LLM's title is in."""
    return one_line(text, 60).strip("\"'` ") or UNTITLED


def upstream_error(error: openai.APIStatusError) -> str:
    # The body may be an HTML error page or carry internal details: keep one short line.
    return f"The model answered {error.status_code}: {one_line(error.message, 300)}"


# Stopping live work on shutdown ----------------------------------------------------------
# Uvicorn waits for open streams before it shuts down, so a long reply would hold a restart:
# on SIGTERM/SIGINT each reply stores what it has (503) and tells its clients.

live_work: set[anyio.CancelScope] = set()
stopping = False


def stop_live_work() -> None:
    global stopping
    stopping = True
    for scope in live_work:
        scope.cancel()


@contextmanager
def cancelled_on_shutdown(scope: anyio.CancelScope) -> Iterator[None]:
    with scope:
        if stopping:
            scope.cancel()
        live_work.add(scope)
        try:
            yield
        finally:
            live_work.discard(scope)


@contextmanager
def shutdown_signals_stop_live_work() -> Iterator[None]:
    """Run stop_live_work on SIGINT/SIGTERM, then hand the signal on to the server (uvicorn)."""
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    # A server (uvicorn) handles both, from the main thread; a test client running the app
    # in a thread has no handlers to hand on to.
    handled = all(callable(handler) for handler in previous.values())
    if not handled or threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()

    def handle(sig: int, frame: Any) -> None:
        # A signal handler can interrupt the loop anywhere: run it from the loop instead.
        loop.call_soon_threadsafe(stop_live_work)
        previous[sig](sig, frame)

    for sig in signals:
        signal.signal(sig, handle)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# The app ---------------------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with engine.connect() as connection:
        await connection.run_sync(migrate_to_head)
    with shutdown_signals_stop_live_work():
        reaper = asyncio.create_task(close_dead_turns_forever())
        yield
        reaper.cancel()
        stop_live_work()  # without a signal too, e.g. when a test client closes the app
        with anyio.move_on_after(15):  # each stores its end within about 10 s
            await asyncio.gather(*background_tasks, return_exceptions=True)
    await llm.close()
    await engine.dispose()


# Swagger UI's files come from a pinned package, not a CDN: /docs works offline. (No ReDoc:
# its page still loads a logo from its CDN.)
app = FastAPIOffline(title="Chat backend", lifespan=lifespan, redoc_url=None)


def openai_error(
    status_code: int, message: str, param: str | None = None, code: str | None = None
) -> dict:
    """OpenAI's error shape: OpenAI clients raise their usual exceptions for it."""
    kind = "invalid_request_error" if status_code < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def under_v1(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_for(
    path: str, status_code: int, detail: str, headers: dict | None = None
) -> JSONResponse:
    """`{"detail": ...}`, or under /v1 (the OpenAI-compatible front) OpenAI's shape."""
    if under_v1(path):
        return JSONResponse(openai_error(status_code, detail), status_code, headers)
    return JSONResponse({"detail": detail}, status_code, headers)


# Starlette's HTTPException: FastAPI's, and the router's own (404, 405).
@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    return error_for(request.url.path, error.status_code, error.detail, error.headers)


BODY_LIMITS: dict[str, tuple[int, str]] = {}  # a path's own limit, and its setting


async def body_within_limit(scope: dict, receive: Any, send: Any) -> Any:
    """The body, taken in before the app runs, as a `receive` that replays it; None when a
    body over the limit got its 413 before it was read whole (or the client left)."""
    default = (settings.max_body_bytes, "MAX_BODY_BYTES")
    limit, setting = BODY_LIMITS.get(scope["path"], default)
    message = f"The request body is over {limit:,} bytes ({setting})"
    too_large = error_for(scope["path"], 413, message)
    length = Headers(scope=scope).get("content-length", "")
    if length.isdigit() and int(length) > limit:
        return await too_large(scope, receive, send)
    messages, received = [], 0
    while not messages or messages[-1].get("more_body"):
        messages.append(part := await receive())
        received += len(part.get("body", b""))
        if part["type"] == "http.disconnect":
            return None  # the client left
        if received > limit:  # sent without a Content-Length (chunked)
            return await too_large(scope, receive, send)

    async def replay() -> dict:
        return messages.pop(0) if messages else await receive()

    return replay


async def database_unavailable(request: Request, error: Exception) -> JSONResponse:
    logger.error("Database unavailable: %s", error)
    return error_for(request.url.path, 503, "Database unavailable")


DATABASE_ERRORS = (exc.OperationalError, exc.InterfaceError, exc.TimeoutError)
for error_class in DATABASE_ERRORS:
    app.add_exception_handler(error_class, database_unavailable)


@app.exception_handler(StaleDataError)
@app.exception_handler(exc.IntegrityError)
async def deleted_meanwhile(request: Request, error: Exception) -> JSONResponse:
    # A DELETE committed between this request's read and its write: the row it changes is
    # gone (StaleDataError), or the conversation a new row belongs to (a foreign key error).
    gone = "Message" if "message_id" in request.path_params else "Conversation"
    return error_for(request.url.path, 404, f"{gone} not found")


@app.exception_handler(RequestValidationError)
async def invalid_request(
    request: Request, error: RequestValidationError
) -> JSONResponse:
    # FastAPI's own handler echoes each bad input back: a 1 MB text, or one that is not valid
    # Unicode and cannot be encoded at all (a 500). The location and message are enough.
    errors = [
        {key: value for key, value in e.items() if key != "input"}
        for e in error.errors()
    ]
    # Under /v1, OpenAI's 400: the problems in one line, and the first one's field.
    if under_v1(request.url.path):
        where = [".".join(map(str, e["loc"][1:])) for e in errors]  # after "body"
        message = "; ".join(
            f"{at}: {e['msg']}" if at else e["msg"]
            for at, e in zip(where, errors, strict=True)
        )
        return JSONResponse(openai_error(400, message, where[0] or None), 400)
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


bearer = HTTPBearer(auto_error=False)


async def require_api_key(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    if settings.api_key is None:
        return
    # Starlette reads header values as Latin-1: back to the bytes sent, which are UTF-8.
    given = credentials.credentials.encode("latin-1") if credentials else b""
    if not secrets.compare_digest(given, settings.api_key.get_secret_value().encode()):
        raise HTTPException(
            401, "Invalid or missing API key", headers={"WWW-Authenticate": "Bearer"}
        )


# Everything but /health (and FastAPI's /docs and /openapi.json) needs the key when API_KEY is set.
api = APIRouter(dependencies=[Depends(require_api_key)])

Skip = Annotated[int, Query(ge=0, le=INT32_MAX)]
Take = Annotated[int, Query(ge=1, le=100)]
ConversationId = Annotated[int, Path(ge=1, le=INT32_MAX)]
MessageId = Annotated[int, Path(ge=1, le=INT32_MAX)]


# Conversations ---------------------------------------------------------------------------


async def find_conversation(
    conversation_id: ConversationId, session: SessionDep
) -> Conversation:
    conversation = await session.get(Conversation, conversation_id)
    if conversation is None:
        raise HTTPException(404, "Conversation not found")
    return conversation


ConversationDep = Annotated[Conversation, Depends(find_conversation)]


@api.get("/conversations")
async def list_conversations(
    session: SessionDep,
    skip: Skip = 0,
    take: Take = 100,
    model_type: Annotated[str, AfterValidator(storable_text)] = "",
) -> list[ConversationPublic]:
    newest = (col(Conversation.updated_at).desc(), col(Conversation.id).desc())
    query = select(Conversation).order_by(*newest)
    if model_type:
        query = query.where(Conversation.model_type == model_type)
    return (await session.exec(query.offset(skip).limit(take))).all()


@api.get("/conversations/{conversation_id}")
async def read_conversation(conversation: ConversationDep) -> ConversationPublic:
    return conversation


@api.post("/conversations", status_code=201)
async def create_conversation(
    body: ConversationCreate, session: SessionDep
) -> ConversationPublic:
    model_type = body.model_type or settings.default_model
    conversation = Conversation.model_validate(body, update={"model_type": model_type})
    session.add(conversation)
    await session.commit()
    return conversation


@api.put("/conversations/{conversation_id}", status_code=202)
async def replace_conversation(
    body: ConversationReplace, conversation: ConversationDep, session: SessionDep
) -> ConversationPublic:
    conversation.sqlmodel_update(body.model_dump(), update={"updated_at": utc_now()})
    await session.commit()
    return conversation


@api.patch("/conversations/{conversation_id}")
async def update_conversation(
    body: ConversationUpdate, conversation: ConversationDep, session: SessionDep
) -> ConversationPublic:
    fields = body.model_dump(exclude_unset=True)
    if "leaf_id" in fields:  # switching branches is not activity: updated_at stays
        conversation = await locked_conversation(session, conversation.id)
        leaf_id = fields.pop("leaf_id")
        turn = leaf_id and await session.get(Message, leaf_id)
        if leaf_id and (turn is None or turn.conversation_id != conversation.id):
            raise HTTPException(422, "leaf_id must be a turn of this conversation")
        await move_leaf(session, conversation, leaf_id)
    if fields:
        conversation.sqlmodel_update(fields, update={"updated_at": utc_now()})
    await session.commit()
    return conversation


@api.delete("/conversations/{conversation_id}", status_code=204)
async def delete_conversation(
    conversation: ConversationDep, session: SessionDep
) -> None:
    await session.delete(conversation)  # the database deletes its messages (CASCADE)
    await session.commit()


# Messages --------------------------------------------------------------------------------


async def find_message(message_id: MessageId, session: SessionDep) -> Message:
    message = await session.get(Message, message_id, populate_existing=True)
    if message is None:
        raise HTTPException(404, "Message not found")
    return message


MessageDep = Annotated[Message, Depends(find_message)]


async def touch_conversation(
    session: AsyncSession, conversation_id: int, at: datetime | None = None
) -> Any:
    """A change to a conversation's messages is activity in it. This locks the conversation
    before its message, as a DELETE of the conversation does, or Postgres fails one of them.
    The row of its leaf_id, or None when it is gone."""
    touch = update(Conversation).where(col(Conversation.id) == conversation_id)
    touch = touch.values(updated_at=at or utc_now()).returning(Conversation.leaf_id)
    return (await session.exec(touch)).first()


@api.get("/conversations/{conversation_id}/messages")
async def list_messages(
    conversation: ConversationDep,
    session: SessionDep,
    skip: Skip = 0,
    take: Take = 100,
    all: bool = False,
) -> list[MessagePublic]:
    query = select(Message).where(Message.conversation_id == conversation.id)
    if not all:
        query = query.where(col(Message.on_branch))  # an index of the branch's turns
    query = query.order_by(col(Message.created_at), col(Message.id))
    return (await session.exec(query.offset(skip).limit(take))).all()


@api.post("/conversations/{conversation_id}/messages", status_code=201)
async def create_message(
    body: MessageCreate, conversation: ConversationDep, session: SessionDep
) -> MessagePublic:
    message = Message.model_validate(body, update={"conversation_id": conversation.id})
    await store_turn(session, conversation, message)
    await session.commit()
    return message


@api.get("/messages/{message_id}")
async def read_message(message: MessageDep) -> MessagePublic:
    return message


@api.put("/messages/{message_id}", status_code=202)
async def replace_message(
    body: MessageCreate, message: MessageDep, session: SessionDep
) -> MessagePublic:
    if message.live:
        raise HTTPException(409, "The message is live: its reply is being generated")
    await touch_conversation(session, message.conversation_id)
    message.sqlmodel_update(body.model_dump(), update={"updated_at": utc_now()})
    await session.commit()
    return message


@api.delete("/messages/{message_id}", status_code=204)
async def delete_message(message: MessageDep, session: SessionDep) -> None:
    conversation = await locked_conversation(session, message.conversation_id)
    conversation.updated_at = utc_now()
    # Read again under the lock: its parent may have been deleted since.
    message = await find_message(message.id, session)
    following = update(Message).where(col(Message.parent_id) == message.id)
    await session.exec(following.values(parent_id=message.parent_id))
    if conversation.leaf_id == message.id:
        conversation.leaf_id = message.parent_id  # on the branch already
    await session.delete(message)
    await session.commit()


# Branches --------------------------------------------------------------------------------
# A conversation's turns form a tree: each follows its parent_id (none: a first turn); its
# leaf_id ends the active branch. The turns of that path are marked on_branch (partial indexes:
# a page of a 20,000-turn branch is an index range), and move_leaf() rewrites only the marks
# where the old branch and the new one differ. Whatever stores a turn, moves a leaf or deletes
# a turn locks the conversation's row first: writers in one conversation take turns.


async def locked_conversation(
    session: AsyncSession, conversation_id: int
) -> Conversation:
    """The conversation as it is now, its row locked until commit (SQLite: one writer anyway)."""
    conversation = await session.get(
        Conversation, conversation_id, with_for_update=True, populate_existing=True
    )
    if conversation is None:
        raise HTTPException(404, "Conversation not found")
    return conversation


def path_up(start: int | None, goes_on: Callable[[Any], Any]) -> Any:
    """A CTE of turn `start` and the turns it follows (id, parent_id, on_branch), climbing
    from a turn to its parent while `goes_on(turn)` holds."""
    turns, above = Message.__table__, Message.__table__.alias()
    first = select(turns.c.id, turns.c.parent_id, turns.c.on_branch)
    path = first.where(turns.c.id == start).cte("path", recursive=True)
    climb = select(above.c.id, above.c.parent_id, above.c.on_branch)
    climb = climb.join(path, above.c.id == path.c.parent_id).where(goes_on(path.c))
    return path.union_all(climb)


async def move_leaf(
    session: AsyncSession, conversation: Conversation, leaf_id: int | None
) -> None:
    """Make `leaf_id` (a turn of this conversation, or None) the leaf, and mark its branch."""
    joining = path_up(leaf_id, lambda turn: ~turn.on_branch)
    # The last turn both branches share: the first marked turn above the new leaf.
    fork = (await session.exec(select(joining.c.id).where(joining.c.on_branch))).first()
    # The old branch below it, up from the old leaf (all of it when they share none).
    leaving = path_up(conversation.leaf_id, lambda turn: turn.id.is_distinct_from(fork))
    old = select(leaving.c.id).where(leaving.c.id.is_distinct_from(fork))
    new = select(joining.c.id).where(~joining.c.on_branch)
    for turns, mark in ((old, False), (new, True)):
        in_turns = col(Message.id).in_(turns)
        await session.exec(update(Message).where(in_turns).values(on_branch=mark))
    conversation.leaf_id = leaf_id


async def store_turn(
    session: AsyncSession, conversation: Conversation, message: Message
) -> None:
    """Add a new turn after the conversation's leaf as it is now, as the new leaf; the caller
    commits. The row is locked first: turns stored at once follow one another."""
    session.add(conversation)
    await session.flush()  # a new conversation gets its id
    if (leaf := await touch_conversation(session, conversation.id)) is None:
        raise HTTPException(404, "Conversation not found")  # deleted meanwhile
    message.created_at = utc_now()  # in the order they follow one another
    message.conversation_id, message.parent_id = conversation.id, leaf.leaf_id
    message.on_branch = True
    session.add(message)
    await session.flush()  # its id
    conversation.leaf_id, conversation.updated_at = message.id, message.created_at


async def recent_successful_turns(
    session: AsyncSession, conversation_id: int
) -> list[tuple[str, str]]:
    """The active branch's last HISTORY_TURNS successful (prompt, reply) pairs, oldest first."""
    query = (
        select(Message.prompt_content, Message.response_content)
        .where(Message.conversation_id == conversation_id, col(Message.on_branch))
        .where(Message.is_success == true())
        .order_by(col(Message.created_at).desc(), col(Message.id).desc())
        .limit(settings.history_turns)
    )
    return [tuple(row) for row in reversed((await session.exec(query)).all())]


# Live replies ----------------------------------------------------------------------------
# A reply belongs to the server, not to the request that started it: it runs in a task of its
# own (run_reply) until the model ends it, a stop, a deletion or shutdown, and stores its end
# exactly once. Clients follow it, in this process from memory, from any other process through
# its row, which the reply writes every CHECKPOINT_MS while its text changes (a checkpoint) and
# every DEAD_TURN_SECONDS/3 anyway (a heartbeat). A live row that stops beating belongs to a
# process that died, and any worker closes it (close_dead_turns_forever).
#
# Every event carries an id, `<message_id>:<offset>` (the characters of reply text sent up to
# and including it) or `<message_id>:end` on the final event, so a client that lost its
# connection asks for the rest with a Last-Event-ID header and gets each character once.

STOPPED = 499  # a stopped reply's status; on a live row it asks the process to stop
RETRY_MS = 1000  # how soon a browser's EventSource reconnects
PING_SECONDS = 15  # a comment line that keeps idle connections open through proxies
HEARTBEAT_SECONDS = settings.dead_turn_seconds / 3
# How often a reply looks at its row (and writes it, when due): often enough for a heartbeat.
TICK_SECONDS = min(settings.checkpoint_ms / 1000, HEARTBEAT_SECONDS)
background_tasks: set[asyncio.Task] = set()


def in_background(work: Coroutine) -> None:
    task = asyncio.create_task(work)
    background_tasks.add(task)  # the loop keeps only a weak reference
    task.add_done_callback(background_tasks.discard)


@dataclass(eq=False)
class LiveReply:
    message_id: int
    conversation_id: int
    pieces: list[str] = field(default_factory=list)
    # The pieces' lengths as text, kept as they come: a checkpoint joins them.
    lengths: list[str] = field(default_factory=list)
    length: int = 0  # characters so far
    finish_reason: str | None = None  # why the model stopped, as it said (stop, length)
    usage: dict[str, int | None] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    stop: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    ended_by: tuple[int, str] | None = None  # a stop or a deletion, before the model
    # A /v1 call's messages: with the reply, its turn's path (see "OpenAI-compatible front").
    call: list[tuple[str, str]] | None = None
    # How it ended, once stored: the status (a 503 when it could not be stored), a detail for
    # errors, and its row as stored (none if it was deleted).
    status_code: int | None = None
    detail: str = ""
    message: Message | None = None
    stored: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, piece: str) -> bool:
        """Append a piece as it can be stored; False once the text is as long as a message holds."""
        room = MAX_TEXT_CHARS - self.length
        piece = storable_piece(piece)[:room]
        if piece:
            self.pieces.append(piece)
            self.lengths.append(str(len(piece)))
            self.length += len(piece)
            self.wake_followers()
        return len(piece) < room

    def set_usage(self, prompt: Any, response: Any, total: Any) -> None:
        # A model may report anything; a count a column cannot hold is unknown.
        names = "prompt_tokens", "response_tokens", "total_tokens"
        self.usage = {
            name: value if type(value) is int and 0 <= value <= INT32_MAX else None
            for name, value in zip(names, (prompt, response, total), strict=True)
        }

    def piece_lengths(self) -> str:
        return ",".join(self.lengths)

    def wake_followers(self) -> None:
        # Followers wait on the event they saw; later ones get a new, unset event.
        woken = self.changed
        self.changed = asyncio.Event()
        woken.set()

    def end(self, status_code: int, detail: str) -> None:
        if self.ended_by is None:
            self.ended_by = (status_code, detail)
            self.stop.cancel()


live_replies: dict[int, LiveReply] = {}  # this process's replies, by message id
# MAX_LIVE_REPLIES places: a turn takes one (counts and takes it, with no await between) before
# its prompt is stored, and gives it back once its end is stored.
reply_places = threading.BoundedSemaphore(settings.max_live_replies)


async def run_reply(
    reply: LiveReply, opening: asyncio.Task | None, prompt: str
) -> None:
    outcome = None
    with cancelled_on_shutdown(reply.stop):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(checkpoint, reply)
            outcome = await generate(reply, opening, prompt)
            tasks.cancel_scope.cancel()
    if opening:
        opening.cancel()  # in case the reply was stopped before it opened
    if outcome is None:  # ended early
        outcome = reply.ended_by or (503, "The server is shutting down")
    reply.status_code, reply.detail, reply.message = await store_end(reply, *outcome)
    del live_replies[reply.message_id]
    reply_places.release()
    reply.stored.set()
    reply.wake_followers()


def database_clock() -> Any:
    """Now, for a live row: by the database server's clock, since app hosts' clocks may differ."""
    return utc_now() if is_sqlite else func.now()  # a SQLite file has one host


async def checkpoint(reply: LiveReply) -> None:
    """Write the text so far to the row when it changed, and a heartbeat; see stops and deletions."""
    stored_length, stored_at = 0, time.monotonic()  # the prompt's insert wrote the row
    live_row = (col(Message.id) == reply.message_id) & col(Message.live)
    while True:
        await asyncio.sleep(TICK_SECONDS)
        length = reply.length
        # A heartbeat when the next tick would come too late for one.
        late = time.monotonic() + TICK_SECONDS - stored_at >= HEARTBEAT_SECONDS
        write = length != stored_length or late
        if write:
            query = (
                update(Message)
                .where(live_row)
                .values(
                    response_content="".join(reply.pieces),
                    piece_lengths=reply.piece_lengths(),
                    updated_at=database_clock(),
                )
                .returning(Message.id, Message.status_code)
            )
        else:
            query = select(Message.id, Message.status_code).where(live_row)
        try:
            # Not cut short by the reply's end: that is stored after this write.
            with anyio.CancelScope(shield=True):
                async with AsyncSession(engine) as session:
                    row = (await session.exec(query)).one_or_none()
                    await session.commit()
        except DATABASE_ERRORS as error:
            logger.warning("Checkpoint of %s failed: %s", reply.message_id, error)
            continue
        if write:
            stored_length, stored_at = length, time.monotonic()
        if row is None:
            reply.end(410, DELETED)
        elif row.status_code == STOPPED:
            reply.end(STOPPED, "Stopped")


def end_values(reply: LiveReply, status_code: int) -> dict:
    values = {
        "response_content": "".join(reply.pieces),
        "piece_lengths": reply.piece_lengths(),
        "finish_reason": reply.finish_reason,
        **reply.usage,
        "is_success": status_code == 200,
        "status_code": status_code,
        "live": False,
        "updated_at": utc_now(),
    }
    if reply.call and status_code == 200:
        path = [*reply.call, ("assistant", values["response_content"])]
        values["path_hash"] = path_key(path)
    return values


async def store_end(
    reply: LiveReply, status_code: int, detail: str
) -> tuple[int, str, Message | None]:
    """Store how the turn ended, retrying a failing database for about 10 s; return the end
    as stored (another process may have ended it first) and the row (None: deleted)."""
    values = end_values(reply, status_code)
    live_row = (col(Message.id) == reply.message_id) & col(Message.live)
    query = update(Message).where(live_row).values(values).returning(Message)
    deadline = time.monotonic() + 10
    while True:
        try:
            async with AsyncSession(engine, expire_on_commit=False) as session:
                updated_at = values["updated_at"]
                await touch_conversation(session, reply.conversation_id, updated_at)
                message = (await session.exec(query)).scalar_one_or_none()
                if message is None:  # deleted, or ended by another process's stop
                    message = await session.get(Message, reply.message_id)
                await session.commit()
            break
        except DATABASE_ERRORS as error:
            if time.monotonic() > deadline:
                logger.error(
                    "Could not store the end of %s: %s", reply.message_id, error
                )
                return 503, "Database unavailable: the reply was not stored", None
            await asyncio.sleep(0.5)
    if message is None:
        return 410, DELETED, None
    if message.is_success or message.status_code != status_code:
        status_code, detail = how_it_ended(message)
    return status_code, detail, message


async def stop_elsewhere(message_id: int, session: AsyncSession) -> None:
    """Wait until the process running a reply, asked through its row, has stopped it."""
    live_row = (col(Message.id) == message_id) & col(Message.live)
    deadline = time.monotonic() + TICK_SECONDS + 2
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        if not (await session.exec(select(Message.live).where(live_row))).first():
            return
        await session.commit()  # end the read: the next one sees new writes
    # No process answered: the one that ran it died. End it with its last checkpoint.
    await session.exec(
        update(Message).where(live_row).values(live=False, is_success=False)
    )
    await session.commit()


async def close_dead_turns_forever() -> None:
    """End live turns whose row has not been written for DEAD_TURN_SECONDS: their process died."""
    while True:
        silent_since = database_clock() - timedelta(seconds=settings.dead_turn_seconds)
        query = (
            update(Message)
            .where(col(Message.live), col(Message.updated_at) < silent_since)
            .values(live=False, is_success=False, status_code=500, updated_at=utc_now())
            .returning(Message.conversation_id)
        )
        try:
            async with AsyncSession(engine) as session:
                for conversation_id in set((await session.exec(query)).scalars()):
                    await touch_conversation(session, conversation_id)
                await session.commit()
        except DATABASE_ERRORS as error:
            logger.warning("Could not look for dead turns: %s", error)
        await asyncio.sleep(settings.dead_turn_seconds / 2)


# Generation ------------------------------------------------------------------------------


def prompt_within_limit(prompt: str, where: tuple[str, ...]) -> None:
    """MAX_PROMPT_CHARS is a setting, so it is checked here, not in the request's schema."""
    if len(prompt) > settings.max_prompt_chars:
        limit = f"at most {settings.max_prompt_chars} characters (MAX_PROMPT_CHARS)"
        raise RequestValidationError(
            [{"type": "string_too_long", "loc": where, "msg": f"must be {limit}"}]
        )


async def validated(model: type[SQLModel], request: Request) -> Any:
    """The query (GET) or JSON body (empty: {}) as `model`, checked by hand: a reconnect isn't."""
    try:
        if request.method == "GET":
            return model.model_validate(dict(request.query_params))
        body = await request.body()
        return model.model_validate(json.loads(body) if body else {})
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None
    except ValueError:  # not JSON, or not UTF-8
        message = "The body must be JSON"
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body",), "msg": message}]
        ) from None


async def start_turn(request: GenerateRequest, session: AsyncSession) -> LiveReply:
    """A turn of /text/generate/stream: it follows the conversation's leaf."""
    prompt_within_limit(request.prompt, ("prompt",))
    if request.conversation_id is None:
        conversation = Conversation(title=UNTITLED, model_type=settings.default_model)
        history = []
    else:
        conversation = await find_conversation(request.conversation_id, session)
        history = await recent_successful_turns(session, conversation.id)
    untitled = conversation.title == UNTITLED
    if untitled:  # the prompt's first words, until the model's title is in
        conversation.title = short_title(request.prompt)
    message = Message(prompt_content=request.prompt, response_content="", live=True)
    messages = chat_messages(request.prompt, history)
    reply = await start_reply(session, conversation, message, messages)
    if untitled and conversation.model_type != ECHO:  # echo's title is the placeholder
        title = conversation.title, conversation.model_type, request.prompt
        in_background(write_title(conversation.id, *title))
    return reply


async def start_sibling(
    message_id: int, prompt: str | None, session: AsyncSession
) -> LiveReply:
    """A turn beside message `message_id`, after the same turn: its prompt again, or `prompt`."""
    if prompt is not None:  # a stored prompt is not checked again
        prompt_within_limit(prompt, ("body", "prompt"))
    message = await find_message(message_id, session)
    conversation = await locked_conversation(session, message.conversation_id)
    # Read again under the lock: the turn it follows may have been deleted since.
    message = await session.get(Message, message_id, populate_existing=True)
    if message is None:
        raise HTTPException(404, "Message not found")
    # The turn it follows becomes the leaf (its branch the model's history), then the new one.
    await move_leaf(session, conversation, message.parent_id)
    prompt = message.prompt_content if prompt is None else prompt
    history = await recent_successful_turns(session, conversation.id)
    turn = Message(prompt_content=prompt, response_content="", live=True)
    messages = chat_messages(prompt, history)
    return await start_reply(session, conversation, turn, messages)


async def start_reply(
    session: AsyncSession,
    conversation: Conversation,
    message: Message,
    messages: list[dict],
    sampling: dict | None = None,
    call: list[tuple[str, str]] | None = None,
) -> LiveReply:
    """Store the prompt (and what else the session holds); start the reply, on its own."""
    if not reply_places.acquire(blocking=False):
        too_many = "Too many replies are being generated (MAX_LIVE_REPLIES)"
        raise HTTPException(429, too_many, {"Retry-After": "1"})
    opening = None
    if conversation.model_type != ECHO:
        # Ask the model now and store the prompt meanwhile: the database adds no wait.
        opening = asyncio.create_task(
            open_llm_reply(conversation.model_type, messages, sampling)
        )
    # What the dead-turn sweep reads, by the database's clock from the first insert on.
    message.updated_at = database_clock()
    try:
        await store_turn(session, conversation, message)
        await session.commit()
    except BaseException:
        reply_places.release()
        if opening:
            opening.cancel()
        raise
    reply = LiveReply(message.id, conversation.id, call=call)
    live_replies[reply.message_id] = reply
    in_background(run_reply(reply, opening, message.prompt_content))
    return reply


async def stream_echo(prompt: str, reply: LiveReply) -> None:
    for word in re.findall(r"\s*\S+\s*", prompt):
        reply.add(word)
        await asyncio.sleep(0)  # its clients get a word at a time
    words = len(prompt.split())
    reply.set_usage(words, words, 2 * words)
    reply.finish_reason = "stop"


# Chunks that arrive together are parsed without a pause, and the SDK takes ~0.1 ms a chunk:
# every so often (and after the first piece) the reply's clients get the loop to send theirs.
PAUSE_SECONDS = 0.005


async def stream_llm(
    stream: openai.AsyncStream[ChatCompletionChunk], reply: LiveReply
) -> None:
    paused_at = float("-inf")
    async with stream:
        async for chunk in stream:
            if reply.pieces and time.monotonic() - paused_at > PAUSE_SECONDS:
                await asyncio.sleep(0)
                paused_at = time.monotonic()
            # Usage comes in an extra last chunk, from servers that honour include_usage.
            if usage := chunk.usage:
                reply.set_usage(
                    usage.prompt_tokens, usage.completion_tokens, usage.total_tokens
                )
            if not chunk.choices:
                continue
            if finish_reason := chunk.choices[0].finish_reason:
                reply.finish_reason = finish_reason
            content = chunk.choices[0].delta.content
            if content and not reply.add(content):
                # A full message ends there, as at MAX_TOKENS.
                reply.finish_reason = "length"
                return


async def generate(
    reply: LiveReply, opening: asyncio.Task | None, prompt: str
) -> tuple[int, str]:
    """Run the model's reply into `reply`; return its HTTP status and a detail for errors."""
    try:
        if opening is None:
            await stream_echo(prompt, reply)
        else:
            await stream_llm(await opening, reply)
    except openai.APITimeoutError:
        silent = f"{settings.openai_timeout:g} s (OPENAI_TIMEOUT)"
        return 504, f"The model sent nothing for {silent}"
    except openai.APIConnectionError:
        return 502, "The model could not be reached, or its reply broke off"
    except openai.APIStatusError as error:
        # A status past 599 is no HTTP status (and no column would take it): a broken reply.
        status_code = error.status_code if error.status_code < 600 else 502
        return status_code, upstream_error(error)
    except Exception as error:  # the turn must be stored whatever the upstream sent
        logger.exception("Reply %s could not be read", reply.message_id)
        return 502, f"The model's reply could not be read: {one_line(str(error), 300)}"
    if not reply.finish_reason:
        return 502, "The model's reply ended without a finish_reason"
    return 200, "Done"


TITLE_INSTRUCTION = "Reply with only a short title, at most six words, for a chat that starts with this."


async def write_title(
    conversation_id: int, placeholder: str, model: str, prompt: str
) -> None:
    """Give a new conversation an LLM-written title, unless the user renamed it meanwhile."""
    messages = [
        {"role": "system", "content": TITLE_INSTRUCTION},
        {"role": "user", "content": prompt},
    ]
    with cancelled_on_shutdown(anyio.CancelScope()):
        try:
            completion = await llm.chat.completions.create(
                model=model, messages=messages, max_tokens=30
            )
            title = short_title(completion.choices[0].message.content or "")
            renamed = (
                update(Conversation)
                .where(col(Conversation.id) == conversation_id)
                .where(col(Conversation.title) == placeholder)
                .values(title=title)
            )
            async with AsyncSession(engine) as session:
                await session.exec(renamed)
                await session.commit()
        except Exception as error:  # the conversation keeps its placeholder title
            why = one_line(str(error), 300)
            logger.warning("No title for conversation %s: %s", conversation_id, why)


LastEventId = Annotated[str | None, Header(alias="Last-Event-ID")]


def resumed_from(last_event_id: str | None) -> tuple[int, int | None] | None:
    """`<message_id>:<offset>` as (message_id, offset), `<message_id>:end` as (message_id, None)."""
    found = re.fullmatch(r"(\d{1,10}):(\d{1,10}|end)", last_event_id or "")
    if not found:
        return None
    message_id, offset = found.groups()
    if offset == "end":
        return int(message_id), None
    # Past the longest text a message holds, as past any text, there is nothing to send.
    return int(message_id), min(int(offset), MAX_TEXT_CHARS)


# What the streams send, for the OpenAPI document (/docs) ----------------------------------

STREAM_DESCRIPTION = """A `text/event-stream` of these events, in this order:

| event | `id:` | `data:` (JSON) |
|---|---|---|
| `start` (with `retry:`) | `<message_id>:<offset>` | `{"conversation_id": int, "message_id": int}` |
| unnamed, zero or more | `<message_id>:<offset>` | `{"content": str}`: the next piece of the reply |
| `done`, or | `<message_id>:end` | the message as stored (`MessagePublic`) |
| `error` | `<message_id>:end` | `{"detail": str, "status_code": int}` |

The offset counts the reply's characters (code points) so far: send the last `id` back as
`Last-Event-ID` to `GET /messages/{message_id}/stream` to resume. Every error status comes
before the first byte, as JSON."""

ERRORS = {
    401: "Missing or wrong API key (when API_KEY is set)",
    403: "A browser request from another site (see CORS_ORIGINS)",
    404: "Unknown conversation or message",
    409: "The turn has already ended",
    422: "Invalid prompt, body or parameter",
    429: "MAX_LIVE_REPLIES replies are running already (Retry-After)",
}
STREAM = {"description": STREAM_DESCRIPTION, "content": {"text/event-stream": {}}}


def documented(*statuses: int, stream: bool = True) -> dict[int | str, dict]:
    """For the document: the errors an endpoint gives (before a stream's first byte)."""
    errors = {s: {"model": ErrorDetail, "description": ERRORS[s]} for s in statuses}
    return {200: STREAM, **errors} if stream else errors


def request_schema(model: type[SQLModel], where: str) -> dict:
    """For the document: the query or body that an endpoint validates by hand."""
    schema = model.model_json_schema()
    required = schema.get("required", [])
    if where == "body":
        # A body whose fields are all optional may be left out.
        content = {"application/json": {"schema": schema}}
        return {"requestBody": {"required": bool(required), "content": content}}
    parameters = [
        {"name": name, "in": "query", "required": name in required, "schema": field}
        for name, field in schema["properties"].items()
    ]
    return {"parameters": parameters}


@api.get(
    "/text/generate/stream",
    response_class=Response,  # an event stream, or a 204 for a finished reconnect
    responses=documented(401, 403, 404, 422, 429),
    openapi_extra=request_schema(GenerateQuery, "query"),
)
@api.post(
    "/text/generate/stream",
    response_class=Response,
    responses=documented(401, 403, 404, 422, 429),
    openapi_extra=request_schema(GenerateRequest, "body"),
)
async def generate_stream(
    request: Request, session: SessionDep, last_event_id: LastEventId = None
) -> Response:
    # A browser's EventSource reconnects with the same request: that starts no new turn.
    if resumed := resumed_from(last_event_id):
        return await follow(*resumed, session)
    model = GenerateQuery if request.method == "GET" else GenerateRequest
    turn = await validated(model, request)
    return event_stream(await start_turn(turn, session), 0)


@api.post(
    "/messages/{message_id}/regenerate",
    response_class=Response,
    responses=documented(401, 403, 404, 422, 429),
    openapi_extra=request_schema(RegenerateRequest, "body"),
)
async def regenerate(
    message_id: MessageId,
    request: Request,
    session: SessionDep,
    last_event_id: LastEventId = None,
) -> Response:
    """A sibling of the message (with a prompt, an edit), streamed as generation is."""
    if resumed := resumed_from(last_event_id):
        return await follow(*resumed, session)
    prompt = (await validated(RegenerateRequest, request)).prompt
    return event_stream(await start_sibling(message_id, prompt, session), 0)


@api.get(
    "/messages/{message_id}/stream",
    response_class=Response,
    responses={
        **documented(401, 403, 404, 422),
        204: {"description": "`Last-Event-ID` was `<message_id>:end`"},
    },
)
async def follow_stream(
    message_id: MessageId,
    session: SessionDep,
    offset: Annotated[int, Query(ge=0, le=MAX_TEXT_CHARS)] = 0,
    last_event_id: LastEventId = None,
) -> Response:
    resumed = resumed_from(last_event_id)
    if resumed and resumed[0] == message_id:  # one naming another message is ignored
        offset = resumed[1]
    return await follow(message_id, offset, session)


@api.post(
    "/messages/{message_id}/stop",
    status_code=202,
    responses=documented(401, 403, 404, 409, stream=False),
)
async def stop_reply(message: MessageDep, session: SessionDep) -> MessagePublic:
    # The stop is this call's if it is the first to mark the live row; it is too late if the
    # reply ends by itself meanwhile (its end is stored as it ended).
    live_row = (col(Message.id) == message.id) & col(Message.live)
    ask = update(Message).where(live_row, col(Message.status_code).is_(None))
    if (await session.exec(ask.values(status_code=STOPPED))).rowcount:
        await session.commit()  # hold no connection while waiting: the reply needs one
        if reply := live_replies.get(message.id):
            reply.end(STOPPED, "Stopped")
            await reply.stored.wait()
        else:
            await stop_elsewhere(message.id, session)
        await session.refresh(message)
        if not message.live and message.status_code == STOPPED:
            return message
    raise HTTPException(409, "The turn has already ended")


# Following a reply -------------------------------------------------------------------------


async def follow(
    message_id: int, offset: int | None, session: AsyncSession
) -> Response:
    if message_id > INT32_MAX:  # from a Last-Event-ID header, not checked as a path is
        raise HTTPException(404, "Message not found")
    message = await find_message(message_id, session)
    await session.close()  # hold no connection for the stream's length
    if offset is None:  # the client has the final event already: don't reconnect
        return Response(status_code=204)
    return event_stream(live_replies.get(message.id, message), offset)


def event_stream(turn: LiveReply | Message, offset: int) -> EventSourceResponse:
    """The turn's events from `offset`: start, the text past it, the live pieces, the end."""
    live = isinstance(turn, LiveReply)
    message_id = turn.message_id if live else turn.id
    ids = {"conversation_id": turn.conversation_id, "message_id": message_id}
    headers = {
        "X-Conversation-Id": str(turn.conversation_id),
        "X-Message-Id": str(message_id),
        **STREAM_HEADERS,
    }

    async def events(sent: int) -> AsyncIterator[bytes]:
        yield sse(ids, "start", f"{message_id}:{sent}", retry=RETRY_MS)
        end = []
        if live:
            texts = text_in_memory(turn, sent)
        else:
            texts = text_from_the_row(message_id, sent, end)
        async for text in texts:
            sent += len(text)
            piece_id = f"{message_id}:{sent}"
            yield sse({"content": text}, event_id=piece_id) if text else PING
        if live:
            yield final_event(message_id, turn.status_code, turn.detail, turn.message)
        elif end:
            yield final_event(message_id, *end[0])

    return EventSourceResponse(events(offset), headers=headers)


async def text_in_memory(reply: LiveReply, offset: int) -> AsyncIterator[str]:
    """The reply's text past `offset` as it comes, until its end is stored; "" after
    PING_SECONDS without any. Pieces that arrived while the client was busy come as one: a
    slow client keeps up."""
    read, position = 0, 0  # pieces read, and the characters in them
    while True:
        changed = reply.changed
        new = reply.pieces[read:]
        text = "".join(new)  # from `position` in the reply on
        read += len(new)
        if position + len(text) > offset:
            yield text[max(offset - position, 0) :]
            offset = position + len(text)
        position += len(text)
        if reply.stored.is_set():
            return
        if not text:
            with anyio.move_on_after(PING_SECONDS) as idle:
                await changed.wait()
            if idle.cancelled_caught:
                yield ""


async def text_from_the_row(
    message_id: int, offset: int, end: list[tuple[int, str, Message | None]]
) -> AsyncIterator[str]:
    """A reply of another process (or one that ended) as its row shows it, polled: the text
    past `offset`, "" after PING_SECONDS without any; then `end` gets how it ended (none when
    the database failed or this server is going away: the client reconnects)."""
    last_sent = time.monotonic()
    while True:
        # Only the text past what was sent: a long reply is not read whole every poll.
        past_offset = func.substr(Message.response_content, offset + 1)
        query = select(past_offset, Message.live).where(col(Message.id) == message_id)
        ended = None  # the stored turn, for the final event
        try:
            async with AsyncSession(engine) as session:
                row = (await session.exec(query)).first()
                if row and not row.live:
                    ended = await session.get(Message, message_id)
        except DATABASE_ERRORS:
            return
        if row is None:
            end.append((410, DELETED, None))
            return
        if text := row[0]:
            offset += len(text)
            yield text
            last_sent = time.monotonic()
        if ended:
            end.append((*how_it_ended(ended), ended))
        if ended or stopping:
            return
        if time.monotonic() - last_sent > PING_SECONDS:
            yield ""
            last_sent = time.monotonic()
        await asyncio.sleep(settings.checkpoint_ms / 1000)


PING = b": ping\n\n"
# X-Accel-Buffering: no asks nginx to pass each event on at once.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DELETED = "The conversation or the message was deleted"


def sse(
    data: dict | str,
    event: str | None = None,
    event_id: str | None = None,
    retry: int | None = None,
) -> bytes:
    """One server-sent event; `data` is sent as JSON (a str as it is)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return format_sse_event(data_str=text, event=event, id=event_id, retry=retry)


def how_it_ended(message: Message) -> tuple[int, str]:
    """A stored turn's status and detail, as a follower sees it."""
    if message.is_success is False:
        status_code = message.status_code or 500
        if status_code == STOPPED:
            return status_code, "Stopped"
        return status_code, f"The reply failed with status {status_code}"
    return 200, "Done"


def final_event(
    message_id: int, status_code: int, detail: str, message: Message | None
) -> bytes:
    end_id = f"{message_id}:end"
    if status_code != 200:
        return sse({"detail": detail, "status_code": status_code}, "error", end_id)
    return sse(MessagePublic.model_validate(message).model_dump_json(), "done", end_id)


# OpenAI-compatible front -----------------------------------------------------------------
# /v1/models and /v1/chat/completions: any OpenAI client (the SDKs, LangChain, Open WebUI) can
# use the service as its model server. A call is a turn run as any other, but the model gets
# exactly the call's messages. OpenAI clients resend the whole history each time: a turn that
# ends well keeps its path (the hash of the call's messages and its reply, indexed), and a call
# follows the newest turn whose path is its messages before the last, so a regenerated reply
# or an edited message adds a branch there, and a failed call leaves that turn as it was.


def path_key(messages: list[tuple[str, str]]) -> str:
    """A path as one indexed value: the hash of its (role, text) pairs, texts stripped."""
    stripped = [(role, text.strip()) for role, text in messages]
    return hashlib.sha256(json.dumps(stripped).encode()).hexdigest()


async def continued_turn(
    session: AsyncSession, history: list[tuple[str, str]]
) -> Conversation | None:
    """The newest turn whose path is `history`: its conversation, locked, it the leaf."""
    newest = (
        select(Message.id, Message.conversation_id)
        .where(Message.path_hash == path_key(history))
        .order_by(col(Message.id).desc())
        .limit(1)
    )
    if (turn := (await session.exec(newest)).first()) is None:
        return None
    conversation = await session.get(
        Conversation, turn.conversation_id, with_for_update=True, populate_existing=True
    )
    # Deleted before the lock was ours: then the call matches no turn.
    if conversation and await session.get(Message, turn.id, populate_existing=True):
        await move_leaf(session, conversation, turn.id)  # the call's turn follows it
        return conversation
    return None


def earlier_turns(messages: list[tuple[str, str]]) -> list[tuple[str, str, int]]:
    """(prompt, reply, end) for each user message with the assistant's after it, if any;
    messages[: end + 1] is the turn's path."""
    turns = []  # [prompt, reply or None, end]
    for end, (role, text) in enumerate(messages):
        if role == "user":
            turns.append([text, None, end])
        elif role == "assistant":
            if turns and turns[-1][1] is None:
                turns[-1][1:] = [text, end]
            else:  # one with no user message before it, e.g. a greeting
                turns.append(["", text, end])
    return [(prompt, reply or "", end) for prompt, reply, end in turns]


async def new_thread(
    session: AsyncSession, messages: list[tuple[str, str]], model: str
) -> Conversation:
    """A new conversation for a call whose history is no path here: its earlier pairs become
    its first turns, as given, each with its path (committed with the call's turn)."""
    first = next(text for role, text in messages if role == "user")
    conversation = Conversation(title=short_title(first), model_type=model)
    for prompt, reply, end in earlier_turns(messages[:-1]):
        turn = Message(
            prompt_content=prompt,
            response_content=reply,
            is_success=True,
            status_code=200,
            path_hash=path_key(messages[: end + 1]),
        )
        await store_turn(session, conversation, turn)
    return conversation


# For the document (/docs): errors under /v1 are not {"detail": ...}, and invalid is 400.
OPENAI_ERRORS = {
    "4XX": {"model": OpenAIErrorBody, "description": "400, 401, 403, 404, 429, ..."},
    "5XX": {"model": OpenAIErrorBody, "description": "The upstream's status, 502, 503"},
}
ConversationHeader = Annotated[
    int | None, Header(alias="X-Conversation-Id", ge=1, le=INT32_MAX)
]


@api.post("/v1/chat/completions", responses=OPENAI_ERRORS)
async def chat_completions(
    call: ChatRequest, session: SessionDep, conversation_id: ConversationHeader = None
) -> Response:
    """The call is stored as a turn after the one it continues (or in a new conversation)."""
    prompt_within_limit(call.messages[-1].content, ("body", "messages"))
    messages = [(message.role, message.content) for message in call.messages]
    if conversation_id is not None:
        conversation = await find_conversation(conversation_id, session)
    elif not (conversation := await continued_turn(session, messages[:-1])):
        conversation = await new_thread(session, messages, call.model)
    conversation.model_type = call.model
    prompt = Message(prompt_content=messages[-1][1], response_content="", live=True)
    to_model = [{"role": role, "content": text} for role, text in messages]
    sampling = call.model_dump(include=set(Sampling.model_fields), exclude_none=True)
    reply = await start_reply(
        session, conversation, prompt, to_model, sampling, messages
    )
    headers = turn_headers(reply)
    await answered(reply, bool(call.stream))
    if call.stream and (reply.pieces or reply.status_code == 200):
        chunks = completion_chunks(reply, call)
        return EventSourceResponse(chunks, headers={**headers, **STREAM_HEADERS})
    if reply.status_code == 200:
        return JSONResponse(completion(reply, call), headers=headers)
    return call_failed(reply, headers)


def turn_headers(reply: LiveReply) -> dict[str, str]:
    return {
        "X-Conversation-Id": str(reply.conversation_id),
        "X-Message-Id": str(reply.message_id),
    }


async def answered(reply: LiveReply, stream: bool) -> None:
    """The status goes out first: a stream waits for the first piece (or the end), so that an
    upstream error before it gets its own status; a whole answer waits for the end."""
    while not (reply.stored.is_set() or (stream and reply.pieces)):
        await reply.changed.wait()


def call_failed(reply: LiveReply, headers: dict[str, str]) -> JSONResponse:
    # The upstream refusing our own key is not the caller's fault. And the turn is stored:
    # a retry would store another.
    status_code = 502 if reply.status_code in (401, 403) else reply.status_code
    body = openai_error(status_code, reply.detail)
    return JSONResponse(body, status_code, {**headers, "x-should-retry": "false"})


def usage(message: Message) -> dict | None:
    """None unless the model reported every count: never zeros for unknown."""
    counts = (message.prompt_tokens, message.response_tokens, message.total_tokens)
    if None in counts:
        return None
    names = ("prompt_tokens", "completion_tokens", "total_tokens")
    return dict(zip(names, counts, strict=True))


def completion_head(reply: LiveReply, call: ChatRequest, kind: str) -> dict:
    """What a chat.completion, and each chunk of a streamed one, starts with."""
    return {
        "id": f"chatcmpl-{reply.message_id}",
        "object": kind,
        "created": int(time.time()),
        "model": call.model,
    }


def completion(reply: LiveReply, call: ChatRequest) -> dict:
    answer = {"role": "assistant", "content": reply.message.response_content}
    choice = {"index": 0, "message": answer, "finish_reason": reply.finish_reason}
    head = completion_head(reply, call, "chat.completion")
    return {**head, "choices": [choice], "usage": usage(reply.message)}


async def completion_chunks(
    reply: LiveReply, call: ChatRequest
) -> AsyncIterator[bytes]:
    """The reply as chat.completion.chunk events, then [DONE], or an error if it fails. No
    event names, ids or retry hints: the openai SDK mis-reads a stream that has them."""
    head = completion_head(reply, call, "chat.completion.chunk")  # the same in each

    def chunk(delta: dict, finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return sse({**head, "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    async for text in text_in_memory(reply, 0):
        yield chunk({"content": text}) if text else PING
    if reply.status_code != 200:  # the status went out with the first piece
        code = str(reply.status_code)
        yield sse(openai_error(reply.status_code, reply.detail, code=code))
        return
    yield chunk({}, reply.finish_reason)
    if call.stream_options and call.stream_options.include_usage:
        yield sse({**head, "choices": [], "usage": usage(reply.message)})
    yield b"data: [DONE]\n\n"


MODELS_CACHE_SECONDS = 60
listed_models: tuple[float, list[str]] = (float("-inf"), [])  # when, and the ids


@api.get("/v1/models", responses=OPENAI_ERRORS)
async def list_models() -> dict:
    """echo, DEFAULT_MODEL, and the model server's own if it lists them within a second
    (cached, failures too)."""
    global listed_models
    listed_at, upstream = listed_models
    if time.monotonic() - listed_at > MODELS_CACHE_SECONDS:
        try:
            with anyio.fail_after(1):
                upstream = [model.id for model in (await llm.models.list()).data]
        except (openai.APIError, TimeoutError) as error:
            logger.warning("The model server lists no models: %s", error)
            upstream = []
        listed_models = (time.monotonic(), upstream)
    models = [
        {"id": name, "object": "model", "created": 0, "owned_by": "chat-backend"}
        for name in dict.fromkeys([ECHO, settings.default_model, *upstream])
    ]
    return {"object": "list", "data": models}


# Search, export and import ---------------------------------------------------------------
# Search runs in the database, on an index written in the same transaction as each turn (the
# "search" migration): SQLite's FTS5 trigram table, Postgres's pg_trgm GIN index, both over
# ended turns only. An index finds a rare term's few hits at once, but a common term's all,
# to be sorted; a walk of the newest turns finds a common term's page at once. So FTS5, which
# can stop early, is asked first; then a window of the newest turns; then the index.

# Postgres: reads in autocommit, without BEGIN and ROLLBACK round trips.
reader = engine if is_sqlite else engine.execution_options(isolation_level="AUTOCOMMIT")
MAX_TERMS = 32
TERM = re.compile(r'"([^"]*)"|\S+')  # a quoted phrase, or a run of non-space
WHITESPACE = re.compile(r"\s+")
SNIPPET_CHARS = 200
WINDOW_PER_HIT = 10  # newest turns walked for each hit of the page
FEW_HITS = 200  # SQLite: fewer in the index, and they are the whole answer
# As the partial indexes say it: SQLite does not see that `live = 0` implies `NOT live`.
ENDED = sql("NOT messages.live")


def search_terms(q: Annotated[str, Query(max_length=1000)]) -> list[str]:
    """`q` split at whitespace, quoted phrases kept whole, `""` ignored; no term: `q` itself."""
    if not q.strip():
        raise HTTPException(422, "q must hold something to find")
    found = (
        m.group(1) if m.group(1) is not None else m.group() for m in TERM.finditer(q)
    )
    terms = list(dict.fromkeys(term for term in found if term)) or [q]
    if len(terms) > MAX_TERMS:
        raise HTTPException(422, f"q may hold at most {MAX_TERMS} different terms")
    return terms


def holds(column: Any, term: str) -> Any:
    """`term` occurs in the column, ASCII case ignored; LIKE's wildcards are only text."""
    pattern = "%" + re.sub(r"([\\%_])", r"\\\1", term) + "%"
    # SQLite's LIKE ignores ASCII case; SQLAlchemy's ilike() there would lower() every text.
    return (column.like if is_sqlite else column.ilike)(pattern, escape="\\")


def fts_rowids(terms: list[str]) -> Any:
    """SQLite: the turns FTS5 holds every term of 3 characters or more in (a trigram's
    length: shorter terms are checked on each turn)."""
    phrases = ['"' + t.replace('"', '""') + '"' for t in terms if len(t) >= 3]
    if not is_sqlite or not phrases:
        return None
    match = sql("messages_fts MATCH :match").bindparams(match=" AND ".join(phrases))
    return select(sa_column("rowid")).select_from(sa_table("messages_fts")).where(match)


async def turn_hits(
    session: AsyncSession, terms: list[str], skip: int, take: int
) -> list[tuple[Message, Conversation]]:
    async def page(turn: Any, *narrowed: Any) -> list[tuple[Message, Conversation]]:
        every_term = (
            holds(turn.prompt_content, t) | holds(turn.response_content, t)
            for t in terms
        )
        query = select(turn, Conversation).where(*narrowed, *every_term)
        query = query.join(Conversation, col(Conversation.id) == turn.conversation_id)
        newest = (col(turn.created_at).desc(), col(turn.id).desc())
        return (
            await session.exec(query.order_by(*newest).offset(skip).limit(take))
        ).all()

    indexed = fts_rowids(terms)
    if indexed is not None:
        few = (await session.exec(indexed.limit(FEW_HITS))).all()
        if len(few) < FEW_HITS:
            return await page(Message, col(Message.id).in_(few))
    # With no term of 3 characters no index helps Postgres: larger windows before a scan.
    first = min(5000, WINDOW_PER_HIT * (skip + take))
    no_index = not is_sqlite and all(len(term) < 3 for term in terms)
    for size in (first, 8 * first, 64 * first) if no_index else (first,):
        window = select(Message).where(ENDED)
        window = window.order_by(col(Message.created_at).desc(), col(Message.id).desc())
        newest = await page(aliased(Message, window.limit(size).subquery()))
        if len(newest) == take:
            return newest
    # Postgres's planner takes the GIN index for the LIKEs itself.
    return await page(
        Message, ENDED, true() if indexed is None else col(Message.id).in_(indexed)
    )


def snippet(text: str, found: re.Pattern) -> str | None:
    """At most SNIPPET_CHARS around the first match, whitespace made single spaces."""
    if (match := found.search(text)) is None:
        return None
    start, room = match.start(), SNIPPET_CHARS - len(WHITESPACE.sub(" ", match.group()))
    before = WHITESPACE.sub(" ", text[max(0, start - SNIPPET_CHARS) : start])
    lead = before[max(0, len(before) - max(0, room) // 2) :]
    rest = WHITESPACE.sub(" ", text[start : start + 2 * SNIPPET_CHARS])
    return (lead + rest)[:SNIPPET_CHARS].strip()


@api.get("/search")
async def search(
    terms: Annotated[list[str], Depends(search_terms)],
    skip: Skip = 0,
    take: Annotated[int, Query(ge=1, le=100)] = 20,
) -> list[SearchHit]:
    """Title hits first, then turn hits; `skip` counts across both."""
    if any(UNSTORABLE.search(term) for term in terms):
        return []  # no stored text holds a NUL or a lone surrogate
    titled = and_(*(holds(Conversation.title, term) for term in terms))
    activity = (col(Conversation.updated_at).desc(), col(Conversation.id).desc())
    query = select(Conversation).where(titled).order_by(*activity)
    async with AsyncSession(reader) as session:
        titles = (await session.exec(query.offset(skip).limit(take))).all()
        hits = [SearchHit(conversation=c, snippet=c.title) for c in titles]
        if len(hits) == take:
            return hits
        titles_found = skip + len(titles)
        if skip and not titles:  # the page is past the titles: how many were there?
            titles_found = (
                await session.exec(select(func.count()).where(titled))
            ).one()
        turns = await turn_hits(
            session, terms, max(0, skip - titles_found), take - len(hits)
        )
    found = re.compile("|".join(map(re.escape, terms)), re.IGNORECASE)
    for turn, conversation in turns:
        shown = snippet(turn.prompt_content, found) or snippet(
            turn.response_content, found
        )
        hits.append(
            SearchHit(conversation=conversation, message=turn, snippet=shown or "")
        )
    return hits


# Export and import: a conversation is one object (format chat-backend/1) with every turn of
# every branch. POST /import takes it back, or ChatGPT's data export mapped to it, in one
# transaction: all of it is stored, or nothing.


async def conversation_export(
    session: AsyncSession, conversation_id: int
) -> ConversationExport | None:
    # One statement: the conversation and its turns are one snapshot on either database.
    query = (
        select(Conversation, Message)
        .outerjoin(Message, col(Message.conversation_id) == Conversation.id)
        .where(Conversation.id == conversation_id)
        .order_by(col(Message.created_at), col(Message.id))
    )
    rows = (await session.exec(query)).all()
    if not rows:
        return None
    turns = [MessagePublic.model_validate(turn) for _, turn in rows if turn is not None]
    conversation = ConversationPublic.model_validate(rows[0][0])
    return ConversationExport(conversation=conversation, messages=turns)


def markdown(export: ConversationExport) -> str:
    """The active branch, for reading: texts as they are, neither escaped nor fenced."""
    conversation, by_id = export.conversation, {t.id: t for t in export.messages}
    branch, turn = [], by_id.get(conversation.leaf_id)
    while turn is not None and len(branch) < len(by_id):
        branch.append(turn)
        turn = by_id.get(turn.parent_id)
    lines = ["# " + re.sub(r"\r\n|\r|\n", " ", conversation.title), ""]
    for turn in reversed(branch):
        lines += ["## User", "", turn.prompt_content, "", "## Assistant", ""]
        lines += [turn.response_content, ""]
    lines += [f"Model: {conversation.model_type}"]
    lines += [f"Created: {iso_timestamp(conversation.created_at)}"]
    return "\n".join([*lines, f"Updated: {iso_timestamp(conversation.updated_at)}", ""])


@api.get(
    "/conversations/{conversation_id}/export",
    response_model=ConversationExport,
    responses={
        200: {"content": {"text/markdown": {}}},
        **documented(404, stream=False),
    },
)
async def export_conversation(
    conversation_id: ConversationId,
    session: SessionDep,
    format: Literal["json", "markdown"] = "json",
) -> Response:
    export = await conversation_export(session, conversation_id)
    if export is None:
        raise HTTPException(404, "Conversation not found")
    if format == "markdown":
        return Response(markdown(export), media_type="text/markdown; charset=utf-8")
    return Response(export.model_dump_json(), media_type="application/json")


async def export_lines(page_size: int = 100) -> AsyncIterator[bytes]:
    """Oldest conversation first, one read at a time: memory does not grow with the
    database, and no connection is held between reads."""
    after, oldest = None, (col(Conversation.created_at), col(Conversation.id))
    while True:
        query = select(Conversation.created_at, Conversation.id).order_by(*oldest)
        if after is not None:
            query = query.where(tuple_(*oldest) > tuple_(*after))
        async with AsyncSession(reader) as session:
            page = (await session.exec(query.limit(page_size))).all()
        for _, conversation_id in page:
            async with AsyncSession(reader) as session:
                export = await conversation_export(session, conversation_id)
            if export is not None:  # else deleted meanwhile
                yield export.model_dump_json().encode() + b"\n"
        if len(page) < page_size:
            return
        after = page[-1]


@api.get(
    "/export",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}}}},
)
async def export_everything() -> StreamingResponse:
    return StreamingResponse(export_lines(), media_type="application/x-ndjson")


def malformed(index: int, error: Exception) -> HTTPException:
    """422 saying where: the conversation's index, the field (none: the tree's own)."""
    first = error.errors()[0] if isinstance(error, ValidationError) else {}
    where, problem = ".".join(map(str, first.get("loc", ()))), first.get("msg", error)
    return HTTPException(422, f"conversation {index}, {where}{where and ': '}{problem}")


async def inserted_ids(
    session: AsyncSession, table: type[SQLModel], rows: list
) -> list:
    query = insert(table).returning(table.id, sort_by_parameter_order=True)
    return list((await session.exec(query, params=rows)).scalars()) if rows else []


async def store_imports(session: AsyncSession, batch: list[ExportImport]) -> list[int]:
    """Conversations first, then their turns a depth at a time, each after its parent."""
    heads = [
        document.conversation.model_dump(exclude={"leaf_id"}) for document in batch
    ]
    conversation_ids = await inserted_ids(session, Conversation, heads)
    levels = [document.turn_levels() for document in batch]
    branches = [document.active_branch() for document in batch]
    new_ids: dict[tuple[int, int | None], int | None] = {}  # (batch index, file's id)
    for depth in range(max(map(len, levels))):
        keys, rows = [], []
        for at, conversation_id in enumerate(conversation_ids):
            for turn in levels[at][depth] if depth < len(levels[at]) else []:
                keys.append((at, turn.id))
                rows.append(turn.model_dump(exclude={"id", "live"}) | {
                    "conversation_id": conversation_id,
                    "parent_id": new_ids.get((at, turn.parent_id)),
                    "on_branch": turn.id in branches[at],
                })  # fmt: skip
        new_ids.update(
            zip(keys, await inserted_ids(session, Message, rows), strict=True)
        )
    leaves = [
        {"id": new_id, "leaf_id": new_ids.get((at, doc.conversation.leaf_id))}
        for at, (doc, new_id) in enumerate(zip(batch, conversation_ids, strict=True))
    ]
    await session.exec(update(Conversation), params=leaves)
    return conversation_ids


def documents_in(body: bytes) -> Iterator[ExportImport]:
    """ChatGPT's array; our NDJSON, a line at a time; or one export object, whole."""
    if re.match(rb"\s*\[", body):
        yield from chatgpt_documents(body)
        return
    lines = (line for line in io.BytesIO(body) if line.strip())
    first = next(lines, b"")
    try:
        one_per_line = isinstance(json.loads(first), dict)
    except (ValueError, RecursionError):
        one_per_line = False
    texts = itertools.chain([first], lines) if one_per_line else [body]
    for index, text in enumerate(texts):
        try:
            yield ExportImport.model_validate_json(text)
        except ValidationError as error:
            raise malformed(index, error) from None


def chatgpt_documents(body: bytes) -> Iterator[ExportImport]:
    try:
        items = json.loads(body)  # unlike pydantic's parser, it keeps lone surrogates
    except (ValueError, RecursionError) as error:
        raise HTTPException(422, f"The body is not JSON: {error}") from None
    for index, item in enumerate(items):
        try:
            chat = ChatGPTConversation.model_validate(item)
            document = chat.as_export(settings.default_model, short_title)
            document = ExportImport.model_validate(document)
        except (ValueError, OverflowError, OSError) as error:  # OS: a time out of range
            raise malformed(index, error) from None
        yield document


# The body is read whole, and refused (413) before that when over MAX_IMPORT_BYTES.
BODY_LIMITS["/import"] = (settings.max_import_bytes, "MAX_IMPORT_BYTES")
IMPORT_BATCH_TURNS = 2000  # turns stored together: a statement per depth of their trees
BODIES = {"application/json": {"schema": ExportImport.model_json_schema()}}
BODIES["application/x-ndjson"] = {"schema": {"type": "string"}}  # or ChatGPT's array


@api.post(
    "/import",
    status_code=201,
    openapi_extra={"requestBody": {"required": True, "content": BODIES}},
    responses={413: {"model": ErrorDetail, "description": "Over MAX_IMPORT_BYTES"}}
    | documented(422, stream=False),
)
async def import_conversations(request: Request, session: SessionDep) -> ImportResult:
    ids, batch, turns = [], [], 0
    for document in documents_in(await request.body()):  # a 422 stores nothing
        batch.append(document)
        turns += len(document.messages)
        if turns >= IMPORT_BATCH_TURNS:
            ids += await store_imports(session, batch)
            batch, turns = [], 0
    ids += await store_imports(session, batch) if batch else []
    await session.commit()  # all of it, or (an error above) none
    return ImportResult(conversation_ids=ids)


# OpenAI Responses API --------------------------------------------------------------------
# The stateful API of OpenAI's SDKs and the Agents SDK, on the stored tree: a response is a
# turn (resp_<message id>) run and stored like any other, and previous_response_id is the
# turn it follows. The model gets the branch that ends there (see branch_context).
#
# Sequence numbers are fixed by the reply's text, so that every stream of a response (live
# or replayed, from any worker) numbers its events alike: the four opening events 0-3, a
# delta whose text ends at offset k 3+k, the four closing events L+4 to L+7 (L: the length of
# the stored reply). A replay splits the text where the live stream's pieces ended (see
# split_at_pieces), so a client that resumes after any number it saw gets each character once.

RESPONSE_ID = re.compile(r"resp_(\d{1,10})")
CONVERSATION_REF = re.compile(r"conv_(\d{1,10})")
# Stored with the turn and returned in its response, as the call sent them.
ECHOED = {"instructions", "temperature", "top_p", "max_output_tokens", "tags"}
RESPONSE_ERRORS = {200: {"model": ResponseObject}, **OPENAI_ERRORS}


def id_in(pattern: re.Pattern, value: str) -> int | None:
    found = pattern.fullmatch(value)
    return int(found[1]) if found and int(found[1]) <= INT32_MAX else None


async def response_row(session: AsyncSession, response_id: str) -> Any:
    """(the turn, its conversation's model), or None."""
    if not (message_id := id_in(RESPONSE_ID, response_id)):
        return None
    query = select(Message, Conversation.model_type).join(Conversation)
    return (await session.exec(query.where(col(Message.id) == message_id))).first()


async def find_response(response_id: str, session: SessionDep) -> tuple[Message, str]:
    if not (row := await response_row(session, response_id)):
        raise HTTPException(404, "Response not found")
    return row


FoundResponse = Annotated[tuple[Message, str], Depends(find_response)]


def response_status(message: Message, detail: str) -> tuple[str, ResponseError | None]:
    if message.live:
        return "in_progress", None
    if message.is_success is False:
        if message.status_code == STOPPED:
            return "cancelled", None
        status_code, generic = how_it_ended(message)
        return "failed", ResponseError(code=str(status_code), message=detail or generic)
    return "incomplete" if message.finish_reason == "length" else "completed", None


def response_object(message: Message, model: str, detail: str = "") -> ResponseObject:
    """The response as its turn is stored (`detail`: the error's, when known)."""
    status, error = response_status(message, detail)
    text, counts = message.response_content, usage(message)
    cut = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return ResponseObject(
        id=f"resp_{message.id}",
        created_at=int(message.created_at.timestamp()),
        status=status,
        model=model,
        output=[OutputMessage.of(message.id, text, status)] if text else [],
        previous_response_id=message.parent_id and f"resp_{message.parent_id}",
        usage=counts and ResponseUsage.model_validate(counts),
        error=error,
        incomplete_details=cut,
        conversation=ConversationRef(id=f"conv_{message.conversation_id}"),
        **(message.response_options or {}),
    )


def split_at_pieces(text: str, piece_lengths: str | None, offset: int) -> Iterator[str]:
    """The text past `offset`, in deltas that end where the reply's pieces ended."""
    start, lengths = offset, filter(None, (piece_lengths or "").split(","))
    for end in itertools.accumulate(map(int, lengths)):
        if start < end < len(text):
            yield text[start:end]
            start = end
    if start < len(text):
        yield text[start:]


async def response_texts(
    turn: LiveReply | Message, offset: int, end: list
) -> AsyncIterator[str]:
    """The reply past `offset`: what there is now, split where its pieces ended, then the
    rest as it comes ("" for a ping); then `end` gets how it ended (see text_from_the_row)."""
    if isinstance(turn, Message):
        turn = live_replies.get(turn.id, turn)
    if isinstance(turn, LiveReply):
        text, piece_lengths = "".join(turn.pieces), turn.piece_lengths()
    else:
        text, piece_lengths = turn.response_content, turn.piece_lengths
    for delta in split_at_pieces(text, piece_lengths, offset):
        yield delta
    offset = max(offset, len(text))
    if isinstance(turn, LiveReply):
        async for delta in text_in_memory(turn, offset):
            yield delta
        end.append((turn.status_code, turn.detail, turn.message))
    else:  # of another worker, or ended: its row has the rest and the end
        async for delta in text_from_the_row(turn.id, offset, end):
            yield delta


def response_event(number: int, kind: str, fields: dict) -> bytes:
    """`event:` and `data:` only: an `id:` line would break the SDK's decoder."""
    data = {"type": f"response.{kind}", "sequence_number": number, **fields}
    return sse(jsonable_encoder(data), data["type"])


async def response_events(
    turn: LiveReply | Message, head: ResponseObject, after: int
) -> AsyncIterator[bytes]:
    """The response's events numbered above `after`, live to its end."""
    message_id, end, offset = int(head.id.removeprefix("resp_")), [], max(after - 3, 0)
    part = {"item_id": f"msg_{message_id}", "output_index": 0, "content_index": 0}
    item = OutputMessage.of(message_id, "", "in_progress")
    opening = [
        ("created", {"response": head}),
        ("in_progress", {"response": head}),
        ("output_item.added", {"output_index": 0, "item": item}),
        ("content_part.added", {**part, "part": OutputText(text="")}),
    ]
    for number, (kind, fields) in enumerate(opening):
        if number > after:
            yield response_event(number, kind, fields)
    async for text in response_texts(turn, offset, end):
        offset += len(text)
        delta = {**part, "delta": text, "logprobs": []}
        yield response_event(3 + offset, "output_text.delta", delta) if text else PING
    if not end:
        return  # the database failed or the server is going away: the client resumes
    final, text = final_response(head, *end[0])
    item = OutputMessage.of(message_id, text, final.status)
    ending = final.status if final.status in ("completed", "incomplete") else "failed"
    closing = [
        ("output_text.done", {**part, "text": text, "logprobs": []}),
        ("content_part.done", {**part, "part": OutputText(text=text)}),
        ("output_item.done", {"output_index": 0, "item": item}),
        (ending, {"response": final}),
    ]
    length = len(text) if end[0][2] else offset  # stored, or deleted meanwhile
    for number, (kind, fields) in enumerate(closing, length + 4):
        if number > after:
            yield response_event(number, kind, fields)


def final_response(
    head: ResponseObject, status_code: int, detail: str, message: Message | None
) -> tuple[ResponseObject, str]:
    """The response as stored and its text; one that could not be stored has failed."""
    if message:
        return response_object(message, head.model, detail), message.response_content
    error = ResponseError(code=str(status_code), message=detail)
    return head.model_copy(update={"status": "failed", "error": error}), ""


async def branch_context(
    session: AsyncSession, conversation: Conversation
) -> list[dict]:
    """The active branch as the model gets it, oldest first: each successful turn's input
    items (a turn of another endpoint: its prompt) and reply. One query, an index range:
    the branch's turns are marked on_branch (see move_leaf)."""
    if conversation.id is None:
        return []
    query = (
        select(Message.input_items, Message.prompt_content, Message.response_content)
        .where(Message.conversation_id == conversation.id, col(Message.on_branch))
        .where(Message.is_success == true())
        .order_by(col(Message.created_at), col(Message.id))
    )
    messages = []
    for items, prompt, reply in (await session.exec(query)).all():
        messages += [model_message(*item) for item in items or [("user", prompt)]]
        messages.append({"role": "assistant", "content": reply})
    return messages


def model_message(role: str, text: str) -> dict:
    return {"role": developer_is_system(role), "content": text}


async def response_place(
    call: ResponseRequest, header_id: int | None, session: AsyncSession
) -> Conversation:
    """The conversation of the call's turn, its leaf the turn that it follows."""
    named = getattr(call.conversation, "id", call.conversation)  # a ConversationRef's
    conversation_id = id_in(CONVERSATION_REF, named) if named else header_id
    if named and header_id and conversation_id != header_id:
        raise HTTPException(400, "conversation and X-Conversation-Id differ")
    if call.previous_response_id is not None:
        if named or header_id:
            raise HTTPException(400, "previous_response_id or conversation, not both")
        if not (row := await response_row(session, call.previous_response_id)):
            raise HTTPException(404, "Previous response not found")
        conversation = await locked_conversation(session, row[0].conversation_id)
        # Read again under the lock: it may have been deleted since.
        previous = await session.get(Message, row[0].id, populate_existing=True)
        if not previous:
            raise HTTPException(404, "Previous response not found")
        if previous.live:
            raise HTTPException(400, "The previous response is still in progress")
        # The turn it follows becomes the leaf, then the new one (see store_turn).
        await move_leaf(session, conversation, previous.id)
        return conversation
    if named or header_id:
        return await find_conversation(conversation_id or 0, session)
    prompt = call.input[-1].content
    return Conversation(title=short_title(prompt), model_type=call.model)


async def start_response(
    call: ResponseRequest, header_id: int | None, session: AsyncSession
) -> tuple[LiveReply, Message]:
    items = [(item.role, item.content) for item in call.input]
    prompt_within_limit(items[-1][1], ("body", "input"))
    conversation = await response_place(call, header_id, session)
    conversation.model_type = call.model
    context = await branch_context(session, conversation)
    messages = [*context, *(model_message(*item) for item in items)]
    if call.instructions:
        messages.insert(0, model_message("system", call.instructions))
    echoed = {*ECHOED, "background"}
    options = call.model_dump(include=echoed, exclude_none=True, by_alias=True)
    message = Message(
        prompt_content=items[-1][1],
        response_content="",
        live=True,
        input_items=items,
        response_options=options,
    )
    sampling = call.model_dump(include={"temperature", "top_p"}, exclude_none=True)
    if call.max_output_tokens:
        sampling["max_tokens"] = call.max_output_tokens
    reply = await start_reply(session, conversation, message, messages, sampling)
    return reply, message


@api.post("/v1/responses", responses=RESPONSE_ERRORS)
async def create_response(
    call: ResponseRequest, session: SessionDep, header_id: ConversationHeader = None
) -> Response:
    reply, message = await start_response(call, header_id, session)
    headers = turn_headers(reply)
    head = response_object(message, call.model).at_start()
    if call.background and not call.stream:
        return JSONResponse(jsonable_encoder(head), headers=headers)
    await answered(reply, bool(call.stream))
    failed_early = not reply.pieces and reply.status_code not in (200, STOPPED, None)
    if failed_early or (reply.message is None and not call.stream):
        return call_failed(reply, headers)
    if call.stream:
        events = response_events(reply, head, -1)
        return EventSourceResponse(events, headers={**headers, **STREAM_HEADERS})
    done = response_object(reply.message, call.model, reply.detail)
    return JSONResponse(jsonable_encoder(done), headers=headers)


@api.get("/v1/responses/{response_id}", responses=RESPONSE_ERRORS)
async def retrieve_response(
    found: FoundResponse,
    session: SessionDep,
    stream: bool = False,
    starting_after: Annotated[int, Query(ge=0, le=INT32_MAX)] | None = None,
) -> Response:
    message, model = found
    if not stream:
        return JSONResponse(jsonable_encoder(response_object(message, model)))
    await session.close()  # hold no connection for the stream's length
    after = -1 if starting_after is None else starting_after
    events = response_events(message, response_object(message, model).at_start(), after)
    return EventSourceResponse(events, headers=STREAM_HEADERS)


@api.post("/v1/responses/{response_id}/cancel", responses=OPENAI_ERRORS)
async def cancel_response(found: FoundResponse, session: SessionDep) -> ResponseObject:
    message, model = found
    if message.live:
        with suppress(HTTPException):  # it ended meanwhile: it is returned as stored
            await stop_reply(message, session)
        await session.refresh(message)
    return response_object(message, model)


@api.delete("/v1/responses/{response_id}", responses=OPENAI_ERRORS)
async def delete_response(found: FoundResponse, session: SessionDep) -> ResponseDeleted:
    await delete_message(found[0], session)
    return ResponseDeleted(id=f"resp_{found[0].id}")


@api.get("/v1/responses/{response_id}/input_items", responses=OPENAI_ERRORS)
async def list_input_items(
    found: FoundResponse,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> InputItemList:
    message = found[0]
    given = message.input_items or [("user", message.prompt_content)]
    items = [InputItem.of(message.id, n, *item) for n, item in enumerate(given)]
    items = items[::-1] if order == "desc" else items
    ids = [item.id for item in items]
    if after is not None and after not in ids:
        raise HTTPException(400, "after: not an input item of this response")
    start = ids.index(after) + 1 if after is not None else 0
    page = items[start : start + limit]
    ends = {"first_id": page[0].id, "last_id": page[-1].id} if page else {}
    return InputItemList(data=page, has_more=start + limit < len(items), **ends)


app.include_router(api)


@app.get("/health")
@app.head("/health")  # a route of its own: operationIds are unique
async def health(session: SessionDep) -> dict[str, str]:
    await session.exec(select(1))
    return {"status": "ok"}


# Browsers --------------------------------------------------------------------------------
# The chat page at /, CORS for the origins in CORS_ORIGINS, and a guard: a request that a
# browser marks as coming from another site is refused before it reaches an endpoint, so a page
# the user happens to visit cannot start generations or change data on their local service,
# nor through its own name pointed at this machine (a Host that is not ours: ALLOWED_HOSTS).

PAGE = FilePath(__file__).with_name("static") / "index.html"


def csp_hash(tag: str, html: str) -> str:
    """The CSP source for the page's one inline <script> or <style>: inline handlers never run."""
    body = re.search(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL).group(1)
    digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
    return f"'sha256-{digest}'"


def page_response() -> tuple[bytes, dict[str, str]]:
    html = PAGE.read_text()
    headers = {
        "Content-Security-Policy": (
            f"default-src 'none'; script-src {csp_hash('script', html)}; "
            f"style-src {csp_hash('style', html)}; connect-src 'self'; img-src 'self' data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        ),
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-cache",
    }
    model = html_escape(settings.default_model, quote=True)
    html = html.replace('content="DEFAULT_MODEL"', f'content="{model}"', 1)
    return html.encode(), headers


page_body, page_headers = page_response()


@app.get("/", include_in_schema=False)
async def chat_page() -> HTMLResponse:
    return HTMLResponse(page_body, headers=page_headers)


DEFAULT_PORTS = {"http": 80, "https": 443}


def normal_origin(origin: str) -> str | None:
    """An origin as a browser writes it (lowercase, no default port); None if it is none."""
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path.strip("/"):
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = "" if port in (None, DEFAULT_PORTS[parts.scheme]) else f":{port}"
    return f"{parts.scheme}://{host}{port}"


def parse_cors_origins(value: str) -> set[str]:
    origins = {origin.strip() for origin in value.split(",")} - {""}
    for origin in origins:
        if normal_origin(origin) is None:
            example = "an origin like http://localhost:5173"
            raise ValueError(f"CORS_ORIGINS: {origin!r} is not {example}")
    return {normal_origin(origin) for origin in origins}


allowed_origins = parse_cors_origins(settings.cors_origins)

# Open to links and requests from anywhere: they read nothing private and change nothing.
OPEN_PATHS = {"/", "/health", "/docs", "/docs/oauth2-redirect", "/openapi.json"}
OPEN_PREFIXES = ("/static-offline-docs/",)  # Swagger UI's files (fastapi-offline)


def from_another_site(scope: dict) -> bool:
    """The contract's rule: an Origin that is neither ours nor allowed, or a Sec-Fetch-Site
    of cross-site/same-site without an allowed Origin (an <img> sends no Origin)."""
    headers = Headers(scope=scope)
    origin = headers.get("origin")
    if origin is None:
        return headers.get("sec-fetch-site") in ("cross-site", "same-site")
    ours = normal_origin(f"{scope.get('scheme', 'http')}://{headers.get('host', '')}")
    theirs = normal_origin(origin)
    return theirs is None or (theirs != ours and theirs not in allowed_origins)


allowed_hosts = {h.strip().lower() for h in settings.allowed_hosts.split(",")} - {""}


def allowed_host(host: str) -> bool:
    """An IP address (a page cannot make a browser send one for its own name), localhost or
    one of ALLOWED_HOSTS: a page whose name is re-pointed at us (DNS rebinding) sends its own."""
    if "*" in allowed_hosts:
        return True
    try:
        name = urlsplit(f"//{host}").hostname or ""  # lowercase, no port, no [brackets]
        return name in allowed_hosts | {"localhost"} or bool(ip_address(name))
    except ValueError:  # not an IP address, or not a host at all
        return False


class Guard:
    """Every request, before the app: its Host, a browser's origin, the size of its body. Pure
    ASGI (no BaseHTTPMiddleware): streams pass through untouched. Not Starlette's
    TrustedHostMiddleware for hosts: it cannot let any IP address in, and answers in plain text."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        elif not allowed_host(host := Headers(scope=scope).get("host", "")):
            message = f"Refused: Host {host!r} is not an IP address, localhost or in ALLOWED_HOSTS"
            await error_for(path, 400, message)(scope, receive, send)
        elif (
            path not in OPEN_PATHS
            and not path.startswith(OPEN_PREFIXES)
            and from_another_site(scope)
        ):
            message = "Refused: a browser request from another site. Add its origin to CORS_ORIGINS to allow it."
            await error_for(path, 403, message)(scope, receive, send)
        elif replay := await body_within_limit(scope, receive, send):
            await self.app(scope, replay, send)


app.add_middleware(Guard)
# Outside the guard, so that preflights get CORS's answer (none for other origins: 400).
app.add_middleware(
    CORSMiddleware,
    allow_origins=list(allowed_origins),
    allow_methods=["*"],
    allow_headers=["*"],
    expose_headers=["X-Conversation-Id", "X-Message-Id"],
)
