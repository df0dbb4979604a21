"""Webhook notifications (engine/notify.py): posted by real engines to a real local HTTP receiver, retried
on a 5xx, bounded against a dead receiver, and `[notify]` validated with the key named."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from engine_harness import pipeline_config, wait_for
from monitoring_helpers import kill_until_restarted

from engine.config import ConfigError, NotifyConfig, load_config
from engine.health import EgressSample, HealthMonitor, WorkerSample
from engine.logs import JsonLogger
from engine.notify import Notifier, RestartStorms, SupervisorNotices


class Receiver:
    """A local webhook receiver: records every POST; ``/fail<N>/...`` answers 500 to its first N
    requests, ``/status<code>`` always answers ``code``, ``/hold`` waits for :attr:`release`."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict]] = []
        self.answers: dict[str, int] = {}
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append((self.path, json.loads(body)))
                self.send_response(receiver._code(self.path))
                if self.path.startswith("/redirect"):
                    self.send_header("Location", "/ok")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _code(self, path: str) -> int:
        seen = self.answers[path] = self.answers.get(path, 0) + 1
        if path.startswith("/fail"):
            return 500 if seen <= int(path[5:].split("/")[0]) else 200
        if path.startswith("/status"):
            return int(path[7:10])
        if path.startswith("/redirect"):
            return 307
        if path.startswith("/hold"):
            self.release.wait(30)
        return 200

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def events(self, path: str, event: str | None = None) -> list[dict]:
        return [body for p, body in list(self.posts) if p == path and (event is None or body["event"] == event)]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def dead_url() -> str:
    """A URL on a port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/dead"


@pytest.fixture
def log(tmp_path):
    """A logger writing to tmp_path/notify.log (read back by the tests)."""
    with open(tmp_path / "notify.log", "wb") as stream:
        yield JsonLogger("notify", "info", stream)


# ---- Notifier on its own --------------------------------------------------------------------------


def test_posts_a_json_notification(receiver: Receiver, log) -> None:
    notifier = Notifier("inst1", [receiver.url("/ok")], log=log)
    notifier.notify("pas_status", "PAS critical", status="critical", previous="healthy")
    notifier.close(10)
    [body] = receiver.events("/ok")
    assert body["event"] == "pas_status" and body["instance"] == "inst1" and body["status"] == "critical"
    assert body["version"] == 1 and body["summary"] == "PAS critical" and "inst1" in body["text"]
    assert notifier.counts == {"queued": 1, "dropped": 0, "sent": 1, "failed": 0}


def test_a_5xx_is_retried_until_accepted(receiver: Receiver, log) -> None:
    notifier = Notifier("i", [receiver.url("/fail2/x")], retries=3, backoff_s=0.01, log=log)
    notifier.notify("escalation", "gave up")
    notifier.close(10)
    assert len(receiver.events("/fail2/x")) == 3  # 500, 500, 200
    assert notifier.counts["sent"] == 1 and notifier.counts["failed"] == 0


def test_retries_are_bounded(receiver: Receiver, log, tmp_path) -> None:
    notifier = Notifier("i", [receiver.url("/fail99/x")], retries=2, backoff_s=0.01, log=log)
    notifier.notify("escalation", "gave up")
    notifier.close(10)
    assert len(receiver.events("/fail99/x")) == 3 and notifier.counts["failed"] == 1
    assert '"event":"notify_failed"' in (tmp_path / "notify.log").read_text()
    assert "/fail99" not in (tmp_path / "notify.log").read_text()  # logs name the origin only


def test_a_4xx_or_a_redirect_is_not_retried_or_followed(receiver: Receiver, log) -> None:
    urls = [receiver.url("/status404"), receiver.url("/redirect")]
    notifier = Notifier("i", urls, retries=3, backoff_s=0.01, log=log)
    notifier.notify("escalation", "gave up")
    notifier.close(10)
    assert len(receiver.events("/status404")) == 1 and len(receiver.events("/redirect")) == 1
    assert receiver.events("/ok") == [] and notifier.counts["failed"] == 2


def test_notify_never_waits_for_a_hanging_receiver(receiver: Receiver, log) -> None:
    """The receiver holds its first request; notify keeps returning, the queue stays bounded (oldest
    dropped), and a second webhook is served meanwhile."""
    notifier = Notifier("i", [receiver.url("/hold"), receiver.url("/ok")], queue_size=3, log=log)
    notifier.notify("pas_status", "first")
    wait_for(lambda: receiver.events("/hold"), 10, "the held request")
    for n in range(20):  # would hang here if notify waited on the held webhook
        notifier.notify("pas_status", f"n{n}")
        wait_for(lambda n=n: len(receiver.events("/ok")) == n + 2, 10, f"notification {n} at the live webhook")
    assert notifier.counts["dropped"] == 17  # the held webhook keeps its 3 newest
    receiver.release.set()
    notifier.close(10)
    assert [b["summary"] for b in receiver.events("/hold")] == ["first", "n17", "n18", "n19"]


def test_a_dead_receiver_costs_a_bounded_close(dead_url: str, log) -> None:
    notifier = Notifier("i", [dead_url], timeout_s=0.5, retries=50, backoff_s=0.2, log=log)
    for n in range(1000):
        notifier.notify("pas_status", f"n{n}")
    assert notifier.counts["queued"] + notifier.counts["dropped"] == 1000 and notifier.counts["dropped"] >= 899
    notifier.close(0.5)  # gives up at its budget, though 50 retries are left
    assert notifier.stopped.is_set() and notifier.counts["sent"] == 0


@pytest.fixture
def garbage_url():
    """A TCP server that answers every request with bytes that are not HTTP, then closes."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(b"SSH-2.0-not-http\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/garbage"
    stop.set()
    thread.join(5)
    server.close()


