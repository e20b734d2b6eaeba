"""The service's behaviour, as a specification.

Every test talks HTTP to the app running in a real uvicorn, on SQLite and on Postgres
(TEST_DATABASE_URL; without it the Postgres cases skip, and under CI=true they fail). Models
other than `echo` are served by `fake_llm` below, a small OpenAI-compatible server the tests
run themselves; its model name scripts the reply, e.g. `fake:pieces=5:gap_ms=100`.
The chat page's tests, at the end, drive headless Chromium, on SQLite only.

`pytest -n 4` runs four at a time: every test makes its own conversations, so tests share an
app (one per module and settings) but never their data; an app a test starts itself is stopped
after it.
"""

import asyncio
import configparser
import contextlib
import hashlib
import http.client
import itertools
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import psycopg
import pytest
import uvicorn
from alembic.config import Config as AlembicConfig
from alembic.config import main as alembic_cli
from alembic.script import ScriptDirectory
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    Route,
    expect,
    sync_playwright,
)
from sqlalchemy.engine import make_url

PROJECT = Path(__file__).resolve().parent
POSTGRES_URL = os.environ.get("TEST_DATABASE_URL")
SETTINGS = [
    "DATABASE_URL",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "DEFAULT_MODEL",
    "SYSTEM_PROMPT",
    "HISTORY_TURNS",
    "MAX_PROMPT_CHARS",
    "OPENAI_TIMEOUT",
    "MAX_TOKENS",
    "API_KEY",
    "CHECKPOINT_MS",
    "DEAD_TURN_SECONDS",
    "MAX_LIVE_REPLIES",
    "CORS_ORIGINS",
    "MAX_IMPORT_BYTES",
    "ALLOWED_HOSTS",
    "MAX_BODY_BYTES",
]


# The fake LLM ----------------------------------------------------------------------------

fake_llm = FastAPI()
fake_llm.state.requests = []


def script(model: str) -> dict:
    """fake:pieces=3:first_ms=0:gap_ms=0:fail=0:title_fail=0:abort=-1:hang=0:usage=1:finish=stop

    pieces are "w0 ", "w1 ", ...; fail answers that HTTP status, title_fail answers 500 to the
    non-streaming (title) requests only, abort breaks the connection before piece N, hang never
    answers, usage=0 never reports usage, finish=none ends without a finish_reason.
    Odd replies: size=N makes each piece N characters long, odd=1 sends the pieces in ODD_PIECES,
    usage=2 reports counts no column can hold, long_error=1 fails with a long, many-line message.
    echo=1 replies with the JSON of the [role, content] pairs it was sent (16 characters a
    piece); cap=1 honours max_tokens: at most that many pieces, then finish_reason length.
    """
    options = {"pieces": 3, "first_ms": 0, "gap_ms": 0, "fail": 0, "title_fail": 0}
    options |= {"abort": -1, "hang": 0, "usage": 1, "finish": "stop", "size": 0}
    options |= {"odd": 0, "long_error": 0, "echo": 0, "cap": 0}
    for part in model.split(":")[1:]:
        key, value = part.split("=")
        options[key] = value if key == "finish" else int(value)
    return options


def chunk(model: str, **fields: object) -> str:
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model}
    return f"data: {json.dumps({**body, 'created': 0, **fields})}\n\n"


# NUL, then half an emoji in each of two pieces: none of it can be stored as sent.
ODD_PIECES = ["a\x00b ", "\ud83d", "\ude00 end"]
LONG_ERROR = "Traceback (most recent call last):\n" + "  internal detail\n" * 200


def llm_error(status: int, long: bool = False) -> JSONResponse:
    message = LONG_ERROR if long else f"scripted failure {status}"
    error = {"message": message, "type": "server_error"}
    return JSONResponse({"error": error}, status_code=status)


@fake_llm.post("/v1/chat/completions")
async def chat_completions(request: Request) -> object:
    body = await request.json()
    fake_llm.state.requests.append(body)
    model, run = body["model"], script(body["model"])
    if run["hang"]:
        await asyncio.sleep(3600)
    if run["fail"]:
        return llm_error(run["fail"], run["long_error"])
    words = [f"w{i} " for i in range(run["pieces"])]
    if run["size"]:
        words = [str(i % 10) * run["size"] for i in range(run["pieces"])]
    if run["odd"]:
        words = ODD_PIECES
    if run["echo"]:
        sent = json.dumps([[m["role"], m["content"]] for m in body["messages"]])
        words = [sent[i : i + 16] for i in range(0, len(sent), 16)]
    if run["cap"] and len(words) > (limit := body.get("max_tokens") or len(words)):
        words, run["finish"] = words[:limit], "length"
    if not body.get("stream"):
        await asyncio.sleep(run["first_ms"] / 1000)
        if run["title_fail"]:
            return llm_error(500)
        message = {"role": "assistant", "content": "".join(words)}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [choice],
        }

    async def events() -> Iterator[str]:
        await asyncio.sleep(run["first_ms"] / 1000)
        for i, word in enumerate(words):
            if i == run["abort"]:
                raise ConnectionAbortedError("scripted break mid-stream")
            if i:
                await asyncio.sleep(run["gap_ms"] / 1000)
            yield chunk(
                model,
                choices=[
                    {"index": 0, "delta": {"content": word}, "finish_reason": None}
                ],
            )
        if run["finish"] != "none":
            yield chunk(
                model,
                choices=[{"index": 0, "delta": {}, "finish_reason": run["finish"]}],
            )
        if run["usage"] and body.get("stream_options", {}).get("include_usage"):
            usage = {"prompt_tokens": 7, "completion_tokens": len(words)}
            usage["total_tokens"] = 7 + len(words)
            if run["usage"] == 2:
                usage = {
                    "prompt_tokens": -5,
                    "completion_tokens": 2**31,
                    "total_tokens": 1.5,
                }
            yield chunk(model, choices=[], usage=usage)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


# Servers and databases -------------------------------------------------------------------


@pytest.fixture(scope="session")
def llm_url() -> Iterator[str]:
    config = uvicorn.Config(
        fake_llm,
        port=0,  # any free one
        log_level="critical",
        timeout_graceful_shutdown=1,
        # Longer than the app's client keeps an idle connection (5 s): with uvicorn's 5 s the
        # two timers raced, and a reply now and then met a connection closed under it (502).
        timeout_keep_alive=60,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(5)


@pytest.fixture
def llm_requests() -> list[dict]:
    """What the app sent to the fake LLM during this test."""
    fake_llm.state.requests.clear()
    return fake_llm.state.requests


@dataclass
class Database:
    url: str
    name: str  # the Postgres database, or the SQLite file


def postgres_admin() -> psycopg.Connection:
    if not POSTGRES_URL:
        if os.environ.get("CI"):
            pytest.fail("CI runs the Postgres cases: set TEST_DATABASE_URL")
        pytest.skip(
            "Postgres cases need TEST_DATABASE_URL, e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test"
        )
    return psycopg.connect(
        make_url(POSTGRES_URL).set(drivername="postgresql").render_as_string(False),
        autocommit=True,
    )


@contextmanager
def new_database(kind: str, folder: Path) -> Iterator[Database]:
    if kind == "sqlite":
        path = folder / "chat.db"
        yield Database(f"sqlite:///{path}", str(path))
        return
    with postgres_admin() as admin:
        name = f"chat_test_{uuid.uuid4().hex[:12]}"
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            # The plain postgresql:// form users copy from elsewhere; the app picks the driver.
            yield Database(
                make_url(POSTGRES_URL)
                .set(drivername="postgresql", database=name)
                .render_as_string(False),
                name,
            )
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Database]:
    with new_database(request.param, tmp_path_factory.mktemp("sqlite")) as database:
        yield database


@pytest.fixture
def empty_database(database: Database, tmp_path: Path) -> Iterator[Database]:
    """Another database of the module's kind, empty: not even migrated."""
    kind = "sqlite" if database.url.startswith("sqlite") else "postgres"
    with new_database(kind, tmp_path) as empty:
        yield empty


# Every app (and `alembic` command) the tests start is a process of its own, as
# `python -m uvicorn app:app ...` starts it, but forked from a process that has imported the
# libraries once (multiprocessing's fork server): a start then costs about 0.3 s of CPU, the
# import of app.py and its migrations, instead of 1.3 s. Nothing of the app is imported before
# the fork: app.py reads its settings in the new process. Variables that Python itself reads
# as it starts (PYTHONPATH, ...) need a new interpreter: with those, a plain subprocess.
LIBRARIES = [
    "uvicorn",
    "fastapi",
    "fastapi_offline",
    "sqlmodel",
    "aiosqlite",
    "psycopg",
]
LIBRARIES += [
    "sqlalchemy.ext.asyncio",
    "openai",
    "alembic.command",
    "pydantic_settings",
]
fork_server = multiprocessing.get_context("forkserver")
fork_server.set_forkserver_preload([*LIBRARIES, __name__])  # __name__: for run_command


def run_command(
    command: str,
    args: list[str],
    env: dict[str, str],
    workdir: Path,
    out: Path,
    err: Path,
) -> None:
    """In the new process: run `uvicorn` or `alembic` with these arguments, as its CLI does."""
    os.chdir(workdir)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), fd)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.stdin = open(0)  # uvicorn --workers hands fd 0 on to its workers
    sys.argv = [command, *args]
    {"uvicorn": uvicorn.main, "alembic": alembic_cli}[command](args)


class Forked:
    """A process from the fork server, with the part of subprocess.Popen's API tests use."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self.process, self.pid = process, process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(str(self.pid), timeout)
        return self.process.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


Process = subprocess.Popen | Forked


def start_command(
    command: str,
    args: list[str],
    env: dict[str, str],
    workdir: Path,
    out: Path,
    err: Path,
) -> Process:
    for path in {out, err}:
        path.write_text("")
    if any(k.startswith("PYTHON") and env[k] != os.environ.get(k) for k in env):
        with out.open("a") as stdout, err.open("a") as stderr:
            argv = [sys.executable, "-m", command, *args]
            return subprocess.Popen(
                argv, cwd=workdir, env=env, stdout=stdout, stderr=stderr
            )
    process = fork_server.Process(
        target=run_command, args=(command, args, env, workdir, out, err), daemon=False
    )
    process.start()
    return Forked(process)


@dataclass
class Server:
    url: str
    process: Process
    log: Path

    def output(self) -> str:
        return self.log.read_text()


def launch(args: list[str], env: dict[str, str], workdir: Path) -> tuple[Process, Path]:
    log = workdir / f"server-{uuid.uuid4().hex[:6]}.log"
    clean = {key: value for key, value in os.environ.items() if key not in SETTINGS}
    process = start_command(
        "uvicorn",
        ["app:app", "--app-dir", str(PROJECT), *args],
        {**clean, **env},
        workdir,  # not the project: a developer's .env there must not leak into the tests
        log,
        log,
    )
    return process, log


def wait_healthy(url: str, process: Process, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the app exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    pytest.fail(f"the app did not answer /health in 60 s:\n{log.read_text()}")


def listening_url(process: Process, log: Path) -> str:
    """The address uvicorn says it listens on (it picks the port when told port 0)."""

    def said() -> str | bool | None:
        found = re.search(r"Uvicorn running on (http://\S+)", log.read_text())
        return found[1] if found else process.poll() is not None

    url = wait_for(said, 60)
    if url is True:
        pytest.fail(f"the app exited with {process.returncode}:\n{log.read_text()}")
    return url


def stop(*processes: Process) -> None:
    """SIGTERM them all, then wait for each (kill it after 10 s)."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        process.terminate()
    for process in running:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


RUNNING: set[Process] = set()  # the apps app_starter started, not yet stopped


@pytest.fixture(autouse=True)
def apps_end_with_the_test_that_started_them() -> Iterator[None]:
    """An app a test starts itself is stopped after it (a module fixture's, with the module):
    fewer processes and database connections at once, and no test meets another's app."""
    before = set(RUNNING)
    yield
    started = RUNNING - before
    stop(*started)
    RUNNING.difference_update(started)


@contextmanager
def app_starter(workdir: Path, llm_url: str) -> Iterator[Callable[..., Server]]:
    """A function that starts the app (keyword arguments are settings, env names) and waits
    until it is healthy; every app it started is stopped at the end."""
    started = []

    def start(**settings: str) -> Server:
        env = {"OPENAI_BASE_URL": llm_url, "OPENAI_API_KEY": "sk-test", **settings}
        # Port 0: the OS picks a free one as uvicorn binds it, so parallel test processes
        # (pytest -n) never race for a port.
        process, log = launch(["--port", "0"], env, workdir)
        started.append(process)
        RUNNING.add(process)
        url = listening_url(process, log)
        wait_healthy(url, process, log)
        return Server(url, process, log)

    yield start
    stop(*started)
    RUNNING.difference_update(started)


@pytest.fixture(scope="module")
def start_app(
    database: Database, llm_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Server]]:
    """Start the app on this module's database; keyword arguments are settings (env names)."""
    with app_starter(tmp_path_factory.mktemp("app"), llm_url) as start:
        yield lambda **settings: start(**{"DATABASE_URL": database.url, **settings})


@pytest.fixture(scope="module")
def server(start_app: Callable[..., Server]) -> Server:
    return start_app()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def iter_events(response: httpx.Response) -> Iterator[tuple[str, dict]]:
    """Server-sent events as (event name, JSON data); unnamed events are 'message'."""
    name, data = "message", []
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data.append(line.removeprefix("data:").strip())
        elif not line and data:
            yield name, json.loads("\n".join(data))
            name, data = "message", []


def generate(
    client: httpx.Client, **params: object
) -> tuple[httpx.Response, list[tuple[str, dict]]]:
    """GET the stream to its end: the response and its events (none when it is refused; the
    refusal's body is read, for response.json())."""
    with client.stream("GET", "/text/generate/stream", params=params) as response:
        if response.status_code != 200:
            response.read()
            return response, []
        return response, list(iter_events(response))


def reply_text(events: list[tuple[str, dict]]) -> str:
    return "".join(data["content"] for name, data in events if name == "message")


def words(count: int) -> str:
    """The fake model's reply of `count` pieces."""
    return "".join(f"w{i} " for i in range(count))


def wait_for(check: Callable[[], object], seconds: float = 10) -> object:
    deadline = time.monotonic() + seconds
    while not (result := check()):
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting")
        time.sleep(0.05)
    return result


def finished_turn(client: httpx.Client, message_id: int) -> Callable[[], dict | None]:
    def check() -> dict | None:
        message = client.get(f"/messages/{message_id}").json()
        return message if message["is_success"] is not None else None

    return check


def new_conversation(client: httpx.Client, **fields: str) -> dict:
    response = client.post("/conversations", json={"title": "A chat", **fields})
    assert response.status_code == 201, response.text
    return response.json()


def model(label: str) -> str:
    """A model_type no other test uses, so list filters see only this test's conversations."""
    return f"{label}-{uuid.uuid4().hex[:8]}"


# Conversations ---------------------------------------------------------------------------


def test_creating_a_conversation_trims_the_title_and_uses_the_default_model(
    client: httpx.Client,
) -> None:
    response = client.post("/conversations", json={"title": "  Trip to Lisbon  "})
    assert response.status_code == 201
    conversation = response.json()
    assert conversation["title"] == "Trip to Lisbon"
    assert conversation["model_type"] == "echo"
    assert set(conversation) == {
        "id",
        "title",
        "model_type",
        "leaf_id",
        "created_at",
        "updated_at",
    }
    assert conversation["leaf_id"] is None


def test_reading_a_conversation_returns_it(client: httpx.Client) -> None:
    conversation = new_conversation(client, model_type="gpt-test")
    assert client.get(f"/conversations/{conversation['id']}").json() == conversation


def test_reading_an_unknown_conversation_is_404(client: httpx.Client) -> None:
    response = client.get("/conversations/2000000000")
    assert response.status_code == 404
    assert response.json() == {"detail": "Conversation not found"}


def test_list_shows_newest_activity_first(client: httpx.Client) -> None:
    label = model("order")
    first, second, third = (
        new_conversation(client, model_type=label) for _ in range(3)
    )
    client.patch(f"/conversations/{first['id']}", json={"title": "touched"})
    listed = client.get("/conversations", params={"model_type": label}).json()
    assert [c["id"] for c in listed] == [first["id"], third["id"], second["id"]]


def test_list_pages_with_skip_and_take(client: httpx.Client) -> None:
    label = model("paging")
    ids = [new_conversation(client, model_type=label)["id"] for _ in range(5)]
    page = client.get(
        "/conversations", params={"model_type": label, "skip": 1, "take": 2}
    ).json()
    assert [c["id"] for c in page] == [ids[3], ids[2]]


def test_list_filters_by_model_type_exactly(client: httpx.Client) -> None:
    label = model("filter")
    wanted = new_conversation(client, model_type=label)
    new_conversation(client, model_type=label + "-other")
    assert client.get("/conversations", params={"model_type": label}).json() == [wanted]


def test_list_without_a_model_type_filter_shows_every_model(
    client: httpx.Client,
) -> None:
    newest = [new_conversation(client, model_type=model(m))["id"] for m in ("a", "b")]
    for params in ({}, {"model_type": ""}):
        assert [
            c["id"]
            for c in client.get("/conversations", params={**params, "take": 2}).json()
        ] == newest[::-1]


@pytest.mark.parametrize(
    "params",
    [{"take": 0}, {"take": 101}, {"skip": -1}, {"take": "ten"}, {"skip": 2**40}],
)
def test_list_rejects_paging_out_of_bounds(client: httpx.Client, params: dict) -> None:
    response = client.get("/conversations", params=params)
    assert response.status_code == 422
    assert response.json()["detail"]


def test_put_replaces_the_conversation_and_moves_only_updated_at(
    client: httpx.Client,
) -> None:
    before = new_conversation(client)
    response = client.put(
        f"/conversations/{before['id']}", json={"title": "New", "model_type": "gpt-x"}
    )
    assert response.status_code == 202
    after = response.json()
    assert (after["title"], after["model_type"]) == ("New", "gpt-x")
    assert after["created_at"] == before["created_at"]
    assert after["updated_at"] > before["updated_at"]
    assert client.get(f"/conversations/{before['id']}").json() == after


def test_put_needs_every_field(client: httpx.Client) -> None:
    conversation = new_conversation(client)
    response = client.put(
        f"/conversations/{conversation['id']}", json={"title": "Only a title"}
    )
    assert response.status_code == 422
    assert client.get(f"/conversations/{conversation['id']}").json() == conversation


def test_patch_changes_only_the_fields_sent(client: httpx.Client) -> None:
    before = new_conversation(client, model_type="keep-me")
    response = client.patch(f"/conversations/{before['id']}", json={"title": "Renamed"})
    assert response.status_code == 200
    after = response.json()
    assert (after["title"], after["model_type"]) == ("Renamed", "keep-me")
    assert after["updated_at"] > before["updated_at"]
    assert after["created_at"] == before["created_at"]


@pytest.mark.parametrize(
    "body", [{"title": None}, {"model_type": None}, {"title": "   "}]
)
def test_patch_cannot_blank_a_field(client: httpx.Client, body: dict) -> None:
    conversation = new_conversation(client)
    assert (
        client.patch(f"/conversations/{conversation['id']}", json=body).status_code
        == 422
    )
    assert client.get(f"/conversations/{conversation['id']}").json() == conversation


def test_deleting_a_conversation_deletes_its_messages(client: httpx.Client) -> None:
    conversation = new_conversation(client)
    message = client.post(
        f"/conversations/{conversation['id']}/messages",
        json={"prompt_content": "q", "response_content": "a"},
    ).json()
    response = client.delete(f"/conversations/{conversation['id']}")
    assert response.status_code == 204
    assert response.content == b""
    assert client.get(f"/messages/{message['id']}").status_code == 404
    assert client.delete(f"/conversations/{conversation['id']}").status_code == 404


