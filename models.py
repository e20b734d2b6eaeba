"""Tables and API schemas: each SQLModel class is one or the other, sharing fields through a Base."""

import re
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    Strict,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from sqlmodel import Field, Index, SQLModel

INT32_MAX = 2**31 - 1  # ids and counts are INTEGER columns on both databases
MAX_TEXT_CHARS = 1_000_000


def utc_now() -> datetime:
    return datetime.now(UTC)


def storable_text(value: str) -> str:
    """Postgres cannot store NUL, and neither database can store half a UTF-16 surrogate pair."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


# A str holds a valid surrogate pair as one code point, so any surrogate left is a lone one.
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable_piece(text: str) -> str:
    """What storable_text refuses in input is replaced in a model's reply: NUL, lone surrogates."""
    return UNSTORABLE.sub("\ufffd", text)


def iso_timestamp(value: datetime) -> str:
    # Always six fractional digits, so that string order is time order.
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


Timestamp = Annotated[datetime, PlainSerializer(iso_timestamp, when_used="json")]

# JSON bodies are strict: true is not 1, 2.0 is not 2, "yes" is not a boolean.
STRICT = ConfigDict(strict=True)

# StringConstraints goes innermost so that it trims before the other checks run.
Content = Annotated[
    Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)],
    AfterValidator(storable_text),
]
Title = Annotated[
    Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)
    ],
    AfterValidator(storable_text),
]
ModelType = Annotated[
    Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)
    ],
    AfterValidator(storable_text),
]
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]
Id = Annotated[int, Field(ge=1, le=INT32_MAX)]
StatusCode = Annotated[int, Field(ge=100, le=599)]


class ConversationBase(SQLModel):
    title: Title
    model_type: ModelType = Field(index=True)


