"""OpenAI's Responses API (``POST /v1/responses``, what the Agents SDK and Codex call) on the
engine's chat streams: the request becomes the chat request every upstream serves
(:func:`chat_body`), and the stream's rows become the Responses events and response object
(:class:`ResponsesShaper`, the gateway's other shaper beside stages/gateway/shapes.py's).

Stateless: nothing is stored, so ``previous_response_id`` and ``conversation`` are refused (400)
and a client sends the whole conversation in ``input`` (as Codex does with ``store: false``).
Only function tools; a reasoning model's thinking is a ``reasoning`` output item."""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any

import orjson
from pydantic import Field, StrictBool, StrictStr, ValidationError

from engine.protocol.openai_errors import ApiError
from engine.protocol.requests import MAX_TOKENS_LIMIT
from engine.protocol.toolcalls import merged_pieces
from stages.gateway.shapes import Usage
from stages.gateway.validation import Invalid, Number, OpenModel, invalid

ECHOED = ("instructions", "max_output_tokens", "temperature", "top_p", "tool_choice", "parallel_tool_calls")
STATEFUL = ("previous_response_id", "conversation")  # need a stored response: not kept here
LOGPROBS = "message.output_text.logprobs"  # in ``include``: each output token's logprob
# the Responses API's own fields that chat has no use for; any other unknown field (seed, top_k,
# ...) passes on to the upstream, as the chat endpoint passes it
RESPONSES_ONLY = {
    "store", "metadata", "truncation", "prompt", "prompt_cache_key", "safety_identifier",
    "service_tier", "stream_options", "max_tool_calls", *STATEFUL,
}  # fmt: skip
TEXT_PARTS = ("input_text", "output_text", "text", "refusal")
# a chat finish_reason that cuts the reply short -> the Responses API's incomplete_details.reason
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
# an output item's type -> the event that streams its text
DELTAS = {
    "message": "response.output_text.delta",
    "reasoning": "response.reasoning_text.delta",
    "function_call": "response.function_call_arguments.delta",
}


class ResponsesRequest(OpenModel):
    model: Annotated[StrictStr, Field(min_length=1)]
    input: Annotated[StrictStr, Field(min_length=1)] | Annotated[list[dict], Field(min_length=1)]
    instructions: StrictStr | None = None
    max_output_tokens: Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    stream: StrictBool | None = False
    tools: list[dict] | None = None
    tool_choice: StrictStr | dict | None = None
    parallel_tool_calls: StrictBool | None = None
    reasoning: dict | None = None
    text: dict | None = None
    background: StrictBool | None = None
    include: list[StrictStr] | None = None  # of what it names, logprobs are given (LOGPROBS)
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=20)] | None = None

    @property
    def logprobs(self) -> bool:
        return LOGPROBS in (self.include or ())


def validate_responses(body: Any) -> ResponsesRequest:
    """``body`` as a Responses request, or :class:`Invalid` naming the first bad field."""
    if not isinstance(body, dict):
        raise Invalid("the request body must be a JSON object", None)
    try:
        req = ResponsesRequest.model_validate(body)
    except ValidationError as exc:
        raise invalid(exc) from None
    for name in STATEFUL:
        if body.get(name) is not None:
            raise Invalid(f"{name}: responses are not stored here; send the whole conversation in input", name)
    if req.background:
        raise Invalid("background: not supported; stream the response instead", "background")
    return req


CHAT_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "tools": "tools", "tool_choice": "tool_choice"}


def responses_param(exc: Invalid) -> Invalid:
    """A complaint about the chat request made from a Responses request, naming the Responses
    field it came from (``messages[2].content`` -> ``input``)."""
    if exc.param is None:
        return exc
    head = exc.param.split(".")[0].split("[")[0]
    if head not in CHAT_PARAMS:
        return exc
    reason = exc.message.split(": ", 1)[-1]
    return Invalid(f"{CHAT_PARAMS[head]}: {reason}", CHAT_PARAMS[head])


