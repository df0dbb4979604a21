"""CURVE on the broadcast's tcp endpoints (issue 13, Security): real sockets, real keys. A client
whose public key is not allow-listed, one without keys and one that trusts another server key get
nothing; an allow-listed client gets the data, live and from the snapshot ROUTER, and so does a
StreamConsumer given its keys. A tcp endpoint beyond loopback without CURVE is refused."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time

import orjson
import pytest
import zmq
from engine_harness import wait_for
from test_broadcast import (
    _write,
    counter_config,
    drain,
    replies,
    stage_on_ring,  # noqa: F401  (the fixture, used through request)
    sub_socket,
)

from engine.clients.consumer import ASK_TIMEOUT_S, StreamConsumer
from engine.config import ConfigError, load_config
from engine.keys import ClientKeys, KeysDir, load_client_keys
from engine.protocol import wire
from shm.batch import Kind
from stages.broadcast.stage import Broadcast


def _last_endpoint(sock: zmq.Socket) -> str:
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()


def _client(kind: int, url: str, keys: ClientKeys | None, *topics: bytes) -> zmq.Socket:
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.apply(sock)
    for topic in topics:
        sock.setsockopt(zmq.SUBSCRIBE, topic)
    sock.connect(url)
    return sock


@pytest.fixture
def curve_stage(request, tmp_path):
    """The broadcast with a CURVE tcp live endpoint and snapshot endpoint; a keys dir where the
    client 'good' is allowed and 'stranger' (a valid pair) is not."""
    keys_dir = str(tmp_path / "keys")
    with KeysDir(keys_dir) as keys:
        keys.new_client("good")
        keys.new_client("stranger", allow=False)
    stage, producer, ctx = request.getfixturevalue("stage_on_ring")(
        endpoints=[{"url": "tcp://127.0.0.1:*", "encoding": "json"}],
        snapshot_url="tcp://127.0.0.1:*",
        curve=True,
        keys_dir=keys_dir,
    )
    live, snap = _last_endpoint(stage.publishers[-1].sock), _last_endpoint(stage.routers[-1])
    return stage, producer, ctx, keys_dir, live, snap


def test_only_an_allowed_client_key_receives_anything(curve_stage):
    stage, producer, ctx, keys_dir, live, _ = curve_stage
    good = load_client_keys("good", keys_dir)
    stranger = load_client_keys("stranger", keys_dir)
    impostor_server = ClientKeys(zmq.curve_keypair()[0], good.public, good.secret)  # trusts another server
    subs = {
        "no keys": _client(zmq.SUB, live, None, wire.ALL_TOPIC),
        "not allowed": _client(zmq.SUB, live, stranger, wire.ALL_TOPIC),
        "wrong server key": _client(zmq.SUB, live, impostor_server, wire.ALL_TOPIC),
        "allowed": _client(zmq.SUB, live, good, wire.ALL_TOPIC),
    }
    ipc_sub = sub_socket(ctx.endpoint(), wire.ALL_TOPIC)  # ipc stays as it was: no keys
    try:
        # the allowed SUB's subscription and the ipc one reach the broadcast; no other can
        wait_for(lambda: stage.do_work() >= 0 and stage.stats()["subscriptions"] >= 2, 5, "the subscriptions")
        _write(producer, [(5, 0, Kind.TOKEN, b"secret tokens")])
        wait_for(lambda: stage.do_work() == 0, 5, "the ring drained")
        assert [b.texts for b in drain(subs["allowed"], 2000)] == [["secret tokens"]]
        assert [b.texts for b in drain(ipc_sub, 2000)] == [["secret tokens"]]
        for who in ("no keys", "not allowed", "wrong server key"):
            assert not subs[who].poll(300), who  # not even a heartbeat
        assert stage.stats()["subscriptions"] == 2
    finally:
        for sock in (*subs.values(), ipc_sub):
            sock.close(0)


def test_allowing_a_key_takes_effect_for_the_next_connection_without_a_restart(curve_stage):
    stage, _, _, keys_dir, live, _ = curve_stage
    stranger = load_client_keys("stranger", keys_dir)
    before = _client(zmq.SUB, live, stranger, wire.HEARTBEAT_TOPIC)
    try:
        until = time.monotonic() + 1.5  # heartbeats go out every second
        while time.monotonic() < until:
            stage.do_work()
            assert not before.poll(50)
    finally:
        before.close(0)
    with KeysDir(keys_dir) as keys:
        keys.allow("stranger", stranger.public)
    after = _client(zmq.SUB, live, stranger, wire.HEARTBEAT_TOPIC)
    try:
        wait_for(lambda: stage.do_work() >= 0 and after.poll(0), 5, "a heartbeat for the key allowed now")
    finally:
        after.close(0)


def test_the_snapshot_endpoint_answers_only_an_allowed_client(curve_stage):
    stage, producer, _, keys_dir, _, snap = curve_stage
    _write(producer, [(5, i, Kind.TOKEN, b"x") for i in range(3)])
    wait_for(lambda: stage.do_work() == 0, 5, "the ring drained")
    request = orjson.dumps({"type": "snapshot", "stream": 5, "from_seq": 0})
    stranger = _client(zmq.DEALER, snap, load_client_keys("stranger", keys_dir))
    anonymous = _client(zmq.DEALER, snap, None)
    good = _client(zmq.DEALER, snap, load_client_keys("good", keys_dir))
    try:
        for sock in (stranger, anonymous, good):
            sock.send(request)
        got, marker = replies(stage, good, "snapshot_end")
        assert [m.seq for m in got] == [(0, 2)] and marker["published"] == 3
        for _ in range(20):
            stage.do_work()
        assert not stranger.poll(200) and not anonymous.poll(200)
    finally:
        for sock in (stranger, anonymous, good):
            sock.close(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
def test_stream_consumer_reads_an_engine_over_curve_tcp(start_engine, tmp_path):
    keys_dir = str(tmp_path / "keys")
    with KeysDir(keys_dir) as keys:
        keys.new_client("reader")
    live, snap = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
    broadcast = (
        f'params = {{ curve = true, keys_dir = "{keys_dir}", snapshot_url = "{snap}",'
        f' endpoints = [{{ url = "{live}", encoding = "binary" }}] }}'
    )
    engine = start_engine(counter_config(rate=200, total=6 * 8 * 10, broadcast=broadcast))
    with StreamConsumer(live, snap, stream=1, encoding="binary", curve=load_client_keys("reader", keys_dir)) as c:
        seqs = []
        for token in c.tokens(idle_timeout_s=5):  # the counter's streams have no end: its last token
            seqs.append(token.seq)
            if token.seq == 79:
                break
    assert seqs == list(range(80)), c.counts
    anonymous = StreamConsumer(live, snap, stream=1)
    try:
        assert list(anonymous.messages(idle_timeout_s=1.5)) == []
    finally:
        anonymous.close()
    assert engine.worker("broadcast")["restarts"] == 0


@pytest.mark.timeout(30)
def test_a_consumer_the_snapshot_router_refuses_returns_at_its_idle_timeout():
    """Without keys against a CURVE snapshot ROUTER the handshake fails and libzmq drops the
    DEALER's only pipe: the consumer's next request for the stream (its retry after
    ASK_TIMEOUT_S, or its very first one) blocked in send for ever."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    public, secret = zmq.curve_keypair()
    router.curve_server, router.curve_publickey, router.curve_secretkey = True, public, secret
    router.setsockopt(zmq.LINGER, 0)
    snap = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    try:
        consumer = StreamConsumer(f"tcp://127.0.0.1:{_free_port()}", snap, stream=1)
        try:
            started = time.monotonic()
            assert list(consumer.messages(idle_timeout_s=ASK_TIMEOUT_S + 1)) == []
            assert time.monotonic() - started < ASK_TIMEOUT_S + 3
            assert consumer.counts["snapshots"] >= 2  # it asked again, and went on
        finally:
            consumer.close()
    finally:
        router.close(0)