class Conversation(ConversationBase, table=True):
    __tablename__ = "conversations"
    __table_args__ = (
        # GET /conversations: newest activity first.
        Index("ix_conversations_updated_at_id", "updated_at", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    # The last turn of the active branch (see "Branches" in app.py); None: no turns on it.
    # Change it only with app.py's move_leaf(), which keeps Message.on_branch in step.
    leaf_id: int | None = None
    created_at: datetime = Field(default_factory=utc_now)
    updated_at: datetime = Field(default_factory=utc_now)


class ConversationCreate(ConversationBase):
    model_config = STRICT
    model_type: ModelType | None = None  # None: the configured DEFAULT_MODEL


class ConversationReplace(ConversationBase):
    model_config = STRICT


class ConversationUpdate(SQLModel):
    model_config = STRICT
    title: Title | None = None
    model_type: ModelType | None = None
    leaf_id: Id | None = None  # null is a value: the next turn is a first turn

    @field_validator("title", "model_type")
    @classmethod
    def not_null(cls, value: str | None) -> str:
        # Leaving a field out keeps it; sending null would blank a required column.
        if value is None:
            raise ValueError("may be left out, but not null")
        return value


class ConversationPublic(ConversationBase):
    id: int
    leaf_id: int | None
    created_at: Timestamp
    updated_at: Timestamp


class MessageBase(SQLModel):
    prompt_content: Content = Field(sa_type=sa.Text)
    response_content: Content = Field(sa_type=sa.Text)
    prompt_tokens: Count | None = None
    response_tokens: Count | None = None
    total_tokens: Count | None = None
    is_success: bool | None = None
    status_code: StatusCode | None = None


class Message(MessageBase, table=True):
    __tablename__ = "messages"
    # Both lead with conversation_id, so they also serve the foreign key and its cascade.
    __table_args__ = (
        # A conversation's page of messages, oldest first.
        Index(
            "ix_messages_conversation_id_created_at_id",
            "conversation_id",
            "created_at",
            "id",
        ),
        # A page of the active branch, first turn first: only its turns are in it.
        Index(
            "ix_messages_conversation_id_created_at_id_on_branch",
            "conversation_id",
            "created_at",
            "id",
            postgresql_where=sa.text("on_branch"),
            sqlite_where=sa.text("on_branch"),
        ),
        # The active branch's last successful turns, the model's history.
        Index(
            "ix_messages_conversation_id_is_success_created_at_id_on_branch",
            "conversation_id",
            "is_success",
            "created_at",
            "id",
            postgresql_where=sa.text("on_branch"),
            sqlite_where=sa.text("on_branch"),
        ),
        # The turns that follow one (a DELETE re-parents them; the foreign key's check).
        Index("ix_messages_parent_id", "parent_id"),
        # A /v1 call continues after the newest turn whose path is its history.
        Index(
            "ix_messages_path_hash_id",
            "path_hash",
            "id",
            postgresql_where=sa.text("path_hash IS NOT NULL"),
            sqlite_where=sa.text("path_hash IS NOT NULL"),
        ),
        # Ended turns newest first: a search walks it (see "Search" in app.py). The
        # search index itself is the migration's alone (migrations/env.py leaves it out).
        Index(
            "ix_messages_ended_created_at_id",
            "created_at",
            "id",
            postgresql_where=sa.text("NOT live"),
            sqlite_where=sa.text("NOT live"),
        ),
        # Live turns whose process died (silent since...): only live rows are in it.
        Index(
            "ix_messages_live_updated_at",
            "updated_at",
            postgresql_where=sa.text("live"),
            sqlite_where=sa.text("live"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    conversation_id: int = Field(foreign_key="conversations.id", ondelete="CASCADE")
    # The turn it follows, of the same conversation; None: a first turn. See "Branches".
    parent_id: int | None = Field(default=None, foreign_key="messages.id")
    # On its conversation's active branch (the path from a first turn to leaf_id): kept by
    # move_leaf() so that a page of a long branch is an index range, not a walk of it all.
    on_branch: bool = Field(
        default=False, sa_column_kwargs={"server_default": sa.false()}
    )
    # A /v1 turn that ended well: the hash of its call's messages plus its reply.
    path_hash: str | None = Field(default=None, max_length=64)
    # A generated reply still being written; see "Live replies" in app.py.
    live: bool = Field(default=False, sa_column_kwargs={"server_default": sa.false()})
    created_at: datetime = Field(default_factory=utc_now)
    updated_at: datetime = Field(default_factory=utc_now)
    # Why the model stopped (stop, length), as it said: a reply cut at a cap is `incomplete`.
    finish_reason: str | None = Field(default=None, max_length=20)
    # The lengths of the reply's pieces as they were streamed, comma-separated: a replay of a
    # response splits its text where the live stream did (see "OpenAI Responses API").
    piece_lengths: str | None = Field(default=None, sa_type=sa.Text)
    # A Responses call's input, [[role, text], ...] (its last item is the prompt), and its
    # options (instructions, metadata, sampling, background), returned as it was sent.
    input_items: list | None = Field(default=None, sa_type=sa.JSON(none_as_null=True))
    response_options: dict | None = Field(
        default=None, sa_type=sa.JSON(none_as_null=True)
    )


class MessageCreate(MessageBase):
    model_config = STRICT


class MessagePublic(MessageBase):
    id: int
    conversation_id: int
    live: bool
    parent_id: int | None
    created_at: Timestamp
    updated_at: Timestamp


# Generation ------------------------------------------------------------------------------


def not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


# MAX_PROMPT_CHARS is a setting: app.py checks it (prompt_within_limit).
Prompt = Annotated[Content, AfterValidator(not_blank)]


class GenerateRequest(SQLModel):
    model_config = STRICT

    prompt: Prompt
    conversation_id: Id | None = None


class RegenerateRequest(SQLModel):
    model_config = STRICT

    prompt: Prompt | None = None  # None: the prompt of the message regenerated


class GenerateQuery(GenerateRequest):
    model_config = ConfigDict(
        strict=False
    )  # a query string is text: ?conversation_id=5


class ErrorDetail(SQLModel):
    detail: str | list[dict[str, Any]]


# The OpenAI-compatible front (/v1) -------------------------------------------------------


def text_parts(*kinds: str) -> BeforeValidator:
    """A message's content as one text: a string, or its text parts (of these types) joined
    with newlines."""

    def joined(content: object) -> object:
        if not isinstance(content, list):
            return content
        for part in content:
            is_text = isinstance(part, dict) and part.get("type") in kinds
            if not (is_text and isinstance(part.get("text"), str)):
                supported = " and ".join(kinds)
                raise ValueError(f"only {supported} content parts are supported")
        return "\n".join(part["text"] for part in content)

    return BeforeValidator(joined)


def developer_is_system(role: str) -> str:
    """`developer` is OpenAI's newer name for `system`, which every model server knows."""
    return "system" if role == "developer" else role


class ChatMessage(SQLModel):
    model_config = STRICT

    role: Annotated[
        Literal["system", "developer", "user", "assistant"],
        AfterValidator(developer_is_system),
    ]
    content: Annotated[Content, text_parts("text")]


def ends_with_the_prompt(messages: list[ChatMessage]) -> list[ChatMessage]:
    if not messages or messages[-1].role != "user":
        raise ValueError("the last message must be the user's: it is the prompt")
    return messages


class StreamOptions(SQLModel):
    model_config = STRICT

    include_usage: bool | None = None


class Sampling(SQLModel):
    """Fields passed on to the model as given."""

    model_config = STRICT

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class ChatRequest(Sampling):
    """A Chat Completions request; fields not listed are ignored."""

    model: ModelType
    messages: Annotated[list[ChatMessage], AfterValidator(ends_with_the_prompt)]
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: Literal[1] | None = None  # a call is one turn
    tools: Annotated[list, Field(max_length=0)] | None = None  # [] is accepted


class OpenAIError(SQLModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(SQLModel):
    error: OpenAIError


# Search, export and import ---------------------------------------------------------------


class SearchHit(SQLModel):
    conversation: ConversationPublic
    message: MessagePublic | None = None  # None: a title hit
    snippet: str


EXPORT_FORMAT = "chat-backend/1"


class ConversationExport(SQLModel):
    """GET /conversations/{id}/export: every turn of every branch, oldest first."""

    format: Literal["chat-backend/1"] = EXPORT_FORMAT
    conversation: ConversationPublic
    messages: list[MessagePublic]


# A datetime is text in JSON: strict mode would refuse it (SQLModel validates JSON as Python).
ImportedTime = Annotated[
    AwareDatetime, Strict(False), AfterValidator(lambda time: time.astimezone(UTC))
]

# An import reads our export back (strict, as every JSON body), and ChatGPT's data export is
# mapped to the same shapes, so both pass the same checks. Ids are the file's own: they link
# turns to their parents and the leaf, and the stored rows get new ones.


class TurnImport(MessageBase):
    model_config = STRICT
    id: int
    parent_id: int | None = None
    live: bool = False
    created_at: ImportedTime
    updated_at: ImportedTime

    @model_validator(mode="after")
    def never_live(self) -> "TurnImport":
        """Nothing goes on writing an imported turn: one exported live comes back failed."""
        if self.live:
            self.is_success, self.status_code = False, 500
        return self


class ConversationImport(ConversationBase):
    model_config = STRICT
    leaf_id: int | None = None
    created_at: ImportedTime
    updated_at: ImportedTime


class ExportImport(SQLModel):
    model_config = STRICT
    format: Literal["chat-backend/1"]
    conversation: ConversationImport
    messages: list[TurnImport]

    @model_validator(mode="after")
    def is_a_tree(self) -> "ExportImport":
        """Each parent and the leaf are turns of this conversation, each id once, no cycle."""
        self.turn_levels()
        leaf = self.conversation.leaf_id
        if leaf is not None and leaf not in {turn.id for turn in self.messages}:
            raise PydanticCustomError("tree", f"conversation.leaf_id: no turn {leaf}")
        return self

    def turn_levels(self) -> list[list[TurnImport]]:
        """The turns by depth: first turns, then the turns that follow those, and so on."""
        turns: dict[int | None, TurnImport] = {}
        for at, turn in enumerate(self.messages):
            if turns.setdefault(turn.id, turn) is not turn:
                raise PydanticCustomError("tree", f"messages.{at}.id: {turn.id} twice")
        depths: dict[int | None, int] = {None: -1}
        for at, turn in enumerate(self.messages):
            path, key = [], turn.id
            while key not in depths:
                if key in path or key not in turns:
                    problem = "a cycle of parents" if key in path else f"no turn {key}"
                    raise PydanticCustomError(
                        "tree", f"messages.{at}.parent_id: {problem}"
                    )
                path.append(key)
                key = turns[key].parent_id
            for key in reversed(path):
                depths[key] = depths[turns[key].parent_id] + 1
        levels: list[list[TurnImport]] = [[] for _ in range(max(depths.values()) + 1)]
        for turn in self.messages:
            levels[depths[turn.id]].append(turn)
        return levels

    def active_branch(self) -> set[int]:
        parents = {turn.id: turn.parent_id for turn in self.messages}
        branch, turn = set(), self.conversation.leaf_id
        while turn is not None:
            branch.add(turn)
            turn = parents[turn]
        return branch


# ChatGPT's conversations.json: a list of conversations, each a tree of nodes in `mapping`.
# Only what the import uses is read; anything else is ignored.


def cleaned_text(value: str) -> str:
    """ChatGPT's text is taken as it comes: what no message can hold is replaced or cut."""
    return storable_piece(value)[:MAX_TEXT_CHARS]


class ChatGPTAuthor(BaseModel):
    role: str


class ChatGPTContent(BaseModel):
    content_type: str
    parts: list[object] = []


class ChatGPTMessage(BaseModel):
    author: ChatGPTAuthor
    content: ChatGPTContent
    create_time: float | None = None
    update_time: float | None = None
    weight: float = 1.0
    recipient: str | None = "all"
    metadata: dict = {}

    def kept_text(self) -> str | None:
        """The text of a user message or an assistant's reply; None for what is skipped:
        system and tool messages, hidden ones, tool calls, content that is not text."""
        hidden = self.weight == 0 or self.metadata.get(
            "is_visually_hidden_from_conversation"
        )
        to_all = self.author.role == "user" or self.recipient in (None, "all")
        text = self.content.content_type in ("text", "multimodal_text")
        parts = [part for part in self.content.parts if isinstance(part, str)]
        if self.author.role not in ("user", "assistant") or hidden or not to_all:
            return None
        joined = "\n".join(parts)  # an empty one is skipped too (a placeholder)
        return cleaned_text(joined) if text and joined else None


class ChatGPTNode(BaseModel):
    message: ChatGPTMessage | None = None
    parent: str | None = None  # authoritative: `children` may be missing


class ChatGPTConversation(BaseModel):
    title: str | None = None
    create_time: float | None = None
    update_time: float | None = None
    mapping: dict[str, ChatGPTNode]
    current_node: str | None = None
    default_model_slug: str | None = None

    def newest_model_slug(self) -> str | None:
        slugs = [
            (node.message.create_time or 0, node.message.metadata.get("model_slug"))
            for node in self.mapping.values()
            if node.message and isinstance(node.message.metadata.get("model_slug"), str)
        ]
        return max(slugs, default=(0, None))[1]

    def kept_parents(self, texts: dict) -> dict[str, str | None]:
        """Each node's nearest ancestor that is kept (None: none is): skipped nodes'
        children are attached to it. A chain of skipped nodes is walked once."""
        above: dict[str, str | None] = {}
        for start in self.mapping:
            path, key = [], start
            while key not in above:
                parent = self.mapping[key].parent
                if key in path or (parent is not None and parent not in self.mapping):
                    problem = (
                        "a cycle of parents" if key in path else f"no node {parent!r}"
                    )
                    raise ValueError(f"mapping.{key}.parent: {problem}")
                path.append(key)
                if parent is None or texts[parent] is not None:
                    break
                key = parent
            nearest = parent if key not in above else above[key]
            above.update(dict.fromkeys(path, nearest))
        return above

    def pairs(self, above: dict, roles: dict) -> list[tuple[str | None, str | None]]:
        """(user node, assistant node) of each turn, None for a missing side: a reply under
        each prompt (several: sibling turns with the same prompt)."""
        replies = defaultdict(list)
        for key, role in roles.items():
            if role == "assistant" and roles.get(above[key]) == "user":
                replies[above[key]].append(key)
        pairs = []
        for key, role in roles.items():
            if role == "user":
                pairs += [(key, reply) for reply in replies[key]] or [(key, None)]
            elif roles.get(above[key]) != "user":
                pairs.append((None, key))
        return pairs

    def turns(self) -> tuple[list[dict], int | None]:
        """Our turns (ids 1, 2... in the mapping's order; times in ChatGPT's seconds, None
        for none) and the leaf's id."""
        nodes = self.mapping
        texts = {
            k: n.message.kept_text() if n.message else None for k, n in nodes.items()
        }
        above = self.kept_parents(texts)
        kept = {
            k: nodes[k].message.author.role for k, t in texts.items() if t is not None
        }
        pairs = self.pairs(above, kept)
        turn_of = {}  # node -> the id of its turn (a prompt with several replies: the first)
        for number, (prompt, reply) in enumerate(pairs, 1):
            turn_of.setdefault(prompt, number)
            turn_of[reply] = number
        turn_of.pop(None, None)  # a side that is missing
        turns = []
        for number, (prompt, reply) in enumerate(pairs, 1):
            last = nodes[reply if reply is not None else prompt].message
            turns.append({
                "id": number,
                "parent_id": turn_of.get(above[prompt if prompt is not None else reply]),
                "prompt_content": texts.get(prompt) or "",
                "response_content": texts.get(reply) or "",
                "is_success": True, "status_code": 200,
                "created_at": last.create_time, "updated_at": last.update_time,
            })  # fmt: skip
        current = self.current_node
        if current is not None and current not in nodes:
            raise ValueError(f"current_node: no node {current!r}")
        return turns, turn_of.get(current if texts.get(current) else above.get(current))

    def as_export(self, default_model: str, untitled: Callable[[str], str]) -> dict:
        """In our export's shape, for ExportImport to check. A null time is the
        conversation's; a missing title is `untitled(first prompt)`."""
        turns, leaf = self.turns()
        created = from_seconds(self.create_time, utc_now())
        updated = from_seconds(self.update_time, created)
        for turn in turns:
            turn["created_at"] = from_seconds(turn["created_at"], created)
            turn["updated_at"] = from_seconds(turn["updated_at"], updated)
        first_prompt = next(
            (t["prompt_content"] for t in turns if t["prompt_content"]), ""
        )
        conversation = {
            "title": cleaned_text(self.title or "")[:200].strip() or untitled(first_prompt),
            "model_type": self.default_model_slug or self.newest_model_slug() or default_model,
            "leaf_id": leaf, "created_at": created, "updated_at": updated,
        }  # fmt: skip
        return {
            "format": EXPORT_FORMAT,
            "conversation": conversation,
            "messages": turns,
        }


def from_seconds(seconds: float | None, otherwise: datetime) -> datetime:
    return otherwise if seconds is None else datetime.fromtimestamp(seconds, UTC)


class ImportResult(SQLModel):
    conversation_ids: list[int]  # the new conversations, in the body's order


# OpenAI Responses API --------------------------------------------------------------------


MetadataText = Annotated[
    Annotated[str, StringConstraints(max_length=512)], AfterValidator(storable_text)
]


class ResponseInputMessage(SQLModel):
    model_config = STRICT

    role: Literal["user", "assistant", "system", "developer"]
    content: Annotated[Content, text_parts("input_text", "output_text")]
    type: Literal["message"] | None = (
        None  # function calls, images, files: not supported
    )


def one_user_message(value: object) -> object:
    return [{"role": "user", "content": value}] if isinstance(value, str) else value


def ends_with_the_users(
    items: list[ResponseInputMessage],
) -> list[ResponseInputMessage]:
    if not items or items[-1].role != "user":
        raise ValueError("the last input message must be the user's: it is the prompt")
    return items


class ConversationRef(SQLModel):
    model_config = STRICT

    id: str


class ResponseRequest(SQLModel):
    """A Responses API call; fields not listed are ignored."""

    model_config = STRICT

    model: ModelType
    input: Annotated[
        list[ResponseInputMessage],
        BeforeValidator(one_user_message),
        AfterValidator(ends_with_the_users),
    ]
    instructions: Content | None = None
    previous_response_id: str | None = None
    conversation: str | ConversationRef | None = None
    stream: bool | None = None
    background: bool | None = None
    store: bool | None = None  # every response is stored
    # Not `metadata`, which is SQLModel's own attribute.
    tags: dict[MetadataText, MetadataText] | None = Field(
        default=None, alias="metadata", max_length=16
    )
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: Annotated[list, Field(max_length=0)] | None = None  # [] is accepted


# What the Responses API returns (for the SDKs, and the OpenAPI document)


class InputText(SQLModel):
    type: Literal["input_text"] = "input_text"
    text: str


class OutputText(SQLModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list = []


class OutputMessage(SQLModel):
    id: str  # msg_<message id>
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]

    @classmethod
    def of(cls, message_id: int, text: str, status: str) -> "OutputMessage":
        """The reply's one output item, in the response's status."""
        return cls(
            id=f"msg_{message_id}",
            status=status if status in ("in_progress", "completed") else "incomplete",
            content=[OutputText(text=text)] if text or status != "in_progress" else [],
        )


class ResponseUsage(SQLModel):
    """Read from a turn's usage, as Chat Completions gives it."""

    input_tokens: int = Field(validation_alias="prompt_tokens")
    input_tokens_details: dict[str, int] = {"cached_tokens": 0}
    output_tokens: int = Field(validation_alias="completion_tokens")
    output_tokens_details: dict[str, int] = {"reasoning_tokens": 0}
    total_tokens: int


class ResponseError(SQLModel):
    code: str  # the reply's HTTP status
    message: str


class ResponseObject(SQLModel):
    id: str  # resp_<message id>
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed", "cancelled"]
    model: str
    output: list[OutputMessage] = []
    previous_response_id: str | None = None
    tags: dict[str, str] = Field(default={}, alias="metadata")  # as in ResponseRequest
    usage: ResponseUsage | None = None
    error: ResponseError | None = None
    incomplete_details: dict[str, str] | None = None
    background: bool = False
    store: bool = True
    parallel_tool_calls: bool = False
    tool_choice: Literal["none"] = "none"
    tools: list = []
    instructions: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    conversation: ConversationRef

    def at_start(self) -> "ResponseObject":
        """What response.created and response.in_progress carry, in every stream."""
        nothing_yet = {"output": [], "usage": None, "error": None}
        return self.model_copy(
            update={"status": "in_progress", "incomplete_details": None, **nothing_yet}
        )


class InputItem(SQLModel):
    id: str  # msg_<message id>_<n>
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    status: Literal["completed"] = "completed"
    content: list[InputText | OutputText]

    @classmethod
    def of(cls, message_id: int, n: int, role: str, text: str) -> "InputItem":
        part = OutputText(text=text) if role == "assistant" else InputText(text=text)
        return cls(id=f"msg_{message_id}_{n}", role=role, content=[part])


class InputItemList(SQLModel):
    object: Literal["list"] = "list"
    data: list[InputItem]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


class ResponseDeleted(SQLModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True