def chat_body(req: ResponsesRequest) -> dict[str, Any]:
    """The chat request that ``req`` asks for (the gateway's chat validation then checks it)."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
    else:
        for i, item in enumerate(req.input):
            _add_item(messages, item, f"input[{i}]")
    extra = {key: value for key, value in (req.model_extra or {}).items() if key not in RESPONSES_ONLY}
    body: dict[str, Any] = extra | {"model": req.model, "messages": messages}
    for ours, theirs in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p")):
        if getattr(req, ours) is not None:
            body[theirs] = getattr(req, ours)
    if req.tools:
        body["tools"] = [_chat_tool(tool, f"tools[{i}]") for i, tool in enumerate(req.tools)]
    if req.tool_choice is not None:
        choice = req.tool_choice
        if isinstance(choice, dict) and choice.get("type") == "function":
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        body["tool_choice"] = choice
    if req.logprobs:
        body["logprobs"] = True
        if req.top_logprobs:
            body["top_logprobs"] = req.top_logprobs
    if req.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = req.parallel_tool_calls
    effort = (req.reasoning or {}).get("effort")
    if effort is not None:
        body["reasoning_effort"] = effort
    fmt = (req.text or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = {key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    return body


def _add_item(messages: list[dict[str, Any]], item: dict, where: str) -> None:
    kind = item.get("type", "message")
    if kind == "message":
        messages.append({"role": item.get("role"), "content": _content(item.get("content"), where)})
    elif kind == "function_call":
        call = {
            "id": item.get("call_id"),
            "type": "function",
            "function": {"name": item.get("name"), "arguments": item.get("arguments", "")},
        }
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and "tool_calls" in last:
            last["tool_calls"].append(call)  # a turn's calls together, as chat has them
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        content = output if isinstance(output, str) else _content(output, where + ".output")
        messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": content})
    elif kind != "reasoning":  # earlier thinking: chat servers take none back
        raise Invalid(f"{where}.type: {kind!r} is not served (message, function_call, function_call_output)", where)


def _content(content: Any, where: str) -> Any:
    """A Responses message's content as chat's: a string, or parts (text and images)."""
    if not isinstance(content, list):
        return content  # a string (or something the chat validation names)
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS:
            parts.append({"type": "text", "text": part.get("text", part.get("refusal", ""))})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image = {"url": part["image_url"]} | ({"detail": part["detail"]} if "detail" in part else {})
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise Invalid(f"{where}.content[{i}].type: {kind!r} is not served (input_text, input_image)", where)
    if len(parts) == 1 and parts[0]["type"] == "text":  # what SDKs send: one text, as a string
        return parts[0]["text"]  # (every chat template reads a string; not all read parts)
    return parts


def _chat_tool(tool: dict, where: str) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise Invalid(f"{where}.type: {tool.get('type')!r} is not served: only function tools", where)
    function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if key in tool}
    return {"type": "function", "function": function}


class ResponsesShaper:
    """One response's events and object. The methods are :class:`stages.gateway.shapes.Shaper`'s
    (the completion handling calls either); the state is what the closing events repeat: each
    output item, whole."""

    index = 0  # one choice: a response has no ``n``
    include_usage = True  # the closing event always has it

    def __init__(self, req: ResponsesRequest) -> None:
        self.id = "resp_" + secrets.token_hex(16)
        self.created = int(time.time())
        self.echo: dict[str, Any] = {name: getattr(req, name) for name in ECHOED}
        self.echo |= {
            "model": req.model,
            "tools": req.tools or [],
            "reasoning": req.reasoning or {"effort": None, "summary": None},
            "text": req.text or {"format": {"type": "text"}},
        }
        self.items: list[dict[str, Any]] = []  # the output, as it grows
        self.open: dict[str, Any] | None = None  # the item being written
        self.pieces: list[str] = []  # its text (or a call's arguments) so far: joined once, at its end
        self.logprobs: list[dict[str, Any]] = []  # the message's tokens' logprobs, when asked for
        self.delta = (b"", b"", b"")  # its delta event's bytes around the sequence number and the text
        self.calls: dict[int, dict[str, Any]] = {}  # chat's tool call index -> its item
        self.reason = "stop"
        self.seq = 0

    # -- the stream -------------------------------------------------------------------------------

    def role(self) -> bytes:
        return self._event("response.created", response=self._response("in_progress")) + self._event(
            "response.in_progress", response=self._response("in_progress")
        )

    def content(self, text: str, logprobs: Any = None, extension: Any = None) -> bytes:
        out = self._begin("message")
        if logprobs is None:
            return out + self._delta(text)
        entries = logprobs["content"]  # chat's shape (shapes.chat_logprobs): the Responses API's entries
        self.pieces.append(text)
        self.logprobs += entries
        delta = {**self._at(), "content_index": 0, "delta": text, "logprobs": entries}
        return out + self._event("response.output_text.delta", **delta)

    def reasoning(self, text: str) -> bytes:
        return self._begin("reasoning") + self._delta(text)

    def tool_call_pieces(self, texts: list[str]) -> bytes:
        out = b""
        for piece in merged_pieces(texts):
            function = piece.get("function", {})
            item = self.calls.get(piece["index"])
            if item is None:
                out += self._close()
                call_id = piece.get("id") or "call_" + secrets.token_hex(12)
                item = _call_item(call_id, function.get("name", ""), "", "in_progress")
                self.calls[piece["index"]] = item
                out += self._add(item)
            arguments = function.get("arguments", "")
            if item is not self.open:  # more of a call after the next began (no event for it now)
                item["arguments"] += arguments
            elif arguments:
                out += self._delta(arguments)
        return out

    def finish(self, reason: str) -> bytes:
        self.reason = reason
        return b""  # the closing events need the usage, known once the stream has ended

    def closing(self, usage: Usage) -> bytes:
        """The open item's done events and the response's last event, with its usage."""
        status = "incomplete" if self.reason in INCOMPLETE else "completed"
        return self._close() + self._event(f"response.{status}", response=self._response(status, usage))

    def error(self, err: ApiError) -> bytes:
        """The response failed mid-stream: ``response.failed`` as OpenAI sends it, with the error
        object beside it too, which the official clients raise on."""
        self._settle()
        response = self._response("failed") | {"error": {"code": err.code, "message": err.message}}
        return self._event("response.failed", response=response, error=err.body()["error"])

    # -- whole ------------------------------------------------------------------------------------

    def choice(
        self,
        text: str,
        reason: str,
        logprobs: Any = None,
        extension: Any = None,
        tool_calls: list[dict[str, Any]] | None = None,
        reasoning: str = "",
    ) -> dict[str, Any]:
        self.reason = reason
        if reasoning:
            self.items.append(_reasoning_item(reasoning))
        if text or not tool_calls:
            self.items.append(_message_item(text))
            if logprobs is not None:
                self.items[-1]["content"][0]["logprobs"] = logprobs["content"]
        for call in tool_calls or ():
            function = call.get("function", {})
            self.items.append(_call_item(call.get("id"), function.get("name"), function.get("arguments", "")))
        return {}

    def whole(self, choices: list[dict[str, Any]], usage: Usage) -> dict[str, Any]:
        return self._response("incomplete" if self.reason in INCOMPLETE else "completed", usage)

    # -- parts ------------------------------------------------------------------------------------

    def _response(self, status: str, usage: Usage | None = None) -> dict[str, Any]:
        response = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": INCOMPLETE[self.reason]} if status == "incomplete" else None,
            "output": self.items if status != "in_progress" else [],
            "usage": _usage(usage) if usage is not None else None,
            "store": False,
            "previous_response_id": None,
            "metadata": {},
            "truncation": "disabled",
        }
        return response | self.echo

    def _event(self, kind: str, **fields: Any) -> bytes:
        body = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"

    def _at(self) -> dict[str, Any]:
        return {"item_id": self.open["id"], "output_index": len(self.items) - 1}

    def _delta(self, text: str) -> bytes:
        """The open item's delta event: its bytes around the sequence number and the text made once
        per item (as the chat shaper splices a chunk's), so a token costs two small encodes."""
        self.pieces.append(text)
        head, middle, tail = self.delta
        self.seq += 1
        return head + str(self.seq - 1).encode() + middle + orjson.dumps(text) + tail

    def _settle(self) -> None:
        """The open item's text (or arguments) so far, joined into it."""
        item, text = self.open, "".join(self.pieces)
        if item is None:
            return
        if item["type"] == "function_call":
            item["arguments"] = text
        else:
            item["content"][0]["text"] = text
        if item["type"] == "message":
            item["content"][0]["logprobs"] = self.logprobs

    def _begin(self, kind: str) -> bytes:
        """Open an item of ``kind`` unless one is open: the other one is done first."""
        if self.open is not None and self.open["type"] == kind:
            return b""
        out = self._close()
        item = _reasoning_item("") if kind == "reasoning" else _message_item("")
        item["status"] = "in_progress"
        out += self._add(item)
        if kind == "message":
            out += self._event("response.content_part.added", **self._at(), content_index=0, part=_text_part(""))
        return out

    def _add(self, item: dict[str, Any]) -> bytes:
        self.items.append(item)
        self.open, self.pieces, self.logprobs = item, [], []
        kind = DELTAS[item["type"]]
        # the delta event as _event writes it, split around its sequence number and its text
        fields = {"type": kind, "sequence_number": -1, **self._at()}
        if item["type"] != "function_call":
            fields["content_index"] = 0
        fields["delta"] = "\0"
        if item["type"] == "message":
            fields["logprobs"] = []
        encoded = b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(fields) + b"\n\n"
        head, rest = encoded.split(b'"sequence_number":-1', 1)
        middle, tail = rest.rsplit(b'"\\u0000"', 1)
        self.delta = (head + b'"sequence_number":', middle, tail)
        added = {key: ("" if key == "arguments" else value) for key, value in item.items()}
        if "content" in added:
            added["content"] = []
        return self._event("response.output_item.added", output_index=len(self.items) - 1, item=added)

    def _close(self) -> bytes:
        item = self.open
        if item is None:
            return b""
        at = self._at()
        self._settle()
        item["status"] = "completed"
        if item["type"] == "message":
            part = item["content"][0]
            out = self._event(
                "response.output_text.done", **at, content_index=0, text=part["text"], logprobs=part["logprobs"]
            )
            out += self._event("response.content_part.done", **at, content_index=0, part=part)
        elif item["type"] == "reasoning":
            text = item["content"][0]["text"]
            out = self._event("response.reasoning_text.done", **at, content_index=0, text=text)
        else:
            out = self._event("response.function_call_arguments.done", **at, arguments=item["arguments"])
        self.open = None
        return out + self._event("response.output_item.done", output_index=at["output_index"], item=item)


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": "msg_" + secrets.token_hex(12),
        "status": "completed",
        "role": "assistant",
        "content": [_text_part(text)],
    }


def _call_item(call_id: Any, name: Any, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": "fc_" + secrets.token_hex(12),
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def _reasoning_item(text: str) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": "rs_" + secrets.token_hex(12),
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": "completed",
    }


def _usage(usage: Usage) -> dict[str, Any]:
    out: dict[str, Any] = {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }
    if usage.prompt_estimated:
        out["neuralpipe"] = {"input_tokens_estimated": True}
    return out
