"""A chat backend: conversations with an LLM, stored in SQLite or Postgres, replies streamed as SSE.

Read top to bottom: settings, database, models (the LLM kind), shutdown, the app, then the
endpoints for conversations, messages, generation and health. The HTTP API is in README.md.
"""

import asyncio
import base64
import hashlib
import logging
import re
import secrets
import signal
import textwrap
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from html import escape as html_escape
from pathlib import Path as FilePath
from typing import Annotated, Any
from urllib.parse import urlsplit

import anyio
import openai
from alembic import command
from alembic.config import Config as AlembicConfig
from anyio.streams.memory import MemoryObjectSendStream
from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
)
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi_offline import FastAPIOffline
from openai.types.chat import ChatCompletionChunk
from pydantic import AfterValidator, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import event, exc, true
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel, col, select, update
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.datastructures import Headers

from models import (
    INT32_MAX,
    Conversation,
    ConversationCreate,
    ConversationPublic,
    ConversationReplace,
    ConversationUpdate,
    Message,
    MessageCreate,
    MessagePublic,
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
    max_prompt_chars: int = Field(default=32_000, ge=1)
    openai_timeout: float = Field(default=60, gt=0)
    max_tokens: int | None = Field(default=None, ge=1)
    api_key: SecretStr | None = None
    cors_origins: str = ""  # comma-separated; see "Browsers" below


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


database_url = async_database_url(settings.database_url)
is_sqlite = database_url.startswith("sqlite")
if is_sqlite:
    # SQLite takes one writer at a time and makes the others poll for the lock, sleeping up
    # to 100 ms a try: under load some wait for seconds. One connection makes them queue.
    engine = create_async_engine(database_url, pool_size=1, max_overflow=0)
else:
    # A database that stops answering should cost a request a few seconds, not minutes.
    engine = create_async_engine(database_url, connect_args={"connect_timeout": 5})


if is_sqlite:

    @event.listens_for(engine.sync_engine, "connect")
    def configure_sqlite(dbapi_connection: Any, _: Any) -> None:
        cursor = dbapi_connection.cursor()
        # Without it SQLite ignores ON DELETE CASCADE.
        cursor.execute("PRAGMA foreign_keys = ON")
        # Readers and the writer do not block each other.
        cursor.execute("PRAGMA journal_mode = WAL")
        # Safe with WAL: a crash loses nothing, a power cut at most the last commits.
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()


async def get_session() -> AsyncIterator[AsyncSession]:
    # Sessions hold a connection only inside a transaction, so a long stream holds none.
    async with AsyncSession(engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


def migrate_to_head(connection: Any) -> None:
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


@dataclass
class Reply:
    pieces: list[str] = field(default_factory=list)
    finished: bool = False  # the model said why it stopped (finish_reason)
    prompt_tokens: int | None = None
    response_tokens: int | None = None
    total_tokens: int | None = None


async def stream_echo(prompt: str, reply: Reply, send: MemoryObjectSendStream) -> None:
    for word in re.findall(r"\s*\S+\s*", prompt):
        reply.pieces.append(word)
        await send.send(ServerSentEvent(data={"content": word}))
    reply.prompt_tokens = reply.response_tokens = len(prompt.split())
    reply.total_tokens = reply.prompt_tokens + reply.response_tokens
    reply.finished = True


async def open_llm_reply(
    model: str, messages: list[dict]
) -> openai.AsyncStream[ChatCompletionChunk]:
    body = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if settings.max_tokens:
        body["max_tokens"] = settings.max_tokens
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


async def stream_llm(
    stream: openai.AsyncStream[ChatCompletionChunk],
    reply: Reply,
    send: MemoryObjectSendStream,
) -> None:
    async with stream:
        async for chunk in stream:
            # Usage comes in an extra last chunk, from servers that honour include_usage.
            if chunk.usage:
                reply.prompt_tokens = chunk.usage.prompt_tokens
                reply.response_tokens = chunk.usage.completion_tokens
                reply.total_tokens = chunk.usage.total_tokens
            if not chunk.choices:
                continue
            if chunk.choices[0].finish_reason:
                reply.finished = True
            if content := chunk.choices[0].delta.content:
                reply.pieces.append(content)
                await send.send(ServerSentEvent(data={"content": content}))


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


def short_title(text: str) -> str:
    """One line of at most 60 characters; the prompt's own words serve until the LLM's title is in."""
    # An LLM may send anything, even NUL or half a surrogate pair.
    storable = text.replace("\x00", "").encode(errors="ignore").decode()
    line = " ".join(storable.split()).strip("\"'` ")
    return textwrap.shorten(line, width=60, placeholder="...") or "New conversation"


# Stopping streams on shutdown ------------------------------------------------------------
# Uvicorn waits for open streams before it shuts down, so a long reply would hold a restart.
# On SIGTERM/SIGINT the app cancels its live work: each turn stores what it has (503),
# tells the client, and the stream ends.

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
    in_a_server = threading.current_thread() is threading.main_thread() and all(
        map(callable, previous.values())
    )
    if not in_a_server:  # e.g. a test client running the app in a thread
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
    async with engine.begin() as connection:
        await connection.run_sync(migrate_to_head)
    with shutdown_signals_stop_live_work():
        yield
    await llm.close()
    await engine.dispose()


# Swagger UI's files come from a pinned package, not a CDN: /docs works offline. (No ReDoc:
# its page still loads a logo from its CDN.)
app = FastAPIOffline(title="Chat backend", lifespan=lifespan, redoc_url=None)


async def database_unavailable(request: Request, error: Exception) -> JSONResponse:
    logger.error("Database unavailable: %s", error)
    return JSONResponse({"detail": "Database unavailable"}, status_code=503)


for error_class in (exc.OperationalError, exc.InterfaceError, exc.TimeoutError):
    app.add_exception_handler(error_class, database_unavailable)


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
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


bearer = HTTPBearer(auto_error=False)


async def require_api_key(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    if settings.api_key is None:
        return
    given = credentials.credentials.encode() if credentials else b""
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
    query = select(Conversation).order_by(
        col(Conversation.updated_at).desc(), col(Conversation.id).desc()
    )
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
    conversation = Conversation.model_validate(
        body, update={"model_type": body.model_type or settings.default_model}
    )
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
    conversation.sqlmodel_update(
        body.model_dump(exclude_unset=True), update={"updated_at": utc_now()}
    )
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
    message = await session.get(Message, message_id)
    if message is None:
        raise HTTPException(404, "Message not found")
    return message


MessageDep = Annotated[Message, Depends(find_message)]


async def touch_conversation(session: AsyncSession, conversation_id: int) -> None:
    """A change to a conversation's messages is activity in that conversation."""
    await session.exec(
        update(Conversation)
        .where(col(Conversation.id) == conversation_id)
        .values(updated_at=utc_now())
    )


@api.get("/conversations/{conversation_id}/messages")
async def list_messages(
    conversation: ConversationDep, session: SessionDep, skip: Skip = 0, take: Take = 100
) -> list[MessagePublic]:
    query = (
        select(Message)
        .where(Message.conversation_id == conversation.id)
        .order_by(col(Message.created_at), col(Message.id))
        .offset(skip)
        .limit(take)
    )
    return (await session.exec(query)).all()


@api.post("/conversations/{conversation_id}/messages", status_code=201)
async def create_message(
    body: MessageCreate, conversation: ConversationDep, session: SessionDep
) -> MessagePublic:
    message = Message.model_validate(body, update={"conversation_id": conversation.id})
    conversation.updated_at = message.created_at
    session.add(message)
    await session.commit()
    return message


@api.get("/messages/{message_id}")
async def read_message(message: MessageDep) -> MessagePublic:
    return message


@api.put("/messages/{message_id}", status_code=202)
async def replace_message(
    body: MessageCreate, message: MessageDep, session: SessionDep
) -> MessagePublic:
    message.sqlmodel_update(body.model_dump(), update={"updated_at": utc_now()})
    await touch_conversation(session, message.conversation_id)
    await session.commit()
    return message


@api.delete("/messages/{message_id}", status_code=204)
async def delete_message(message: MessageDep, session: SessionDep) -> None:
    await session.delete(message)
    await touch_conversation(session, message.conversation_id)
    await session.commit()


# Generation ------------------------------------------------------------------------------


class GenerateRequest(SQLModel):
    prompt: Annotated[str, AfterValidator(storable_text)]
    conversation_id: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None

    @field_validator("prompt")
    @classmethod
    def prompt_fits(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("must not be empty")
        if len(prompt) > settings.max_prompt_chars:
            raise ValueError(
                f"must be at most {settings.max_prompt_chars} characters (MAX_PROMPT_CHARS)"
            )
        return prompt


@dataclass
class Turn:
    """One prompt and its reply: stored before the stream starts, finished exactly once."""

    conversation: Conversation
    message: Message
    opening: asyncio.Task | None  # the request to the model (None for echo)
    stop: anyio.CancelScope = field(default_factory=anyio.CancelScope)


async def start_turn(request: GenerateRequest, session: AsyncSession) -> Turn:
    if request.conversation_id is None:
        model = settings.default_model
        conversation = Conversation(title=short_title(request.prompt), model_type=model)
        history = []
    else:
        conversation = await find_conversation(request.conversation_id, session)
        history = await recent_successful_turns(session, conversation.id)
    message = Message(prompt_content=request.prompt, response_content="")
    opening = None
    if conversation.model_type != ECHO:
        # Ask the model now and store the prompt meanwhile: the database adds no wait.
        messages = chat_messages(request.prompt, history)
        opening = asyncio.create_task(open_llm_reply(conversation.model_type, messages))
    try:
        await store_prompt(session, conversation, message)
    except BaseException:
        if opening:
            opening.cancel()
        raise
    return Turn(conversation, message, opening)


async def store_prompt(
    session: AsyncSession, conversation: Conversation, message: Message
) -> None:
    conversation.updated_at = message.created_at
    session.add(conversation)
    await session.flush()  # a new conversation gets its id
    message.conversation_id = conversation.id
    session.add(message)
    await session.commit()


async def recent_successful_turns(
    session: AsyncSession, conversation_id: int
) -> list[tuple[str, str]]:
    """The last HISTORY_TURNS successful (prompt, reply) pairs, oldest first."""
    if settings.history_turns == 0:
        return []
    query = (
        select(Message.prompt_content, Message.response_content)
        .where(Message.conversation_id == conversation_id, Message.is_success == true())
        .order_by(col(Message.created_at).desc(), col(Message.id).desc())
        .limit(settings.history_turns)
    )
    return [tuple(row) for row in reversed((await session.exec(query)).all())]


async def generate(
    turn: Turn, reply: Reply, send: MemoryObjectSendStream
) -> tuple[int, str | None]:
    """Stream the model's reply into `send` and `reply`; return its HTTP status and error detail."""
    model = turn.conversation.model_type
    try:
        if turn.opening is None:
            await stream_echo(turn.message.prompt_content, reply, send)
        else:
            await stream_llm(await turn.opening, reply, send)
    except openai.APITimeoutError:
        return (
            504,
            f"The model sent nothing for {settings.openai_timeout:g} s (OPENAI_TIMEOUT)",
        )
    except openai.APIConnectionError:
        return 502, "The model could not be reached, or its reply broke off"
    except openai.APIStatusError as error:
        return (
            error.status_code,
            f"The model answered {error.status_code}: {error.message}",
        )
    except Exception as error:  # the turn must be stored whatever the upstream sent
        logger.exception("Reply from %r failed", model)
        return 502, f"The model's reply could not be read: {error}"
    if not reply.finished:
        return 502, "The model's reply ended without a finish_reason"
    return 200, None


async def finish_turn(
    turn: Turn, reply: Reply, status_code: int, session: AsyncSession
) -> bool:
    """Store the turn's final state; runs even while the request is being cancelled."""
    message_id = turn.message.id  # after a failed commit the session would reload it
    turn.message.sqlmodel_update(
        {
            "response_content": "".join(reply.pieces),
            "prompt_tokens": reply.prompt_tokens,
            "response_tokens": reply.response_tokens,
            "total_tokens": reply.total_tokens,
            "is_success": status_code == 200,
            "status_code": status_code,
            "updated_at": utc_now(),
        }
    )
    turn.conversation.updated_at = turn.message.updated_at
    with anyio.move_on_after(10, shield=True):
        try:
            await session.commit()
            return True
        except Exception:
            logger.exception("Could not store the end of turn %s", message_id)
    return False


async def run_turn(
    turn: Turn, session: AsyncSession, send: MemoryObjectSendStream
) -> None:
    reply = Reply()
    status_code, detail = None, None
    async with send:
        try:
            with cancelled_on_shutdown(turn.stop):
                ids = {
                    "conversation_id": turn.conversation.id,
                    "message_id": turn.message.id,
                }
                await send.send(ServerSentEvent(event="start", data=ids))
                status_code, detail = await generate(turn, reply, send)
        finally:  # also when the request itself is cancelled
            if turn.opening:
                turn.opening.cancel()  # in case the reply was stopped before it opened
            if status_code is None:
                status_code, detail = (
                    (503, "The server is shutting down")
                    if stopping
                    else (499, "The client went away")
                )
            if not await finish_turn(turn, reply, status_code, session):
                status_code, detail = (
                    503,
                    "Database unavailable: the reply was not stored",
                )
        if status_code == 200:
            final = MessagePublic.model_validate(turn.message)
            event = ServerSentEvent(event="done", data=final)
        else:
            error = {"detail": detail, "status_code": status_code}
            event = ServerSentEvent(event="error", data=error)
        try:
            await send.send(event)
        except anyio.BrokenResourceError:
            pass  # nobody is listening any more


TITLE_INSTRUCTION = "Reply with only a short title, at most six words, for a chat that starts with this."


async def write_title(
    conversation_id: int, placeholder: str, model: str, prompt: str
) -> None:
    """Give a new conversation an LLM-written title, unless the user renamed it meanwhile.

    (With echo the placeholder, the prompt's first words, is already the model's answer.)
    """
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
        except Exception:  # the conversation keeps its placeholder title
            logger.exception("No title for conversation %s", conversation_id)


@asynccontextmanager
async def open_turn(
    request: GenerateRequest, session: AsyncSession, response: Response
) -> AsyncIterator[AsyncIterable]:
    """Store the prompt, then stream the reply from a task that finishes the turn however the stream ends."""
    turn = await start_turn(request, session)
    response.headers["X-Conversation-Id"] = str(turn.conversation.id)
    send, receive = anyio.create_memory_object_stream[ServerSentEvent](
        max_buffer_size=64
    )
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(run_turn, turn, session, send)
        if request.conversation_id is None and turn.conversation.model_type != ECHO:
            tasks.start_soon(
                write_title,
                turn.conversation.id,
                turn.conversation.title,
                turn.conversation.model_type,
                request.prompt,
            )
        with receive:
            try:
                yield receive
            finally:
                # The response is over. If the reply is not, the client went away.
                turn.stop.cancel()


async def turn_from_query(
    request: Annotated[GenerateRequest, Query()],
    session: SessionDep,
    response: Response,
) -> AsyncIterator[AsyncIterable]:
    async with open_turn(request, session, response) as events:
        yield events


async def turn_from_body(
    request: GenerateRequest, session: SessionDep, response: Response
) -> AsyncIterator[AsyncIterable]:
    async with open_turn(request, session, response) as events:
        yield events


# What the streams send, for the OpenAPI document (/docs) ----------------------------------


class StreamStart(SQLModel):
    conversation_id: int
    message_id: int


class StreamPiece(SQLModel):
    content: str


class StreamError(SQLModel):
    detail: str
    status_code: int


class ErrorDetail(SQLModel):
    detail: str | list[dict[str, Any]]


def sse_event(name: str | None, data: dict, about: str, last: bool = False) -> dict:
    """One kind of server-sent event: its `event:` name (None: unnamed), `id:` and JSON `data:`."""
    event_id = (
        {"type": "string", "pattern": r"^\d+:end$", "description": "<message_id>:end"}
        if last
        else {
            "type": "string",
            "pattern": r"^\d+:\d+$",
            "description": "<message_id>:<offset>, the reply's length in code points so far",
        }
    )
    fields = {"id": event_id}
    if name:
        fields["event"] = {"const": name}
    if name == "start":
        fields["retry"] = {"type": "integer", "description": "reconnect delay, ms"}
    fields["data"] = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": data,
    }
    required = ["id", "data"] + (["event"] if name else [])
    title = name or "piece (unnamed: a browser's 'message')"
    return {
        "title": title,
        "description": about,
        "properties": fields,
        "required": required,
    }


STREAM_EVENTS = [
    sse_event(
        "start",
        StreamStart.model_json_schema(),
        "First: the turn is stored (prompt saved, is_success null).",
    ),
    sse_event(None, StreamPiece.model_json_schema(), "The next piece of the reply."),
    sse_event(
        "done",
        {"$ref": "#/components/schemas/MessagePublic"},
        "Last, on success: the message as stored.",
        last=True,
    ),
    sse_event(
        "error",
        StreamError.model_json_schema(),
        "Last, on failure: the upstream's status, 499 stopped, 502, 503, 504, 410 deleted.",
        last=True,
    ),
]
STREAM_EXAMPLE = """event: start
id: 7:0
retry: 3000
data: {"conversation_id": 3, "message_id": 7}

id: 7:6
data: {"content": "hello "}

id: 7:11
data: {"content": "there"}

event: done
id: 7:end
data: {"id": 7, "conversation_id": 3, "response_content": "hello there", ...}

"""


STREAM_DESCRIPTION = """A `text/event-stream` of these events, in this order (the schema of each
is in `itemSchema`):

| event | `id:` | `data:` (JSON) |
|---|---|---|
| `start` (also `retry:`) | `<message_id>:<offset>` | `{"conversation_id": int, "message_id": int}` |
| unnamed, zero or more | `<message_id>:<offset>` | `{"content": str}`: the next piece of the reply |
| `done`, or | `<message_id>:end` | the Message as stored |
| `error` | `<message_id>:end` | `{"detail": str, "status_code": int}` |

The offset counts the reply's characters (code points) so far: send the last `id` back as
`Last-Event-ID` to `GET /messages/{message_id}/stream` to resume."""


def error_response(description: str) -> dict:
    schema = ErrorDetail.model_json_schema()
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }


# Shared by the stream endpoints; every error comes before the stream's first byte.
STREAM_RESPONSES: dict[int | str, dict] = {
    200: {
        "description": STREAM_DESCRIPTION,
        "content": {
            "text/event-stream": {
                "itemSchema": {"oneOf": STREAM_EVENTS},
                "example": STREAM_EXAMPLE,
            }
        },
    },
    401: error_response("Missing or wrong API key (when API_KEY is set)"),
    403: error_response("A browser request from another site (see CORS_ORIGINS)"),
    404: error_response("Unknown conversation or message"),
    409: error_response("The request conflicts with the turn's state"),
    422: error_response("Invalid prompt, body or parameter"),
    429: error_response("MAX_LIVE_REPLIES replies are running already (Retry-After)"),
}


@api.get(
    "/text/generate/stream",
    response_class=EventSourceResponse,
    responses=STREAM_RESPONSES,
)
async def generate_stream(
    events: Annotated[AsyncIterable, Depends(turn_from_query)],
) -> AsyncIterable[ServerSentEvent]:
    async for sse in events:
        yield sse


@api.post(
    "/text/generate/stream",
    response_class=EventSourceResponse,
    responses=STREAM_RESPONSES,
)
async def generate_stream_post(
    events: Annotated[AsyncIterable, Depends(turn_from_body)],
) -> AsyncIterable[ServerSentEvent]:
    async for sse in events:
        yield sse


app.include_router(api)


@app.get("/health")
async def health(session: SessionDep) -> dict[str, str]:
    await session.exec(select(1))
    return {"status": "ok"}


# Browsers --------------------------------------------------------------------------------
# The chat page at /, CORS for the origins in CORS_ORIGINS, and a guard: a request that a
# browser marks as coming from another site is refused before it reaches an endpoint, so a page
# the user happens to visit cannot start generations or change data on their local service.

PAGE = FilePath(__file__).with_name("static") / "index.html"


def csp_hash(tag: str, html: str) -> str:
    """The CSP source for the page's one inline <script> or <style>: inline handlers never run."""
    body = re.search(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL).group(1)
    return (
        f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
    )


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


def origin_key(origin: str) -> tuple[str, str, int | None] | None:
    """scheme, host and port of an origin (default ports made explicit); None if malformed."""
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname or parts.path.strip("/"):
        return None
    return parts.scheme, parts.hostname, port


def parse_cors_origins(value: str) -> dict[tuple[str, str, int | None], str]:
    """Each origin in CORS_ORIGINS, as a key and as a browser writes it; refuses the malformed."""
    origins = {}
    for origin in filter(None, (o.strip() for o in value.split(","))):
        key = origin_key(origin)
        if key is None or key[0] not in ("http", "https"):
            raise ValueError(
                f"CORS_ORIGINS: {origin!r} is not an origin like http://localhost:5173"
            )
        scheme, host, port = key
        host = f"[{host}]" if ":" in host else host
        default = port == {"http": 80, "https": 443}[scheme]
        origins[key] = f"{scheme}://{host}" + ("" if default else f":{port}")
    return origins


allowed_origins = parse_cors_origins(settings.cors_origins)

# Open to links and requests from anywhere: they read nothing private and change nothing.
OPEN_PATHS = {
    "/",
    "/health",
    "/docs",
    "/docs/oauth2-redirect",
    "/openapi.json",
}
OPEN_PREFIXES = ("/static-offline-docs/",)  # Swagger UI's files (fastapi-offline)


def from_another_site(scope: dict) -> bool:
    """The contract's rule: an Origin that is neither ours nor allowed, or a Sec-Fetch-Site
    of cross-site/same-site without an allowed Origin (an <img> sends no Origin)."""
    headers = Headers(scope=scope)
    origin = headers.get("origin")
    if origin is None:
        return headers.get("sec-fetch-site") in ("cross-site", "same-site")
    ours = origin_key(f"{scope.get('scheme', 'http')}://{headers.get('host', '')}")
    key = origin_key(origin)
    return key is None or (key != ours and key not in allowed_origins)


def refusal(path: str) -> JSONResponse:
    """403 in the error shape of the path: OpenAI's under /v1, {"detail": ...} elsewhere."""
    message = (
        "Refused: a browser request from another site. "
        "Add its origin to CORS_ORIGINS to allow it."
    )
    if path == "/v1" or path.startswith("/v1/"):
        error = {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": "cross_site_request",
        }
        return JSONResponse({"error": error}, status_code=403)
    return JSONResponse({"detail": message}, status_code=403)


class RefuseOtherSites:
    """Pure ASGI (no BaseHTTPMiddleware): streams pass through untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] == "http"
            and path not in OPEN_PATHS
            and not path.startswith(OPEN_PREFIXES)
            and from_another_site(scope)
        ):
            await refusal(path)(scope, receive, send)
            return
        await self.app(scope, receive, send)


app.add_middleware(RefuseOtherSites)
# Outside the guard, so that preflights get CORS's answer (none for other origins: 400).
app.add_middleware(
    CORSMiddleware,
    allow_origins=list(allowed_origins.values()),
    allow_methods=["*"],
    allow_headers=["*"],
    expose_headers=["X-Conversation-Id", "X-Message-Id"],
)