@pytest.mark.parametrize(
    "title",
    [
        "",
        "   ",
        "x" * 201,
        42,
        None,
        ["a list"],
        "nul \x00 inside",
        "lone \ud800 surrogate",
    ],
    ids=[
        "empty",
        "whitespace",
        "201-chars",
        "number",
        "null",
        "list",
        "nul",
        "surrogate",
    ],
)
def test_bad_titles_are_rejected_and_change_nothing(
    client: httpx.Client, title: object
) -> None:
    label = model("bad-title")
    conversation = new_conversation(client, model_type=label)
    # httpx would refuse to encode a lone surrogate; json.dumps writes it as \ud800.
    body = json.dumps({"title": title, "model_type": label})
    for method in ("POST", "PUT"):
        url = (
            "/conversations"
            if method == "POST"
            else f"/conversations/{conversation['id']}"
        )
        response = client.request(
            method, url, content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422, response.text
        assert response.json()["detail"]
    assert client.get(f"/conversations/{conversation['id']}").json() == conversation
    assert client.get("/conversations", params={"model_type": label}).json() == [
        conversation
    ]


def test_a_title_of_200_characters_after_trimming_is_accepted(
    client: httpx.Client,
) -> None:
    response = client.post("/conversations", json={"title": "  " + "x" * 200 + "  "})
    assert response.status_code == 201
    assert response.json()["title"] == "x" * 200


@pytest.mark.parametrize(
    "content",
    [b"not json", b'["a", "list"]', b'{"title": "unclosed', b""],
    ids=["text", "array", "truncated", "empty"],
)
def test_malformed_bodies_are_rejected(client: httpx.Client, content: bytes) -> None:
    response = client.post(
        "/conversations", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["detail"]


@pytest.mark.parametrize(
    "path",
    [
        "/conversations/abc",
        "/conversations/1.5",
        "/conversations/99999999999",
        "/messages/-1",
    ],
)
def test_ids_that_are_not_small_positive_integers_are_rejected(
    client: httpx.Client, path: str
) -> None:
    for method in ("GET", "DELETE"):
        response = client.request(method, path)
        assert response.status_code == 422
        assert response.json()["detail"]


def test_a_nul_in_the_model_type_filter_is_rejected(client: httpx.Client) -> None:
    assert (
        client.get("/conversations", params={"model_type": "a\x00b"}).status_code == 422
    )


def test_quotes_and_semicolons_in_titles_are_stored_as_given(
    client: httpx.Client,
) -> None:
    title = 'Robert\'); DROP TABLE conversations;-- "quoted" `tick` 😀'
    conversation = new_conversation(client, title=title)
    assert client.get(f"/conversations/{conversation['id']}").json()["title"] == title


# Messages --------------------------------------------------------------------------------


def add_message(client: httpx.Client, conversation_id: int, **fields: object) -> dict:
    body = {"prompt_content": "question", "response_content": "answer", **fields}
    response = client.post(f"/conversations/{conversation_id}/messages", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def test_a_message_is_stored_as_given(client: httpx.Client) -> None:
    conversation = new_conversation(client)
    fields = {
        "prompt_tokens": 3,
        "response_tokens": 5,
        "total_tokens": 8,
        "is_success": True,
        "status_code": 200,
    }
    message = add_message(client, conversation["id"], **fields)
    assert message == client.get(f"/messages/{message['id']}").json()
    assert message["conversation_id"] == conversation["id"]
    assert {key: message[key] for key in fields} == fields
    assert (message["prompt_content"], message["response_content"]) == (
        "question",
        "answer",
    )


def test_optional_message_fields_default_to_null(client: httpx.Client) -> None:
    message = add_message(client, new_conversation(client)["id"])
    for key in (
        "prompt_tokens",
        "response_tokens",
        "total_tokens",
        "is_success",
        "status_code",
    ):
        assert message[key] is None


def test_a_new_message_moves_its_conversations_updated_at(client: httpx.Client) -> None:
    conversation = new_conversation(client)
    add_message(client, conversation["id"])
    assert (
        client.get(f"/conversations/{conversation['id']}").json()["updated_at"]
        > conversation["updated_at"]
    )


def test_messages_list_oldest_first_in_pages(client: httpx.Client) -> None:
    conversation = new_conversation(client)
    ids = [
        add_message(client, conversation["id"], prompt_content=f"q{i}")["id"]
        for i in range(5)
    ]
    url = f"/conversations/{conversation['id']}/messages"
    assert [m["id"] for m in client.get(url).json()] == ids
    assert [
        m["id"] for m in client.get(url, params={"skip": 3, "take": 2}).json()
    ] == ids[3:]


@pytest.mark.parametrize("params", [{"take": 0}, {"take": 101}, {"skip": -1}])
def test_messages_list_rejects_paging_out_of_bounds(
    client: httpx.Client, params: dict
) -> None:
    conversation = new_conversation(client)
    assert (
        client.get(
            f"/conversations/{conversation['id']}/messages", params=params
        ).status_code
        == 422
    )


def test_messages_of_an_unknown_conversation_are_404(client: httpx.Client) -> None:
    assert client.get("/conversations/2000000000/messages").json() == {
        "detail": "Conversation not found"
    }
    response = client.post(
        "/conversations/2000000000/messages",
        json={"prompt_content": "q", "response_content": "a"},
    )
    assert response.status_code == 404


def test_reading_an_unknown_message_is_404(client: httpx.Client) -> None:
    response = client.get("/messages/2000000000")
    assert response.status_code == 404
    assert response.json() == {"detail": "Message not found"}


def test_put_replaces_a_message_and_moves_its_conversations_updated_at(
    client: httpx.Client,
) -> None:
    conversation = new_conversation(client)
    message = add_message(client, conversation["id"], is_success=True)
    touched = client.get(f"/conversations/{conversation['id']}").json()["updated_at"]
    response = client.put(
        f"/messages/{message['id']}",
        json={"prompt_content": "q2", "response_content": "a2"},
    )
    assert response.status_code == 202
    replaced = response.json()
    assert (
        replaced["prompt_content"],
        replaced["response_content"],
        replaced["is_success"],
    ) == ("q2", "a2", None)
    assert replaced["created_at"] == message["created_at"]
    assert replaced["updated_at"] > message["updated_at"]
    assert (
        client.get(f"/conversations/{conversation['id']}").json()["updated_at"]
        > touched
    )


def test_deleting_a_message_removes_it_and_moves_its_conversations_updated_at(
    client: httpx.Client,
) -> None:
    conversation = new_conversation(client)
    message = add_message(client, conversation["id"])
    touched = client.get(f"/conversations/{conversation['id']}").json()["updated_at"]
    assert client.delete(f"/messages/{message['id']}").status_code == 204
    assert client.get(f"/messages/{message['id']}").status_code == 404
    assert client.delete(f"/messages/{message['id']}").status_code == 404
    assert (
        client.get(f"/conversations/{conversation['id']}").json()["updated_at"]
        > touched
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt_content": None},
        {"prompt_content": 5},
        {"response_content": "nul \x00"},
        {"prompt_content": "lone \udfff"},
        {"prompt_tokens": -1},
        {"total_tokens": 2**31},
        {"is_success": "maybe"},
        {"status_code": 1000},
    ],
    ids=[
        "null",
        "number",
        "nul",
        "surrogate",
        "negative-count",
        "huge-count",
        "not-bool",
        "bad-status",
    ],
)
def test_bad_message_fields_are_rejected_and_change_nothing(
    client: httpx.Client, fields: dict
) -> None:
    conversation = new_conversation(client)
    message = add_message(client, conversation["id"])
    body = json.dumps({"prompt_content": "q", "response_content": "a", **fields})
    headers = {"Content-Type": "application/json"}
    for method, url in (
        ("POST", f"/conversations/{conversation['id']}/messages"),
        ("PUT", f"/messages/{message['id']}"),
    ):
        response = client.request(method, url, content=body, headers=headers)
        assert response.status_code == 422, response.text
    assert client.get(f"/conversations/{conversation['id']}/messages").json() == [
        message
    ]
    assert (
        client.get(f"/conversations/{conversation['id']}").json()["updated_at"]
        == message["created_at"]
    )


def test_long_texts_round_trip_byte_for_byte(client: httpx.Client) -> None:
    conversation = new_conversation(client)
    # Over 200 kB each, with quotes, backslashes, line ends and characters of every width.
    prompt = "ünïcødé 😀 'quotes'; \"double\" \\ back\nslash\r\n\t" * 4000
    reply = "".join(chr(0x20 + i % 0x2FF0) for i in range(200_000))
    message = add_message(
        client, conversation["id"], prompt_content=prompt, response_content=reply
    )
    stored = client.get(f"/messages/{message['id']}").json()
    assert (stored["prompt_content"], stored["response_content"]) == (prompt, reply)


# The service -----------------------------------------------------------------------------


def test_health_says_ok_and_head_answers_like_get_without_a_body(
    client: httpx.Client,
) -> None:
    # Every fixture waits for its 200; what it says, and HEAD, only here. Its 503 while the
    # database is down is in the tests of database faults.
    assert client.get("/health").json() == {"status": "ok"}
    response = client.head("/health")
    assert (response.status_code, response.content) == (200, b"")


def test_the_app_starts_with_no_configuration_on_a_sqlite_file_in_the_working_directory(
    tmp_path: Path,
) -> None:
    process, log = launch(["--port", "0"], {}, tmp_path)
    try:
        url = listening_url(process, log)
        wait_healthy(url, process, log)
        conversation = httpx.post(f"{url}/conversations", json={"title": "hi"}).json()
        assert conversation["model_type"] == "echo"
        assert (tmp_path / "chat.db").exists()
    finally:
        stop(process)


def test_migrations_upgrade_check_and_downgrade_from_the_command_line(
    database: Database, tmp_path: Path
) -> None:
    for args in (
        ["upgrade", "head"],
        ["check"],
        ["downgrade", "base"],
        ["upgrade", "head"],
        ["check"],
    ):
        result = alembic(PROJECT / "alembic.ini", database.url, *args, workdir=tmp_path)
        assert result.returncode == 0, result.stderr


API_KEY = "s3cret-test-key-7f3a"


@pytest.fixture(scope="module")
def guarded(start_app: Callable[..., Server]) -> Server:
    return start_app(API_KEY=API_KEY)


@pytest.fixture(scope="module")
def capped(start_app: Callable[..., Server]) -> Server:
    """The app with every limit and addition to a turn set (one app for their tests)."""
    return start_app(
        MAX_TOKENS="20",
        MAX_PROMPT_CHARS="100",
        HISTORY_TURNS="2",
        SYSTEM_PROMPT="Be brief.",  # not for /v1 calls, which bring their own messages
    )


@pytest.fixture(scope="module")
def one_live_reply(start_app: Callable[..., Server]) -> Server:
    return start_app(MAX_LIVE_REPLIES="1")


def every_operation(openapi: dict) -> Iterator[tuple[str, str]]:
    ids = {"{conversation_id}": "1", "{message_id}": "1", "{response_id}": "resp_1"}
    for path, operations in openapi["paths"].items():
        for name, value in ids.items():
            path = path.replace(name, value)
        for method in operations:
            yield method.upper(), path


# Every operation of the API but /health, as every_operation() lists them. A new endpoint goes
# here too: the tests of the API key and of the browser guard then cover it.
API_OPERATIONS = {
    ("GET", "/conversations"),
    ("POST", "/conversations"),
    ("GET", "/conversations/1"),
    ("PUT", "/conversations/1"),
    ("PATCH", "/conversations/1"),
    ("DELETE", "/conversations/1"),
    ("GET", "/conversations/1/messages"),
    ("POST", "/conversations/1/messages"),
    ("GET", "/messages/1"),
    ("PUT", "/messages/1"),
    ("DELETE", "/messages/1"),
    ("GET", "/text/generate/stream"),
    ("POST", "/text/generate/stream"),
    ("GET", "/messages/1/stream"),
    ("POST", "/messages/1/stop"),
    ("POST", "/messages/1/regenerate"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/responses/resp_1"),
    ("POST", "/v1/responses/resp_1/cancel"),
    ("DELETE", "/v1/responses/resp_1"),
    ("GET", "/v1/responses/resp_1/input_items"),
    ("GET", "/search"),
    ("GET", "/conversations/1/export"),
    ("GET", "/export"),
    ("POST", "/import"),
}


def test_with_an_api_key_every_endpoint_but_health_and_docs_needs_the_bearer_token(
    guarded: Server,
) -> None:
    with httpx.Client(base_url=guarded.url, timeout=10) as client:
        openapi = client.get("/openapi.json")
        assert openapi.status_code == 200
        assert client.get("/docs").status_code == 200
        assert client.get("/health").status_code == 200
        operations = [
            op for op in every_operation(openapi.json()) if op[1] != "/health"
        ]
        assert set(operations) == API_OPERATIONS
        for method, path in operations:
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": API_KEY},
            ):
                response = client.request(
                    method, path, headers=headers, params={"prompt": "hi"}
                )
                assert response.status_code == 401, (method, path, headers)
                if path.startswith("/v1/"):  # OpenAI's error shape, for OpenAI clients
                    assert response.json()["error"]["message"]
                else:
                    assert response.json()["detail"]
        ok = client.get(
            "/conversations", headers={"Authorization": f"Bearer {API_KEY}"}
        )
        assert ok.status_code == 200


def test_a_rejected_stream_stores_nothing(
    guarded: Server, client: httpx.Client
) -> None:
    before = client.get("/conversations", params={"take": 1}).json()
    with httpx.Client(base_url=guarded.url, timeout=10) as unauthorized:
        response, _ = generate(unauthorized, prompt="hello")
    assert response.status_code == 401
    assert client.get("/conversations", params={"take": 1}).json() == before


def test_the_api_key_appears_neither_in_the_openapi_document_nor_in_the_logs(
    guarded: Server,
) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    openapi = httpx.get(f"{guarded.url}/openapi.json").text
    httpx.post(f"{guarded.url}/conversations", json={"title": "x"}, headers=headers)
    httpx.get(
        f"{guarded.url}/conversations", headers={"Authorization": "Bearer not-it"}
    )
    assert API_KEY not in openapi
    assert API_KEY not in guarded.output()


@pytest.fixture
def postgres_outage(database: Database) -> Iterator[Callable[[bool], None]]:
    """Call with True to make the module's Postgres database refuse and drop connections, False to end it."""
    if database.url.startswith("sqlite"):
        pytest.skip("a SQLite file has no server that can go away")
    with postgres_admin() as admin:

        def outage(on: bool) -> None:
            admin.execute(
                f'ALTER DATABASE "{database.name}" ALLOW_CONNECTIONS {"false" if on else "true"}'
            )
            if on:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    [database.name],
                )

        try:
            yield outage
        finally:
            outage(False)


def test_while_the_database_is_down_every_endpoint_answers_503_quickly_then_recovers(
    postgres_outage: Callable[[bool], None], client: httpx.Client
) -> None:
    conversation = new_conversation(client)
    requests = [
        ("GET", "/health", None),
        ("GET", "/conversations", None),
        ("GET", f"/conversations/{conversation['id']}", None),
        ("POST", "/conversations", {"title": "x"}),
        ("PATCH", f"/conversations/{conversation['id']}", {"title": "y"}),
        ("GET", "/text/generate/stream?prompt=hi", None),
    ]
    postgres_outage(True)
    for method, path, body in requests:
        started = time.monotonic()
        response = client.request(method, path, json=body)
        assert (response.status_code, response.json()) == (
            503,
            {"detail": "Database unavailable"},
        ), (method, path)
        # The contract's bound (generous for a busy machine); unbounded, a request would
        # wait for the pool (30 s) or the OS.
        assert time.monotonic() - started < 10
    postgres_outage(False)
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get(f"/conversations/{conversation['id']}").json() == conversation


def test_three_workers_start_together_on_an_empty_postgres_database(
    tmp_path: Path,
) -> None:
    with postgres_admin() as admin:
        name = f"chat_test_{uuid.uuid4().hex[:12]}"
        admin.execute(f'CREATE DATABASE "{name}"')
        url = make_url(POSTGRES_URL).set(database=name).render_as_string(False)
        process, log = launch(
            ["--port", "0", "--workers", "3"],
            {"DATABASE_URL": url},
            tmp_path,
        )
        try:
            wait_for(
                lambda: (
                    log.read_text().count("Application startup complete") == 3
                    or process.poll()
                ),
                60,
            )
            assert log.read_text().count("Application startup complete") == 3, (
                log.read_text()
            )
            assert "Traceback" not in log.read_text()
        finally:
            stop(process)
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


# Generation ------------------------------------------------------------------------------


def test_echo_streams_the_prompt_word_by_word_and_stores_the_turn(
    client: httpx.Client,
) -> None:
    response, events = generate(client, prompt="Hello there,  world!")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert [name for name, _ in events] == [
        "start",
        "message",
        "message",
        "message",
        "done",
    ]
    start, done = events[0][1], events[-1][1]
    assert int(response.headers["x-conversation-id"]) == start["conversation_id"]
    assert reply_text(events) == "Hello there,  world!"
    assert done == client.get(f"/messages/{start['message_id']}").json()
    assert (done["is_success"], done["status_code"]) == (True, 200)
    assert (done["prompt_tokens"], done["response_tokens"], done["total_tokens"]) == (
        3,
        3,
        6,
    )


def test_a_stream_without_a_conversation_starts_one_with_the_default_model(
    client: httpx.Client,
) -> None:
    _, events = generate(client, prompt="Plan a   trip\nto Lisbon")
    conversation_id = events[0][1]["conversation_id"]
    conversation = client.get(f"/conversations/{conversation_id}").json()
    assert conversation["model_type"] == "echo"
    assert conversation["title"] == "Plan a trip to Lisbon"
    messages = client.get(f"/conversations/{conversation_id}/messages").json()
    assert [m["id"] for m in messages] == [events[0][1]["message_id"]]


def test_post_streams_like_get_into_an_existing_conversation(
    client: httpx.Client,
) -> None:
    conversation = new_conversation(client)
    body = {"prompt": "one two", "conversation_id": conversation["id"]}
    with client.stream("POST", "/text/generate/stream", json=body) as response:
        events = list(iter_events(response))
    assert response.headers["x-conversation-id"] == str(conversation["id"])
    assert events[0] == (
        "start",
        {"conversation_id": conversation["id"], "message_id": events[-1][1]["id"]},
    )
    assert reply_text(events) == "one two"
    assert events[-1][0] == "done"
    touched = client.get(f"/conversations/{conversation['id']}").json()
    assert touched["updated_at"] == events[-1][1]["updated_at"]


def test_the_prompt_is_stored_before_the_start_event(client: httpx.Client) -> None:
    conversation = new_conversation(client, model_type="fake:pieces=3:first_ms=1000")
    params = {"prompt": "slow one", "conversation_id": conversation["id"]}
    with client.stream("GET", "/text/generate/stream", params=params) as response:
        events = iter_events(response)
        name, start = next(events)
        stored = client.get(f"/messages/{start['message_id']}").json()
        assert name == "start"
        assert (
            stored["prompt_content"],
            stored["is_success"],
            stored["status_code"],
        ) == ("slow one", None, None)
        assert [name for name, _ in events][-1] == "done"


@pytest.mark.parametrize(
    "params",
    [
        {"prompt": ""},
        {"prompt": "  \n\t "},
        {},
        {"prompt": "nul \x00"},
        {"prompt": "hi", "conversation_id": "abc"},
    ],
    ids=["empty", "whitespace", "missing", "nul", "bad-conversation-id"],
)
def test_bad_stream_requests_are_422_before_any_byte_and_store_nothing(
    client: httpx.Client, params: dict
) -> None:
    newest = client.get("/conversations", params={"take": 1}).json()
    response, _ = generate(client, **params)
    assert response.status_code == 422
    assert response.json()["detail"]
    assert client.get("/conversations", params={"take": 1}).json() == newest


def test_a_prompt_over_max_prompt_chars_is_422_and_stores_nothing(
    capped: Server,
) -> None:
    with httpx.Client(base_url=capped.url, timeout=10) as client:
        newest = client.get("/conversations", params={"take": 1}).json()
        assert generate(client, prompt="x" * 101)[0].status_code == 422
        response = client.post("/text/generate/stream", json={"prompt": "x" * 101})
        assert response.status_code == 422
        assert "MAX_PROMPT_CHARS" in response.text
        assert client.get("/conversations", params={"take": 1}).json() == newest
        assert generate(client, prompt="x" * 100)[0].status_code == 200


def test_a_stream_into_an_unknown_conversation_is_404(client: httpx.Client) -> None:
    response, _ = generate(client, prompt="hi", conversation_id=2000000000)
    assert (response.status_code, response.json()) == (
        404,
        {"detail": "Conversation not found"},
    )


def test_a_model_reply_streams_and_is_stored_with_its_usage(
    client: httpx.Client, llm_requests: list[dict]
) -> None:
    conversation = new_conversation(client, model_type="fake:pieces=4")
    _, events = generate(
        client, prompt="count to four", conversation_id=conversation["id"]
    )
    assert reply_text(events) == "w0 w1 w2 w3 "
    done = events[-1][1]
    assert events[-1][0] == "done"
    assert (done["response_content"], done["is_success"], done["status_code"]) == (
        "w0 w1 w2 w3 ",
        True,
        200,
    )
    assert (done["prompt_tokens"], done["response_tokens"], done["total_tokens"]) == (
        7,
        4,
        11,
    )
    assert done == client.get(f"/messages/{done['id']}").json()
    sent = llm_requests[-1]
    assert (sent["model"], sent["stream"], sent["stream_options"]) == (
        "fake:pieces=4",
        True,
        {"include_usage": True},
    )
    assert "max_tokens" not in sent


def test_usage_the_model_does_not_report_is_stored_as_null(
    client: httpx.Client,
) -> None:
    conversation = new_conversation(client, model_type="fake:pieces=2:usage=0")
    _, events = generate(client, prompt="hi", conversation_id=conversation["id"])
    done = events[-1][1]
    assert (
        done["is_success"],
        done["prompt_tokens"],
        done["response_tokens"],
        done["total_tokens"],
    ) == (
        True,
        None,
        None,
        None,
    )


def test_a_reply_cut_at_the_token_limit_is_a_success(client: httpx.Client) -> None:
    conversation = new_conversation(client, model_type="fake:pieces=2:finish=length")
    _, events = generate(client, prompt="hi", conversation_id=conversation["id"])
    assert events[-1][0] == "done"
    assert events[-1][1]["is_success"] is True


def test_history_is_the_system_prompt_then_the_last_successful_turns_then_the_prompt(
    capped: Server, llm_requests: list[dict]
) -> None:
    with httpx.Client(base_url=capped.url, timeout=10) as client:
        conversation = new_conversation(client, model_type="fake:pieces=1")
        for i, success in enumerate([True, True, False, True, None]):
            add_message(
                client,
                conversation["id"],
                prompt_content=f"q{i}",
                response_content=f"a{i}",
                is_success=success,
            )
        generate(client, prompt="and now?", conversation_id=conversation["id"])
    assert llm_requests[-1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q3"},
        {"role": "assistant", "content": "a3"},
        {"role": "user", "content": "and now?"},
    ]
    assert llm_requests[-1]["max_tokens"] == 20


def test_a_generated_reply_becomes_history_for_the_next_turn(
    client: httpx.Client, llm_requests: list[dict]
) -> None:
    conversation = new_conversation(client, model_type="fake:pieces=2")
    generate(client, prompt="first", conversation_id=conversation["id"])
    generate(client, prompt="second", conversation_id=conversation["id"])
    assert llm_requests[-1]["messages"] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "w0 w1 "},
        {"role": "user", "content": "second"},
    ]


def test_a_new_conversation_gets_the_llms_title_after_a_placeholder(
    start_app: Callable[..., Server], llm_requests: list[dict]
) -> None:
    app = start_app(DEFAULT_MODEL="fake:pieces=3:first_ms=700")
    with httpx.Client(base_url=app.url, timeout=10) as client:
        with client.stream(
            "GET", "/text/generate/stream", params={"prompt": "Where is   Lisbon?"}
        ) as response:
            events = iter_events(response)
            conversation_id = next(events)[1]["conversation_id"]
            url = f"/conversations/{conversation_id}"
            assert client.get(url).json()["title"] == "Where is Lisbon?"
            assert [name for name, _ in events][-1] == "done"
        wait_for(lambda: client.get(url).json()["title"] == "w0 w1 w2")
    title_request = next(r for r in llm_requests if not r.get("stream"))
    assert title_request["messages"][-1] == {
        "role": "user",
        "content": "Where is   Lisbon?",
    }


def test_an_untitled_conversation_is_titled_by_its_next_turn_and_a_named_one_is_not(
    client: httpx.Client, llm_requests: list[dict]
) -> None:
    untitled = new_conversation(
        client, title="New conversation", model_type="fake:pieces=2"
    )
    named = new_conversation(client, title="Lisbon", model_type="fake:pieces=2")
    generate(client, prompt="Plan a weekend", conversation_id=untitled["id"])
    generate(client, prompt="Plan a weekend", conversation_id=named["id"])
    url = f"/conversations/{untitled['id']}"
    wait_for(lambda: client.get(url).json()["title"] == "w0 w1")
    assert client.get(f"/conversations/{named['id']}").json()["title"] == "Lisbon"
    title_calls = [r for r in llm_requests if not r.get("stream")]
    assert [r["messages"][-1]["content"] for r in title_calls] == ["Plan a weekend"]


def test_a_failed_title_call_keeps_the_placeholder_and_the_reply(
    start_app: Callable[..., Server], llm_requests: list[dict]
) -> None:
    app = start_app(DEFAULT_MODEL="fake:pieces=2:title_fail=1")
    with httpx.Client(base_url=app.url, timeout=10) as client:
        _, events = generate(client, prompt="Name this chat")
        # The outcome of the title call is in the log: wait for it, not for a while.
        wait_for(lambda: "No title for conversation" in app.output())
        conversation = client.get(
            f"/conversations/{events[0][1]['conversation_id']}"
        ).json()
        assert conversation["title"] == "Name this chat"
        assert events[-1][0] == "done"
        assert client.get("/health").status_code == 200


def error_event(events: list[tuple[str, dict]]) -> dict:
    name, data = events[-1]
    assert name == "error"
    assert set(data) == {"detail", "status_code"}
    return data


@pytest.mark.parametrize("status", [429, 500, 401])
def test_an_upstream_error_status_ends_the_turn_with_that_status(
    client: httpx.Client, status: int
) -> None:
    conversation = new_conversation(client, model_type=f"fake:fail={status}")
    _, events = generate(client, prompt="hi", conversation_id=conversation["id"])
    assert error_event(events)["status_code"] == status
    stored = client.get(f"/messages/{events[0][1]['message_id']}").json()
    assert (
        stored["is_success"],
        stored["status_code"],
        stored["response_content"],
    ) == (False, status, "")


def test_an_upstream_status_past_599_is_a_broken_reply_502(
    client: httpx.Client,
) -> None:
    conversation = new_conversation(client, model_type="fake:fail=799")
    _, events = generate(client, prompt="hi", conversation_id=conversation["id"])
    assert error_event(events)["status_code"] == 502
    stored = client.get(f"/messages/{events[0][1]['message_id']}").json()
    assert (stored["is_success"], stored["status_code"]) == (False, 502)


def test_a_reply_that_breaks_off_is_502_with_the_partial_reply_stored(
    client: httpx.Client,
) -> None:
    conversation = new_conversation(client, model_type="fake:pieces=5:abort=2")
    _, events = generate(client, prompt="hi", conversation_id=conversation["id"])
    assert reply_text(events) == "w0 w1 "
    assert error_event(events)["status_code"] == 502
    stored = client.get(f"/messages/{events[0][1]['message_id']}").json()
    assert (
        stored["is_success"],
        stored["status_code"],
        stored["response_content"],
    ) == (False, 502, "w0 w1 ")


@pytest.mark.parametrize(
    "model_type",
    ["fake:pieces=2:finish=none", "fake:pieces=0:finish=none:usage=0"],
    ids=["partial", "empty"],
)
def test_a_reply_that_ends_without_a_finish_reason_is_502(
    client: httpx.Client, model_type: str
) -> None:
    conversation = new_conversation(client, model_type=model_type)
    _, events = generate(client, prompt="hi", conversation_id=conversation["id"])
    assert error_event(events)["status_code"] == 502
    stored = client.get(f"/messages/{events[0][1]['message_id']}").json()
    assert (
        stored["is_success"],
        stored["status_code"],
        stored["response_content"],
    ) == (
        False,
        502,
        reply_text(events),
    )


def test_an_unreachable_upstream_is_502(start_app: Callable[..., Server]) -> None:
    # A port bound but never listening refuses connections, and no server of a parallel
    # test can take it meanwhile.
    with socket.socket() as closed, httpx.Client(timeout=10) as client:
        closed.bind(("127.0.0.1", 0))
        app = start_app(
            OPENAI_BASE_URL=f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
        )
        client.base_url = app.url
        conversation = new_conversation(client, model_type="gpt-test")
        _, events = generate(client, prompt="hi", conversation_id=conversation["id"])
        assert error_event(events)["status_code"] == 502
        message_id = events[0][1]["message_id"]
        assert client.get(f"/messages/{message_id}").json()["status_code"] == 502


@pytest.fixture(scope="module")
def impatient(start_app: Callable[..., Server]) -> Server:
    return start_app(OPENAI_TIMEOUT="1")


@pytest.mark.parametrize(
    "model_type",
    ["fake:hang=1", "fake:pieces=3:gap_ms=30000"],
    ids=["silent", "stalls"],
)
def test_an_upstream_silent_for_openai_timeout_is_504(
    impatient: Server, model_type: str
) -> None:
    with httpx.Client(base_url=impatient.url, timeout=60) as client:
        conversation = new_conversation(client, model_type=model_type)
        started = time.monotonic()
        _, events = generate(client, prompt="hi", conversation_id=conversation["id"])
        # OPENAI_TIMEOUT is 1 s; the model would answer in an hour, or send its next piece
        # in 30 s: a ceiling of 15 s is generous for a busy machine and still tells them apart.
        assert time.monotonic() - started < 15
        assert error_event(events)["status_code"] == 504
        stored = client.get(f"/messages/{events[0][1]['message_id']}").json()
        assert (
            stored["is_success"],
            stored["status_code"],
            stored["response_content"],
        ) == (
            False,
            504,
            reply_text(events),
        )


@pytest.fixture
def long_reply(client: httpx.Client) -> dict:
    """Stream parameters for a turn whose reply takes ten seconds: 100 pieces, 100 ms apart."""
    conversation = new_conversation(client, model_type="fake:pieces=100:gap_ms=100")
    return {"prompt": "long one", "conversation_id": conversation["id"]}


def read_until(events: Iterator[tuple[str, dict]], chars: int) -> str:
    """Read reply pieces until at least `chars` characters of reply have come."""
    text = ""
    while len(text) < chars:
        name, data = next(events)
        assert name == "message", (name, data)
        text += data["content"]
    return text


def test_sigterm_mid_stream_stores_503_tells_every_client_and_exits_quickly(
    start_app: Callable[..., Server], client: httpx.Client
) -> None:
    doomed = start_app()
    # 100 s of reply: a server that waited for it to end would take that long to exit.
    conversation = new_conversation(client, model_type="fake:pieces=1000:gap_ms=100")
    params = {"prompt": "long one", "conversation_id": conversation["id"]}
    url = f"{doomed.url}/text/generate/stream"
    with httpx.stream("GET", url, params=params, timeout=10) as response:
        events = iter_events(response)
        message_id = next(events)[1]["message_id"]
        seen = read_until(events, 6)
        follow_url = f"{doomed.url}/messages/{message_id}/stream"
        with httpx.stream("GET", follow_url, timeout=10) as follower:
            followed = iter_events(follower)
            next(followed)  # start
            doomed.process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            rest, followed_rest = list(events), list(followed)
    assert error_event(rest)["status_code"] == 503
    assert error_event(followed_rest)["status_code"] == 503
    doomed.process.wait(30)
    assert (
        time.monotonic() - started < 30
    )  # generous for a busy machine, far from 100 s
    stored = client.get(f"/messages/{message_id}").json()
    assert (stored["is_success"], stored["status_code"], stored["live"]) == (
        False,
        503,
        False,
    )
    assert stored["response_content"] == seen + reply_text(rest)
    assert reply_text(followed_rest) == stored["response_content"]


def test_forty_streams_run_at_once_on_the_default_pool_and_are_all_stored(
    server: Server, client: httpx.Client
) -> None:
    conversation = new_conversation(client, model_type="fake:pieces=20:gap_ms=300")
    params = {"prompt": "together", "conversation_id": conversation["id"]}

    async def one_stream(http: httpx.AsyncClient) -> tuple[float, list, float]:
        async with http.stream(
            "GET", "/text/generate/stream", params=params
        ) as response:
            lines = response.aiter_lines()
            names = [await anext(lines)]  # event: start
            started = time.monotonic()
            names += [line async for line in lines if line.startswith("event:")]
            return started, names, time.monotonic()

    async def forty_streams() -> list[tuple[float, list, float]]:
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(
            base_url=server.url, timeout=30, limits=limits
        ) as http:
            return await asyncio.gather(*(one_stream(http) for _ in range(40)))

    results = asyncio.run(forty_streams())
    assert all(names == ["event: start", "event: done"] for _, names, _ in results)
    # Had a stream waited for a connection that another held for its whole reply (5.7 s),
    # its start would have come after that reply's end.
    assert max(start for start, _, _ in results) < min(end for *_, end in results)
    stored = client.get(f"/conversations/{conversation['id']}/messages").json()
    assert len(stored) == 40
    assert all(
        m["is_success"] and m["response_content"].endswith("w19 ") for m in stored
    )


def test_a_reply_survives_the_database_going_away_while_it_ends(
    postgres_outage: Callable[[bool], None], server: Server, client: httpx.Client
) -> None:
    conversation = new_conversation(client, model_type="fake:pieces=30:gap_ms=100")
    params = {"prompt": "unlucky", "conversation_id": conversation["id"]}
    with client.stream("GET", "/text/generate/stream", params=params) as response:
        events = iter_events(response)
        message_id = next(events)[1]["message_id"]
        postgres_outage(True)
        # The database is down while the reply runs: its checkpoints fail...
        wait_for(lambda: f"Checkpoint of {message_id} failed" in server.output())
        # ...and the model sends the rest, whose end cannot be stored yet.
        read_until(events, len(words(30)))
        with ThreadPoolExecutor(1) as reader:
            rest = reader.submit(list, events)
            time.sleep(1)
            assert not rest.done()  # the end waits for the database, not gives up
            postgres_outage(False)
            rest = rest.result(15)
    assert rest[-1][0] == "done"
    assert client.get("/health").json() == {"status": "ok"}
    stored = client.get(f"/messages/{message_id}").json()
    assert (stored["response_content"], stored["is_success"]) == (words(30), True)


def test_a_reply_is_stored_whole_when_the_database_drops_the_apps_connections(
    database: Database, client: httpx.Client
) -> None:
    if database.url.startswith("sqlite"):
        pytest.skip("a SQLite file has no server that can drop connections")
    conversation = new_conversation(client, model_type="fake:pieces=10:gap_ms=100")
    params = {"prompt": "restart", "conversation_id": conversation["id"]}
    with client.stream("GET", "/text/generate/stream", params=params) as response:
        events = iter_events(response)
        message_id = next(events)[1]["message_id"]
        read_until(events, 6)
        with postgres_admin() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                [database.name],
            )
        rest = list(events)
    assert rest[-1][0] == "done"
    stored = client.get(f"/messages/{message_id}").json()
    assert (stored["is_success"], stored["response_content"]) == (
        True,
        "".join(f"w{i} " for i in range(10)),
    )


# What a model may send -------------------------------------------------------------------


def test_nul_and_lone_surrogates_from_the_model_are_streamed_and_stored_replaced(
    client: httpx.Client,
) -> None:
    conversation = new_conversation(client, model_type="fake:odd=1")
    _, events = generate(client, prompt="hi", conversation_id=conversation["id"])
    assert events[-1][0] == "done"
    assert reply_text(events) == "a\ufffdb \ufffd\ufffd end"
    stored = client.get(f"/conversations/{conversation['id']}/messages")
    assert stored.status_code == 200
    assert stored.json()[0]["response_content"] == reply_text(events)


def test_a_reply_that_reaches_a_messages_limit_ends_there_as_a_success(
    client: httpx.Client,
) -> None:
    conversation = new_conversation(client, model_type="fake:pieces=5:size=250000")
    _, events = generate(client, prompt="say a lot", conversation_id=conversation["id"])
    assert events[-1][0] == "done"
    assert len(reply_text(events)) == 1_000_000
    stored = client.get(f"/conversations/{conversation['id']}/messages")
    assert stored.status_code == 200
    message = stored.json()[0]
    assert (message["is_success"], message["response_content"]) == (
        True,
        reply_text(events),
    )


def test_usage_that_no_count_can_be_is_stored_as_null(client: httpx.Client) -> None:
    conversation = new_conversation(client, model_type="fake:pieces=2:usage=2")
    _, events = generate(client, prompt="hi", conversation_id=conversation["id"])
    done = events[-1][1]
    assert (done["prompt_tokens"], done["response_tokens"], done["total_tokens"]) == (
        None,
        None,
        None,
    )
    assert client.get(f"/messages/{done['id']}").json() == done


def test_an_upstream_error_reaches_the_client_and_the_log_as_one_short_line(
    server: Server, client: httpx.Client
) -> None:
    conversation = new_conversation(client, model_type="fake:fail=500:long_error=1")
    _, events = generate(client, prompt="hi", conversation_id=conversation["id"])
    error = error_event(events)
    assert error["status_code"] == 500
    assert error["detail"].startswith("The model answered 500: Error code: 500 - Trace")
    assert "\n" not in error["detail"]
    assert len(error["detail"]) <= len("The model answered 500: ") + 300
    assert server.output().count("internal detail") < 20


# Settings refused at start ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value"),
    [("MAX_PROMPT_CHARS", "1000001"), ("API_KEY", "   "), ("DEAD_TURN_SECONDS", "2")],
)
def test_a_setting_the_service_cannot_honour_is_refused_at_start(
    tmp_path: Path, setting: str, value: str
) -> None:
    process, log = launch(["--port", "0"], {setting: value}, tmp_path)
    assert process.wait(60) != 0
    assert setting.lower() in log.read_text().lower()