def test_an_answer_that_is_not_http_is_a_failed_try_and_the_sender_lives_on(garbage_url: str, log, tmp_path) -> None:
    notifier = Notifier("i", [garbage_url], retries=1, backoff_s=0.01, log=log)
    for n in range(2):
        notifier.notify("pas_status", f"n{n}")
        wait_for(lambda n=n: notifier.counts["failed"] == n + 1, 10, f"notification {n} failed")
    notifier.close(1)
    assert "BadStatusLine" in (tmp_path / "notify.log").read_text()


def test_restart_storm_reported_once_per_storm() -> None:
    storms = RestartStorms(threshold=3, window_s=10)
    assert [storms.restarted("a", t) for t in (0, 1)] == [None, None]
    assert storms.restarted("b", 1.5) is None  # another worker counts apart
    assert storms.restarted("a", 2) == 3
    assert storms.restarted("a", 3) is None  # the same storm
    assert storms.restarted("a", 30) is None  # calm again: re-armed
    assert [storms.restarted("a", t) for t in (31, 32)] == [None, 3]


def test_pas_status_changes_are_posted_once_each(receiver: Receiver, log) -> None:
    """Scores from the real monitor: healthy (no notice), critical (all workers dead), critical again (no
    notice), healthy again."""
    notices = SupervisorNotices("inst", NotifyConfig(webhooks=[receiver.url("/ok")]), log)
    monitor = HealthMonitor()

    def score(now: float, alive: bool):
        workers = [WorkerSample(f"w{i}", "g", "running", alive, 0, 0.1, 0) for i in range(2)]
        pas = monitor.observe(now, [], workers, EgressSample())
        notices.pas_scored(pas)
        return pas.status

    assert [score(0, True), score(1, False), score(2, False), score(3, True)] == [
        "healthy",
        "critical",
        "critical",
        "healthy",
    ]
    notices.close()
    posted = [(b["status"], b["previous"]) for b in receiver.events("/ok", "pas_status")]
    assert posted == [("critical", "healthy"), ("healthy", "critical")]
    first = receiver.events("/ok")[0]
    assert first["pas"]["stability"] == 0 and "lowest sub-score stability" in first["summary"]