# ---- refusing tcp beyond loopback without CURVE ---------------------------------------------------


@pytest.mark.parametrize(
    "url", ["tcp://0.0.0.0:5556", "tcp://*:5556", "tcp://eth0:5556", "tcp://10.1.2.3:5556", "tcp://[::]:5556"]
)
def test_a_tcp_endpoint_beyond_loopback_needs_curve(url):
    with pytest.raises(ValueError, match=r"endpoints\[0\].url: .* set curve = true"):
        Broadcast.parse_params({"endpoints": [{"url": url}]})
    with pytest.raises(ValueError, match=r"snapshot_url: .* set curve = true"):
        Broadcast.parse_params({"snapshot_url": url})
    assert Broadcast.parse_params({"endpoints": [{"url": url}], "curve": True}).curve


@pytest.mark.parametrize("url", ["tcp://127.0.0.1:5556", "tcp://127.3.4.5:1", "tcp://localhost:5556", "tcp://[::1]:9"])
def test_a_loopback_tcp_endpoint_needs_no_curve(url):
    assert Broadcast.parse_params({"endpoints": [{"url": url}], "snapshot_url": url}).endpoints[0].url == url


def test_config_load_refuses_an_exposed_tcp_endpoint_with_the_key_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[workers.source]\nstage = "counter"\noutputs = ["r"]\n'
        '[workers.broadcast]\nstage = "broadcast"\ninputs = ["r"]\n'
        'params = { endpoints = [{ url = "tcp://0.0.0.0:5556", encoding = "json" }] }\n'
    )
    with pytest.raises(ConfigError, match=r"workers.broadcast.params.endpoints\[0\].url: tcp://0.0.0.0:5556 is reach"):
        load_config(str(path))
    path.write_text(path.read_text().replace("params = {", "params = { curve = true,"))
    assert load_config(str(path)).workers["broadcast"].params["curve"] is True