def test_any_api_key_a_user_can_type_works(start_app: Callable[..., Server]) -> None:
    key = "clé-秘密-🔑"
    app = start_app(API_KEY=key)
    right = {"Authorization": b"Bearer " + key.encode()}
    wrong = {"Authorization": b"Bearer " + "cle-秘密-🔑".encode()}
    assert httpx.get(f"{app.url}/conversations", headers=right).status_code == 200
    assert httpx.get(f"{app.url}/conversations", headers=wrong).status_code == 401


# Strict JSON and other details -----------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt_tokens": True},
        {"total_tokens": 3.0},
        {"is_success": "yes"},
        {"is_success": 1},
        {"status_code": 200.0},
        {"status_code": "200"},
    ],
    ids=[
        "bool-count",
        "float-count",
        "string-bool",
        "int-bool",
        "float-status",
        "string-status",
    ],
)
def test_json_bodies_are_strict_about_numbers_and_booleans(
    client: httpx.Client, fields: dict
) -> None:
    conversation = new_conversation(client)
    body = {"prompt_content": "q", "response_content": "a", **fields}
    response = client.post(f"/conversations/{conversation['id']}/messages", json=body)
    assert response.status_code == 422, response.text
    assert client.get(f"/conversations/{conversation['id']}/messages").json() == []


def test_a_stream_request_body_is_strict_but_the_query_string_is_text(
    client: httpx.Client,
) -> None:
    conversation = new_conversation(client)
    newest = client.get("/conversations", params={"take": 1}).json()
    for conversation_id in (True, float(conversation["id"]), str(conversation["id"])):
        body = {"prompt": "hi", "conversation_id": conversation_id}
        response = client.post("/text/generate/stream", json=body)
        assert response.status_code == 422, conversation_id
    assert client.get("/conversations", params={"take": 1}).json() == newest
    _, events = generate(client, prompt="hi", conversation_id=str(conversation["id"]))
    assert events[0][1]["conversation_id"] == conversation["id"]


BODY_LIMIT = 100_000  # MAX_BODY_BYTES of small_bodies
# A valid body of each endpoint, opened: whitespace up to any size, then "}" closes it.
OPENED_BODIES = {
    "POST /conversations": b'{"title": "big"',
    "POST /text/generate/stream": b'{"prompt": "big"',
    "GET /text/generate/stream?prompt=big": b"",  # a body it does not read
    "POST /v1/chat/completions": b'{"model": "echo", "messages": [{"role": "user", "content": "big"}]',
}


@pytest.fixture(scope="module")
def small_bodies(start_app: Callable[..., Server]) -> Server:
    return start_app(MAX_BODY_BYTES=str(BODY_LIMIT))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("request_line", list(OPENED_BODIES))
def test_a_body_over_max_body_bytes_is_413_before_it_is_read_whole(
    small_bodies: Server, request_line: str, chunked: bool
) -> None:
    before = httpx.get(f"{small_bodies.url}/conversations").json()
    url = httpx.URL(small_bodies.url)
    with socket.create_connection((url.host, url.port), timeout=10) as sock:
        # Declares a terabyte, or streams past the limit; either way never ends the body.
        framing = (
            b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % 10**12
        )
        head = (
            b"%s HTTP/1.1\r\nHost: %s\r\n%s\r\nContent-Type: application/json\r\n\r\n"
        )
        sock.sendall(head % (request_line.encode(), url.netloc, framing))
        body = OPENED_BODIES[request_line] + b" " * (BODY_LIMIT + 1)
        sock.sendall(b"%x\r\n%s\r\n" % (len(body), body) if chunked else body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        refused = json.loads(response.read())
    assert response.status == 413
    if "/v1/" in request_line:
        assert "MAX_BODY_BYTES" in refused["error"]["message"]
    else:
        assert "MAX_BODY_BYTES" in refused["detail"]
    assert httpx.get(f"{small_bodies.url}/conversations").json() == before
    assert "Traceback" not in small_bodies.output()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_of_max_body_bytes_is_read(small_bodies: Server, chunked: bool) -> None:
    opened = OPENED_BODIES["POST /conversations"]
    body = opened + b" " * (BODY_LIMIT - len(opened) - 1) + b"}"
    assert len(body) == BODY_LIMIT
    content = iter([body[:1000], body[1000:]]) if chunked else body
    headers = {"Content-Type": "application/json"}
    response = httpx.post(
        f"{small_bodies.url}/conversations", content=content, headers=headers
    )
    assert response.status_code == 201, response.text
    assert response.json()["title"] == "big"


def run_sql(database: Database, statement: str) -> None:
    """Write to the test's database behind the app's back."""
    if database.url.startswith("sqlite"):
        with sqlite3.connect(database.name) as connection:
            connection.execute(statement)
        return
    url = make_url(POSTGRES_URL).set(drivername="postgresql", database=database.name)
    with psycopg.connect(url.render_as_string(False), autocommit=True) as connection:
        connection.execute(statement)


def test_timestamps_always_have_six_fractional_digits(
    database: Database, client: httpx.Client
) -> None:
    conversation = new_conversation(client)
    whole_second = (
        "'2026-11-24 18:03:09.000000'"
        if database.url.startswith("sqlite")
        else "'2026-11-24 18:03:09+00'"
    )
    run_sql(
        database,
        f"UPDATE conversations SET created_at = {whole_second} WHERE id = {conversation['id']}",
    )
    read = client.get(f"/conversations/{conversation['id']}").json()
    assert read["created_at"] == "2026-11-24T18:03:09.000000Z"
    pattern = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"
    assert re.fullmatch(pattern, read["updated_at"])


@pytest.mark.parametrize(
    "prompt",
    [
        "https://example.com/" + "a" * 80 + " what is this?",
        "我想知道今天北京的天气怎么样以及明天是否会下雨我应该带伞吗还是不用带伞呢" * 3,
    ],
    ids=["url", "chinese"],
)
def test_a_prompt_whose_first_word_is_long_is_titled_with_its_first_characters(
    client: httpx.Client, prompt: str
) -> None:
    _, events = generate(client, prompt=prompt)
    conversation_id = events[0][1]["conversation_id"]
    title = client.get(f"/conversations/{conversation_id}").json()["title"]
    assert title == prompt[:57] + "..."


# Deletes racing writes -------------------------------------------------------------------


def test_writes_racing_a_delete_answer_404_not_500(server: Server) -> None:
    message = {"prompt_content": "q", "response_content": "a"}

    def writes(conversation_id: int, message_id: int) -> list[tuple[str, str, dict]]:
        return [
            ("PATCH", f"/conversations/{conversation_id}", {"title": "t"}),
            (
                "PUT",
                f"/conversations/{conversation_id}",
                {"title": "t", "model_type": "echo"},
            ),
            ("POST", f"/conversations/{conversation_id}/messages", message),
            ("PUT", f"/messages/{message_id}", message),
            (
                "POST",
                "/text/generate/stream",
                {"prompt": "hi", "conversation_id": conversation_id},
            ),
        ]

    async def race(
        http: httpx.AsyncClient, other: httpx.AsyncClient, kind: int
    ) -> tuple:
        conversation = (await http.post("/conversations", json={"title": "x"})).json()
        added = await http.post(
            f"/conversations/{conversation['id']}/messages", json=message
        )
        method, path, body = writes(conversation["id"], added.json()["id"])[kind]
        written, deleted = await asyncio.gather(
            other.request(method, path, json=body),
            http.delete(f"/conversations/{conversation['id']}"),
        )
        return method, path.split("/")[1], written.status_code, deleted.status_code

    async def many_races() -> list[tuple]:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=10) as http,
            httpx.AsyncClient(base_url=server.url, timeout=10) as other,
        ):
            return [await race(http, other, i % 5) for i in range(100)]

    outcomes = asyncio.run(many_races())
    assert {written for _, _, written, _ in outcomes} <= {200, 201, 202, 404}, outcomes
    assert {deleted for *_, deleted in outcomes} == {204}


@pytest.mark.parametrize("deleted", ["conversation", "message"])
def test_deleting_a_turn_while_its_reply_streams_ends_the_stream_with_410(
    server: Server, client: httpx.Client, long_reply: dict, deleted: str
) -> None:
    logged_before = len(server.output())
    with client.stream("GET", "/text/generate/stream", params=long_reply) as response:
        events = iter_events(response)
        ids = next(events)[1]
        read_until(events, 3)
        path = f"/{deleted}s/{ids[f'{deleted}_id']}"
        with httpx.Client(base_url=server.url, timeout=10) as other:
            assert other.delete(path).status_code == 204
        rest = list(events)
    assert error_event(rest) == {
        "detail": "The conversation or the message was deleted",
        "status_code": 410,
    }
    assert client.get(f"/messages/{ids['message_id']}").status_code == 404
    assert "Traceback" not in server.output()[logged_before:]


# Live replies ----------------------------------------------------------------------------


def test_a_client_that_goes_away_mid_stream_does_not_end_the_reply(
    client: httpx.Client,
) -> None:
    conversation = new_conversation(client, model_type="fake:pieces=20:gap_ms=50")
    params = {"prompt": "keep going", "conversation_id": conversation["id"]}
    with client.stream("GET", "/text/generate/stream", params=params) as response:
        events = iter_events(response)
        message_id = next(events)[1]["message_id"]
        read_until(events, 3)
    stored = wait_for(finished_turn(client, message_id))
    assert (stored["is_success"], stored["status_code"], stored["live"]) == (
        True,
        200,
        False,
    )
    assert stored["response_content"] == "".join(f"w{i} " for i in range(20))


def test_forty_replies_whose_clients_all_leave_at_once_all_complete(
    server: Server, client: httpx.Client
) -> None:
    conversation = new_conversation(client, model_type="fake:pieces=20:gap_ms=100")
    params = {"prompt": "abandoned", "conversation_id": conversation["id"]}

    async def leave_after_two_pieces(http: httpx.AsyncClient) -> None:
        async with http.stream(
            "GET", "/text/generate/stream", params=params
        ) as response:
            seen = 0
            async for line in response.aiter_lines():
                seen += line.startswith("data:")
                if seen == 3:  # start and two pieces
                    return

    async def forty_clients() -> None:
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(
            base_url=server.url, timeout=30, limits=limits
        ) as http:
            await asyncio.gather(*(leave_after_two_pieces(http) for _ in range(40)))

    asyncio.run(forty_clients())
    url = f"/conversations/{conversation['id']}/messages"

    def all_ended() -> list[dict] | None:
        messages = client.get(url).json()
        return messages if all(not m["live"] for m in messages) else None

    stored = wait_for(all_ended, 20)
    assert len(stored) == 40
    whole = "".join(f"w{i} " for i in range(20))
    assert [(m["status_code"], m["response_content"]) for m in stored] == [
        (200, whole)
    ] * 40


def test_every_event_carries_an_id_of_message_and_offset(client: httpx.Client) -> None:
    with client.stream(
        "GET", "/text/generate/stream", params={"prompt": "one two three"}
    ) as response:
        lines = list(response.iter_lines())
    message_id = json.loads(lines[1].removeprefix("data:"))["message_id"]
    ids = [line.removeprefix("id:").strip() for line in lines if line.startswith("id:")]
    pieces = [
        json.loads(line.removeprefix("data:"))["content"]
        for line in lines
        if line.startswith('data: {"content"')
    ]
    offsets = [len("".join(pieces[: i + 1])) for i in range(len(pieces))]
    assert ids == [f"{message_id}:{offset}" for offset in [0, *offsets]] + [
        f"{message_id}:end"
    ]
    assert offsets[-1] == len("one two three")
    assert any(line.startswith("retry:") for line in lines[:5])


def test_while_a_reply_streams_its_row_shows_the_last_checkpoint(
    client: httpx.Client, long_reply: dict
) -> None:
    with client.stream("GET", "/text/generate/stream", params=long_reply) as response:
        events = iter_events(response)
        message_id = next(events)[1]["message_id"]
        read_until(events, 40)
        stored = client.get(f"/messages/{message_id}").json()
        client.post(f"/messages/{message_id}/stop")
    assert (stored["live"], stored["is_success"], stored["status_code"]) == (
        True,
        None,
        None,
    )
    assert stored["response_content"]
    assert "".join(f"w{i} " for i in range(100)).startswith(stored["response_content"])


@pytest.mark.parametrize("where", ["this process", "another process"])
def test_stop_ends_the_reply_as_499_with_the_text_so_far_for_every_client(
    server: Server,
    start_app: Callable[..., Server],
    client: httpx.Client,
    long_reply: dict,
    where: str,
) -> None:
    """The follower and the stop go to the process that runs the reply, or to another one on
    the same database (as with `uvicorn --workers N`)."""
    other = server if where == "this process" else start_app()
    with client.stream("GET", "/text/generate/stream", params=long_reply) as response:
        events = iter_events(response)
        message_id = next(events)[1]["message_id"]
        seen = read_until(events, 6)
        with httpx.stream(
            "GET", f"{other.url}/messages/{message_id}/stream", timeout=10
        ) as follower:
            followed = iter_events(follower)
            next(followed)  # start
            first = read_until(followed, 1)
            stop = httpx.post(f"{other.url}/messages/{message_id}/stop", timeout=10)
            followed_rest = list(followed)
        rest = list(events)
    assert stop.status_code == 202
    stopped = stop.json()
    assert (stopped["is_success"], stopped["status_code"], stopped["live"]) == (
        False,
        499,
        False,
    )
    assert stopped == client.get(f"/messages/{message_id}").json()
    assert error_event(rest) == {"detail": "Stopped", "status_code": 499}
    assert error_event(followed_rest) == {"detail": "Stopped", "status_code": 499}
    assert stopped["response_content"] == seen + reply_text(rest)
    assert first + reply_text(followed_rest) == stopped["response_content"]
    assert "w99" not in stopped["response_content"]


def test_stop_on_an_ended_turn_is_409_and_on_an_unknown_message_404(
    client: httpx.Client,
) -> None:
    _, events = generate(client, prompt="short")
    ended = client.post(f"/messages/{events[0][1]['message_id']}/stop")
    assert ended.status_code == 409
    assert ended.json()["detail"]
    imported = add_message(client, new_conversation(client)["id"])
    assert client.post(f"/messages/{imported['id']}/stop").status_code == 409
    unknown = client.post("/messages/2000000000/stop")
    assert (unknown.status_code, unknown.json()) == (
        404,
        {"detail": "Message not found"},
    )


@contextmanager
def row_locked(database: Database, message_id: int) -> Iterator[None]:
    """Hold the message's row (on SQLite, the file) locked for writing, from the test."""
    if database.url.startswith("sqlite"):
        connection = sqlite3.connect(database.name, isolation_level=None)
        connection.execute("BEGIN IMMEDIATE")
    else:
        connection = psycopg.connect(database.url)
        connection.execute(
            "SELECT 1 FROM messages WHERE id = %s FOR UPDATE", [message_id]
        )
    try:
        yield
    finally:
        connection.rollback()
        connection.close()


@pytest.mark.parametrize("where", ["this process", "another process"])
def test_a_stop_racing_the_replys_natural_end_is_409_and_the_reply_is_stored_whole(
    database: Database,
    server: Server,
    start_app: Callable[..., Server],
    client: httpx.Client,
    where: str,
) -> None:
    """The stop comes after the model's last piece, while the reply's end waits to be stored."""
    other = server if where == "this process" else start_app()
    conversation = new_conversation(client, model_type="fake:pieces=3:gap_ms=300")
    params = {"prompt": "racing", "conversation_id": conversation["id"]}
    with (
        ThreadPoolExecutor(1) as pool,
        client.stream("GET", "/text/generate/stream", params=params) as response,
    ):
        events = iter_events(response)
        message_id = next(events)[1]["message_id"]
        with row_locked(database, message_id):
            read_until(events, len("w0 w1 w2 "))
            time.sleep(0.3)  # the model's finish_reason has come
            url = f"{other.url}/messages/{message_id}/stop"
            stop = pool.submit(httpx.post, url, timeout=30)
            time.sleep(0.5)
        rest = list(events)
        stopped = stop.result()
    assert (stopped.status_code, stopped.json()) == (
        409,
        {"detail": "The turn has already ended"},
    )
    assert rest[-1][0] == "done"
    stored = client.get(f"/messages/{message_id}").json()
    assert (stored["status_code"], stored["response_content"]) == (200, "w0 w1 w2 ")


def test_a_follower_joining_mid_reply_ends_with_the_same_text_as_the_starter(
    server: Server, client: httpx.Client
) -> None:
    conversation = new_conversation(client, model_type="fake:pieces=30:gap_ms=50")
    params = {"prompt": "share", "conversation_id": conversation["id"]}
    with client.stream("GET", "/text/generate/stream", params=params) as response:
        events = iter_events(response)
        message_id = next(events)[1]["message_id"]
        seen = read_until(events, 10)
        with httpx.stream(
            "GET", f"{server.url}/messages/{message_id}/stream", timeout=10
        ) as follower:
            followed = list(iter_events(follower))
        started = seen + reply_text(list(events))
    stored = client.get(f"/messages/{message_id}").json()
    assert followed[0] == (
        "start",
        {"conversation_id": conversation["id"], "message_id": message_id},
    )
    assert followed[-1] == ("done", stored)
    assert reply_text(followed) == started == stored["response_content"]


def test_following_an_ended_turn_gives_the_text_past_the_offset_then_its_end(
    client: httpx.Client,
) -> None:
    _, events = generate(client, prompt="all of it")
    message_id = events[0][1]["message_id"]
    url = f"/messages/{message_id}/stream"
    with client.stream("GET", url) as response:
        whole = list(iter_events(response))
    assert [name for name, _ in whole] == ["start", "message", "done"]
    assert reply_text(whole) == "all of it"
    with client.stream("GET", url, params={"offset": 4}) as response:
        assert reply_text(list(iter_events(response))) == "of it"
    with client.stream("GET", url, headers={"Last-Event-ID": f"{message_id}:9"}) as end:
        assert [name for name, _ in iter_events(end)] == ["start", "done"]
    final = client.get(url, headers={"Last-Event-ID": f"{message_id}:end"})
    assert (final.status_code, final.content) == (204, b"")


@pytest.mark.parametrize("offset", ["2147483647", "9999999999"])
def test_a_last_event_id_offset_past_the_text_gets_start_then_the_end(
    client: httpx.Client, offset: str
) -> None:
    _, events = generate(client, prompt="all of it")
    message_id = events[0][1]["message_id"]
    headers = {"Last-Event-ID": f"{message_id}:{offset}"}
    for url in (f"/messages/{message_id}/stream", "/text/generate/stream"):
        with client.stream("GET", url, headers=headers) as response:
            followed = list(iter_events(response))
        assert [name for name, _ in followed] == ["start", "done"]


def test_a_failed_or_imported_turn_is_followed_as_ended(client: httpx.Client) -> None:
    conversation = new_conversation(client)
    failed = add_message(client, conversation["id"], is_success=False)
    imported = add_message(client, conversation["id"])
    with client.stream("GET", f"/messages/{failed['id']}/stream") as response:
        assert list(iter_events(response))[-1] == (
            "error",
            {"detail": "The reply failed with status 500", "status_code": 500},
        )
    with client.stream("GET", f"/messages/{imported['id']}/stream") as response:
        events = list(iter_events(response))
    assert events[-1] == ("done", imported)
    assert reply_text(events) == "answer"


@pytest.mark.parametrize("offset", ["-1", "abc", "1.5"])
def test_follow_rejects_an_offset_that_is_not_a_count(
    client: httpx.Client, offset: str
) -> None:
    _, events = generate(client, prompt="hi")
    response = client.get(
        f"/messages/{events[0][1]['message_id']}/stream", params={"offset": offset}
    )
    assert response.status_code == 422
    assert response.json()["detail"]


def test_following_an_unknown_message_is_404(client: httpx.Client) -> None:
    for headers in ({}, {"Last-Event-ID": "2000000000:end"}):
        response = client.get("/messages/2000000000/stream", headers=headers)
        assert (response.status_code, response.json()) == (
            404,
            {"detail": "Message not found"},
        )


def test_a_reconnect_to_the_generate_endpoint_resumes_and_starts_no_turn(
    client: httpx.Client,
) -> None:
    conversation = new_conversation(client, model_type="fake:pieces=20:gap_ms=50")
    params = {"prompt": "resume me", "conversation_id": conversation["id"]}
    with client.stream("GET", "/text/generate/stream", params=params) as response:
        events = iter_events(response)
        message_id = next(events)[1]["message_id"]
        seen = read_until(events, 6)
    headers = {"Last-Event-ID": f"{message_id}:{len(seen)}"}
    for method in ("GET", "POST"):
        with client.stream(
            method, "/text/generate/stream", params=params, headers=headers
        ) as response:
            rest = list(iter_events(response))
        assert rest[0] == (
            "start",
            {"conversation_id": conversation["id"], "message_id": message_id},
        )
        assert seen + reply_text(rest) == "".join(f"w{i} " for i in range(20))
        assert rest[-1][0] == "done"
    after_the_end = client.get(
        "/text/generate/stream",
        params=params,
        headers={"Last-Event-ID": f"{message_id}:end"},
    )
    assert after_the_end.status_code == 204
    messages = client.get(f"/conversations/{conversation['id']}/messages").json()
    assert [m["id"] for m in messages] == [message_id]


def test_replacing_a_live_message_is_409(
    client: httpx.Client, long_reply: dict
) -> None:
    with client.stream("GET", "/text/generate/stream", params=long_reply) as response:
        message_id = next(iter_events(response))[1]["message_id"]
        replaced = client.put(
            f"/messages/{message_id}",
            json={"prompt_content": "q", "response_content": "a"},
        )
        client.post(f"/messages/{message_id}/stop")
    assert replaced.status_code == 409
    assert replaced.json()["detail"]


def test_a_turn_beyond_max_live_replies_is_429_and_stores_nothing(
    one_live_reply: Server,
) -> None:
    with httpx.Client(base_url=one_live_reply.url, timeout=10) as client:
        conversation = new_conversation(client, model_type="fake:pieces=50:gap_ms=100")
        params = {"prompt": "busy", "conversation_id": conversation["id"]}
        with client.stream("GET", "/text/generate/stream", params=params) as response:
            message_id = next(iter_events(response))[1]["message_id"]
            refused = client.get("/text/generate/stream", params=params)
            client.post(f"/messages/{message_id}/stop")
        assert refused.status_code == 429
        assert refused.headers["retry-after"]
        assert refused.json()["detail"]
        messages = client.get(f"/conversations/{conversation['id']}/messages").json()
        assert [m["id"] for m in messages] == [message_id]


async def post_at_once(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as http:
        return await asyncio.gather(*(http.post(url, json=body) for body in bodies))


@pytest.mark.parametrize("path", ["/text/generate/stream", "/v1/chat/completions"])
def test_turns_sent_at_once_start_at_most_max_live_replies_and_store_no_other(
    start_app: Callable[..., Server], path: str
) -> None:
    app = start_app(MAX_LIVE_REPLIES="2")
    model_type = tagged("fake:pieces=30:gap_ms=100")  # three seconds
    with httpx.Client(base_url=app.url, timeout=10) as client:
        if path == "/v1/chat/completions":
            messages = [[user(unique("at once"))] for _ in range(30)]
            bodies = [{"model": model_type, "messages": m} for m in messages]
        else:
            conversation = new_conversation(client, model_type=model_type)
            bodies = [{"prompt": "at once", "conversation_id": conversation["id"]}] * 30
        responses = asyncio.run(post_at_once(app.url + path, bodies))
        listed = client.get("/conversations", params={"model_type": model_type}).json()
        stored = [turn["id"] for c in listed for turn in turns(client, c["id"])]
    started = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert 1 <= len(started) <= 2
    assert {r.status_code for r in refused} == {429}
    assert all(r.headers["retry-after"] for r in refused)
    assert sorted(stored) == sorted(int(r.headers["x-message-id"]) for r in started)


def test_a_reply_longer_than_dead_turn_seconds_is_not_closed_while_its_process_lives(
    start_app: Callable[..., Server],
) -> None:
    app = start_app(DEAD_TURN_SECONDS="3")
    with httpx.Client(base_url=app.url, timeout=10) as client:
        # Silent for 5 s: only the heartbeat writes its row meanwhile.
        conversation = new_conversation(
            client, model_type="fake:pieces=3:first_ms=5000"
        )
        imported = add_message(client, conversation["id"], is_success=None)
        _, events = generate(client, prompt="slow", conversation_id=conversation["id"])
        assert events[-1][0] == "done"
        assert client.get(f"/messages/{imported['id']}").json() == imported


def test_a_checkpoint_ms_longer_than_the_heartbeat_does_not_end_live_replies_as_dead(
    start_app: Callable[..., Server],
) -> None:
    app = start_app(DEAD_TURN_SECONDS="3", CHECKPOINT_MS="5000")
    with httpx.Client(base_url=app.url, timeout=10) as client:
        conversation = new_conversation(client, model_type="fake:pieces=12:gap_ms=500")
        params = {"prompt": "rare checkpoints", "conversation_id": conversation["id"]}
        _, events = generate(client, **params)
        stored = client.get(f"/messages/{events[0][1]['message_id']}").json()
    assert events[-1][0] == "done"
    whole = "".join(f"w{i} " for i in range(12))
    assert (stored["status_code"], stored["response_content"]) == (200, whole)


# What Python reads as now on a host whose clock is a minute behind the database's.
CLOCK_A_MINUTE_BEHIND = """
import datetime
import time


class MinuteBehind(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return super().now(tz) - datetime.timedelta(minutes=1)


datetime.datetime = MinuteBehind
host_time = time.time
time.time = lambda: host_time() - 60
"""


def test_live_replies_of_a_host_whose_clock_is_behind_the_databases_are_not_ended_as_dead(
    start_app: Callable[..., Server], empty_database: Database, tmp_path: Path
) -> None:
    """(On SQLite, whose processes share one host's clock, the app's clock is the database's.)"""
    (tmp_path / "sitecustomize.py").write_text(CLOCK_A_MINUTE_BEHIND)
    app = start_app(
        DATABASE_URL=empty_database.url,  # no other app's sweep: this one's clock alone
        PYTHONPATH=str(tmp_path),
        DEAD_TURN_SECONDS="3",
        CHECKPOINT_MS="1000",
    )
    with httpx.Client(base_url=app.url, timeout=30) as client:
        conversation = new_conversation(client, model_type="fake:pieces=6:gap_ms=500")
        created = datetime.fromisoformat(conversation["created_at"])
        assert datetime.now(UTC) - created > timedelta(seconds=50)  # the app's clock

        # Ten turns 0.2 s apart: a sweep (every 1.5 s) comes before the first checkpoint of some.
        def turn(delay: float) -> list[tuple[str, dict]]:
            time.sleep(delay)
            params = {"prompt": "on time", "conversation_id": conversation["id"]}
            return generate(client, **params)[1]

        with ThreadPoolExecutor(10) as pool:
            ended = list(pool.map(turn, [i * 0.2 for i in range(10)]))
        stored = client.get(f"/conversations/{conversation['id']}/messages").json()
    stop(app.process)  # before its database goes
    assert [events[-1][0] for events in ended] == ["done"] * 10
    whole = "".join(f"w{i} " for i in range(6))
    assert [(m["status_code"], m["response_content"]) for m in stored] == [
        (200, whole)
    ] * 10


def test_after_kill_9_a_reply_keeps_its_last_checkpoint_and_is_closed_as_500(
    start_app: Callable[..., Server], client: httpx.Client, long_reply: dict
) -> None:
    killed = start_app()
    url = f"{killed.url}/text/generate/stream"
    with httpx.stream("GET", url, params=long_reply, timeout=10) as response:
        events = iter_events(response)
        message_id = next(events)[1]["message_id"]
        read_until(events, 40)

        def checkpointed() -> str | None:
            text = client.get(f"/messages/{message_id}").json()["response_content"]
            return text if len(text) >= 40 else None

        # A checkpoint of what the client saw is in the row (a busy machine writes it late).
        last_seen_in_the_row = wait_for(checkpointed)
        killed.process.kill()
        killed.process.wait(5)
    start_app(DEAD_TURN_SECONDS="3")
    stored = wait_for(finished_turn(client, message_id), 15)
    assert (stored["is_success"], stored["status_code"], stored["live"]) == (
        False,
        500,
        False,
    )
    # It keeps that checkpoint (or a later one) of the reply.
    assert stored["response_content"].startswith(last_seen_in_the_row)
    assert words(100).startswith(stored["response_content"])


def test_a_stop_ends_a_reply_whose_process_died_with_its_last_checkpoint(
    start_app: Callable[..., Server], client: httpx.Client, long_reply: dict
) -> None:
    killed = start_app()
    url = f"{killed.url}/text/generate/stream"
    with httpx.stream("GET", url, params=long_reply, timeout=10) as response:
        events = iter_events(response)
        message_id = next(events)[1]["message_id"]
        read_until(events, 30)
        killed.process.kill()
        killed.process.wait(5)
    started = time.monotonic()
    stop = client.post(f"/messages/{message_id}/stop")
    assert time.monotonic() - started < 5
    assert stop.status_code == 202
    stopped = stop.json()
    assert (stopped["is_success"], stopped["status_code"], stopped["live"]) == (
        False,
        499,
        False,
    )
    assert stopped["response_content"]
    assert "".join(f"w{i} " for i in range(100)).startswith(stopped["response_content"])


def test_the_live_turns_migration_keeps_what_a_database_already_holds(
    empty_database: Database, tmp_path: Path
) -> None:
    ini, url = PROJECT / "alembic.ini", empty_database.url
    sqlite = url.startswith("sqlite")
    assert alembic(ini, url, "upgrade", "4172c9fc1642").returncode == 0
    at = "'2026-11-20 10:00:00.000000'" if sqlite else "'2026-11-20 10:00:00+00'"
    too_long = "hex(zeroblob(500001))" if sqlite else "repeat('0', 1000002)"
    too_big = 2**31 if sqlite else 7  # a Postgres integer cannot be over 2^31-1
    nul = "'a' || char(0) || 'b'" if sqlite else "'a b'"
    run_sql(
        empty_database,
        f"INSERT INTO conversations VALUES ('Old', 'echo', 1, {at}, {at})",
    )
    for values in (
        f"'q', 'a', 1, 1, 2, true, 200, 1, 1, {at}, {at}",
        f"'killed mid-reply', '', null, null, null, null, null, 2, 1, {at}, {at}",
        f"'q', {nul}, -5, {too_big}, 7, false, 500, 3, 1, {at}, {at}",
        f"'q', {too_long}, 1, 1, 2, true, 200, 4, 1, {at}, {at}",
    ):
        run_sql(empty_database, f"INSERT INTO messages VALUES ({values})")
    assert alembic(ini, url, "upgrade", "head").returncode == 0
    process, log = launch(["--port", "0"], {"DATABASE_URL": url}, tmp_path)
    try:
        served = listening_url(process, log)
        wait_healthy(served, process, log)
        response = httpx.get(f"{served}/conversations/1/messages")
    finally:
        stop(process)
    assert response.status_code == 200
    messages = response.json()
    assert [m["live"] for m in messages] == [False] * 4
    assert (messages[0]["response_content"], messages[0]["total_tokens"]) == ("a", 2)
    assert (messages[1]["prompt_content"], messages[1]["is_success"]) == (
        "killed mid-reply",
        None,
    )
    assert (messages[2]["prompt_tokens"], messages[2]["response_tokens"]) == (
        None,
        None if sqlite else 7,
    )
    assert messages[2]["response_content"] == ("a\ufffdb" if sqlite else "a b")
    assert len(messages[3]["response_content"]) == 1_000_000


# Database faults -------------------------------------------------------------------------


def test_pooled_connections_the_database_closed_fail_no_request(
    database: Database, client: httpx.Client
) -> None:
    if database.url.startswith("sqlite"):
        pytest.skip("a SQLite file has no server that can close connections")
    conversation = new_conversation(client)  # the pool now holds a connection
    with postgres_admin() as admin:

        def close_the_apps_connections() -> None:
            # As a restart or a failover does; the second argument waits for them to end.
            admin.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = %s",
                [database.name],
            )

        close_the_apps_connections()
        assert client.get("/health").json() == {"status": "ok"}
        close_the_apps_connections()
        response = client.get(f"/conversations/{conversation['id']}")
        assert (response.status_code, response.json()) == (200, conversation)