# ---- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('webhooks = ["http://h/a", "ftp://h/b"]', "notify.webhooks[1]: must be an http:// or https:// URL"),
        ('webhooks = ["http://u:pw@h/a"]', "notify.webhooks[0]: must not carry credentials"),
        ('webhooks = ["http://h/a", "http://h/a"]', "notify.webhooks[1]: webhook listed twice"),
        ('webhooks = ["http://h:0/a"]', "notify.webhooks[0]: must be a plain URL"),
        ('webhooks = "http://h/a"', "notify.webhooks: must be an array"),
        ("webhooks = [" + ", ".join(f'"http://h/{i}"' for i in range(17)) + "]", "notify.webhooks: at most 16"),
        ("timeout_s = 0", "notify.timeout_s: must be > 0"),
        ("retries = 11", "notify.retries: must be <= 10"),
        ("queue_size = 0", "notify.queue_size: must be >= 1"),
        ("storm_restarts = 1", "notify.storm_restarts: must be >= 2"),
        ("webhook = []", "notify.webhook: unknown key (did you mean 'webhooks'?)"),
    ],
)
def test_config_errors_name_the_key(tmp_path, toml: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[notify]\n{toml}\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path), env={})
    assert message in str(err.value)


# ---- real engines ---------------------------------------------------------------------------------


def notify_section(*urls: str, storm_restarts: int = 3) -> str:
    hooks = ", ".join(f'"{u}"' for u in urls)
    return f"[notify]\nwebhooks = [{hooks}]\ntimeout_s = 1.0\nbackoff_s = 0.05\nstorm_restarts = {storm_restarts}\n"


@pytest.mark.timeout(90)
def test_engine_posts_a_restart_storm_despite_a_flaky_and_a_dead_webhook(
    start_engine, receiver: Receiver, dead_url: str
) -> None:
    config = pipeline_config(extra=notify_section(receiver.url("/ok"), receiver.url("/fail1/x"), dead_url))
    engine = start_engine(config)
    kill_until_restarted(engine, "relay", 3)
    [storm] = wait_for(lambda: receiver.events("/ok", "restart_storm"), 15, "the restart-storm notification")
    assert storm["worker"] == "relay" and storm["restarts_in_window"] == 3 and storm["instance"] == engine.instance
    # the flaky webhook answered 500 to its first request: that one came again, and whatever its
    # first notification was, the storm reached it too
    wait_for(lambda: receiver.events("/fail1/x", "restart_storm"), 15, "the storm at the flaky webhook")
    first = receiver.events("/fail1/x")[0]
    wait_for(lambda: receiver.events("/fail1/x").count(first) == 2, 15, "the retry of the 500-answered post")
    # the dead webhook changed nothing: the engine still answers, restarts, and stops cleanly
    wait_for(lambda: engine.worker("relay")["state"] == "running", 15, "relay running again")
    assert engine.stop() == 0
    assert '"event":"notify_failed"' in engine.log() and "/dead" not in engine.log()


@pytest.mark.timeout(90)
def test_engine_posts_its_escalation_before_it_exits(start_engine, receiver: Receiver) -> None:
    config = pipeline_config(intensity=2, extra=notify_section(receiver.url("/fail1/esc"), storm_restarts=2))
    engine = start_engine(config)
    kill_until_restarted(engine, "relay", 2)
    os.kill(engine.worker("relay")["pid"], signal.SIGKILL)
    assert engine.wait_exit(30) == 3
    # the supervisor has exited: what it queued was delivered before, retried past the first 500
    [escalation] = receiver.events("/fail1/esc", "escalation")
    assert "relay" in escalation["reason"] and escalation["summary"].startswith("supervisor gave up")
    assert {b["worker"] for b in receiver.events("/fail1/esc", "restart_storm")} == {"relay"}
    first = receiver.events("/fail1/esc")[0]
    assert receiver.events("/fail1/esc").count(first) == 2  # answered 500 once, then accepted
