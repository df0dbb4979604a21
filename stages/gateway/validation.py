"""Request bodies of /v1/chat/completions and /v1/completions, validated with pydantic before
anything is submitted: a body the engine would refuse, or one the gateway cannot honour, gets an
OpenAI error object naming the field (``param``) instead of reaching ingest.

Fields the gateway does not know pass through to the upstream unchanged (OpenAI-compatible servers
grow fields faster than any proxy), but the ones it knows are checked strictly: types (no
coercion: ``"max_tokens": "5"`` is an error), ranges, and the limits the request protocol sets
(engine/protocol/requests.py). The gateway's own fields (``stream``, ``stream_options``,
``neuralpipe``, ``n``: each choice is submitted as a stream of its own) are taken out of the body
it submits."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from engine.protocol.requests import MAX_MESSAGES, MAX_MODEL_BYTES, MAX_TOKENS_LIMIT, ROLES

MAX_COLUMNS = 32
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # ``seed``, as OpenAI bounds it
MAX_STOPS = 64  # stop sequences: a bound, not OpenAI's 4 (docs/gateway.md)
MAX_CHOICES = 16  # ``n``: each choice is a stream of its own, counted against the key's max_streams
GATEWAY_FIELDS = ("stream", "stream_options", "neuralpipe", "n")

Number = StrictInt | StrictFloat


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class OpenModel(BaseModel):
    """Fields beyond the declared ones are kept: they pass on to the upstream."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class TextPart(OpenModel):
    type: StrictStr = "text"
    text: StrictStr = ""  # as long as the body may be (max_body_bytes): a long document in one message


class Message(OpenModel):
    role: Literal[ROLES]
    # null only for an assistant's turn that called tools (its ``tool_calls`` pass through)
    content: StrictStr | list[TextPart] | None = ""
    name: StrictStr | None = None

    @field_validator("content")
    @classmethod
    def _null_only_for_the_assistant(cls, content: Any, info: ValidationInfo) -> Any:
        if content is None and info.data.get("role") != "assistant":
            raise PydanticCustomError("null_content", "null is only for an assistant message")
        return content


class StreamOptions(_Closed):
    include_usage: StrictBool = False
    # OpenAI's random padding of chunks against length side channels: accepted, without effect
    # (the gateway pads nothing; docs/gateway.md)
    include_obfuscation: StrictBool = True


class Extension(_Closed):
    """``neuralpipe``: what the engine adds to a response (docs/gateway.md, "Extensions")."""

    columns: Annotated[
        list[Annotated[StrictStr, Field(min_length=1, max_length=64)]], Field(max_length=MAX_COLUMNS)
    ] = []


class _Common(OpenModel):
    model: Annotated[StrictStr, Field(min_length=1, max_length=MAX_MODEL_BYTES)]
    stream: StrictBool | None = False  # null (a client passing None through) is OpenAI's default: false
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] | None = None  # choices: an engine stream each
    seed: Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    # OpenAI takes 4; the servers behind the engine take more, and editors' completions send more
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOPS)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    user: Annotated[StrictStr, Field(max_length=256)] | None = None
    neuralpipe: Extension | None = None
    # chat's alternatives per token; legacy completions ask with ``logprobs`` and pass this on
    # unused, but ingest checks it on both endpoints, so it is refused here, naming the field
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None


class ChatRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    logprobs: StrictBool | None = None


Prompt = Annotated[StrictStr, Field(min_length=1)]


class CompletionRequest(_Common):
    prompt: Prompt | list[Prompt]  # a list: a batch, of one prompt only (LangChain sends every prompt so)
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    echo: StrictBool | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str:
        if isinstance(prompt, str):
            return prompt
        if len(prompt) != 1:
            raise PydanticCustomError("one_prompt", "one prompt per request (a batch of one is fine)")
        return prompt[0]


class Invalid(Exception):
    """A body that fails validation: ``param`` names the field, ``message`` says why."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def validate(body: Any, chat: bool) -> ChatRequest | CompletionRequest:
    """``body`` (parsed JSON) as a request, or :class:`Invalid` naming the first bad field."""
    if not isinstance(body, dict):
        raise Invalid("the request body must be a JSON object", None)
    model = ChatRequest if chat else CompletionRequest
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise invalid(exc) from None


def invalid(exc: ValidationError) -> Invalid:
    """pydantic's first complaint as :class:`Invalid`, naming the field as OpenAI's ``param`` does."""
    error = exc.errors(include_url=False)[0]
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in _location(error["loc"]))
    param = param.removeprefix(".")
    return Invalid(f"{param or 'body'}: {_reason(error)}", param or None)


def _location(loc: tuple) -> list:
    # pydantic names the union member it tried ("str", "list[TextPart]", "function-after"): not a key
    return [
        part
        for part in loc
        if isinstance(part, int)
        or ("[" not in part and "-" not in part and part not in ("str", "int", "float", "bool"))
    ]


def _reason(error: dict[str, Any]) -> str:
    kind, message = error["type"], error["msg"]
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown field"
    got = repr(error.get("input"))
    return f"{message} (got {got[:60] + '...' if len(got) > 60 else got})"


def upstream_body(request: ChatRequest | CompletionRequest, raw: dict[str, Any]) -> dict[str, Any]:
    """What is submitted to ingest: the client's body as sent (unknown fields included), without
    the gateway's own fields. ``max_completion_tokens`` (OpenAI's newer name) is also given as
    ``max_tokens``, the name the engine bounds and most servers read."""
    body = {key: value for key, value in raw.items() if key not in GATEWAY_FIELDS}
    if isinstance(request, ChatRequest) and request.max_completion_tokens and request.max_tokens is None:
        body["max_tokens"] = request.max_completion_tokens
    if isinstance(request, CompletionRequest):
        body["prompt"] = request.prompt  # a batch of one: the prompt itself, as the engine takes it
    return body