def start_three_workers(database_url: str, workdir: Path) -> str:
    """Start `uvicorn --workers 3` until all three are up (or it exits); return its log."""
    process, log = launch(
        ["--port", "0", "--workers", "3"],
        {"DATABASE_URL": database_url},
        workdir,
    )
    try:
        wait_for(
            lambda: (
                log.read_text().count("Application startup complete") == 3
                or process.poll() is not None
            ),
            120,  # generous: interpreters start at once on a busy machine
        )
    finally:
        stop(process)
    return log.read_text()


def test_three_workers_start_together_on_an_empty_sqlite_file(tmp_path: Path) -> None:
    def attempt(number: int) -> str:
        workdir = tmp_path / f"start-{number}"
        workdir.mkdir()
        return start_three_workers(f"sqlite:///{workdir / 'chat.db'}", workdir)

    # It used to fail about one start in three: three starts, each on its own file, at once.
    with ThreadPoolExecutor(3) as starts:
        for output in starts.map(attempt, range(3)):
            assert output.count("Application startup complete") == 3, output
            assert "Traceback" not in output, output


def workers_with_open(supervisor: Process, path: Path) -> int:
    """How many of uvicorn's worker processes have the file open."""
    pid = supervisor.pid
    workers = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    opened = 0
    for worker in workers:
        with contextlib.suppress(OSError):  # a process that just ended
            files = {os.readlink(fd) for fd in Path(f"/proc/{worker}/fd").iterdir()}
            opened += str(path) in files
    return opened


def test_workers_that_reach_the_migration_of_a_sqlite_file_at_once_all_come_up(
    tmp_path: Path,
) -> None:
    # The test holds the file's write lock until all three workers have opened the file, which
    # each does just before its migration takes that lock: they meet there every time rather
    # than one start in a few. (Which process has a file open: Linux's /proc.)
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to see which processes have the file open")
    path = tmp_path / "chat.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode = WAL")
    holder.execute("BEGIN IMMEDIATE")
    process, log = launch(
        ["--port", "0", "--workers", "3"],
        {"DATABASE_URL": f"sqlite:///{path}"},
        tmp_path,
    )
    try:
        wait_for(
            lambda: workers_with_open(process, path) == 3 or process.poll() is not None,
            60,
        )
        assert "Application startup complete" not in log.read_text()  # all at the lock
        holder.execute("COMMIT")
        wait_for(
            lambda: (
                log.read_text().count("Application startup complete") == 3
                or process.poll() is not None
            ),
            60,
        )
    finally:
        stop(process)
        holder.close()
    assert log.read_text().count("Application startup complete") == 3, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()


def alembic(
    ini: Path, database_url: str, *args: str, workdir: Path | None = None
) -> subprocess.CompletedProcess:
    """`alembic -c ini ...args` on that database, in the ini's folder unless told another."""
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env["DATABASE_URL"] = database_url
    argv = ["-c", str(ini), *args]
    with tempfile.TemporaryDirectory() as output:
        out, err = Path(output, "out"), Path(output, "err")
        command = start_command("alembic", argv, env, workdir or ini.parent, out, err)
        returncode = command.wait(300)
        return subprocess.CompletedProcess(
            argv, returncode, out.read_text(), err.read_text()
        )


@pytest.fixture
def migrations_plus_one(tmp_path: Path) -> Callable[[str], Path]:
    """The project's migrations plus one throwaway revision (its upgrade() body given),
    in a copy: returns an alembic.ini for the copy."""

    def add(upgrade_body: str) -> Path:
        project_ini = PROJECT / "alembic.ini"
        head = ScriptDirectory.from_config(
            AlembicConfig(str(project_ini))
        ).get_current_head()
        folder = tmp_path / "migrations"
        shutil.copytree(
            PROJECT / "migrations", folder, ignore=shutil.ignore_patterns("__pycache__")
        )
        (folder / "versions" / "throwaway.py").write_text(
            f"import sqlalchemy as sa\nfrom alembic import op\n\n"
            f"revision = 'throwaway'\ndown_revision = '{head}'\n"
            f"branch_labels = None\ndepends_on = None\n\n\n"
            f"def upgrade() -> None:\n{textwrap.indent(upgrade_body, '    ')}\n"
        )
        ini = configparser.RawConfigParser()
        ini.read(project_ini)
        ini["alembic"]["script_location"] = str(folder)
        ini["alembic"]["prepend_sys_path"] = str(PROJECT)  # env.py imports the app
        path = tmp_path / "alembic.ini"
        with path.open("w") as file:
            ini.write(file)
        return path

    return add


def sqlite_with_six_messages(path: Path) -> str:
    """A SQLite file at the project's head with two conversations of three messages each."""
    url = f"sqlite:///{path}"
    result = alembic(PROJECT / "alembic.ini", url, "upgrade", "head")
    assert result.returncode == 0, result.stderr
    now = "2026-11-25 12:00:00.000000"
    with sqlite3.connect(path) as db:
        for conversation_id in (1, 2):
            db.execute(
                "INSERT INTO conversations (id, title, model_type, created_at, updated_at)"
                " VALUES (?, 'A chat', 'echo', ?, ?)",
                [conversation_id, now, now],
            )
            db.executemany(
                "INSERT INTO messages (conversation_id, prompt_content, response_content,"
                " created_at, updated_at) VALUES (?, 'hi', 'hi', ?, ?)",
                [[conversation_id, now, now]] * 3,
            )
    db.close()
    return url


def count(path: Path, table: str) -> int:
    with sqlite3.connect(path) as db:
        rows = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    db.close()
    return rows


def test_a_sqlite_migration_that_rebuilds_conversations_keeps_their_messages(
    tmp_path: Path, migrations_plus_one: Callable[[str], Path]
) -> None:
    # On SQLite any alter_column rebuilds the table: copy it, drop the old one, rename.
    ini = migrations_plus_one(
        'with op.batch_alter_table("conversations") as batch_op:\n'
        '    batch_op.alter_column("title", existing_type=sa.String(), type_=sa.String(200))'
    )
    url = sqlite_with_six_messages(tmp_path / "chat.db")
    result = alembic(ini, url, "upgrade", "head")
    assert result.returncode == 0, result.stderr
    assert count(tmp_path / "chat.db", "messages") == 6


def test_a_sqlite_migration_that_would_orphan_messages_fails_and_changes_nothing(
    tmp_path: Path, migrations_plus_one: Callable[[str], Path]
) -> None:
    ini = migrations_plus_one(
        'op.execute("DELETE FROM conversations WHERE id = 1")\n'
        'with op.batch_alter_table("conversations") as batch_op:\n'
        '    batch_op.alter_column("title", existing_type=sa.String(), type_=sa.String(200))'
    )
    url = sqlite_with_six_messages(tmp_path / "chat.db")
    result = alembic(ini, url, "upgrade", "head")
    assert result.returncode != 0
    assert "foreign key" in result.stderr.lower(), result.stderr
    assert count(tmp_path / "chat.db", "conversations") == 2
    assert count(tmp_path / "chat.db", "messages") == 6
    current = alembic(ini, url, "current")
    assert "throwaway" not in current.stdout, current.stdout


class FreezableProxy:
    """A TCP proxy to Postgres that can freeze like a hung server or a dead network path:
    frozen, it passes no byte either way and answers nothing, but keeps every socket open."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = self.call(self.listen())

    def call(self, coroutine: object) -> object:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    async def listen(self) -> int:
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.sockets: set[asyncio.StreamWriter] = set()
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def serve(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        self.sockets.add(client_out)
        try:
            await self.flowing.wait()  # frozen, a new connection hangs too
            server_in, server_out = await asyncio.open_connection(*self.target)
        except OSError:
            client_out.close()
            return
        self.sockets.add(server_out)
        await asyncio.gather(
            self.pipe(client_in, server_out), self.pipe(server_in, client_out)
        )
        self.sockets -= {client_out, server_out}

    async def pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await source.read(65536):
                await self.flowing.wait()
                sink.write(data)
                await sink.drain()
        except (OSError, RuntimeError):
            pass
        finally:
            sink.close()  # the other direction then reads the end too

    def freeze(self) -> None:
        self.loop.call_soon_threadsafe(self.flowing.clear)

    async def drop_and_flow(self) -> None:
        for writer in self.sockets:
            writer.close()
        self.sockets.clear()
        self.flowing.set()

    def thaw(self) -> None:
        """Flow again; connections from before are dropped (what they held back is stale)."""
        self.call(self.drop_and_flow())

    async def shut(self) -> None:
        self.server.close()
        await self.drop_and_flow()

    def close(self) -> None:
        self.call(self.shut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def freezable_postgres(database: Database) -> Iterator[FreezableProxy]:
    if database.url.startswith("sqlite"):
        pytest.skip("a SQLite file has no network path that can freeze")
    url = make_url(database.url)
    proxy = FreezableProxy(url.host or "127.0.0.1", url.port or 5432)
    yield proxy
    proxy.close()


def test_while_the_database_stops_answering_every_endpoint_answers_503_within_seconds_then_recovers(
    freezable_postgres: FreezableProxy,
    database: Database,
    start_app: Callable[..., Server],
) -> None:
    proxied = make_url(database.url).set(host="127.0.0.1", port=freezable_postgres.port)
    server = start_app(DATABASE_URL=proxied.render_as_string(False))
    with httpx.Client(base_url=server.url, timeout=20) as client:
        conversation = new_conversation(client)  # the pool now holds a connection
        freezable_postgres.freeze()
        for method, path, body in [
            ("GET", "/health", None),
            ("GET", "/conversations", None),
            ("GET", f"/conversations/{conversation['id']}", None),
            ("POST", "/conversations", {"title": "x"}),
        ]:
            started = time.monotonic()
            response = client.request(method, path, json=body)
            assert (response.status_code, response.json()) == (
                503,
                {"detail": "Database unavailable"},
            ), (method, path)
            assert time.monotonic() - started < 12, (method, path)
        freezable_postgres.thaw()
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get(f"/conversations/{conversation['id']}").json() == conversation


def test_a_postgres_migration_may_take_longer_than_the_apps_wait_for_an_answer(
    tmp_path: Path, migrations_plus_one: Callable[[str], Path]
) -> None:
    # The app gives up on a database answer after 5 s; an index on a big table takes longer.
    ini = migrations_plus_one('op.execute("SELECT pg_sleep(7)")')
    with postgres_admin() as admin:
        name = f"chat_test_{uuid.uuid4().hex[:12]}"
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            url = make_url(POSTGRES_URL).set(database=name).render_as_string(False)
            result = alembic(ini, url, "upgrade", "head")
            assert result.returncode == 0, result.stderr
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


# The chat page ---------------------------------------------------------------------------
# Headless Chromium (Debian's `chromium`, driven by Playwright) against the app on SQLite: the
# API's database behaviour is covered above on both databases. Every request a page makes is
# routed: those to the service go through, any other is refused and recorded.

CHROMIUM = shutil.which("chromium")
FRIEND = (
    "http://localhost:5173"  # an origin in CORS_ORIGINS: a front end on Vite's port
)
STRANGER = "http://evil.example"  # any other site


# One value, for its id: the browser's tests are named test_...[page], so `-k page` picks them
# and `-k "not page"` leaves them out.
@pytest.fixture(scope="module", params=["page"])
def chromium() -> Iterator[Browser]:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI runs the browser tests: apt-get install -y chromium")
        pytest.skip("the chat page's tests need Chromium: apt-get install -y chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def start_page_app(
    llm_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Server]]:
    """Start the app on a new SQLite file; keyword arguments are settings (env names)."""
    workdir = tmp_path_factory.mktemp("page")
    with app_starter(workdir, llm_url) as start:

        def start_on_a_new_file(**settings: str) -> Server:
            path = workdir / f"chat-{uuid.uuid4().hex[:8]}.db"
            return start(**{"DATABASE_URL": f"sqlite:///{path}", **settings})

        yield start_on_a_new_file


@pytest.fixture(scope="module")
def page_server(start_page_app: Callable[..., Server]) -> Server:
    return start_page_app(CORS_ORIGINS=FRIEND)


@pytest.fixture
def service(page_server: Server) -> Iterator[httpx.Client]:
    """The page's service, through its HTTP API (to arrange and to check what is stored)."""
    with httpx.Client(base_url=page_server.url, timeout=10) as http:
        yield http


@dataclass
class Requests:
    served: list[str]  # to the service
    elsewhere: list[str]  # to anywhere else: refused


@pytest.fixture
def requests_made() -> Requests:
    return Requests([], [])


@pytest.fixture
def open_page(
    chromium: Browser, page_server: Server, requests_made: Requests
) -> Iterator[Callable[..., Page]]:
    """open_page(path, server=..., width=..., height=...): a new tab in a new browser profile."""
    contexts: list[BrowserContext] = []

    def open_(
        path: str = "/",
        server: Server = page_server,
        width: int = 1280,
        height: int = 800,
        context: BrowserContext | None = None,
    ) -> Page:
        if context is None:
            context = chromium.new_context(viewport={"width": width, "height": height})
            contexts.append(context)

            def only_the_service(route: Route) -> None:
                url = route.request.url
                if url == server.url or url.startswith(f"{server.url}/"):
                    requests_made.served.append(url)
                    route.continue_()
                else:
                    requests_made.elsewhere.append(url)
                    route.abort()

            context.route("**/*", only_the_service)
        page = context.new_page()
        page.goto(f"{server.url}{path}")
        return page

    yield open_
    for context in contexts:
        context.close()


def prompt_box(page: Page):
    return page.get_by_role("textbox", name="Message", exact=True)


def send_message(page: Page, text: str) -> None:
    prompt_box(page).fill(text)
    prompt_box(page).press("Enter")


def last_reply(page: Page):
    return page.locator(".turn .reply .text").last


def last_status(page: Page):
    return page.locator(".turn .status").last


def start_new_chat(page: Page, model: str) -> None:
    page.get_by_role("button", name="New chat").click()
    page.get_by_label("Model").fill(model)


def conversation_id_in_url(page: Page) -> int:
    page.wait_for_url("**/#/c/*")
    return int(page.url.rsplit("/", 1)[1])


def test_the_page_is_html_at_the_root_with_a_policy_that_runs_only_its_own_script(
    service: httpx.Client,
) -> None:
    response = service.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "script-src 'sha256-" in policy and "unsafe-inline" not in policy
    assert "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy


# Every text the last reply shows, as the page changes it: seen on each change, not polled.
RECORD_THE_REPLYS_RENDERS = """() => {
    window.renders = [];
    new MutationObserver(() => {
        const text = [...document.querySelectorAll(".turn .reply .text")].at(-1)?.textContent;
        if (text !== undefined && window.renders.at(-1) !== text) window.renders.push(text);
    }).observe(document.body, {childList: true, subtree: true, characterData: true});
}"""


def test_a_reply_streams_into_the_page_as_it_arrives(
    open_page: Callable[..., Page], service: httpx.Client
) -> None:
    page = open_page()
    start_new_chat(page, "fake:pieces=20:gap_ms=100")
    page.evaluate(RECORD_THE_REPLYS_RENDERS)
    send_message(page, "Tell me a story")
    expect(last_reply(page)).to_have_text(words(20), timeout=15_000)
    partial = [text for text in page.evaluate("window.renders") if text]
    assert len(partial) >= 5, partial  # seen piece by piece, not all at once at the end
    assert all(words(20).startswith(text) for text in partial)
    expect(last_status(page)).to_have_text("7 prompt + 20 reply = 27 tokens")
    stored = service.get(f"/conversations/{conversation_id_in_url(page)}/messages")
    assert [(m["prompt_content"], m["response_content"]) for m in stored.json()] == [
        ("Tell me a story", words(20))
    ]


def test_a_new_chat_uses_the_model_chosen_and_gets_the_models_title(
    open_page: Callable[..., Page], service: httpx.Client
) -> None:
    page = open_page()
    expect(page.get_by_label("Model")).to_have_value("echo")  # DEFAULT_MODEL
    start_new_chat(page, "fake:pieces=2:first_ms=300")
    send_message(page, "Plan a weekend in Lisbon")
    expect(page.locator("#title")).to_have_text("Plan a weekend in Lisbon")
    expect(last_reply(page)).to_have_text(words(2))
    conversation = service.get(f"/conversations/{conversation_id_in_url(page)}").json()
    assert conversation["model_type"] == "fake:pieces=2:first_ms=300"
    # The model's title, written beside the reply (the fake titles with its reply).
    wait_for(
        lambda: (
            service.get(f"/conversations/{conversation['id']}").json()["title"]
            == words(2).strip()
        )
    )
    page.reload()
    expect(page.locator("#title")).to_have_text(words(2).strip())
    link = page.locator(f'#conversations a[href="#/c/{conversation["id"]}"] .title')
    expect(link).to_have_text(words(2).strip())  # (other chats' titles may start alike)


def test_enter_sends_and_shift_enter_starts_a_new_line(
    open_page: Callable[..., Page], service: httpx.Client
) -> None:
    page = open_page()
    box = prompt_box(page)
    box.click()
    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    expect(box).to_have_value("first line\nsecond line")
    page.keyboard.press("Enter")
    expect(last_reply(page)).to_have_text("first line\nsecond line")
    expect(box).to_have_value("")
    messages = service.get(f"/conversations/{conversation_id_in_url(page)}/messages")
    assert messages.json()[0]["prompt_content"] == "first line\nsecond line"


def test_the_keyboard_alone_opens_a_conversation_and_continues_it(
    open_page: Callable[..., Page], service: httpx.Client
) -> None:
    title = f"Keyboard {uuid.uuid4().hex[:6]}"
    conversation = new_conversation(service, title=title)
    page = open_page()
    link = page.get_by_role("link", name=title)
    expect(link).to_be_visible()
    for _ in range(10):
        page.keyboard.press("Tab")
        if link.evaluate("link => link === document.activeElement"):
            break
    expect(link).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#title")).to_have_text(title)
    expect(prompt_box(page)).to_be_focused()
    page.keyboard.type("typed, not clicked")
    page.keyboard.press("Enter")
    expect(last_reply(page)).to_have_text("typed, not clicked")
    stored = service.get(f"/conversations/{conversation['id']}/messages").json()
    assert [m["response_content"] for m in stored] == ["typed, not clicked"]


def test_an_upstream_error_is_shown_plainly_in_its_turn(
    open_page: Callable[..., Page], service: httpx.Client
) -> None:
    page = open_page()
    start_new_chat(page, "fake:fail=500")
    send_message(page, "Will this work?")
    expect(last_status(page)).to_have_text(
        "Error 500: The model answered 500: Error code: 500 - scripted failure 500"
    )
    expect(last_status(page)).to_have_class("status error")
    # Reopened later, the stored turn still says it failed.
    page.reload()
    expect(last_status(page)).to_contain_text("failed (500)")


@pytest.fixture
def slow_chat(service: httpx.Client) -> dict:
    """A conversation whose replies take five seconds: 50 pieces, 100 ms apart."""
    return new_conversation(service, model_type="fake:pieces=50:gap_ms=100")


def test_a_reload_mid_reply_shows_the_whole_reply_with_one_turn_stored(
    open_page: Callable[..., Page], service: httpx.Client, slow_chat: dict
) -> None:
    page = open_page(f"/#/c/{slow_chat['id']}")
    send_message(page, "a long one")
    expect(last_reply(page)).to_contain_text("w3 ")
    page.reload()
    expect(page.locator(".reply.live")).to_have_count(1)  # still going after the reload
    expect(last_reply(page)).to_have_text(words(50), timeout=15_000)
    expect(last_status(page)).to_have_text("7 prompt + 50 reply = 57 tokens")
    stored = service.get(f"/conversations/{slow_chat['id']}/messages").json()
    assert [(m["response_content"], m["is_success"]) for m in stored] == [
        (words(50), True)
    ]


def test_a_second_tab_shows_the_same_reply_live(
    open_page: Callable[..., Page], service: httpx.Client, slow_chat: dict
) -> None:
    first = open_page(f"/#/c/{slow_chat['id']}")
    send_message(first, "for two tabs")
    expect(last_reply(first)).to_contain_text("w3 ")
    second = open_page(f"/#/c/{slow_chat['id']}", context=first.context)
    expect(second.locator(".reply.live")).to_have_count(1)
    for page in (first, second):
        expect(last_reply(page)).to_have_text(words(50), timeout=15_000)
        expect(last_status(page)).to_have_text("7 prompt + 50 reply = 57 tokens")
    stored = service.get(f"/conversations/{slow_chat['id']}/messages").json()
    assert len(stored) == 1


def test_stop_keeps_the_partial_reply_and_marks_it_stopped(
    open_page: Callable[..., Page], service: httpx.Client, slow_chat: dict
) -> None:
    page = open_page(f"/#/c/{slow_chat['id']}")
    send_message(page, "stop me")
    expect(last_reply(page)).to_contain_text("w3 ")
    page.get_by_role("button", name="Stop").click()
    expect(last_status(page)).to_have_text("Stopped")
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    shown = last_reply(page).text_content()
    stored = service.get(f"/conversations/{slow_chat['id']}/messages").json()
    assert len(stored) == 1
    assert (stored[0]["is_success"], stored[0]["status_code"]) == (False, 499)
    assert stored[0]["response_content"] == shown
    assert shown.startswith("w0 w1 w2 w3 ") and "w49" not in shown


def test_a_reply_followed_after_a_reload_can_be_stopped(
    open_page: Callable[..., Page], service: httpx.Client, slow_chat: dict
) -> None:
    page = open_page(f"/#/c/{slow_chat['id']}")
    send_message(page, "stop me later")
    expect(last_reply(page)).to_contain_text("w2 ")
    page.reload()
    expect(last_reply(page)).to_contain_text("w5 ")
    page.get_by_role("button", name="Stop").click()
    expect(last_status(page)).to_have_text("Stopped")
    stored = service.get(f"/conversations/{slow_chat['id']}/messages").json()
    assert [(m["status_code"], m["response_content"]) for m in stored] == [
        (499, last_reply(page).text_content())
    ]


class CuttableProxy:
    """A TCP proxy in front of the app whose open connections a test can cut, as a network would."""

    def __init__(self, port: int) -> None:
        self.port, self.open = port, []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.port))
            self.open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self.pipe, args=(source, sink), daemon=True
                ).start()

    def pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        cut, self.open = self.open, []
        for end in cut:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
                end.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()


def test_a_broken_connection_resumes_from_the_last_event_id(
    open_page: Callable[..., Page],
    page_server: Server,
    service: httpx.Client,
    slow_chat: dict,
    requests_made: Requests,
) -> None:
    proxy = CuttableProxy(int(page_server.url.rsplit(":", 1)[1]))
    try:
        through_proxy = Server(proxy.url, page_server.process, page_server.log)
        page = open_page(f"/#/c/{slow_chat['id']}", server=through_proxy)
        send_message(page, "mind the gap")
        expect(last_reply(page)).to_contain_text("w3 ")
        proxy.cut()
        expect(last_reply(page)).to_have_text(words(50), timeout=15_000)
        expect(last_status(page)).to_have_text("7 prompt + 50 reply = 57 tokens")
    finally:
        proxy.close()
    stored = service.get(f"/conversations/{slow_chat['id']}/messages").json()
    assert [m["response_content"] for m in stored] == [words(50)]
    # It asked for the rest by event id (GET /messages/{id}/stream without ?offset=).
    assert f"{proxy.url}/messages/{stored[0]['id']}/stream" in requests_made.served


def test_html_in_prompts_replies_and_titles_shows_as_text(
    open_page: Callable[..., Page],
) -> None:
    page = open_page()
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    markup = "<img src=x onerror=alert(1)> <b>bold?</b>"
    send_message(page, markup)  # echo replies with the prompt itself
    expect(last_reply(page)).to_have_text(markup)
    expect(page.locator(".turn .prompt .text")).to_have_text(markup)
    expect(page.locator("#title")).to_have_text(markup)  # the prompt's first words
    expect(page.get_by_role("link", name=markup)).to_be_visible()
    page.reload()  # and from what is stored
    expect(last_reply(page)).to_have_text(markup)
    assert page.locator("img, b").count() == 0
    assert dialogs == []


@pytest.fixture(scope="module")
def keyed_server(start_page_app: Callable[..., Server]) -> Server:
    return start_page_app(API_KEY=API_KEY)


def test_with_an_api_key_the_page_asks_for_it_once_and_keeps_it(
    open_page: Callable[..., Page], keyed_server: Server
) -> None:
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    conversation = httpx.post(
        f"{keyed_server.url}/conversations", json={"title": "Keyed"}, headers=bearer
    ).json()
    # Three requests are refused at once (the list, the conversation, its messages): one question.
    page = open_page(f"/#/c/{conversation['id']}", server=keyed_server)
    dialog = page.get_by_role("dialog", name="API key")
    expect(dialog).to_be_visible()
    dialog.get_by_label("API key").fill(API_KEY)
    dialog.get_by_label("API key").press("Enter")
    expect(dialog).to_be_hidden()
    expect(page.locator("#title")).to_have_text("Keyed")
    send_message(page, "with the key")
    expect(last_reply(page)).to_have_text("with the key")
    expect(dialog).to_be_hidden()
    assert page.evaluate("localStorage.getItem('chat-backend:api-key')") == API_KEY
    page.reload()
    expect(page.get_by_role("link", name="Keyed")).to_be_visible()
    expect(dialog).to_be_hidden()
    stored = httpx.get(
        f"{keyed_server.url}/conversations/{conversation['id']}/messages",
        headers=bearer,
    ).json()
    assert [m["response_content"] for m in stored] == ["with the key"]


