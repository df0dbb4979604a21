"""`neuralpipe submit --follow` as a user runs it: JSON lines only with --json, the exit code says
how the stream ended, an empty prompt is refused."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest
from engine_harness import full_config

from engine.clients.tail import _stream_text
from engine.protocol import wire
from engine.protocol.toolcalls import piece_text

pytestmark = pytest.mark.timeout(90)


def cli(engine, command: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", command, *args, "--config", str(engine.config_path)],
        env=engine.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_follow_json_prints_json_lines_only_and_exits_0_on_a_complete_stream(start_engine):
    engine = start_engine(full_config())
    done = cli(engine, "submit", "hello there", "--max-tokens", "8", "--follow", "--json")
    assert done.returncode == 0, done.stderr
    lines = [orjson.loads(line) for line in done.stdout.splitlines()]  # every line is JSON
    assert "stream_id" in lines[0]
    assert lines[-1]["type"] == "end" and sum(line.get("type") == "tokens" for line in lines) >= 1


def test_follow_exits_1_when_the_stream_ends_in_an_error(start_engine):
    # the upstream drops every connection after 3 tokens: the stream ends with an explicit error
    config = full_config().replace("tokens_per_s = 0 }", 'tokens_per_s = 0, faults = "disconnect_after=3" }')
    engine = start_engine(config)
    done = cli(engine, "submit", "cut me off", "--max-tokens", "20", "--temperature", "0.9", "--follow")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "[error:" in done.stdout


def test_an_empty_prompt_is_refused(start_engine):
    engine = start_engine(full_config())
    done = cli(engine, "submit", "   ")
    assert done.returncode == 2 and "the prompt is empty" in done.stderr


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("option", "value"),
    [("--max-tokens", str(2**64)), ("--max-tokens", "0"), ("--temperature", "nan"), ("--temperature", "inf")],
)
def test_submit_refuses_a_number_out_of_range_before_sending_it(tmp_path, option, value):
    """2**64 tokens was a TypeError traceback (JSON has no such integer); NaN and infinity were sent
    as null, so the request ran at the default temperature, not the one asked for. Refused before
    looking for an engine (none runs under this runtime directory)."""
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "submit", "numbers", option, value],
        env=dict(os.environ, NEURALPIPE_RUNTIME_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 2 and f"Invalid value for '{option}'" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_tail_of_an_unknown_stream_ends_with_an_error_instead_of_hanging(start_engine):
    engine = start_engine(full_config())
    done = cli(engine, "tail", "--stream", "987654321", "--wait", "2")
    assert done.returncode == 1
    assert "nothing of stream 987654321 reached the broadcast within 2 s" in done.stderr


@pytest.mark.timeout(30)
@pytest.mark.parametrize("stream", ["-1", str(2**64)])
def test_tail_of_a_stream_id_no_stream_can_have_is_refused_at_once(stream):
    """-1 waited the whole --wait for a stream that cannot exist; 2**64 was a TypeError traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "tail", "--stream", stream], capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 2 and "Invalid value for '--stream'" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_tail_of_a_finished_stream_prints_it_whole(start_engine):
    engine = start_engine(full_config())
    sid = orjson.loads(cli(engine, "submit", "remember me", "--max-tokens", "5", "--json").stdout)["stream_id"]
    done = cli(engine, "tail", "--stream", str(sid), "--format", "json")
    assert done.returncode == 0, done.stderr
    kinds = [orjson.loads(line)["type"] for line in done.stdout.splitlines()]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("tokens") == 5


def test_follow_prints_a_reasoning_models_thinking_marked_then_the_reply(start_engine):
    """Before, a reasoning message printed as "[error: None]" (every type but the known ones did)."""
    engine = start_engine(full_config())
    args = ("submit", "think first", "--max-tokens", "12", "--reasoning-effort", "low", "--follow")
    text = cli(engine, *args)
    assert text.returncode == 0, text.stderr
    assert "error" not in text.stdout
    thought = text.stdout.split("[thinking] ", 1)[1].split(" [/thinking]\n", 1)
    assert len(thought) == 2 and thought[0] and thought[1].split("\n[end:", 1)[0]  # thinking, then the reply
    lines = [orjson.loads(line) for line in cli(engine, *args, "--json").stdout.splitlines()[1:]]
    assert [line["type"] for line in lines] == ["start"] + ["reasoning"] * 8 + ["tokens"] * 4 + ["end"]


def test_a_tool_calls_pieces_print_as_the_call_and_its_arguments():
    """A reply that called a tool has no token text: without its calls, the text form showed nothing."""
    pieces = [
        piece_text(0, '{"q": ', "call_1", "function", "lookup"),
        piece_text(0, '"x"}'),
        piece_text(1, "{}", "call_2", "function", "note"),
    ]
    printed = _stream_text(wire.Message("tool_calls", 7, (3, 5), {}, text=pieces))
    assert printed == '\n[tool call 0: lookup] {"q": "x"}\n[tool call 1: note] {}'