# ---- the keys directory ---------------------------------------------------------------------------


def test_keys_files_are_private_and_never_overwritten(tmp_path):
    keys_dir = str(tmp_path / "keys")
    with KeysDir(keys_dir) as keys:
        pair = keys.new_client("alice")
        server = keys.server()
        assert keys.server() == server  # made once, then read
        assert keys.allowed() == {"alice": pair.public} and keys.clients() == {"alice": pair.public}
        with pytest.raises(ValueError, match="exists already"):
            keys.new_client("alice")
        with pytest.raises(ValueError, match="key name must be"):
            keys.new_client("../evil")
    for root, _dirs, files in os.walk(keys_dir):
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700, root
        for name in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o600, name
    assert zmq.curve_public(load_client_keys("alice", keys_dir).secret) == pair.public


def test_a_symlinked_keys_dir_is_refused(tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    (tmp_path / "keys").symlink_to(real)
    with pytest.raises(RuntimeError, match="symbolic link"):
        KeysDir(str(tmp_path / "keys"))


def test_curve_command_makes_lists_and_allows(tmp_path):
    env = dict(os.environ, NEURALPIPE_KEYS_DIR=str(tmp_path / "keys"))

    def cli(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "engine.cli", "curve", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)

    made = orjson.loads(cli("new", "alice", "--json").stdout)
    other = orjson.loads(cli("new", "bob", "--no-allow", "--json").stdout)
    listed = orjson.loads(cli("list", "--json").stdout)
    assert listed["allowed"] == {"alice": made["public_key"]} and set(listed["clients"]) == {"alice", "bob"}
    assert listed["server_public_key"] == made["server_public_key"]
    again = cli("new", "alice")
    assert again.returncode == 1 and "exists already" in again.stderr
    assert cli("allow", str(tmp_path / "keys" / "clients" / "bob.key")).returncode == 0
    assert orjson.loads(cli("list", "--json").stdout)["allowed"]["bob"] == other["public_key"]


@pytest.mark.parametrize(
    ("given", "message"),
    [({"curve": "yes"}, "curve: must be true or false"), ({"keys_dir": "keys"}, "keys_dir: must be an absolute path")],
)
def test_bad_curve_params_are_refused_with_the_key_named(given, message):
    with pytest.raises(ValueError, match=message):
        Broadcast.parse_params(given)