def test_a_refused_api_key_is_asked_for_again(
    open_page: Callable[..., Page], keyed_server: Server
) -> None:
    page = open_page(server=keyed_server)
    dialog = page.get_by_role("dialog", name="API key")
    dialog.get_by_label("API key").fill("not the key")
    dialog.get_by_label("API key").press("Enter")
    expect(dialog).to_contain_text("refused")
    dialog.get_by_label("API key").fill(API_KEY)
    dialog.get_by_label("API key").press("Enter")
    expect(dialog).to_be_hidden()
    expect(page.locator("#list-note")).not_to_contain_text("API key")


def test_an_api_key_of_any_characters_works_from_the_page(
    open_page: Callable[..., Page], start_page_app: Callable[..., Server]
) -> None:
    key = "clé-ключ-🔑"
    page = open_page(server=start_page_app(API_KEY=key))
    dialog = page.get_by_role("dialog", name="API key")
    dialog.get_by_label("API key").fill(key)
    dialog.get_by_label("API key").press("Enter")
    expect(dialog).to_be_hidden()
    send_message(page, "unicode key")
    expect(last_reply(page)).to_have_text("unicode key")


def test_a_dismissed_key_prompt_leaves_a_way_to_enter_the_key(
    open_page: Callable[..., Page], keyed_server: Server
) -> None:
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    conversation = httpx.post(
        f"{keyed_server.url}/conversations", json={"title": "Later"}, headers=bearer
    ).json()
    page = open_page(f"/#/c/{conversation['id']}", server=keyed_server)
    dialog = page.get_by_role("dialog", name="API key")
    expect(dialog).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("#turns")).to_contain_text("This service needs an API key.")
    page.get_by_role("button", name="Enter the API key").click()
    dialog.get_by_label("API key").fill(API_KEY)
    dialog.get_by_label("API key").press("Enter")
    expect(page.locator("#title")).to_have_text("Later")


def test_rename_and_delete_a_conversation(
    open_page: Callable[..., Page], service: httpx.Client
) -> None:
    conversation = new_conversation(service, title="Old name")
    page = open_page(f"/#/c/{conversation['id']}")
    page.get_by_role("button", name="Rename").click()
    page.get_by_label("Title").fill("New <name>")
    page.get_by_label("Title").press("Enter")
    expect(page.locator("#title")).to_have_text("New <name>")
    expect(page.get_by_role("link", name="New <name>")).to_be_visible()
    url = f"/conversations/{conversation['id']}"
    assert service.get(url).json()["title"] == "New <name>"
    page.get_by_role("button", name="Delete").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    expect(page.locator("#title")).to_have_text("New chat")
    expect(page.get_by_role("link", name="New <name>")).to_have_count(0)
    assert service.get(url).status_code == 404


def test_150_conversations_show_newest_first_with_load_more(
    open_page: Callable[..., Page], start_page_app: Callable[..., Server]
) -> None:
    server = start_page_app()
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for i in range(150):
            new_conversation(http, title=f"Chat {i:03}")
    page = open_page(server=server)
    links = page.locator("#conversations a .title")
    expect(links.first).to_have_text("Chat 149")
    load_more = page.get_by_role("button", name="Load more")
    assert links.count() < 150
    clicks = 0
    while load_more.is_visible():
        shown = links.count()
        load_more.click()
        expect(links).not_to_have_count(shown)
        clicks += 1
    assert clicks >= 2
    assert links.all_text_contents() == [f"Chat {i:03}" for i in reversed(range(150))]


def test_the_page_and_the_docs_ask_nothing_of_any_other_host(
    open_page: Callable[..., Page], requests_made: Requests
) -> None:
    page = open_page()
    send_message(page, "offline, please")
    expect(last_reply(page)).to_have_text("offline, please")
    page.goto(page.url.split("#")[0] + "docs")
    expect(page.get_by_text("/text/generate/stream").first).to_be_visible()
    assert requests_made.elsewhere == []
    assert any(url.endswith("/swagger-ui-bundle.js") for url in requests_made.served)


def test_the_docs_work_offline_with_the_stream_endpoints_listed(
    open_page: Callable[..., Page],
) -> None:
    page = open_page("/docs")
    operation = page.locator(".opblock", has_text="/text/generate/stream").first
    expect(operation).to_be_visible()
    operation.locator(".opblock-summary").click()
    expect(operation).to_contain_text("text/event-stream")
    expect(operation).to_contain_text("403")


def resolved(openapi: dict, schema: dict) -> dict:
    """The schema a $ref points to, as a client's code generator follows it."""
    while "$ref" in schema:
        schema = openapi["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


@pytest.mark.parametrize(
    "method, path, errors",
    [
        ("get", "/text/generate/stream", {401, 403, 404, 422, 429}),
        ("post", "/text/generate/stream", {401, 403, 404, 422, 429}),
        ("get", "/messages/{message_id}/stream", {401, 403, 404, 422}),
        ("post", "/messages/{message_id}/regenerate", {401, 403, 404, 422, 429}),
    ],
)
def test_the_openapi_document_describes_each_stream_its_events_and_its_errors(
    service: httpx.Client, method: str, path: str, errors: set[int]
) -> None:
    document = service.get("/openapi.json").json()
    responses = document["paths"][path][method]["responses"]
    assert set(responses["200"]["content"]) == {"text/event-stream"}
    for event in ("`start`", "`done`", "`error`", "Last-Event-ID"):
        assert event in responses["200"]["description"]
    assert {int(s) for s in responses if s.startswith("4")} == errors
    for status in errors:
        schema = responses[str(status)]["content"]["application/json"]["schema"]
        name = schema["$ref"].removeprefix("#/components/schemas/")
        assert document["components"]["schemas"][name]["required"] == ["detail"]


def test_the_openapi_document_lists_the_stop_endpoints_409(
    service: httpx.Client,
) -> None:
    document = service.get("/openapi.json").json()
    responses = document["paths"]["/messages/{message_id}/stop"]["post"]["responses"]
    assert set(responses) == {"202", "401", "403", "404", "409", "422"}
    schema = responses["409"]["content"]["application/json"]["schema"]
    name = schema["$ref"].removeprefix("#/components/schemas/")
    assert document["components"]["schemas"][name]["required"] == ["detail"]


def test_the_openapi_document_shows_what_the_generation_endpoints_read(
    service: httpx.Client,
) -> None:
    openapi = service.get("/openapi.json").json()
    get = openapi["paths"]["/text/generate/stream"]["get"]
    query = {p["name"]: p["required"] for p in get["parameters"] if p["in"] == "query"}
    assert query == {"prompt": True, "conversation_id": False}
    post = openapi["paths"]["/text/generate/stream"]["post"]
    body = resolved(
        openapi, post["requestBody"]["content"]["application/json"]["schema"]
    )
    assert set(body["properties"]) == {"prompt", "conversation_id"}
    assert body["required"] == ["prompt"]
    again = openapi["paths"]["/messages/{message_id}/regenerate"]["post"]["requestBody"]
    assert again["required"] is False  # the prompt is optional, and so is the body
    schema = resolved(openapi, again["content"]["application/json"]["schema"])
    assert set(schema["properties"]) == {"prompt"}


def test_every_operation_id_in_the_openapi_document_is_unique(
    service: httpx.Client,
) -> None:
    paths = service.get("/openapi.json").json()["paths"]
    ids = [op["operationId"] for ops in paths.values() for op in ops.values()]
    assert len(ids) == len(API_OPERATIONS) + 2  # and /health's GET and HEAD
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


# Requests from other sites (plain HTTP, with the headers browsers send)


def test_another_origin_is_refused_on_every_api_endpoint_before_anything_is_stored(
    service: httpx.Client,
) -> None:
    before = service.get("/conversations").json()
    openapi = service.get("/openapi.json").json()
    operations = [op for op in every_operation(openapi) if op[1] != "/health"]
    assert set(operations) == API_OPERATIONS
    for method, path in operations:
        response = service.request(
            method,
            path,
            params={"prompt": "from elsewhere"},
            json={"title": "x", "prompt": "from elsewhere"},
            headers={"Origin": STRANGER},
        )
        assert response.status_code == 403, (method, path)
        refused = response.json()
        if path.startswith("/v1/"):  # OpenAI's error shape, for OpenAI clients
            assert "CORS_ORIGINS" in refused["error"]["message"]
        else:
            assert "CORS_ORIGINS" in refused["detail"]
    assert service.get("/conversations").json() == before


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "cross-site"},  # an <img> on another site: no Origin
        {"Sec-Fetch-Site": "same-site"},  # an <img> on another local port
        {"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:1"},
        {"Origin": "null"},  # a sandboxed frame, a file:// page
        {"Origin": "http://localhost:5173.evil.example"},
    ],
)
def test_a_browser_request_from_elsewhere_is_refused(
    service: httpx.Client, headers: dict
) -> None:
    before = service.get("/conversations").json()
    response = service.get(
        "/text/generate/stream", params={"prompt": "hi"}, headers=headers
    )
    assert response.status_code == 403
    assert response.json()["detail"]
    assert service.get("/conversations").json() == before


@pytest.mark.parametrize(
    "headers",
    [
        {},  # curl, SDKs, servers
        {"Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},  # typed in the address bar
        {"Origin": "own", "Sec-Fetch-Site": "same-origin"},
        {"Origin": FRIEND, "Sec-Fetch-Site": "same-site"},
    ],
)
def test_requests_from_the_service_itself_an_allowed_origin_or_no_browser_pass(
    service: httpx.Client, page_server: Server, headers: dict
) -> None:
    if headers.get("Origin") == "own":
        headers = {**headers, "Origin": page_server.url}
    response = service.post("/conversations", json={"title": "ok"}, headers=headers)
    assert response.status_code == 201


def test_an_allowed_origin_may_call_and_read_the_conversation_id(
    service: httpx.Client,
) -> None:
    preflight = service.options(
        "/text/generate/stream",
        headers={
            "Origin": FRIEND,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == FRIEND
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    with service.stream(
        "POST",
        "/text/generate/stream",
        json={"prompt": "hi from vite"},
        headers={"Origin": FRIEND},
    ) as response:
        events = list(iter_events(response))
    assert response.headers["access-control-allow-origin"] == FRIEND
    exposed = response.headers["access-control-expose-headers"].lower()
    assert "x-conversation-id" in exposed and "x-message-id" in exposed
    assert events[-1][0] == "done"


def test_a_preflight_from_another_origin_gets_no_allow_headers(
    service: httpx.Client,
) -> None:
    response = service.options(
        "/conversations",
        headers={"Origin": STRANGER, "Access-Control-Request-Method": "POST"},
    )
    # Answered by the CORS rules (Starlette's 400), not by an endpoint or an error.
    assert (response.status_code, response.text) == (400, "Disallowed CORS origin")
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize("path", ["/", "/health", "/docs", "/openapi.json"])
def test_the_page_the_docs_and_health_open_from_links_anywhere(
    service: httpx.Client, path: str
) -> None:
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": STRANGER}):
        assert service.get(path, headers=headers).status_code == 200, headers


def test_swagger_uis_files_open_from_anywhere(service: httpx.Client) -> None:
    docs = service.get("/docs").text
    files = [part.split('"')[0] for part in docs.split('="')[1:] if "/static" in part]
    assert any(name.endswith(".js") for name in files)
    for name in files:
        response = service.get(name, headers={"Sec-Fetch-Site": "cross-site"})
        assert response.status_code == 200, name


def test_under_v1_the_refusal_has_openais_error_shape(service: httpx.Client) -> None:
    response = service.get("/v1/models", headers={"Origin": STRANGER})
    assert response.status_code == 403
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "CORS_ORIGINS" in error["message"]


REBOUND = (
    "rebind.attacker.example"  # a page's name that its owner re-points at 127.0.0.1
)


def as_host(client: httpx.Client, method: str, path: str, host: str) -> httpx.Response:
    """A request as a browser on http://<host> sends it: that Host, and that Origin."""
    port = client.base_url.port
    headers = {"Host": f"{host}:{port}", "Origin": f"http://{host}:{port}"}
    body = {"title": "x", "prompt": "hi", "model": "echo"}
    body["messages"] = [{"role": "user", "content": "hi"}]
    return client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/conversations"),
        ("POST", "/conversations"),
        ("POST", "/text/generate/stream"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/"),
        ("GET", "/health"),
    ],
)
def test_a_host_name_not_in_allowed_hosts_is_refused_before_anything_runs(
    service: httpx.Client, method: str, path: str
) -> None:
    before = service.get("/conversations").json()
    response = as_host(service, method, path, REBOUND)
    assert response.status_code == 400
    refused = response.json()
    if path.startswith("/v1/"):
        assert "ALLOWED_HOSTS" in refused["error"]["message"]
    else:
        assert "ALLOWED_HOSTS" in refused["detail"]
    assert service.get("/conversations").json() == before


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "192.168.1.20", "[::1]", "[fe80::1]", "localhost", "LocalHost"],
)
def test_ip_addresses_and_localhost_are_always_allowed_hosts(
    service: httpx.Client, host: str
) -> None:
    assert as_host(service, "POST", "/conversations", host).status_code == 201
    assert as_host(service, "GET", "/", host).status_code == 200


def test_allowed_hosts_lets_those_names_in_whatever_their_case_and_port(
    start_page_app: Callable[..., Server],
) -> None:
    app = start_page_app(ALLOWED_HOSTS="chat.example.com, Other.Example")
    with httpx.Client(base_url=app.url, timeout=10) as client:
        for host in ("CHAT.example.com", "other.example"):
            assert as_host(client, "POST", "/conversations", host).status_code == 201
        assert as_host(client, "GET", "/health", REBOUND).status_code == 400
        assert as_host(client, "GET", "/health", "example.com").status_code == 400


def test_allowed_hosts_star_lets_any_host_in(
    start_page_app: Callable[..., Server],
) -> None:
    app = start_page_app(ALLOWED_HOSTS="*")
    with httpx.Client(base_url=app.url, timeout=10) as client:
        assert as_host(client, "POST", "/conversations", REBOUND).status_code == 201
        assert as_host(client, "GET", "/", REBOUND).status_code == 200


@pytest.mark.parametrize(
    "origins", ["localhost:5173", "http://localhost:5173/app", "*"]
)
def test_a_malformed_cors_origins_setting_is_refused_at_start(
    tmp_path: Path, origins: str
) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}", "CORS_ORIGINS": origins}
    process, log = launch(["--port", "0"], env, tmp_path)
    assert process.wait(60) != 0
    assert "CORS_ORIGINS" in log.read_text()


# From a page on another port, in the browser


@pytest.fixture
def other_site() -> Iterator[str]:
    """A page served on another local port: another origin, the same site."""

    class Blank(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>Another site</title><p>elsewhere</p>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Blank)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{http.server_address[1]}"
    http.shutdown()


CALL_FROM_PAGE = """async (api) => {
    const outcome = async (promise) => {
        try {
            const response = await promise;
            return response.type === "opaque" ? "opaque" : response.status;
        } catch (error) {
            return "blocked";
        }
    };
    const image = await new Promise((resolve) => {
        const img = new Image();
        img.onload = () => resolve("loaded");
        img.onerror = () => resolve("failed");
        img.src = `${api}/text/generate/stream?prompt=from%20an%20img`;
    });
    return {
        image,
        simple: await outcome(fetch(`${api}/text/generate/stream?prompt=from%20no-cors`, {mode: "no-cors"})),
        json: await outcome(fetch(`${api}/conversations`, {
            method: "POST",
            headers: {"Content-Type": "application/json"},
            body: JSON.stringify({title: "from another port"}),
        })),
    };
}"""


def test_a_page_on_another_port_starts_nothing_unless_its_origin_is_allowed(
    chromium: Browser, start_page_app: Callable[..., Server], other_site: str
) -> None:
    closed, open_to_it = start_page_app(), start_page_app(CORS_ORIGINS=other_site)
    context = chromium.new_context()
    page = context.new_page()
    page.goto(other_site)
    try:
        refused = page.evaluate(CALL_FROM_PAGE, closed.url)
        allowed = page.evaluate(CALL_FROM_PAGE, open_to_it.url)
        conversation_id = page.evaluate(
            """async (api) => {
                const response = await fetch(`${api}/text/generate/stream`, {
                    method: "POST",
                    headers: {"Content-Type": "application/json"},
                    body: JSON.stringify({prompt: "read the id"}),
                });
                await response.text();
                return response.headers.get("X-Conversation-Id");
            }""",
            open_to_it.url,
        )
    finally:
        context.close()
    assert refused == {"image": "failed", "simple": "opaque", "json": "blocked"}
    assert httpx.get(f"{closed.url}/conversations").json() == []
    assert closed.output().count('" 403') == 2  # the <img> and the no-cors GET
    assert allowed["json"] == 201
    titles = {c["title"] for c in httpx.get(f"{open_to_it.url}/conversations").json()}
    assert "from another port" in titles
    assert conversation_id and conversation_id.isdigit()


def seed_a_chat(http: httpx.Client) -> int:
    """A few conversations, the last with turns that ended each way; returns its id."""
    for title, model_type in [
        ("Birthday gift ideas", "echo"),
        ("Fix my bash loop", "llama3.2"),
        ("Summarize this article", "gpt-4o-mini"),
    ]:
        new_conversation(http, title=title, model_type=model_type)
    chat = new_conversation(http, title="Weekend in Lisbon", model_type="gpt-4o-mini")
    turns = [
        {
            "prompt_content": "Plan a relaxed weekend in Lisbon for two.",
            "response_content": "Saturday\n- Morning: coffee and pastéis de nata in Belém,"
            " then the Jerónimos Monastery.\n- Afternoon: tram 28 up to Alfama; the view"
            " from Miradouro de Santa Luzia.\n- Evening: dinner in Príncipe Real.\n\n"
            "Sunday\n- LX Factory for brunch and bookshops, then a sunset walk along the river.",
            "prompt_tokens": 14,
            "response_tokens": 72,
            "total_tokens": 86,
            "is_success": True,
            "status_code": 200,
        },
        {
            "prompt_content": "Where should we eat on Saturday night? Nothing too touristy.",
            "response_content": "Try the small tascas in Campo de Ourique: grilled fish,",
            "is_success": False,
            "status_code": 499,
        },
        {
            "prompt_content": "And a plan for a rainy day?",
            "response_content": "",
            "is_success": False,
            "status_code": 502,
        },
    ]
    for turn in turns:
        response = http.post(f"/conversations/{chat['id']}/messages", json=turn)
        assert response.status_code == 201, response.text
    return chat["id"]


@pytest.fixture(scope="module")
def seeded(start_page_app: Callable[..., Server]) -> tuple[Server, int]:
    """An app on a new file with seed_a_chat's conversations only; and the chat's id."""
    server = start_page_app()
    with httpx.Client(base_url=server.url, timeout=10) as http:
        return server, seed_a_chat(http)


@pytest.mark.parametrize(
    "name, width, height", [("desktop", 1280, 800), ("phone", 390, 844)]
)
def test_the_page_fits_desktop_and_phone_widths(
    open_page: Callable[..., Page],
    seeded: tuple[Server, int],
    tmp_path: Path,
    name: str,
    width: int,
    height: int,
) -> None:
    """UPDATE_SCREENSHOTS=1 saves the pictures as static/screenshot*.png for the README."""
    server, chat = seeded
    page = open_page(f"/#/c/{chat}", server=server, width=width, height=height)
    expect(page.locator(".turn")).to_have_count(3)
    expect(page.locator(".turn .status")).to_have_text(
        [
            "14 prompt + 72 reply = 86 tokens",
            "Stopped",
            "The model could not be reached, or its reply broke off (502)",
        ]
    )
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    for element in [
        *page.locator(".turn .text").filter(visible=True).all(),
        page.locator("#title"),
        prompt_box(page),
        page.get_by_role("button", name="Send"),
    ]:
        box = element.bounding_box()
        assert 0 <= box["x"] and box["x"] + box["width"] <= width, element
    folder = PROJECT / "static" if os.environ.get("UPDATE_SCREENSHOTS") else tmp_path
    suffix = "" if name == "desktop" else f"-{name}"
    page.screenshot(path=folder / f"screenshot{suffix}.png")


def test_at_phone_width_the_list_opens_over_the_chat_and_closes_on_a_choice(
    open_page: Callable[..., Page], service: httpx.Client
) -> None:
    title = f"Pocket {uuid.uuid4().hex[:6]}"
    new_conversation(service, title=title)
    page = open_page(width=390, height=844)
    link = page.get_by_role("link", name=title)
    expect(link).to_be_hidden()
    page.get_by_role("button", name="Chats").click()
    expect(link).to_be_visible()
    link.click()
    expect(page.locator("#title")).to_have_text(title)
    expect(link).to_be_hidden()


# OpenAI-compatible front -----------------------------------------------------------------
# The official openai SDK as the client, as users' scripts, LangChain and Open WebUI use it.


@fake_llm.get("/v1/models")
async def fake_models() -> dict:
    models = [
        {"id": name, "object": "model", "created": 0, "owned_by": "fake"}
        for name in ("fake", "echo")
    ]
    return {"object": "list", "data": models}


def openai_client(server: Server, api_key: str = "any") -> openai.OpenAI:
    """The SDK with its defaults (two retries among them), pointed at the app."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, timeout=20)


@pytest.fixture
def sdk(server: Server) -> Iterator[openai.OpenAI]:
    with openai_client(server) as sdk:
        yield sdk


def unique(text: str) -> str:
    """A message no other test sends: the threads of different tests never meet."""
    return f"{text} {uuid.uuid4().hex[:8]}"


def tagged(model: str) -> str:
    """A model name no other test uses (the fake ignores the tag): list filters see one test."""
    return f"{model}:tag={uuid.uuid4().int % 10**9}"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def chat(
    sdk: openai.OpenAI, messages: list[dict], model: str = "fake:pieces=2", **fields
) -> tuple[str, httpx.Headers]:
    """One call without streaming: the reply, and the response's headers."""
    raw = sdk.chat.completions.with_raw_response.create(
        model=model, messages=messages, **fields
    )
    return raw.parse().choices[0].message.content, raw.headers


def turns(client: httpx.Client, conversation_id: int | str) -> list[dict]:
    return client.get(f"/conversations/{conversation_id}/messages").json()


def test_v1_create_answers_a_chat_completion_and_stores_it_as_a_turn(
    sdk: openai.OpenAI, client: httpx.Client
) -> None:
    prompt = unique("hello")
    raw = sdk.chat.completions.with_raw_response.create(
        model="fake:pieces=3", messages=[user(prompt)]
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "w0 w1 w2 "
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    counts = (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
    assert counts == (7, 3, 10)
    stored = client.get(f"/messages/{raw.headers['x-message-id']}").json()
    assert stored["conversation_id"] == int(raw.headers["x-conversation-id"])
    assert (
        stored["prompt_content"],
        stored["response_content"],
        stored["status_code"],
        stored["live"],
    ) == (prompt, "w0 w1 w2 ", 200, False)


def test_v1_a_stream_read_to_the_end_gives_the_whole_reply_and_stores_it(
    sdk: openai.OpenAI, client: httpx.Client
) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        model="fake:pieces=4:gap_ms=20", messages=[user(unique("hi"))], stream=True
    )
    chunks = list(raw.parse())
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == "w0 w1 w2 w3 "
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len({(chunk.id, chunk.created) for chunk in chunks}) == 1
    assert all(chunk.usage is None for chunk in chunks)
    stored = client.get(f"/messages/{raw.headers['x-message-id']}").json()
    assert (stored["response_content"], stored["is_success"]) == (text, True)


def test_v1_the_sdks_stream_helper_gets_the_whole_reply(sdk: openai.OpenAI) -> None:
    with sdk.chat.completions.stream(
        model="fake:pieces=3", messages=[user(unique("hi"))]
    ) as stream:
        pieces = [event.delta for event in stream if event.type == "content.delta"]
        final = stream.get_final_completion()
    assert "".join(pieces) == final.choices[0].message.content == "w0 w1 w2 "
    assert final.choices[0].finish_reason == "stop"


def test_v1_include_usage_adds_a_last_chunk_with_the_usage(sdk: openai.OpenAI) -> None:
    chunks = list(
        sdk.chat.completions.create(
            model="fake:pieces=2",
            messages=[user(unique("hi"))],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    counts = (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
    assert counts == (7, 2, 9)
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_v1_models_lists_echo_the_default_model_and_the_upstreams_once_each(
    sdk: openai.OpenAI,
) -> None:
    # The default model is echo here, and the fake upstream lists "fake" and "echo".
    assert [model.id for model in sdk.models.list()] == ["echo", "fake"]


def test_v1_calls_that_resend_the_growing_history_stay_in_one_conversation(
    sdk: openai.OpenAI, client: httpx.Client
) -> None:
    messages = [{"role": "system", "content": "Be brief."}]
    conversations = set()
    for prompt in ("first", "second", "third"):
        messages.append(user(unique(prompt)))
        reply, headers = chat(sdk, messages)
        messages.append(assistant(reply))
        conversations.add(headers["x-conversation-id"])
    assert len(conversations) == 1
    stored = turns(client, conversations.pop())
    assert [(m["prompt_content"], m["response_content"]) for m in stored] == [
        (messages[i]["content"], messages[i + 1]["content"]) for i in (1, 3, 5)
    ]
    assert [m["parent_id"] for m in stored] == [None, stored[0]["id"], stored[1]["id"]]


def test_v1_a_new_history_starts_a_conversation_with_its_earlier_pairs_as_turns(
    sdk: openai.OpenAI, client: httpx.Client
) -> None:
    first = unique("What is SQLite?")
    messages = [
        {"role": "system", "content": "Be brief."},
        user(first),
        assistant("A database in a file."),
        user("And Postgres?"),
    ]
    _, headers = chat(sdk, messages)
    conversation = client.get(f"/conversations/{headers['x-conversation-id']}").json()
    assert (conversation["title"], conversation["model_type"]) == (
        first,
        "fake:pieces=2",
    )
    stored = turns(client, conversation["id"])
    assert [
        (m["prompt_content"], m["response_content"], m["is_success"], m["status_code"])
        for m in stored
    ] == [
        (first, "A database in a file.", True, 200),
        ("And Postgres?", "w0 w1 ", True, 200),
    ]
    assert (stored[0]["prompt_tokens"], stored[0]["live"]) == (None, False)


def test_v1_a_history_that_differs_from_every_thread_starts_another_conversation(
    sdk: openai.OpenAI,
) -> None:
    question = user(unique("q"))
    reply, first = chat(sdk, [question])
    _, same = chat(sdk, [question, assistant(reply), user("more")])
    _, edited = chat(sdk, [question, assistant("an edited reply"), user("more")])
    assert same["x-conversation-id"] == first["x-conversation-id"]
    assert edited["x-conversation-id"] != first["x-conversation-id"]


def test_v1_x_conversation_id_picks_the_conversation_and_imports_nothing(
    sdk: openai.OpenAI, client: httpx.Client
) -> None:
    conversation = new_conversation(client)
    messages = [user(unique("q1")), assistant("a1"), user("q2")]
    _, headers = chat(
        sdk, messages, extra_headers={"X-Conversation-Id": str(conversation["id"])}
    )
    assert headers["x-conversation-id"] == str(conversation["id"])
    assert [m["prompt_content"] for m in turns(client, conversation["id"])] == ["q2"]
    _, again = chat(
        sdk, messages, extra_headers={"X-Conversation-Id": str(conversation["id"])}
    )
    followed = client.get(f"/messages/{again['x-message-id']}").json()
    assert followed["parent_id"] == int(headers["x-message-id"])
    assert leaf(client, conversation["id"]) == followed["id"]
    picked = client.get(f"/conversations/{conversation['id']}").json()
    assert picked["model_type"] == "fake:pieces=2"


def test_v1_the_next_call_continues_a_conversation_picked_by_x_conversation_id(
    sdk: openai.OpenAI, client: httpx.Client
) -> None:
    conversation = new_conversation(client)
    messages = [user(unique("q1"))]
    reply, _ = chat(
        sdk, messages, extra_headers={"X-Conversation-Id": str(conversation["id"])}
    )
    _, headers = chat(sdk, [*messages, assistant(reply), user("q2")])
    assert headers["x-conversation-id"] == str(conversation["id"])


def test_v1_an_unknown_x_conversation_id_is_404_in_openais_shape(
    sdk: openai.OpenAI,
) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        chat(sdk, [user("hi")], extra_headers={"X-Conversation-Id": "2000000000"})
    assert raised.value.response.json()["error"]["message"] == "Conversation not found"


@pytest.mark.parametrize(
    "fields",
    [
        {"n": 2},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "https://x/a.png"}},
                    ],
                }
            ]
        },
        {"messages": [user("hi"), assistant("hello")]},
        {"messages": []},
        {"messages": [{"role": "tool", "content": "42", "tool_call_id": "1"}]},
        {"messages": [user("nul \x00 inside")]},
    ],
    ids=["n-2", "tools", "image", "last-not-user", "empty", "tool-role", "nul"],
)
def test_v1_a_request_it_cannot_honour_is_400_in_openais_shape_and_stores_nothing(
    sdk: openai.OpenAI, client: httpx.Client, fields: dict
) -> None:
    newest = client.get("/conversations", params={"take": 1}).json()
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.chat.completions.create(
            **{"model": "echo", "messages": [user("hi")], **fields}
        )
    body = raised.value.response.json()
    assert list(body) == ["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert client.get("/conversations", params={"take": 1}).json() == newest


def test_v1_a_wrong_key_is_401_in_openais_shape_and_the_right_one_works(
    guarded: Server,
) -> None:
    with (
        openai_client(guarded, "wrong") as wrong,
        openai_client(guarded, API_KEY) as right,
    ):
        with pytest.raises(openai.AuthenticationError) as raised:
            chat(wrong, [user("hi")], model="echo")
        assert chat(right, [user("hi")], model="echo")[0] == "hi"
    assert raised.value.response.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_v1_an_upstream_error_before_the_reply_is_raised_with_its_status_and_stored(
    sdk: openai.OpenAI, client: httpx.Client, stream: bool
) -> None:
    with pytest.raises(openai.InternalServerError) as raised:
        sdk.chat.completions.create(
            model="fake:fail=500", messages=[user(unique("hi"))], stream=stream
        )
    response = raised.value.response
    assert (response.status_code, response.headers["x-should-retry"]) == (500, "false")
    assert response.json()["error"]["message"].startswith("The model answered 500")
    stored = client.get(f"/messages/{response.headers['x-message-id']}").json()
    assert (stored["is_success"], stored["status_code"]) == (False, 500)


def test_v1_the_upstream_refusing_our_own_key_is_502_not_the_callers_401(
    sdk: openai.OpenAI, client: httpx.Client
) -> None:
    with pytest.raises(openai.InternalServerError) as raised:
        chat(sdk, [user(unique("hi"))], model="fake:fail=401")
    assert raised.value.status_code == 502
    message_id = raised.value.response.headers["x-message-id"]
    assert client.get(f"/messages/{message_id}").json()["status_code"] == 401


def test_v1_an_upstream_break_mid_stream_raises_and_stores_the_partial_reply(
    sdk: openai.OpenAI, client: httpx.Client
) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        model="fake:pieces=5:abort=2", messages=[user(unique("hi"))], stream=True
    )
    seen = ""
    with pytest.raises(openai.APIError) as raised:
        for chunk in raw.parse():
            seen += chunk.choices[0].delta.content or ""
    assert (seen, raised.value.code) == ("w0 w1 ", "502")
    stored = client.get(f"/messages/{raw.headers['x-message-id']}").json()
    assert (stored["is_success"], stored["status_code"]) == (False, 502)
    assert stored["response_content"] == seen


