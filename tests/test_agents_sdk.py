"""The OpenAI Agents SDK against the gateway, as its users run it: its default model calls the
Responses API (``POST /v1/responses``). An agent with a function tool runs to its final answer,
whole and streamed: the model calls the tool (the embedded upstream calls one when the tool choice
makes it), the SDK runs it and sends its output back in ``input``, and the model answers."""

from __future__ import annotations

import asyncio

import pytest
from agents import Agent, ModelSettings, Runner, function_tool, set_tracing_disabled
from agents.models.openai_responses import OpenAIResponsesModel
from gateway_harness import serving
from openai import AsyncOpenAI

MODEL = "neuralpipe-echo"


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    set_tracing_disabled(True)  # the SDK would send its traces to OpenAI
    yield from serving(tmp_path_factory, "gwagents")


def _agent(url: str, calls: list[str]) -> Agent:
    @function_tool
    def echo(text: str) -> str:
        """Say the text back."""
        calls.append(text)
        return text

    model = OpenAIResponsesModel(MODEL, AsyncOpenAI(base_url=url, api_key="unused", max_retries=0))
    # "required": the first turn calls the tool; the SDK then lets the model choose, and it answers
    settings = ModelSettings(tool_choice="required", max_tokens=4096)
    return Agent(name="echoer", instructions="Be brief.", model=model, tools=[echo], model_settings=settings)


@pytest.mark.timeout(90)
def test_an_agent_calls_its_tool_and_answers(gw):
    calls: list[str] = []

    async def run():
        return await Runner.run(_agent(gw.url, calls), "say hi through the tool")

    result = asyncio.run(run())
    kinds = [type(item).__name__ for item in result.new_items]
    assert kinds == ["ToolCallItem", "ToolCallOutputItem", "MessageOutputItem"]
    assert len(calls) == 1 and calls[0]  # the arguments reached the tool, parsed
    assert isinstance(result.final_output, str) and result.final_output


@pytest.mark.timeout(90)
def test_a_streamed_agent_run_ends_with_the_same_shape(gw):
    calls: list[str] = []

    async def run():
        streamed = Runner.run_streamed(_agent(gw.url, calls), "stream it through the tool")
        events = [event async for event in streamed.stream_events()]
        return streamed, events

    streamed, events = asyncio.run(run())
    raw = [e.data.type for e in events if e.type == "raw_response_event"]
    assert raw.count("response.completed") == 2  # the tool-calling turn and the answer
    assert "response.function_call_arguments.delta" in raw and "response.output_text.delta" in raw
    assert len(calls) == 1 and isinstance(streamed.final_output, str) and streamed.final_output