def test_v1_with_the_sdks_retries_on_a_failed_call_stores_one_turn(
    sdk: openai.OpenAI, client: httpx.Client
) -> None:
    assert sdk.max_retries == 2
    model = tagged("fake:fail=503")
    with pytest.raises(openai.InternalServerError):
        chat(sdk, [user(unique("hi"))], model=model)
    stored = client.get("/conversations", params={"model_type": model}).json()
    assert len(stored) == 1
    assert len(turns(client, stored[0]["id"])) == 1


def test_v1_a_call_beyond_max_live_replies_is_a_retryable_429(
    one_live_reply: Server,
) -> None:
    with (
        openai_client(one_live_reply) as sdk,
        httpx.Client(base_url=one_live_reply.url) as client,
    ):
        raw = sdk.chat.completions.with_raw_response.create(
            model="fake:pieces=50:gap_ms=100", messages=[user("busy")], stream=True
        )
        try:
            with pytest.raises(openai.RateLimitError) as raised:
                chat(sdk.with_options(max_retries=0), [user("me too")])
        finally:
            client.post(f"/messages/{raw.headers['x-message-id']}/stop")
    assert raised.value.response.headers["retry-after"]
    assert "x-should-retry" not in raised.value.response.headers


def test_v1_calls_with_the_same_history_at_the_same_time_are_siblings_in_one_conversation(
    server: Server, sdk: openai.OpenAI, client: httpx.Client
) -> None:
    messages = [user(unique("shared"))]
    reply, first = chat(sdk, messages)
    messages += [assistant(reply), user("and then?")]

    async def eight_at_once() -> list[httpx.Headers]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="unused", max_retries=0
        ) as caller:
            calls = [
                caller.chat.completions.with_raw_response.create(
                    model="fake:pieces=3:gap_ms=300", messages=messages
                )
                for _ in range(8)
            ]
            return [raw.headers for raw in await asyncio.gather(*calls)]

    answers = asyncio.run(eight_at_once())
    assert {headers["x-conversation-id"] for headers in answers} == {
        first["x-conversation-id"]
    }
    siblings = [client.get(f"/messages/{h['x-message-id']}").json() for h in answers]
    assert {turn["parent_id"] for turn in siblings} == {int(first["x-message-id"])}
    assert len({turn["id"] for turn in siblings}) == 8


def test_v1_a_failed_call_leaves_its_conversation_to_the_next_call_with_that_history(
    sdk: openai.OpenAI, client: httpx.Client
) -> None:
    messages = [user(unique("q"))]
    reply, first = chat(sdk, messages)
    messages += [assistant(reply), user("again")]
    with pytest.raises(openai.InternalServerError):
        chat(sdk, messages, model="fake:fail=500")
    _, retried = chat(sdk, messages)
    assert retried["x-conversation-id"] == first["x-conversation-id"]
    assert client.get(f"/messages/{retried['x-message-id']}").json()[
        "parent_id"
    ] == int(first["x-message-id"])


def test_v1_a_client_that_leaves_mid_stream_does_not_end_the_reply(
    sdk: openai.OpenAI, client: httpx.Client
) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        model="fake:pieces=20:gap_ms=50", messages=[user(unique("hi"))], stream=True
    )
    stream = raw.parse()
    chunks = iter(stream)
    next(chunks), next(chunks)
    stream.close()
    stored = wait_for(finished_turn(client, raw.headers["x-message-id"]))
    assert (stored["is_success"], stored["response_content"]) == (
        True,
        "".join(f"w{i} " for i in range(20)),
    )


def test_v1_a_call_stopped_by_its_x_message_id_ends_its_stream_with_an_error(
    sdk: openai.OpenAI, client: httpx.Client
) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        model="fake:pieces=100:gap_ms=100", messages=[user(unique("hi"))], stream=True
    )
    chunks = iter(raw.parse())
    next(chunks), next(chunks)
    stop = client.post(f"/messages/{raw.headers['x-message-id']}/stop")
    with pytest.raises(openai.APIError) as raised:
        list(chunks)
    assert (stop.json()["status_code"], raised.value.code) == (499, "499")


def test_v1_sampling_fields_reach_the_upstream_capped_by_max_tokens(
    capped: Server, llm_requests: list[dict]
) -> None:
    sampling = {
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 50,
        "stop": ["\n\n"],
        "seed": 7,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.3,
    }
    with openai_client(capped) as sdk:
        chat(sdk, [user(unique("hi"))], user="not passed on", **sampling)
    sent = llm_requests[-1]
    assert {key: sent.get(key) for key in sampling} == {**sampling, "max_tokens": 20}
    assert "user" not in sent


def test_v1_the_model_gets_exactly_the_callers_messages(
    capped: Server, llm_requests: list[dict]
) -> None:
    parts = [{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]
    messages = [{"role": "developer", "content": "Be terse."}, user(parts)]
    with openai_client(capped) as sdk:
        chat(sdk, messages)
    assert llm_requests[-1]["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "line one\nline two"},
    ]


def test_v1_the_stream_has_only_data_lines_and_ends_with_done(
    client: httpx.Client,
) -> None:
    body = {"model": "echo", "messages": [user("one two three")], "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"


def rows(database: Database, query: str) -> list[tuple]:
    if database.url.startswith("sqlite"):
        with sqlite3.connect(database.name) as connection:
            found = connection.execute(query).fetchall()
        connection.close()
        return found
    url = make_url(POSTGRES_URL).set(drivername="postgresql", database=database.name)
    with psycopg.connect(url.render_as_string(False)) as connection:
        return connection.execute(query).fetchall()


def test_the_thread_migration_upgrades_a_database_that_holds_conversations(
    empty_database: Database,
) -> None:
    ini, url = PROJECT / "alembic.ini", empty_database.url
    before_threads = "bb608e99419b"  # the revision before 2b8d356d0649
    assert alembic(ini, url, "upgrade", before_threads).returncode == 0
    now = "'2026-11-25 12:00:00.000000'"
    for conversation_id in (1, 2):
        run_sql(
            empty_database,
            "INSERT INTO conversations (id, title, model_type, created_at, updated_at)"
            f" VALUES ({conversation_id}, 'A chat', 'echo', {now}, {now})",
        )
        run_sql(
            empty_database,
            "INSERT INTO messages (conversation_id, prompt_content, response_content,"
            f" created_at, updated_at) VALUES ({conversation_id}, 'q', 'a', {now}, {now})",
        )
    upgraded = alembic(ini, url, "upgrade", "2b8d356d0649")
    assert upgraded.returncode == 0, upgraded.stderr
    query = "SELECT id, title, thread FROM conversations ORDER BY id"
    assert rows(empty_database, query) == [(1, "A chat", None), (2, "A chat", None)]
    assert rows(empty_database, "SELECT count(*) FROM messages") == [(2,)]


def old_thread_key(messages: list[tuple[str, str]]) -> str:
    """How the code before branches hashed a conversation's /v1 thread."""
    stripped = [(role, text.strip()) for role, text in messages]
    return hashlib.sha256(json.dumps(stripped).encode()).hexdigest()


# The /v1 call that last continued conversation 2, with its reply.
OLD_THREAD = [("user", "q4"), ("assistant", "a4"), ("user", "q5"), ("assistant", "a5")]


def database_before_branches(database: Database) -> None:
    """What the code before branches wrote: turns in order (one stored out of id order),
    a /v1 conversation with its thread, a conversation without turns."""
    ini, url = PROJECT / "alembic.ini", database.url
    assert alembic(ini, url, "upgrade", "2b8d356d0649").returncode == 0
    thread = old_thread_key(OLD_THREAD)
    for conversation_id, at, kept in (
        (1, 1, "null"),
        (2, 5, f"'{thread}'"),
        (3, 9, "null"),
    ):
        stamp = f"'2026-11-25 12:00:0{at}.000000'"
        run_sql(
            database,
            "INSERT INTO conversations (id, title, model_type, created_at, updated_at,"
            f" thread) VALUES ({conversation_id}, 'A chat', 'echo', {stamp}, {stamp},"
            f" {kept})",
        )
    # (id, conversation, second of created_at, is_success)
    for message_id, conversation_id, at, success in (
        (1, 1, 1, "true"),
        (2, 1, 3, "false"),
        (3, 1, 2, "null"),
        (4, 2, 4, "true"),
        (5, 2, 5, "true"),
        (6, 2, 6, "false"),
    ):
        stamp = f"'2026-11-25 12:00:0{at}.000000'"
        run_sql(
            database,
            "INSERT INTO messages (id, conversation_id, prompt_content, response_content,"
            f" is_success, created_at, updated_at) VALUES ({message_id},"
            f" {conversation_id}, 'q{message_id}', 'a{message_id}', {success}, {stamp},"
            f" {stamp})",
        )
    if not url.startswith(
        "sqlite"
    ):  # the ids were given: the sequences go on after them
        for table in ("conversations", "messages"):
            run_sql(database, f"SELECT setval('{table}_id_seq', 100)")


def test_the_branches_migration_makes_each_conversations_turns_one_branch(
    empty_database: Database,
) -> None:
    database_before_branches(empty_database)
    ini, url = PROJECT / "alembic.ini", empty_database.url
    upgraded = alembic(ini, url, "upgrade", "head")
    assert upgraded.returncode == 0, upgraded.stderr
    assert alembic(ini, url, "check").returncode == 0
    query = "SELECT id, parent_id, on_branch, path_hash FROM messages ORDER BY id"
    thread = old_thread_key(OLD_THREAD)
    assert [tuple(row) for row in rows(empty_database, query)] == [
        (1, None, True, None),
        (2, 3, True, None),  # by created_at: 1, 3, 2
        (3, 1, True, None),
        (4, None, True, None),
        (5, 4, True, thread),  # the newest successful turn carries the thread
        (6, 5, True, None),
    ]
    leaves = "SELECT id, leaf_id FROM conversations ORDER BY id"
    assert [tuple(row) for row in rows(empty_database, leaves)] == [
        (1, 2),
        (2, 6),
        (3, None),
    ]


def test_after_the_branches_migration_a_v1_client_still_continues_its_conversation(
    empty_database: Database, tmp_path: Path
) -> None:
    database_before_branches(empty_database)
    with app_starter(tmp_path, "http://127.0.0.1:9") as start:
        app = start(DATABASE_URL=empty_database.url)  # it migrates on start
        with httpx.Client(base_url=app.url, timeout=10) as client:
            assert branch(client, 1) == ["q1", "q3", "q2"]
            history = [{"role": role, "content": text} for role, text in OLD_THREAD]
            answer = client.post(
                "/v1/chat/completions",
                json={"model": "echo", "messages": [*history, user("q7")]},
            )
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-conversation-id"] == "2"
            assert [
                m["id"]
                for m in client.get(
                    "/conversations/2/messages", params={"all": "true"}
                ).json()
            ] == [4, 5, 6, int(answer.headers["x-message-id"])]
            assert (
                client.get(f"/messages/{answer.headers['x-message-id']}").json()[
                    "parent_id"
                ]
                == 5
            )
            assert len(client.get("/conversations").json()) == 3  # nothing imported


# Branches --------------------------------------------------------------------------------


def regenerate(
    client: httpx.Client, message_id: int, body: object = None
) -> tuple[httpx.Response, list[tuple[str, dict]]]:
    """POST /messages/{id}/regenerate: the response, and its events when it streamed."""
    kwargs = {} if body is None else {"json": body}
    with client.stream(
        "POST", f"/messages/{message_id}/regenerate", **kwargs
    ) as response:
        if response.status_code != 200:
            response.read()
            return response, []
        return response, list(iter_events(response))


def chain(client: httpx.Client, conversation_id: int, *prompts: str) -> list[dict]:
    """Successful turns stored one after another; returns them."""
    return [
        add_message(
            client,
            conversation_id,
            prompt_content=prompt,
            response_content=f"re {prompt}",
            is_success=True,
        )
        for prompt in prompts
    ]


def branch(client: httpx.Client, conversation_id: int, **params: object) -> list[str]:
    """The prompts of the active branch (or, with all=True, of every turn)."""
    response = client.get(f"/conversations/{conversation_id}/messages", params=params)
    assert response.status_code == 200, response.text
    return [message["prompt_content"] for message in response.json()]


def leaf(client: httpx.Client, conversation_id: int) -> int | None:
    return client.get(f"/conversations/{conversation_id}").json()["leaf_id"]


def switch(client: httpx.Client, conversation_id: int, leaf_id: int | None) -> dict:
    response = client.patch(
        f"/conversations/{conversation_id}", json={"leaf_id": leaf_id}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_a_generated_turn_follows_the_leaf_and_becomes_it(client: httpx.Client) -> None:
    _, events = generate(client, prompt="first")
    first = events[-1][1]
    _, events = generate(
        client, prompt="second", conversation_id=first["conversation_id"]
    )
    second = events[-1][1]
    assert (first["parent_id"], second["parent_id"]) == (None, first["id"])
    assert leaf(client, first["conversation_id"]) == second["id"]


def test_a_stored_turn_follows_the_leaf_and_becomes_it(client: httpx.Client) -> None:
    conversation = new_conversation(client)
    first, second = chain(client, conversation["id"], "q1", "q2")
    assert (first["parent_id"], second["parent_id"]) == (None, first["id"])
    assert leaf(client, conversation["id"]) == second["id"]


def test_a_turn_is_the_leaf_as_soon_as_it_is_stored_before_its_reply_ends(
    client: httpx.Client,
) -> None:
    conversation = new_conversation(client, model_type="fake:pieces=20:gap_ms=50")
    params = {"prompt": "slow", "conversation_id": conversation["id"]}
    with client.stream("GET", "/text/generate/stream", params=params) as response:
        events = iter_events(response)
        started = next(events)[1]
        assert leaf(client, conversation["id"]) == started["message_id"]
        assert list(events)[-1][0] == "done"
    assert leaf(client, conversation["id"]) == started["message_id"]


def test_regenerate_streams_a_sibling_with_the_same_prompt_as_generation_does(
    client: httpx.Client,
) -> None:
    conversation = new_conversation(client)
    first, second = chain(client, conversation["id"], "q1", "say this again")
    with client.stream("POST", f"/messages/{second['id']}/regenerate") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-conversation-id"] == str(conversation["id"])
        lines = list(response.iter_lines())
    events = [
        line.removeprefix("event:").strip()
        for line in lines
        if line.startswith("event:")
    ]
    assert events == ["start", "done"]
    data = [
        json.loads(line.removeprefix("data:"))
        for line in lines
        if line.startswith("data:")
    ]
    started, done = data[0], data[-1]
    new_id = started["message_id"]
    assert started == {"conversation_id": conversation["id"], "message_id": new_id}
    ids = [line.removeprefix("id:").strip() for line in lines if line.startswith("id:")]
    assert ids[0] == f"{new_id}:0" and ids[-1] == f"{new_id}:end"
    assert any(line.startswith("retry:") for line in lines)
    assert (done["prompt_content"], done["response_content"]) == ("say this again",) * 2
    assert (done["parent_id"], done["is_success"], done["live"]) == (
        first["id"],
        True,
        False,
    )
    assert leaf(client, conversation["id"]) == new_id


def test_regenerate_with_a_prompt_is_an_edit_and_keeps_the_old_branch(
    client: httpx.Client,
) -> None:
    conversation = new_conversation(client)
    first, second, third = chain(client, conversation["id"], "q1", "q2", "q3")
    response, events = regenerate(client, second["id"], {"prompt": "q2 edited"})
    assert response.status_code == 200
    edited = events[-1][1]
    assert (edited["prompt_content"], edited["parent_id"]) == ("q2 edited", first["id"])
    assert branch(client, conversation["id"]) == ["q1", "q2 edited"]
    assert branch(client, conversation["id"], all=True) == [
        "q1",
        "q2",
        "q3",
        "q2 edited",
    ]
    assert client.get(f"/messages/{third['id']}").json() == third


def test_regenerate_gives_the_model_the_branch_it_joins_as_history(
    client: httpx.Client, llm_requests: list[dict]
) -> None:
    conversation = new_conversation(client, model_type="fake:pieces=1")
    first, second, _ = chain(client, conversation["id"], "q1", "q2", "q3")
    regenerate(client, second["id"], {"prompt": "other q2"})
    assert llm_requests[-1]["messages"] == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "re q1"},
        {"role": "user", "content": "other q2"},
    ]
    regenerate(client, first["id"])
    assert llm_requests[-1]["messages"] == [{"role": "user", "content": "q1"}]


def test_regenerate_of_an_unknown_message_is_404_and_stores_nothing(
    client: httpx.Client,
) -> None:
    response, _ = regenerate(client, 2_000_000_000)
    assert response.status_code == 404
    assert response.json() == {"detail": "Message not found"}


def test_regenerate_with_a_last_event_id_is_a_reconnect_and_starts_no_turn(
    client: httpx.Client,
) -> None:
    conversation = new_conversation(client)
    (turn,) = chain(client, conversation["id"], "q1")
    _, events = regenerate(client, turn["id"])
    sibling = events[-1][1]
    response = client.post(
        f"/messages/{turn['id']}/regenerate",
        headers={"Last-Event-ID": f"{sibling['id']}:end"},
    )
    assert response.status_code == 204
    with client.stream(
        "POST",
        f"/messages/{turn['id']}/regenerate",
        headers={"Last-Event-ID": f"{sibling['id']}:0"},
    ) as response:
        followed = list(iter_events(response))
    assert followed[-1] == ("done", sibling)
    assert len(branch(client, conversation["id"], all=True)) == 2


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": ""},
        {"prompt": "  "},
        {"prompt": 5},
        {"prompt": "a\x00b"},
        {"prompt": "x" * 32_001},
        ["q"],
    ],
    ids=["empty", "blank", "number", "nul", "over-max-prompt-chars", "list"],
)
def test_regenerate_with_a_bad_body_is_422_and_stores_nothing(
    client: httpx.Client, body: object
) -> None:
    conversation = new_conversation(client)
    (turn,) = chain(client, conversation["id"], "q1")
    response, _ = regenerate(client, turn["id"], body)
    assert response.status_code == 422
    assert response.json()["detail"]
    assert branch(client, conversation["id"], all=True) == ["q1"]


def test_the_active_branch_is_listed_first_turn_first_in_pages_and_all_lists_every_turn(
    client: httpx.Client,
) -> None:
    conversation = new_conversation(client)
    q1, q2, _ = chain(client, conversation["id"], "q1", "q2", "q3")
    switch(client, conversation["id"], q1["id"])
    chain(client, conversation["id"], "b2", "b3", "b4")
    assert branch(client, conversation["id"]) == ["q1", "b2", "b3", "b4"]
    assert branch(client, conversation["id"], skip=1, take=2) == ["b2", "b3"]
    every = client.get(
        f"/conversations/{conversation['id']}/messages", params={"all": "true"}
    ).json()
    assert [m["prompt_content"] for m in every] == ["q1", "q2", "q3", "b2", "b3", "b4"]
    assert [m["parent_id"] for m in every][:4] == [None, q1["id"], q2["id"], q1["id"]]


def test_switching_the_leaf_changes_the_branch_but_not_updated_at(
    client: httpx.Client,
) -> None:
    conversation = new_conversation(client)
    q1, q2 = chain(client, conversation["id"], "q1", "q2")
    before = client.get(f"/conversations/{conversation['id']}").json()
    switched = switch(client, conversation["id"], q1["id"])
    assert (switched["leaf_id"], switched["updated_at"]) == (
        q1["id"],
        before["updated_at"],
    )
    assert branch(client, conversation["id"]) == ["q1"]
    renamed = client.patch(
        f"/conversations/{conversation['id']}",
        json={"title": "Renamed", "leaf_id": q2["id"]},
    ).json()
    assert (renamed["title"], renamed["leaf_id"]) == ("Renamed", q2["id"])
    assert renamed["updated_at"] > before["updated_at"]


@pytest.mark.parametrize("leaf_id", ["another's", 2_000_000_000, "text", 0])
def test_a_leaf_that_is_not_a_turn_of_the_conversation_is_422_and_changes_nothing(
    client: httpx.Client, leaf_id: object
) -> None:
    conversation = new_conversation(client)
    (turn,) = chain(client, conversation["id"], "q1")
    if leaf_id == "another's":
        leaf_id = chain(client, new_conversation(client)["id"], "elsewhere")[0]["id"]
    response = client.patch(
        f"/conversations/{conversation['id']}", json={"leaf_id": leaf_id, "title": "No"}
    )
    assert response.status_code == 422
    assert response.json()["detail"]
    after = client.get(f"/conversations/{conversation['id']}").json()
    assert (after["leaf_id"], after["title"]) == (turn["id"], "A chat")


def test_a_null_leaf_makes_the_next_turn_a_new_first_turn(client: httpx.Client) -> None:
    conversation = new_conversation(client)
    chain(client, conversation["id"], "q1", "q2")
    assert switch(client, conversation["id"], None)["leaf_id"] is None
    assert branch(client, conversation["id"]) == []
    (fresh,) = chain(client, conversation["id"], "anew")
    assert fresh["parent_id"] is None
    assert branch(client, conversation["id"]) == ["anew"]
    assert len(branch(client, conversation["id"], all=True)) == 3


def test_switching_back_restores_what_the_model_gets(
    client: httpx.Client, llm_requests: list[dict]
) -> None:
    conversation = new_conversation(client, model_type="fake:pieces=1")
    _, q2 = chain(client, conversation["id"], "q1", "q2")
    _, events = regenerate(client, q2["id"], {"prompt": "q2 edited"})
    edited = events[-1][1]
    switch(client, conversation["id"], q2["id"])
    generate(client, prompt="next", conversation_id=conversation["id"])
    assert [m["content"] for m in llm_requests[-1]["messages"]] == [
        "q1",
        "re q1",
        "q2",
        "re q2",
        "next",
    ]
    switch(client, conversation["id"], edited["id"])
    generate(client, prompt="next", conversation_id=conversation["id"])
    assert [m["content"] for m in llm_requests[-1]["messages"]] == [
        "q1",
        "re q1",
        "q2 edited",
        "w0 ",
        "next",
    ]


def test_deleting_a_middle_turn_makes_the_turns_after_it_follow_its_parent(
    client: httpx.Client,
) -> None:
    conversation = new_conversation(client)
    q1, q2, q3 = chain(client, conversation["id"], "q1", "q2", "q3")
    _, events = regenerate(client, q3["id"], {"prompt": "q3 again"})
    assert client.delete(f"/messages/{q2['id']}").status_code == 204
    assert client.get(f"/messages/{q3['id']}").json()["parent_id"] == q1["id"]
    assert (
        client.get(f"/messages/{events[-1][1]['id']}").json()["parent_id"] == q1["id"]
    )
    assert branch(client, conversation["id"]) == ["q1", "q3 again"]


def test_deleting_the_leaf_makes_its_parent_the_leaf(client: httpx.Client) -> None:
    conversation = new_conversation(client)
    q1, q2 = chain(client, conversation["id"], "q1", "q2")
    assert client.delete(f"/messages/{q2['id']}").status_code == 204
    assert leaf(client, conversation["id"]) == q1["id"]
    assert branch(client, conversation["id"]) == ["q1"]
    assert client.delete(f"/messages/{q1['id']}").status_code == 204
    assert leaf(client, conversation["id"]) is None
    assert chain(client, conversation["id"], "anew")[0]["parent_id"] is None


def test_turns_started_at_once_on_one_leaf_are_all_kept_each_after_the_leaf_when_stored(
    server: Server,
) -> None:
    with httpx.Client(base_url=server.url, timeout=20) as client:
        conversation = new_conversation(client, model_type="fake:pieces=3:gap_ms=100")
        (first,) = chain(client, conversation["id"], "q0")

    async def at_once() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:

            async def one(i: int) -> int:
                params = {"prompt": f"q{i}", "conversation_id": conversation["id"]}
                async with client.stream(
                    "GET", "/text/generate/stream", params=params
                ) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data:"):
                            return json.loads(line.removeprefix("data:"))["message_id"]

            return await asyncio.gather(*(one(i) for i in range(1, 9)))

    started = sorted(asyncio.run(at_once()))
    with httpx.Client(base_url=server.url, timeout=20) as client:
        every = client.get(
            f"/conversations/{conversation['id']}/messages", params={"all": "true"}
        ).json()
        stored = {m["id"]: m["parent_id"] for m in every}
        assert set(stored) == {first["id"], *started}  # none lost
        # Writers in one conversation take turns: each follows the one stored before it.
        assert [stored[i] for i in started] == [first["id"], *started[:-1]]
        assert leaf(client, conversation["id"]) == started[-1]
        for message_id in started:
            wait_for(finished_turn(client, message_id))


def test_v1_the_same_history_again_is_a_sibling_in_the_same_conversation(
    sdk: openai.OpenAI, client: httpx.Client
) -> None:
    messages = [user(unique("q1"))]
    reply, first = chat(sdk, messages)
    messages += [assistant(reply), user("q2")]
    _, second = chat(sdk, messages)
    _, regenerated = chat(sdk, messages)  # what a client's Regenerate sends
    assert regenerated["x-conversation-id"] == first["x-conversation-id"]
    siblings = [
        client.get(f"/messages/{h['x-message-id']}").json()
        for h in (second, regenerated)
    ]
    assert [turn["parent_id"] for turn in siblings] == [int(first["x-message-id"])] * 2
    assert leaf(client, first["x-conversation-id"]) == siblings[1]["id"]


def test_v1_a_history_cut_before_an_earlier_message_with_new_text_branches_there(
    sdk: openai.OpenAI, client: httpx.Client
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, user(unique("q1"))]
    for prompt in ("q2", "q3"):
        reply, headers = chat(sdk, messages)
        messages += [assistant(reply), user(prompt)]
    first_turn = turns(client, headers["x-conversation-id"])[0]
    _, edited = chat(sdk, [*messages[:3], user("q2, edited")])
    assert edited["x-conversation-id"] == headers["x-conversation-id"]
    turn = client.get(f"/messages/{edited['x-message-id']}").json()
    assert turn["parent_id"] == first_turn["id"]
    assert branch(client, turn["conversation_id"])[-1] == "q2, edited"
    assert len(branch(client, turn["conversation_id"], all=True)) == 3


def test_v1_a_failed_turn_is_never_continued_by_path(
    sdk: openai.OpenAI, client: httpx.Client
) -> None:
    messages = [user(unique("q1"))]
    with pytest.raises(openai.InternalServerError) as raised:
        chat(sdk.with_options(max_retries=0), messages, model="fake:fail=500")
    failed = raised.value.response.headers["x-conversation-id"]
    assert [m["is_success"] for m in turns(client, failed)] == [False]
    # The history as if the failed turn's empty reply had been the answer.
    _, later = chat(sdk, [*messages, assistant(""), user("q2")])
    assert later["x-conversation-id"] != failed


def test_v1_after_kill_9_mid_call_the_retry_continues_the_same_conversation(
    start_app: Callable[..., Server], client: httpx.Client
) -> None:
    killed = start_app()
    messages = [user(unique("q1")), assistant("a1"), user("q2")]
    with openai_client(killed) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(
            model="fake:pieces=100:gap_ms=50", messages=messages, stream=True
        )
        conversation_id = raw.headers["x-conversation-id"]
        killed.process.kill()
        killed.process.wait(5)
    with openai_client(start_app()) as sdk:
        _, retried = chat(sdk, messages)
    assert retried["x-conversation-id"] == conversation_id
    stored = branch(client, conversation_id, all=True)
    assert stored == [messages[0]["content"], "q2", "q2"]  # nothing imported again
    dead, retry = client.get(
        f"/conversations/{conversation_id}/messages", params={"all": "true"}
    ).json()[1:]
    assert dead["parent_id"] == retry["parent_id"]


def test_the_page_regenerates_edits_and_switches_versions_and_keeps_the_branch(
    open_page: Callable[..., Page], service: httpx.Client, tmp_path: Path
) -> None:
    conversation = new_conversation(service)  # echo: the reply is the prompt
    chain(service, conversation["id"], "q1", "q2")
    page = open_page(f"/#/c/{conversation['id']}")
    problems = []
    page.on("console", lambda m: m.type == "error" and problems.append(m.text))
    page.on("pageerror", lambda error: problems.append(str(error)))
    second = page.locator(".turn").nth(1)
    expect(second.locator(".reply .text")).to_have_text("re q2")
    expect(second.get_by_role("button", name="Previous version")).to_be_hidden()

    second.get_by_role("button", name="Regenerate").click()
    expect(second.locator(".reply .text")).to_have_text("q2")  # echo's, streamed
    expect(second.locator(".counter")).to_have_text("2/2")
    second.get_by_role("button", name="Edit").click()
    editor = second.get_by_role("textbox", name="Edit message")
    expect(editor).to_have_value("q2")
    editor.fill("q2, edited")
    editor.press("Enter")
    expect(second.locator(".prompt .text")).to_have_text("q2, edited")
    expect(second.locator(".reply .text")).to_have_text("q2, edited")
    expect(second.locator(".counter")).to_have_text("3/3")
    assert len(branch(service, conversation["id"], all=True)) == 4

    second.get_by_role("button", name="Previous version").click()
    expect(second.locator(".counter")).to_have_text("2/3")
    expect(second.locator(".reply .text")).to_have_text("q2")
    page.screenshot(path=tmp_path / "versions.png")
    wait_for(lambda: branch(service, conversation["id"]) == ["q1", "q2"])
    page.reload()
    expect(page.locator(".turn").nth(1).locator(".counter")).to_have_text("2/3")
    elsewhere = open_page(f"/#/c/{conversation['id']}")  # another browser profile
    expect(elsewhere.locator(".turn").nth(1).locator(".counter")).to_have_text("2/3")
    expect(elsewhere.locator(".turn").nth(1).locator(".reply .text")).to_have_text("q2")
    elsewhere.locator(".turn").nth(1).get_by_role("button", name="Next version").click()
    expect(elsewhere.locator(".turn").nth(1).locator(".counter")).to_have_text("3/3")
    page.reload()
    expect(page.locator(".turn").nth(1).locator(".prompt .text")).to_have_text(
        "q2, edited"
    )
    assert problems == []
    if os.environ.get("KEEP_SCREENSHOTS"):
        shutil.copy(tmp_path / "versions.png", os.environ["KEEP_SCREENSHOTS"])


def test_the_page_sends_after_the_branch_it_shows(
    open_page: Callable[..., Page], service: httpx.Client
) -> None:
    conversation = new_conversation(service)
    q1, _ = chain(service, conversation["id"], "q1", "q2")
    switch(service, conversation["id"], q1["id"])
    page = open_page(f"/#/c/{conversation['id']}")
    expect(page.locator(".turn")).to_have_count(1)
    send_message(page, "after q1")
    expect(last_reply(page)).to_have_text("after q1")
    expect(page.locator(".turn").nth(1).locator(".counter")).to_have_text("2/2")
    assert branch(service, conversation["id"]) == ["q1", "after q1"]


# Search, export and import ---------------------------------------------------------------


def marker() -> str:
    """A word no other test's text holds, so a search sees only this test's turns."""
    return f"mk{uuid.uuid4().hex[:10]}"


def search(client: httpx.Client, q: str, **params: object) -> list[dict]:
    response = client.get("/search", params={"q": q, **params})
    assert response.status_code == 200, response.text
    return response.json()


def found_turns(client: httpx.Client, q: str, **params: object) -> list[int]:
    return [
        hit["message"]["id"] for hit in search(client, q, **params) if hit["message"]
    ]


def test_search_finds_turns_by_prompt_or_reply_substrings_and_conversations_by_title(
    client: httpx.Client,
) -> None:
    word = marker()
    titled = new_conversation(client, title=f"Notes on x{word}y")
    other = new_conversation(client)
    asked = add_message(client, other["id"], prompt_content=f"about{word}s?")
    answered = add_message(client, other["id"], response_content=f"see {word.upper()}")
    hits = search(client, word)
    assert [(h["conversation"]["id"], h["message"]) for h in hits[:1]] == [
        (titled["id"], None)
    ]
    assert hits[0]["snippet"] == f"Notes on x{word}y"
    assert [h["message"]["id"] for h in hits[1:]] == [answered["id"], asked["id"]]
    assert hits[1]["conversation"]["id"] == other["id"]


def test_search_terms_may_be_split_between_prompt_and_reply_and_all_must_occur(
    client: httpx.Client,
) -> None:
    one, two = marker(), marker()
    conversation = new_conversation(client)
    both = add_message(
        client, conversation["id"], prompt_content=one, response_content=two
    )
    add_message(client, conversation["id"], prompt_content=one, response_content="-")
    assert found_turns(client, f"{one} {two}") == [both["id"]]
    assert found_turns(client, f"{two.upper()} {one}") == [both["id"]]


def test_a_quoted_phrase_is_one_term_with_its_spaces(client: httpx.Client) -> None:
    word = marker()
    conversation = new_conversation(client)
    phrase = add_message(client, conversation["id"], prompt_content=f"{word} new york")
    add_message(client, conversation["id"], prompt_content=f"{word} york is new")
    assert found_turns(client, f'{word} "new york"') == [phrase["id"]]
    assert len(found_turns(client, f"{word} new york")) == 2
    assert len(found_turns(client, f'{word} ""')) == 2  # an empty phrase is ignored


@pytest.mark.parametrize(
    "q",
    ["", "   \n\t", "x" * 1001, "y" * 5000, " ".join(f"t{i}" for i in range(33))],
    ids=["empty", "whitespace", "1001-chars", "5000-chars", "33-terms"],
)
def test_search_refuses_an_empty_or_too_long_q_or_too_many_terms(
    client: httpx.Client, q: str
) -> None:
    response = client.get("/search", params={"q": q})
    assert response.status_code == 422
    assert response.json()["detail"]


def test_thirty_two_terms_and_a_thousand_characters_are_searched(
    client: httpx.Client,
) -> None:
    words = [marker() for _ in range(32)]
    turn = add_message(
        client, new_conversation(client)["id"], prompt_content=" ".join(words)
    )
    assert found_turns(client, " ".join(words)) == [turn["id"]]
    assert search(client, words[0] + "z" * (1000 - len(words[0]))) == []


@pytest.mark.parametrize(
    "text, q",
    [
        ("东京的天气今天很好", "天气今天"),
        ("日本語のテキストを検索します", "テキスト"),
        ("日本語のテキストを検索します", "検索"),
        ("a short ab term", "ab"),
        ("party 🎉🎉 time", "🎉"),
        ("Ünïcode café", "café"),
    ],
    ids=[
        "chinese",
        "japanese",
        "japanese-2-chars",
        "latin-2-chars",
        "emoji",
        "accents",
    ],
)
def test_search_finds_substrings_in_any_script_and_short_terms(
    client: httpx.Client, text: str, q: str
) -> None:
    word = marker()
    turn = add_message(
        client, new_conversation(client)["id"], prompt_content=f"{word} {text}"
    )
    assert found_turns(client, f"{word} {q}") == [turn["id"]]


def test_accents_are_not_folded(client: httpx.Client) -> None:
    word = marker()
    add_message(client, new_conversation(client)["id"], prompt_content=f"{word} café")
    assert found_turns(client, f"{word} cafe") == []


HOSTILE = [
    '"',
    '"unpaired',
    "*",
    "%",
    "_",
    "\\",
    "' OR 1=1 --",
    "NEAR(",
    "AND OR NOT",
    "a* OR b:c ^d -e",
    "'; DROP TABLE messages; --",
    "%_\\%",
    '"""',
]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_operators_wildcards_and_sql_in_q_are_only_text_to_find(
    client: httpx.Client, hostile: str
) -> None:
    word = marker()
    conversation = new_conversation(client)
    literal = add_message(
        client, conversation["id"], prompt_content=f"{word} has {hostile} inside"
    )
    add_message(client, conversation["id"], prompt_content=f"{word} zzz")
    assert found_turns(client, f"{word} {hostile}") == [literal["id"]]
    assert client.get("/search", params={"q": hostile}).status_code == 200


def test_a_live_reply_is_found_only_once_its_turn_ends(client: httpx.Client) -> None:
    word = marker()
    conversation = new_conversation(client, model_type="fake:pieces=6:gap_ms=300")
    body = {"prompt": f"slow {word}", "conversation_id": conversation["id"]}
    with client.stream("POST", "/text/generate/stream", json=body) as response:
        events = iter_events(response)
        message_id = next(events)[1]["message_id"]
        next(events)  # a piece: the reply is under way, and checkpointed
        assert search(client, word) == []
        assert found_turns(client, f"{word} w0") == []
        assert [name for name, _ in events][-1] == "done"
    assert found_turns(client, f"{word} w5") == [message_id]


def test_search_sees_a_put_and_a_delete_at_once(client: httpx.Client) -> None:
    before, after = marker(), marker()
    conversation = new_conversation(client)
    turn = add_message(client, conversation["id"], prompt_content=before)
    assert found_turns(client, before) == [turn["id"]]
    body = {"prompt_content": after, "response_content": "changed"}
    assert client.put(f"/messages/{turn['id']}", json=body).status_code == 202
    assert (found_turns(client, before), found_turns(client, after)) == (
        [],
        [turn["id"]],
    )
    assert client.delete(f"/messages/{turn['id']}").status_code == 204
    assert found_turns(client, after) == []
    titled = new_conversation(client, title=f"title {before}")
    client.put(
        f"/conversations/{titled['id']}", json={"title": "plain", "model_type": "echo"}
    )
    assert search(client, before) == []


def test_search_pages_titles_first_then_turns_newest_first(
    client: httpx.Client,
) -> None:
    word = marker()
    older = new_conversation(client, title=f"older {word}")
    newer = new_conversation(client, title=f"newer {word}")
    conversation = new_conversation(client)
    turns = [
        add_message(client, conversation["id"], prompt_content=f"{word} {i}")
        for i in range(5)
    ]
    expected = [(newer["id"], None), (older["id"], None)]
    expected += [(conversation["id"], t["id"]) for t in reversed(turns)]
    hits = search(client, word, take=100)
    assert [
        (h["conversation"]["id"], h["message"] and h["message"]["id"]) for h in hits
    ] == expected
    pages = [search(client, word, skip=skip, take=3) for skip in (0, 3, 6)]
    assert [h for page in pages for h in page] == hits
    assert client.get("/search", params={"q": word, "take": 101}).status_code == 422
    assert client.get("/search", params={"q": word, "skip": -1}).status_code == 422


def test_a_snippet_is_at_most_200_characters_around_the_first_match_in_one_line(
    client: httpx.Client,
) -> None:
    word = marker()
    prompt = "lead\n\n  words " * 40 + f"{word}\tafter\n" + "tail " * 100
    turn = add_message(
        client,
        new_conversation(client)["id"],
        prompt_content=prompt,
        response_content=f"{word} in the reply",
    )
    [hit] = search(client, word)
    assert hit["message"]["id"] == turn["id"]
    assert len(hit["snippet"]) <= 200 and f"{word} after" in hit["snippet"]
    assert "\n" not in hit["snippet"] and "  " not in hit["snippet"]
    assert hit["snippet"].startswith("words") or hit["snippet"].startswith("lead")
    only_reply = add_message(
        client,
        new_conversation(client)["id"],
        prompt_content="-",
        response_content=f"{word}!",
    )
    assert search(client, f"{word}!")[0]["message"]["id"] == only_reply["id"]
    assert search(client, f"{word}!")[0]["snippet"] == f"{word}!"


def stamp(minute: int) -> str:
    return f"2025-03-01T10:{minute:02d}:00.000000Z"


def our_export(title: str, model_type: str, tree: dict, leaf: int | None) -> dict:
    """An export by hand: `tree` maps each turn's id to its parent's (None: a first turn)."""
    messages = [
        {
            "id": turn_id,
            "parent_id": parent_id,
            "prompt_content": f"prompt {turn_id}",
            "response_content": f"reply {turn_id}",
            "prompt_tokens": 2,
            "response_tokens": 2,
            "total_tokens": 4,
            "is_success": True,
            "status_code": 200,
            "live": False,
            "created_at": stamp(turn_id),
            "updated_at": stamp(turn_id + 1),
        }
        for turn_id, parent_id in tree.items()
    ]
    conversation = {"id": 77, "title": title, "model_type": model_type}
    conversation |= {"leaf_id": leaf, "created_at": stamp(0), "updated_at": stamp(59)}
    return {
        "format": "chat-backend/1",
        "conversation": conversation,
        "messages": messages,
    }


def import_body(client: httpx.Client, body: bytes | str) -> httpx.Response:
    content = body.encode() if isinstance(body, str) else body
    return client.post("/import", content=content)


def exported(client: httpx.Client, conversation_id: int) -> dict:
    response = client.get(f"/conversations/{conversation_id}/export")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


def without_ids(export: dict) -> dict:
    """The export with its ids replaced by their order of appearance (mapped consistently)."""
    order = {m["id"]: n for n, m in enumerate(export["messages"], 1)}
    conversation = {**export["conversation"], "id": None}
    conversation["leaf_id"] = order.get(conversation["leaf_id"])
    messages = [
        {
            **m,
            "id": order[m["id"]],
            "parent_id": order.get(m["parent_id"]),
            "conversation_id": None,
        }
        for m in export["messages"]
    ]
    return {**export, "conversation": conversation, "messages": messages}


# Two branches: 1 -> 2 -> 3 and 1 -> 4 (the newest), with the leaf on the older one.
TREE = {1: None, 2: 1, 3: 2, 4: 1}


def test_an_export_imports_back_with_its_branches_leaf_times_model_and_counts(
    client: httpx.Client,
) -> None:
    kind = model("imported")
    body = our_export("Branchy", kind, TREE, leaf=3)
    response = import_body(client, json.dumps(body, indent=2))  # one object, pretty
    assert response.status_code == 201, response.text
    [conversation_id] = response.json()["conversation_ids"]
    export = exported(client, conversation_id)
    assert without_ids(export) == without_ids(
        {
            **body,
            "conversation": {**body["conversation"], "id": 0},
            "messages": [{**m, "conversation_id": 0} for m in body["messages"]],
        }
    )
    assert client.get(f"/conversations/{conversation_id}").json()["model_type"] == kind
    branch = client.get(f"/conversations/{conversation_id}/messages").json()
    assert [m["prompt_content"] for m in branch] == ["prompt 1", "prompt 2", "prompt 3"]


def test_the_markdown_export_is_the_active_branch_with_texts_as_they_are(
    client: httpx.Client,
) -> None:
    body = our_export("Two\nlines <b>", model("md"), TREE, leaf=4)
    body["messages"][3]["prompt_content"] = "# not a heading\n<script>x</script> *a*"
    body["messages"][3]["response_content"] = "```\ncode\n```"
    [conversation_id] = import_body(client, json.dumps(body)).json()["conversation_ids"]
    response = client.get(f"/conversations/{conversation_id}/export?format=markdown")
    assert response.headers["content-type"] == "text/markdown; charset=utf-8"
    assert response.text == (
        "# Two lines <b>\n\n## User\n\nprompt 1\n\n## Assistant\n\nreply 1\n\n"
        "## User\n\n# not a heading\n<script>x</script> *a*\n\n## Assistant\n\n```\ncode\n```\n\n"
        f"Model: {body['conversation']['model_type']}\n"
        "Created: 2025-03-01T10:00:00.000000Z\nUpdated: 2025-03-01T10:59:00.000000Z\n"
    )


def test_exporting_an_unknown_conversation_is_404(client: httpx.Client) -> None:
    for query in ("", "?format=markdown"):
        response = client.get(f"/conversations/999999/export{query}")
        assert (response.status_code, response.json()) == (
            404,
            {"detail": "Conversation not found"},
        )


def test_export_all_is_ndjson_one_conversation_a_line_oldest_first_and_imports_back(
    client: httpx.Client,
) -> None:
    first, second = new_conversation(client), new_conversation(client)
    add_message(client, second["id"], prompt_content='<b>&amp;</b>\n"quoted"')
    response = client.get("/export")
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in response.text.splitlines()]
    ids = [line["conversation"]["id"] for line in lines]
    assert ids.index(first["id"]) < ids.index(second["id"])
    assert lines[ids.index(second["id"])] == exported(client, second["id"])
    mine = [lines[ids.index(c["id"])] for c in (first, second)]
    again = import_body(client, "".join(json.dumps(line) + "\n" for line in mine))
    assert again.status_code == 201, again.text
    copies = [exported(client, c) for c in again.json()["conversation_ids"]]
    assert [without_ids(c) for c in copies] == [without_ids(c) for c in mine]


def test_a_live_turn_is_exported_live_and_imported_as_a_failed_turn(
    client: httpx.Client,
) -> None:
    conversation = new_conversation(client, model_type="fake:pieces=8:gap_ms=300")
    body = {"prompt": "long one", "conversation_id": conversation["id"]}
    with client.stream("POST", "/text/generate/stream", json=body) as response:
        events = iter_events(response)
        next(events)
        next(events)
        live = exported(client, conversation["id"])
        [turn] = live["messages"]
        assert turn["live"] is True and turn["is_success"] is None
        [copy_id] = import_body(client, json.dumps(live)).json()["conversation_ids"]
        [copy] = exported(client, copy_id)["messages"]
        list(events)
    assert (copy["live"], copy["is_success"], copy["status_code"]) == (
        False,
        False,
        500,
    )
    assert copy["response_content"] == turn["response_content"]


def chatgpt_node(
    key: str,
    parent: str | None,
    role: str | None = None,
    *parts: object,
    **fields: object,
) -> dict:
    """A node of ChatGPT's `mapping`; without a role, one with no message (the root)."""
    message = None
    if role is not None:
        content = {
            "content_type": fields.pop("content_type", "text"),
            "parts": list(parts),
        }
        message = {
            "id": key,
            "author": {"role": role, "name": None},
            "content": content,
        }
        message |= {"create_time": fields.pop("at", None), "update_time": None}
        message |= {"status": "finished_successfully", "weight": 1.0, "metadata": {}}
        message |= {"recipient": "all", **fields}
    return {"id": key, "message": message, "parent": parent, "children": []}


def chatgpt_conversation(*nodes: dict, **fields: object) -> dict:
    return {
        "title": None,
        "create_time": 1700000000.5,
        "update_time": 1700000999.25,
        "mapping": {node["id"]: node for node in nodes},
        "current_node": nodes[-1]["id"],
        "conversation_id": "abc-123",
        **fields,
    }


CHATGPT_NODES = [
    chatgpt_node("root", None),
    chatgpt_node("sys", "root", "system", "You are ChatGPT", weight=0.0),
    chatgpt_node("u1", "sys", "user", "Hello there, how are you?", at=1700000100.0),
    chatgpt_node(
        "a1",
        "u1",
        "assistant",
        "First reply",
        at=1700000101.0,
        metadata={"model_slug": "gpt-4o"},
    ),
    chatgpt_node("a1b", "u1", "assistant", "Second ", "reply", at=1700000102.0),
    chatgpt_node(
        "u2",
        "a1b",
        "user",
        "Look at this",
        {"content_type": "image_asset_pointer"},
        "and this",
        content_type="multimodal_text",
        at=1700000103.0,
    ),
    chatgpt_node(
        "hidden",
        "u2",
        "assistant",
        "context",
        at=1700000104.0,
        metadata={"is_visually_hidden_from_conversation": True},
    ),
    chatgpt_node(
        "call",
        "hidden",
        "assistant",
        "search('x')",
        content_type="code",
        recipient="browser",
        at=1700000105.0,
    ),
    chatgpt_node("tool", "call", "tool", "results", at=1700000106.0),
    chatgpt_node(
        "a2",
        "tool",
        "assistant",
        "Here is what I found",
        at=1700000107.0,
        metadata={"model_slug": "gpt-4o-mini"},
    ),
]


def test_a_chatgpt_export_becomes_turns_with_siblings_the_leaf_times_and_model(
    client: httpx.Client,
) -> None:
    body = [chatgpt_conversation(*CHATGPT_NODES)]
    response = import_body(client, json.dumps(body))
    assert response.status_code == 201, response.text
    [conversation_id] = response.json()["conversation_ids"]
    export = exported(client, conversation_id)
    conversation, turns = export["conversation"], export["messages"]
    assert (conversation["title"], conversation["model_type"]) == (
        "Hello there, how are you?",
        "gpt-4o-mini",
    )
    assert (conversation["created_at"], conversation["updated_at"]) == (
        "2023-11-14T22:13:20.500000Z",
        "2023-11-14T22:29:59.250000Z",
    )
    pairs = [(t["prompt_content"], t["response_content"]) for t in turns]
    assert pairs == [
        ("Hello there, how are you?", "First reply"),
        ("Hello there, how are you?", "Second \nreply"),
        ("Look at this\nand this", "Here is what I found"),
    ]
    first, second, third = turns
    assert [t["parent_id"] for t in turns] == [None, None, second["id"]]
    assert conversation["leaf_id"] == third["id"]
    assert first["created_at"] == "2023-11-14T22:15:01.000000Z"
    assert first["updated_at"] == conversation["updated_at"]  # the reply had none
    assert {(t["is_success"], t["status_code"], t["total_tokens"]) for t in turns} == {
        (True, 200, None)
    }


def test_a_chatgpt_leaf_on_an_older_branch_and_replies_without_prompts(
    client: httpx.Client,
) -> None:
    nodes = [
        chatgpt_node("root", None),
        chatgpt_node("a0", "root", "assistant", "Welcome", at=1.0),
        chatgpt_node("u1", "a0", "user", "Only a question", at=2.0),
        chatgpt_node("u2", "a0", "user", "Another", at=3.0),
        chatgpt_node("a2", "u2", "assistant", "Answer", at=4.0),
    ]
    body = [chatgpt_conversation(*nodes, title="  Kept  ", current_node="u1")]
    [conversation_id] = import_body(client, json.dumps(body)).json()["conversation_ids"]
    export = exported(client, conversation_id)
    pairs = [(t["prompt_content"], t["response_content"]) for t in export["messages"]]
    assert pairs == [("", "Welcome"), ("Only a question", ""), ("Another", "Answer")]
    welcome, question, _ = export["messages"]
    assert export["conversation"]["title"] == "Kept"
    assert export["conversation"]["model_type"] == "echo"  # DEFAULT_MODEL
    assert export["conversation"]["leaf_id"] == question["id"]
    assert question["parent_id"] == welcome["id"]


def test_chatgpt_text_with_nul_or_lone_surrogates_is_replaced_and_overlong_text_cut(
    client: httpx.Client,
) -> None:
    nodes = [
        chatgpt_node("u", None, "user", "nul \x00 here", at=1.0),
        chatgpt_node("a", "u", "assistant", "x" * 1_000_005, at=2.0),
    ]
    body = json.dumps([chatgpt_conversation(*nodes, title="t" * 300)])
    body = body.replace("here", "\\ud800here")  # a lone surrogate, as JSON writes one
    response = import_body(client, body)
    assert response.status_code == 201, response.text
    export = exported(client, response.json()["conversation_ids"][0])
    [turn] = export["messages"]
    assert turn["prompt_content"] == "nul \ufffd \ufffdhere"
    assert len(turn["response_content"]) == 1_000_000
    assert export["conversation"]["title"] == "t" * 200


def ours(tree: dict, leaf: int | None = None, **changes: object) -> dict:
    body = our_export("Bad", MALFORMED_MODEL, tree, leaf)
    for at, fields in changes.get("messages", {}).items():
        body["messages"][at] |= fields
    return body | {k: v for k, v in changes.items() if k != "messages"}


MALFORMED_MODEL = f"malformed-{uuid.uuid4().hex[:8]}"
CYCLE_NODES = [
    chatgpt_node("u1", "a1", "user", "q", at=1.0),
    chatgpt_node("a1", "u1", "assistant", "a", at=2.0),
]
SKIPPED_CYCLE = [chatgpt_node("x", "y"), chatgpt_node("y", "x")]
MALFORMED = {
    "not-json": (b"{nope", "conversation 0"),
    "empty": (b"", "conversation 0"),
    "wrong-shapes": (
        json.dumps({"format": "chat-backend/1", "conversation": [], "messages": {}}),
        "conversation",
    ),
    "other-format": (json.dumps(ours(TREE) | {"format": "chat-backend/2"}), "format"),
    "unknown-parent": (json.dumps(ours({1: None, 2: 9})), "messages.1.parent_id"),
    "cycle": (json.dumps(ours({1: 2, 2: 1})), "cycle"),
    "duplicate-id": (
        json.dumps(ours({1: None}) | {"messages": ours({1: None})["messages"] * 2}),
        "messages.1.id",
    ),
    "unknown-leaf": (json.dumps(ours(TREE, leaf=9)), "leaf_id"),
    "nul": (
        json.dumps(ours(TREE, messages={2: {"prompt_content": "a\x00b"}})),
        "messages.2.prompt_content",
    ),
    "lone-surrogate": (
        json.dumps(ours(TREE)).replace("prompt 2", "\\udc00"),
        "conversation 0",
    ),
    "2m-reply": (
        json.dumps(ours(TREE, messages={0: {"response_content": "r" * 2_000_000}})),
        "messages.0.response_content",
    ),
    "string-count": (
        json.dumps(ours(TREE, messages={1: {"prompt_tokens": "2"}})),
        "messages.1.prompt_tokens",
    ),
    "naive-time": (
        json.dumps(ours(TREE, messages={1: {"created_at": "2025-03-01T10:00:00"}})),
        "messages.1.created_at",
    ),
    "bad-ndjson-line": (
        "\n".join(json.dumps(ours(TREE)) for _ in range(2)) + "\n{]\n",
        "conversation 2",
    ),
    "chatgpt-not-a-mapping": (
        json.dumps([chatgpt_conversation(*CHATGPT_NODES) | {"mapping": []}]),
        "mapping",
    ),
    "chatgpt-unknown-parent": (
        json.dumps([chatgpt_conversation(chatgpt_node("u", "nowhere", "user", "q"))]),
        "nowhere",
    ),
    "chatgpt-cycle": (json.dumps([chatgpt_conversation(*CYCLE_NODES)]), "cycle"),
    "chatgpt-skipped-cycle": (
        json.dumps([chatgpt_conversation(*SKIPPED_CYCLE)]),
        "cycle",
    ),
    "chatgpt-unknown-current-node": (
        json.dumps([chatgpt_conversation(*CHATGPT_NODES, current_node="gone")]),
        "current_node",
    ),
    "chatgpt-second-bad": (
        json.dumps([chatgpt_conversation(*CHATGPT_NODES), 5]),
        "conversation 1",
    ),
}


@pytest.mark.parametrize("body, where", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_import_is_422_saying_where_and_stores_nothing(
    client: httpx.Client, body: bytes | str, where: str
) -> None:
    before = client.get("/conversations", params={"take": 1}).json()
    response = import_body(client, body)
    assert response.status_code == 422, response.text
    assert where in response.json()["detail"]
    assert (
        client.get("/conversations", params={"model_type": MALFORMED_MODEL}).json()
        == []
    )
    assert client.get("/conversations", params={"take": 1}).json() == before


def test_an_import_over_max_import_bytes_is_413_before_it_is_read_whole(
    start_app: Callable[..., Server],
) -> None:
    server = start_app(MAX_IMPORT_BYTES="2000")
    kind = model("limit")
    body = json.dumps(our_export("Small", kind, {1: None}, 1))
    assert len(body) < 2000
    assert httpx.post(f"{server.url}/import", content=body).status_code == 201
    response = httpx.post(f"{server.url}/import", content=body + " " * 2000)
    assert response.status_code == 413 and response.json()["detail"]
    chunked = httpx.post(
        f"{server.url}/import", content=iter([body.encode(), b" " * 2000])
    )
    assert chunked.status_code == 413
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.sendall(
            b"POST /import HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
            b"\r\nContent-Length: 90000000\r\n\r\n{"
        )
        answer = connection.recv(1000)  # at once: the body is never waited for
    assert answer.startswith(b"HTTP/1.1 413")
    assert (
        len(
            httpx.get(f"{server.url}/conversations", params={"model_type": kind}).json()
        )
        == 1
    )


def test_export_import_into_an_empty_database_and_export_again_gives_the_same_lines(
    database: Database, llm_url: str, tmp_path: Path
) -> None:
    kind = "sqlite" if database.url.startswith("sqlite") else "postgres"
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    with (
        new_database(kind, tmp_path / "a") as first,
        new_database(kind, tmp_path / "b") as second,
        app_starter(tmp_path, llm_url) as start,
    ):
        source = start(DATABASE_URL=first.url)
        odd = our_export("Odd <i>text</i>", "gpt-x", TREE, leaf=2)
        odd["messages"][1] |= {"prompt_content": "é\n\t\"'\\ 🎉", "prompt_tokens": None}
        odd["messages"][2] |= {"is_success": False, "status_code": 502}
        ndjson = (
            json.dumps(odd) + "\n" + json.dumps(our_export("Plain", "echo", {}, None))
        )
        assert httpx.post(f"{source.url}/import", content=ndjson).status_code == 201
        with httpx.Client(base_url=source.url) as client:
            add_message(
                client, new_conversation(client)["id"], prompt_content="by hand"
            )
            lines = client.get("/export").text
        target = start(DATABASE_URL=second.url)
        assert httpx.post(f"{target.url}/import", content=lines).status_code == 201
        again = httpx.get(f"{target.url}/export").text
    before, after = (
        [json.loads(line) for line in text.splitlines()] for text in (lines, again)
    )
    assert len(before) == 3
    assert [without_ids(line) for line in after] == [
        without_ids(line) for line in before
    ]


def test_the_page_searches_and_opens_a_hit_on_its_branch(
    open_page: Callable[..., Page], service: httpx.Client, tmp_path: Path
) -> None:
    word = marker()
    body = our_export(f"Trip {word[:4]}", "echo", TREE, leaf=3)
    body["messages"][3] |= {"prompt_content": f"the other branch: {word}\n\nfound"}
    [conversation_id] = import_body(service, json.dumps(body)).json()[
        "conversation_ids"
    ]
    hit_id = exported(service, conversation_id)["messages"][3]["id"]
    page = open_page()
    page.get_by_role("searchbox", name="Search chats").fill(word)
    results = page.get_by_role("list", name="Search results")
    expect(results.get_by_role("link")).to_have_count(1)
    expect(results).to_contain_text(f"the other branch: {word} found")
    page.screenshot(path=tmp_path / "search.png")
    results.get_by_role("link").click()
    expect(page).to_have_url(re.compile(f"#/c/{conversation_id}/m/{hit_id}$"))
    expect(page.locator(".turn .prompt")).to_have_count(2)
    expect(page.locator(".turn.hit .prompt")).to_contain_text(word)
    assert service.get(f"/conversations/{conversation_id}").json()["leaf_id"] == hit_id
    page.get_by_role("searchbox", name="Search chats").fill("")
    expect(page.get_by_role("list", name="Search results")).to_be_hidden()
    expect(page.locator("#conversations a").first).to_be_visible()
    page.screenshot(path=tmp_path / "hit.png")


def test_the_page_exports_json_and_markdown_and_imports_a_file(
    open_page: Callable[..., Page], service: httpx.Client, tmp_path: Path
) -> None:
    body = our_export("Export me", "echo", TREE, leaf=4)
    [conversation_id] = import_body(service, json.dumps(body)).json()[
        "conversation_ids"
    ]
    page = open_page(f"/#/c/{conversation_id}")
    expect(page.get_by_role("heading", name="Export me")).to_be_visible()
    for name, query in (("Export JSON", ""), ("Export Markdown", "?format=markdown")):
        with page.expect_download() as download:
            page.get_by_role("button", name=name).click()
        saved = Path(download.value.path()).read_text()
        assert (
            saved == service.get(f"/conversations/{conversation_id}/export{query}").text
        )
    chatgpt = json.dumps([chatgpt_conversation(*CHATGPT_NODES, title="From ChatGPT")])
    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Import").click()
    chooser.value.set_files(
        {
            "name": "conversations.json",
            "mimeType": "application/json",
            "buffer": chatgpt.encode(),
        }
    )
    expect(page.get_by_role("heading", name="From ChatGPT")).to_be_visible()
    expect(page.locator(".turn .reply").last).to_contain_text("Here is what I found")
    page.screenshot(path=tmp_path / "imported.png")
    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Import").click()
    chooser.value.set_files(
        {"name": "bad.json", "mimeType": "application/json", "buffer": b"[5]"}
    )
    expect(page.locator("#list-note")).to_contain_text("Import failed: conversation 0")
    page.screenshot(path=tmp_path / "import-failed.png")


def test_the_search_migration_indexes_the_ended_turns_a_database_already_holds(
    empty_database: Database, tmp_path: Path
) -> None:
    ini, url = PROJECT / "alembic.ini", empty_database.url
    assert alembic(ini, url, "upgrade", "3b35a6bab885").returncode == 0  # before search
    at = "'2026-11-25 12:00:00.000000'"
    run_sql(
        empty_database,
        "INSERT INTO conversations (id, title, model_type, created_at, updated_at)"
        f" VALUES (1, 'Old chat', 'echo', {at}, {at})",
    )
    for turn, (prompt, live) in enumerate(
        [
            ("ended quetzal one", "false"),
            ("live quetzal two", "true"),
            ("東京 three", "false"),
        ],
        1,
    ):
        run_sql(
            empty_database,
            "INSERT INTO messages (id, conversation_id, parent_id, prompt_content,"
            " response_content, live, created_at, updated_at)"
            f" VALUES ({turn}, 1, {turn - 1 or 'NULL'}, '{prompt}', 'reply', {live}, {at}, {at})",
        )
    upgraded = alembic(ini, url, "upgrade", "head")
    assert upgraded.returncode == 0, upgraded.stderr
    assert alembic(ini, url, "check").returncode == 0
    process, log = launch(["--port", "0"], {"DATABASE_URL": url}, tmp_path)
    try:
        app_url = listening_url(process, log)
        wait_healthy(app_url, process, log)
        with httpx.Client(base_url=app_url) as client:
            # The app ends the live turn at its start (its process is long gone): found now.
            assert found_turns(client, "quetzal") == [2, 1]
            assert found_turns(client, "東京") == [3]
            assert client.delete("/messages/3").status_code == 204
            assert found_turns(client, "東京") == []
            assert len(client.get("/conversations/1/messages?all=true").json()) == 2
    finally:
        stop(process)
    assert alembic(ini, url, "downgrade", "-1").returncode == 0
    assert alembic(ini, url, "upgrade", "head").returncode == 0


# OpenAI Responses API --------------------------------------------------------------------
# The official openai SDK's client.responses, as scripts and the Agents SDK use it.

DELTA = "response.output_text.delta"


def turn_of(response: object) -> int:
    return int(response.id.removeprefix("resp_"))


def sent_to_model(response: object) -> list[list[str]]:
    """What the model was sent, from a fake:echo=1 reply."""
    return json.loads(response.output_text)


def text_of_deltas(events: list) -> str:
    return "".join(event.delta for event in events if event.type == DELTA)


def read_deltas(stream: Iterator, chars: int) -> tuple[str, int]:
    """Read a stream until it gave `chars` characters: the text and the last number seen."""
    text = ""
    for event in stream:
        text += event.delta if event.type == DELTA else ""
        if len(text) >= chars:
            return text, event.sequence_number
    pytest.fail("the stream ended early")


def resumed(sdk: openai.OpenAI, how: str, response_id: str, after: int) -> list:
    """The events after number `after`, by either of the SDK's ways to resume."""
    if how == "retrieve":
        events = list(
            sdk.responses.retrieve(response_id, stream=True, starting_after=after)
        )
    else:
        with sdk.responses.stream(
            response_id=response_id, starting_after=after
        ) as stream:
            events = list(stream)
    assert all(event.sequence_number > after for event in events)
    return events


def numbers(sdk: openai.OpenAI, response_id: str) -> list[tuple[str, int]]:
    events = sdk.responses.retrieve(response_id, stream=True)
    return [(event.type, event.sequence_number) for event in events]


def finished(sdk: openai.OpenAI, response_id: str) -> object:
    def check() -> object:
        response = sdk.responses.retrieve(response_id)
        return response if response.status != "in_progress" else None

    return wait_for(check)


PIECES_30 = "".join(f"w{i} " for i in range(30))


def test_responses_a_string_input_is_a_stored_turn_of_a_new_conversation_and_its_leaf(
    sdk: openai.OpenAI, client: httpx.Client
) -> None:
    prompt = unique("hello there")
    response = sdk.responses.create(model="echo", input=prompt)
    assert (response.status, response.output_text, response.model) == (
        "completed",
        prompt,
        "echo",
    )
    assert (response.usage.input_tokens, response.usage.output_tokens) == (3, 3)
    stored = client.get(f"/messages/{turn_of(response)}").json()
    assert (stored["prompt_content"], stored["response_content"]) == (prompt, prompt)
    assert (stored["is_success"], stored["parent_id"]) == (True, None)
    conversation = client.get(f"/conversations/{stored['conversation_id']}").json()
    assert (conversation["leaf_id"], conversation["title"]) == (stored["id"], prompt)
    assert response.conversation.id == f"conv_{conversation['id']}"


def test_responses_a_message_list_is_kept_as_the_input_items_its_last_the_prompt(
    sdk: openai.OpenAI, client: httpx.Client
) -> None:
    parts = [
        {"type": "input_text", "text": "two"},
        {"type": "input_text", "text": "parts"},
    ]
    items = [
        {"role": "developer", "content": "Be brief."},
        user(unique("first")),
        assistant("an answer"),
        {"type": "message", "role": "user", "content": parts},
    ]
    response = sdk.responses.create(model="fake:echo=1", input=items)
    sent = [["system", "Be brief."], ["user", items[1]["content"]]]
    sent += [["assistant", "an answer"], ["user", "two\nparts"]]
    assert sent_to_model(response) == sent
    stored = client.get(f"/messages/{turn_of(response)}").json()
    assert stored["prompt_content"] == "two\nparts"
    listed = sdk.responses.input_items.list(response.id, order="asc")
    assert [(item.role, item.content[0].text) for item in listed] == [
        ("developer", "Be brief."),
        ("user", items[1]["content"]),
        ("assistant", "an answer"),
        ("user", "two\nparts"),
    ]
    assert [item.id for item in listed] == [f"msg_{stored['id']}_{n}" for n in range(4)]
    assert listed.data[2].content[0].type == "output_text"


def test_responses_retrieve_gives_the_response_as_stored_with_its_options(
    sdk: openai.OpenAI,
) -> None:
    options = {"instructions": "Answer in French.", "metadata": {"user": "ada"}}
    options |= {"temperature": 0.5, "top_p": 0.9, "max_output_tokens": 50}
    created = sdk.responses.create(
        model="echo", input=unique("hi"), store=False, **options
    )
    retrieved = sdk.responses.retrieve(created.id)
    for response in (created, retrieved):
        assert {name: getattr(response, name) for name in options} == options
        assert (response.store, response.background, response.status) == (
            True,
            False,
            "completed",
        )
    assert retrieved.output_text == created.output_text


def test_responses_a_turn_stored_by_another_endpoint_reads_as_a_completed_response(
    sdk: openai.OpenAI, client: httpx.Client
) -> None:
    conversation = new_conversation(client)
    message = add_message(
        client, conversation["id"], prompt_content="q?", response_content="a."
    )
    response = sdk.responses.retrieve(f"resp_{message['id']}")
    assert (response.status, response.output_text, response.model) == (
        "completed",
        "a.",
        conversation["model_type"],
    )
    items = sdk.responses.input_items.list(response.id)
    assert [(item.role, item.content[0].text) for item in items] == [("user", "q?")]


def test_responses_a_chain_gives_the_model_each_turn_and_only_this_calls_instructions(
    sdk: openai.OpenAI,
) -> None:
    prompt = unique("one")
    first = sdk.responses.create(model="fake:echo=1", input=prompt, instructions="Old.")
    second = sdk.responses.create(
        model="fake:echo=1",
        input="two",
        previous_response_id=first.id,
        instructions="New.",
    )
    assert sent_to_model(second) == [
        ["system", "New."],
        ["user", prompt],
        ["assistant", first.output_text],
        ["user", "two"],
    ]
    assert (second.previous_response_id, second.conversation) == (
        first.id,
        first.conversation,
    )


def test_responses_a_chain_from_an_older_response_is_a_branch_the_model_sees_alone(
    sdk: openai.OpenAI, client: httpx.Client
) -> None:
    prompt = unique("root")
    root = sdk.responses.create(model="fake:echo=1", input=prompt)
    sdk.responses.create(model="fake:echo=1", input="b", previous_response_id=root.id)
    branch = sdk.responses.create(
        model="fake:echo=1", input="c", previous_response_id=root.id
    )
    assert sent_to_model(branch) == [
        ["user", prompt],
        ["assistant", root.output_text],
        ["user", "c"],
    ]
    conversation_id = root.conversation.id.removeprefix("conv_")
    tree = client.get(f"/conversations/{conversation_id}/messages?all=true").json()
    assert [turn["parent_id"] for turn in tree] == [None, turn_of(root), turn_of(root)]
    leaf = client.get(f"/conversations/{conversation_id}").json()["leaf_id"]
    assert leaf == turn_of(branch)


def test_responses_two_calls_at_once_on_one_response_are_siblings(
    server: Server, sdk: openai.OpenAI, client: httpx.Client
) -> None:
    root = sdk.responses.create(model="echo", input=unique("root"))

    async def two_at_once() -> list:
        base_url = f"{server.url}/v1"
        async with openai.AsyncOpenAI(base_url=base_url, api_key="x") as client:
            calls = [
                client.responses.create(
                    model="fake:pieces=3:gap_ms=200",
                    input=f"branch {n}",
                    previous_response_id=root.id,
                )
                for n in range(2)
            ]
            return await asyncio.gather(*calls)

    branches = asyncio.run(two_at_once())
    stored = [client.get(f"/messages/{turn_of(r)}").json() for r in branches]
    assert [turn["parent_id"] for turn in stored] == [turn_of(root)] * 2
    assert {r.conversation.id for r in branches} == {root.conversation.id}


def test_responses_conversation_and_x_conversation_id_continue_after_the_leaf(
    sdk: openai.OpenAI,
) -> None:
    prompt = unique("start")
    first = sdk.responses.create(model="echo", input=prompt)
    named = first.conversation.id
    second = sdk.responses.create(
        model="fake:echo=1", input="by body", conversation=named
    )
    third = sdk.responses.create(
        model="echo",
        input="by header",
        extra_headers={"X-Conversation-Id": named.removeprefix("conv_")},
    )
    assert sent_to_model(second) == [
        ["user", prompt],
        ["assistant", prompt],
        ["user", "by body"],
    ]
    assert (second.previous_response_id, third.previous_response_id) == (
        first.id,
        second.id,
    )
    assert third.conversation.id == named


def test_responses_a_stream_sends_openais_events_in_order_numbered_by_offset(
    sdk: openai.OpenAI, client: httpx.Client
) -> None:
    events = list(
        sdk.responses.create(model="fake:pieces=5", input=unique("hi"), stream=True)
    )
    opening = ["created", "in_progress", "output_item.added", "content_part.added"]
    closing = ["output_text.done", "content_part.done", "output_item.done", "completed"]
    kinds = [event.type.removeprefix("response.") for event in events]
    assert kinds[:4] == opening and kinds[-4:] == closing
    assert set(kinds[4:-4]) == {"output_text.delta"}
    text = text_of_deltas(events)
    ends = itertools.accumulate(len(event.delta) for event in events[4:-4])
    assert [event.sequence_number for event in events] == [
        0,
        1,
        2,
        3,
        *(3 + end for end in ends),
        *range(len(text) + 4, len(text) + 8),
    ]
    assert (events[0].response.status, events[0].response.output) == ("in_progress", [])
    stored = client.get(f"/messages/{turn_of(events[0].response)}").json()
    assert text == stored["response_content"] == events[-1].response.output_text
    assert events[-4].text == text == "w0 w1 w2 w3 w4 "


def test_responses_the_sdks_stream_helper_gives_the_final_response(
    sdk: openai.OpenAI,
) -> None:
    with sdk.responses.stream(model="fake:pieces=5", input=unique("hi")) as stream:
        text = text_of_deltas(list(stream))
        final = stream.get_final_response()
    assert (final.status, final.output_text, text) == (
        "completed",
        text,
        "w0 w1 w2 w3 w4 ",
    )


def test_responses_background_answers_at_once_in_progress_and_the_reply_runs_on(
    sdk: openai.OpenAI,
) -> None:
    model = "fake:pieces=10:gap_ms=50"
    started = sdk.responses.create(model=model, input=unique("bg"), background=True)
    assert (started.status, started.background, started.output) == (
        "in_progress",
        True,
        [],
    )
    done = finished(sdk, started.id)
    assert (done.status, done.output_text) == ("completed", PIECES_30[:30])


def test_responses_a_client_that_leaves_mid_stream_does_not_end_the_response(
    sdk: openai.OpenAI,
) -> None:
    stream = sdk.responses.create(
        model="fake:pieces=30:gap_ms=30", input=unique("leave"), stream=True
    )
    read_deltas(stream, 6)
    response_id = f"resp_{stream.response.headers['x-message-id']}"
    stream.close()
    assert finished(sdk, response_id).output_text == PIECES_30


@pytest.mark.parametrize("how", ["retrieve", "stream-helper"])
@pytest.mark.parametrize("when", ["mid-reply", "after-the-end"])
def test_responses_a_stream_resumed_after_the_last_number_seen_gives_each_character_once(
    sdk: openai.OpenAI, how: str, when: str
) -> None:
    stream = sdk.responses.create(
        model="fake:pieces=30:gap_ms=30", input=unique("resume"), stream=True
    )
    seen, last = read_deltas(stream, 12)
    response_id = f"resp_{stream.response.headers['x-message-id']}"
    stream.close()
    if when == "after-the-end":
        finished(sdk, response_id)
    events = resumed(sdk, how, response_id, last)
    assert seen + text_of_deltas(events) == PIECES_30
    assert events[-1].type == "response.completed"


def test_responses_another_process_on_the_database_resumes_and_numbers_alike(
    start_app: Callable[..., Server], sdk: openai.OpenAI
) -> None:
    stream = sdk.responses.create(
        model="fake:pieces=30:gap_ms=50", input=unique("elsewhere"), stream=True
    )
    seen, last = read_deltas(stream, 9)
    response_id = f"resp_{stream.response.headers['x-message-id']}"
    stream.close()
    with openai_client(start_app()) as elsewhere:
        events = resumed(elsewhere, "retrieve", response_id, last)  # while it runs
        assert seen + text_of_deltas(events) == PIECES_30
        assert numbers(elsewhere, response_id) == numbers(sdk, response_id)


def test_responses_after_kill_9_another_process_resumes_to_the_last_checkpoint(
    start_app: Callable[..., Server],
) -> None:
    killed = start_app()
    with openai_client(killed) as sdk:
        stream = sdk.responses.create(
            model="fake:pieces=100:gap_ms=50", input=unique("crash"), stream=True
        )
        seen, last = read_deltas(stream, 60)
        response_id = f"resp_{stream.response.headers['x-message-id']}"
        time.sleep(1.2)  # a checkpoint (every 500 ms) past what was seen
        killed.process.kill()
        killed.process.wait(5)
    with openai_client(start_app(DEAD_TURN_SECONDS="3")) as sdk:
        events = resumed(sdk, "retrieve", response_id, last)
    final = events[-1].response
    assert (events[-1].type, final.status, final.error.code) == (
        "response.failed",
        "failed",
        "500",
    )
    assert seen + text_of_deltas(events) == final.output_text


def test_responses_replays_give_every_event_the_number_it_had_live(
    sdk: openai.OpenAI,
) -> None:
    live = sdk.responses.create(
        model="fake:pieces=20:gap_ms=5", input=unique("again"), stream=True
    )
    seen = {(event.type, event.sequence_number) for event in live}
    response_id = f"resp_{live.response.headers['x-message-id']}"
    replay = numbers(sdk, response_id)
    assert replay == numbers(sdk, response_id)
    assert seen <= set(replay)
    assert [kind for kind, _ in replay].count(DELTA) == 20  # one a piece, as it came


def test_responses_cancel_mid_reply_keeps_the_text_and_ends_every_follower(
    sdk: openai.OpenAI,
) -> None:
    stream = sdk.responses.create(
        model="fake:pieces=100:gap_ms=50", input=unique("stop"), stream=True
    )
    read_deltas(stream, 6)
    response_id = f"resp_{stream.response.headers['x-message-id']}"
    follower = sdk.responses.retrieve(response_id, stream=True)
    cancelled = sdk.responses.cancel(response_id)
    assert cancelled.status == "cancelled" and cancelled.output_text.startswith(
        "w0 w1 "
    )
    for events in (list(stream), list(follower)):
        assert events[-1].type == "response.failed"
        assert events[-1].response.status == "cancelled"
        assert events[-1].response.output_text == cancelled.output_text
    again = sdk.responses.cancel(response_id)  # ended: as stored
    assert (again.status, again.output_text) == ("cancelled", cancelled.output_text)


def test_responses_delete_then_404_and_the_turn_after_it_follows_its_parent(
    sdk: openai.OpenAI,
) -> None:
    first = sdk.responses.create(model="echo", input=unique("a"))
    second = sdk.responses.create(
        model="echo", input="b", previous_response_id=first.id
    )
    third = sdk.responses.create(
        model="echo", input="c", previous_response_id=second.id
    )
    assert sdk.responses.delete(second.id) is None
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(second.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.delete(second.id)
    assert sdk.responses.retrieve(third.id).previous_response_id == first.id


def test_responses_input_items_page_by_order_after_and_limit(
    sdk: openai.OpenAI,
) -> None:
    items = [(user if n % 2 == 0 else assistant)(f"m{n}") for n in range(25)]
    response = sdk.responses.create(model="echo", input=items)
    ids = [f"msg_{turn_of(response)}_{n}" for n in range(25)]
    page = sdk.responses.input_items.list(response.id, limit=10)
    assert [item.id for item in page.data] == ids[::-1][:10]
    assert (page.first_id, page.last_id, page.has_more) == (ids[24], ids[15], True)
    rest = sdk.responses.input_items.list(
        response.id, order="asc", after=ids[19], limit=10
    )
    assert ([item.id for item in rest.data], rest.has_more) == (ids[20:], False)
    every = sdk.responses.input_items.list(response.id, limit=7)  # pages on by itself
    assert [item.id for item in every] == ids[::-1]
    with pytest.raises(openai.BadRequestError):
        sdk.responses.input_items.list(response.id, limit=101)


@pytest.mark.parametrize(
    "response_id", ["resp_999999999", "resp_x", "msg_1", "resp_99999999999"]
)
def test_responses_an_unknown_or_malformed_id_is_404(
    sdk: openai.OpenAI, response_id: str
) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.responses.retrieve(response_id)
    assert raised.value.response.json()["error"]["type"] == "invalid_request_error"


UNHONOURABLE = {
    "an unknown previous response": {"previous_response_id": "resp_999999999"},
    "tools": {"tools": [{"type": "function", "name": "f", "parameters": {}}]},
    "a last item that is not the user's": {"input": [assistant("hi")]},
    "a function call output": {
        "input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]
    },
    "an image": {
        "input": [
            {"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}
        ]
    },
    "both a previous response and a conversation": {
        "previous_response_id": "resp_1",
        "conversation": "conv_1",
    },
}


@pytest.mark.parametrize("fields", UNHONOURABLE.values(), ids=UNHONOURABLE.keys())
def test_responses_a_request_it_cannot_honour_is_4xx_and_stores_nothing(
    sdk: openai.OpenAI, client: httpx.Client, fields: dict
) -> None:
    model = tagged("fake")
    with pytest.raises(openai.APIStatusError) as raised:
        sdk.responses.create(**{"model": model, "input": "hi", **fields})
    unknown = "previous_response_id" in fields and "conversation" not in fields
    assert raised.value.status_code == (404 if unknown else 400)
    assert raised.value.response.json()["error"]["message"]
    assert client.get("/conversations", params={"model_type": model}).json() == []


def test_responses_a_previous_response_still_in_progress_is_400(
    sdk: openai.OpenAI,
) -> None:
    running = sdk.responses.create(
        model="fake:pieces=50:gap_ms=50", input=unique("busy"), background=True
    )
    try:
        with pytest.raises(openai.BadRequestError) as raised:
            sdk.responses.create(
                model="echo", input="next", previous_response_id=running.id
            )
        assert "in progress" in raised.value.message
    finally:
        sdk.responses.cancel(running.id)


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_responses_an_upstream_error_before_any_text_is_its_status_and_stored_once(
    sdk: openai.OpenAI, client: httpx.Client, stream: bool
) -> None:
    assert sdk.max_retries == 2
    model = tagged("fake:fail=503")
    with pytest.raises(openai.InternalServerError) as raised:
        sdk.responses.create(model=model, input=unique("hi"), stream=stream)
    response = raised.value.response
    assert (response.status_code, response.headers["x-should-retry"]) == (503, "false")
    stored = client.get("/conversations", params={"model_type": model}).json()
    assert len(stored) == 1 and len(turns(client, stored[0]["id"])) == 1
    failed = sdk.responses.retrieve(f"resp_{response.headers['x-message-id']}")
    assert (failed.status, failed.error.code) == ("failed", "503")


def test_responses_a_failure_mid_stream_ends_with_response_failed_and_nothing_raised(
    sdk: openai.OpenAI,
) -> None:
    model = "fake:pieces=5:abort=2"
    events = list(sdk.responses.create(model=model, input=unique("hi"), stream=True))
    final = events[-1].response
    assert (events[-1].type, final.status, final.error.code) == (
        "response.failed",
        "failed",
        "502",
    )
    assert text_of_deltas(events) == final.output_text == "w0 w1 "
    whole = sdk.responses.create(model=model, input=unique("hi"))
    assert (whole.status, whole.output_text) == ("failed", "w0 w1 ")


def test_responses_a_reply_cut_at_max_output_tokens_is_incomplete_then_and_later(
    sdk: openai.OpenAI,
) -> None:
    model, prompt = "fake:pieces=10:cap=1", unique("long")
    response = sdk.responses.create(model=model, input=prompt, max_output_tokens=3)
    retrieved = sdk.responses.retrieve(response.id)
    for cut in (response, retrieved):
        assert (cut.status, cut.incomplete_details.reason) == (
            "incomplete",
            "max_output_tokens",
        )
        assert cut.output_text == "w0 w1 w2 "
    events = list(sdk.responses.retrieve(response.id, stream=True))
    assert events[-1].type == "response.incomplete"


def test_responses_beyond_max_live_replies_is_a_retryable_429(
    start_app: Callable[..., Server],
) -> None:
    app = start_app(MAX_LIVE_REPLIES="1")
    with openai_client(app) as sdk:
        running = sdk.responses.create(
            model="fake:pieces=50:gap_ms=100", input="busy", background=True
        )
        try:
            with pytest.raises(openai.RateLimitError) as raised:
                sdk.with_options(max_retries=0).responses.create(
                    model="echo", input="x"
                )
        finally:
            sdk.responses.cancel(running.id)
    assert raised.value.response.headers["retry-after"]


def test_the_responses_migration_keeps_every_turn_and_reads_it_as_a_response(
    empty_database: Database, start_app: Callable[..., Server]
) -> None:
    ini, url = PROJECT / "alembic.ini", empty_database.url
    assert alembic(ini, url, "upgrade", "3b35a6bab885").returncode == 0  # branches
    now = "'2026-11-25 12:00:00.000000'"
    run_sql(
        empty_database,
        "INSERT INTO conversations (id, title, model_type, leaf_id, created_at,"
        f" updated_at) VALUES (1, 'A chat', 'echo', 1, {now}, {now})",
    )
    run_sql(
        empty_database,
        "INSERT INTO messages (id, conversation_id, prompt_content, response_content,"
        " is_success, status_code, on_branch, created_at, updated_at)"
        f" VALUES (1, 1, 'q', 'a', true, 200, true, {now}, {now})",
    )
    upgraded = alembic(ini, url, "upgrade", "head")
    assert upgraded.returncode == 0, upgraded.stderr
    assert alembic(ini, url, "check").returncode == 0
    query = "SELECT id, prompt_content, response_content, status_code FROM messages"
    assert [tuple(row) for row in rows(empty_database, query)] == [(1, "q", "a", 200)]
    with openai_client(start_app(DATABASE_URL=url)) as sdk:
        response = sdk.responses.retrieve("resp_1")
        assert (response.status, response.output_text) == ("completed", "a")
        replay = list(sdk.responses.retrieve("resp_1", stream=True))
        assert text_of_deltas(replay) == "a"
