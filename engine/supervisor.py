"""The supervisor: owns every segment, socket path and worker process of an engine instance.

It creates the runtime directory and the rings, spawns the workers (``spawn`` start method),
watches them — process exit through each worker's sentinel fd, hangs through missed heartbeats —
and restarts them with OTP-like semantics: restart type per worker (permanent / transient /
temporary), strategy one_for_one or rest_for_one, at most ``intensity`` restarts in ``period_s``
with exponential back-off, then escalation (stop everything cleanly, exit non-zero with the
reason). One ``zmq.Poller`` waits on the control ROUTER, the worker sentinels and the signal
wake-up fd, with a timeout set by the next timer, so an idle supervisor sleeps.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import platform
import secrets
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any

import zmq

from engine.config import STAGE_ALIASES, Config, ConfigError, check_stage_params
from engine.fdlimit import raise_open_files
from engine.health import EgressSample, HealthMonitor, Pas, RingSample, WorkerSample
from engine.logfile import keep_under, remove_old_logs
from engine.logs import JsonLogger
from engine.metrics import EngineMetrics
from engine.notify import SupervisorNotices
from engine.ports import port_factory
from engine.procstats import cpu_seconds, rss_bytes
from engine.protocol import control
from engine.rundir import InstanceDir, RuntimeDirError, remove_dead_instances
from engine.telemetry import Telemetry, WorkerTotals, check_snapshot, merge, upstream_health, values_of
from engine.worker import TERMINATE_GRACE_S, RingEnd, WorkerSpec
from engine.worker import main as worker_main
from shm.naming import new_instance_id, segment_name
from shm.registry import list_segments, remove_stale
from shm.ring import Ring, RingCorrupt, read_header
from shm.segment import NoSharedMemory

EXIT_OK = 0
EXIT_ESCALATED = 3
STARTUP_GRACE_S = 10.0  # a fresh worker imports its stage before its first heartbeat
# a turn of the loop may take this much longer than its poll's timeout; beyond, the supervisor was
# not running (stopped, paused, descheduled) and the time is not charged to its workers' heartbeats
TURN_SLACK_S = 0.25
STDERR = 2  # where every process of the engine logs (a detached engine's: <base>/<instance>.log)
_EGRESS_KEYS = ("messages", "gaps", "duplicates", "batches", "batches_within_budget")
_RECEIVED = {**control.WORKER_TO_SUPERVISOR, **control.CLIENT_REQUESTS}
_STAGE_NAMES = {ref: alias for alias, ref in STAGE_ALIASES.items()}  # metrics name a stage by its alias


class StartupError(Exception):
    """The engine could not be set up (no shared memory, a port in use); the text says why."""


class Escalation(Exception):
    """Restarts exceeded the configured intensity; the supervisor gives up with this reason."""


@dataclass
class WorkerHandle:
    """The supervisor's view of one worker across its incarnations."""

    name: str
    spec: WorkerSpec
    restart: str
    process: multiprocessing.process.BaseProcess | None = None
    state: str = "stopped"
    incarnation: int = 0
    started: float = 0.0
    last_heartbeat: float = 0.0
    restarts: int = 0
    restart_times: deque[float] = field(default_factory=deque)
    restart_due: float | None = None
    processed: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    telemetry: WorkerTotals = field(default_factory=WorkerTotals)  # its metrics, over its incarnations
    cpu_seen: float = 0.0  # CPU seconds of the current process already counted in the metrics
    exit_code: int | None = None
    ready: bool = False  # this incarnation said "ready" (its stage is set up)
    identity: bytes = b""  # this incarnation's control identity (its name and secret token)
    pausable: bool = True  # from its hello: an asyncio stage cannot be paused
    # Stops the supervisor asked for, whose exit is awaited through the sentinel, never joined:
    killed: bool = False  # SIGKILLed as hung (its exit is then a failure like any other)
    terminating: bool = False  # stopped by rest_for_one (its exit is expected: no restart decision)
    kill_at: float | None = None  # SIGKILL then, if the SIGTERM of rest_for_one has not ended it

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.exitcode is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.alive else None


class Supervisor:
    def __init__(self, cfg: Config, log: JsonLogger | None = None) -> None:
        self.cfg = cfg
        self.log = log or JsonLogger("supervisor", cfg.engine.log_level)
        self.instance = cfg.engine.instance or new_instance_id()
        self.mp = multiprocessing.get_context("spawn")
        self.rings: dict[str, Ring] = {}  # shm transport
        self.channels: dict[str, Any] = {}  # another transport's rings (a port factory's channels)
        self.workers: dict[str, WorkerHandle] = {}
        self.params: dict[str, Any] = {}  # what each worker is handed: run() checks them before the set-up
        self.started = time.time()
        self.stopping = False
        self.state = "starting"  # "running" once every worker has said ready
        self.exit_code = EXIT_OK
        self.reason = ""
        self.refused = 0  # control messages refused (logged sparsely: a flood must not flood the log)
        self.pas: Pas | None = None
        self.rates: dict[str, float] = {}
        self._rate_base: dict[str, tuple[float, int]] = {}
        # the supervisor's own metrics (workers' CPU and memory from /proc, build info), and every
        # worker's merged in at each health tick (engine/telemetry.py)
        self.telemetry = Telemetry()
        self.telemetry.set("neuralpipe_build_info", 1, version=_version(), python=platform.python_version())
        self.merged: dict[str, Any] = {}
        self.telemetry_refused = 0

    # ---- set-up and tear-down -------------------------------------------------------------

    def _setup(self) -> None:
        base = self.cfg.engine.resolved_runtime_dir()
        for name in remove_stale():
            self.log.warning("stale_segment_removed", segment=name)
        for name in remove_dead_instances(base):
            self.log.warning("stale_runtime_dir_removed", instance=name)
        for name in remove_old_logs(base):
            self.log.info("old_log_removed", file=name)
        self.dir = InstanceDir(base, self.instance)
        self.zmq = zmq.Context()
        self.router = self.zmq.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        # a frame up to twice the message limit gets a clear error; a larger one is never buffered
        self.router.setsockopt(zmq.MAXMSGSIZE, 2 * control.MAX_MESSAGE_BYTES)
        # no ROUTER_HANDOVER: each spawn has its own secret identity, and a client claiming one
        # that is connected must not take its route over
        self.router.bind(self.dir.control_endpoint)
        self.ports = port_factory(self.cfg.engine.transport)
        for ring_name in self.cfg.ring_names():
            ring_cfg = self.cfg.ring(ring_name)
            if self.ports is not None:
                self.channels[ring_name] = self.ports.create(
                    ring_name, ring_cfg.capacity, ring_cfg.resolved_max_record(), self.mp, self.dir.path
                )
                continue
            self.rings[ring_name] = Ring.create(
                segment_name(self.instance, ring_name),
                ring_cfg.capacity,
                max_record=ring_cfg.resolved_max_record(),
                drop_when_full=ring_cfg.full == "drop",
                doorbell_dir=self.dir.bells,
            )
        for name, wcfg in self.cfg.workers.items():
            self.workers[name] = WorkerHandle(name=name, spec=self._spec(name, wcfg), restart=wcfg.restart)
        self.health = HealthMonitor(
            window_s=self.cfg.engine.health_window_s,
            heartbeat_timeout_s=self.cfg.engine.heartbeat_timeout_s,
            intensity=self.cfg.supervisor.intensity,
            latency_budget_ms=self.cfg.engine.latency_budget_ms,
        )
        self.metrics = EngineMetrics(self.instance)
        self.metrics_port = None
        if self.cfg.engine.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(self.cfg.engine.metrics_host, self.cfg.engine.metrics_port)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.poller.register(self._wake_r.fileno(), zmq.POLLIN)
        self._publish_info("starting")

    def _spec(self, name: str, wcfg) -> WorkerSpec:
        def ends(ring_names: list[str]) -> tuple[RingEnd, ...]:
            return tuple(
                RingEnd(
                    segment_name(self.instance, r),
                    self.cfg.ring(r).wait_strategy(),
                    self.cfg.engine.transport,
                    self.channels.get(r),
                )
                for r in ring_names
            )

        return WorkerSpec(
            name=name,
            stage=wcfg.stage,
            inputs=ends(wcfg.inputs),
            outputs=ends(wcfg.outputs),
            control_endpoint=self.dir.control_endpoint,
            runtime_dir=self.dir.path,
            state_dir=self.dir.state,
            supervisor_pid=os.getpid(),
            heartbeat_interval_s=self.cfg.engine.heartbeat_interval_s,
            heartbeat_timeout_s=self.cfg.engine.heartbeat_timeout_s,
            log_level=self.cfg.engine.log_level,
            params=self.params[name],
            cpus=tuple(wcfg.cpus),
            sched_policy=self.cfg.engine.sched_policy,
        )

    def _check_ready(self) -> None:
        """While starting: publish which workers are not ready yet; once none, the engine is
        running (what `run --detach`, the demo, the tests and the benches wait for)."""
        if self.state != "starting":
            return
        waiting = [h.name for h in self.workers.values() if not h.ready]
        if waiting:
            self._publish_info("starting", waiting)
            return
        self.state = "running"
        self._publish_info("running")
        self.log.info("engine_running", startup_s=round(time.time() - self.started, 3))

    def _publish_info(self, state: str, waiting_for: list[str] | None = None) -> None:
        self.dir.write_info(
            {
                "instance": self.instance,
                "pid": os.getpid(),
                "control": self.dir.control_endpoint,
                "metrics_port": self.metrics_port,
                "metrics_host": self.cfg.engine.metrics_host,
                "started": self.started,
                "runtime_dir": self.dir.path,
                "state": state,
                "waiting_for": waiting_for or [],
                "transport": self.cfg.engine.transport,
            }
        )

    def _abandon_setup(self) -> None:
        """Undo what a failed ``_setup`` made so far (rings, channels, sockets, the directory)."""
        for ring in self.rings.values():
            ring.destroy()
        for channel in self.channels.values():
            self.ports.close(channel)
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if getattr(self, "zmq", None) is not None:
            self.zmq.destroy(linger=0)
        if getattr(self, "dir", None) is not None:
            self.dir.remove()

    def _teardown(self) -> None:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        self._wake_r.close()
        self._wake_w.close()
        self.metrics.close()
        self.router.close(0)
        self.zmq.term()
        for ring in self.rings.values():
            ring.destroy()
        for channel in self.channels.values():
            self.ports.close(channel)
        self.dir.remove()

    # ---- main loop --------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped (signal, ``shutdown`` request) or escalation; returns the exit code.
        Raises :class:`StartupError` when the engine cannot be set up; nothing is left behind."""
        try:
            # before anything is made: a bad param is a config error; workers get the validated values
            self.params = check_stage_params(self.cfg)
        except ConfigError as exc:
            raise StartupError(str(exc)) from None
        open_files = raise_open_files()  # before anything is opened: every worker inherits it
        try:
            self._setup()
        except BaseException as exc:
            self._abandon_setup()
            if isinstance(exc, NoSharedMemory | RuntimeDirError | OSError):
                raise StartupError(getattr(exc, "strerror", None) or str(exc)) from None
            raise
        self.notices = SupervisorNotices(self.instance, self.cfg.notify, self.log)
        try:
            self.log.info(
                "engine_starting",
                instance=self.instance,
                runtime_dir=self.dir.path,
                metrics_port=self.metrics_port,
                workers=list(self.workers),
                open_files_limit=open_files[1],
                open_files_limit_was=open_files[0],
            )
            for handle in self.workers.values():
                self._start(handle)
            self._check_ready()
            self._loop()
        except Escalation as exc:
            self.exit_code, self.reason = EXIT_ESCALATED, str(exc)
            self.log.error("escalation", reason=self.reason)
            self.notices.escalated(self.reason)
        finally:
            self._stop_all()
            self._teardown()
            self.notices.close()  # after the drain: what is queued had that long to go out already
            self.log.info("engine_stopped", instance=self.instance, exit_code=self.exit_code, reason=self.reason)
        return self.exit_code

    def _loop(self) -> None:
        interval = self.cfg.engine.health_interval_s
        next_health = checked = time.monotonic()
        while not self.stopping:
            now = time.monotonic()
            if now >= next_health:
                self._health_tick(now)
                next_health = now + interval
            timeout = max(0.0, min(next_health, self._next_timer(now)) - time.monotonic())
            events = dict(self.poller.poll(int(timeout * 1000) + 1))
            if self._wake_r.fileno() in events:
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)
            if self.router in events:
                self._handle_messages()
            self._reap()
            now = time.monotonic()
            self._excuse_stall(now, now - checked - timeout - TURN_SLACK_S)
            self._kill_overdue(now)
            self._check_heartbeats(now)
            self._restart_due(now)
            checked = now

    def _excuse_stall(self, now: float, stalled_s: float) -> None:
        """The supervisor was not running for ``stalled_s`` (when > 0): its workers went on, their
        heartbeats wait in its socket, unread. Judged by its clock at once, every worker was
        hung: that time is added to each one's last heartbeat instead."""
        if stalled_s <= 0:
            return
        self.log.warning("supervisor_stalled", stalled_s=round(stalled_s, 3))
        for h in self.workers.values():
            h.last_heartbeat = min(now, h.last_heartbeat + stalled_s)

    def _next_timer(self, now: float) -> float:
        """The next moment a heartbeat may be overdue or a back-off ends."""
        timeout = self.cfg.engine.heartbeat_timeout_s
        due = [now + timeout]
        for h in self.workers.values():
            if h.kill_at is not None:
                due.append(h.kill_at)
            if h.restart_due is not None and h.process is None:  # else its exit wakes us first
                due.append(h.restart_due)
            elif h.alive and not (h.killed or h.terminating):
                due.append(h.last_heartbeat + timeout + 0.001)
        return min(due)

    def _on_signal(self, signum, _frame) -> None:
        if not self.stopping:
            self.log.info("signal_received", signal=signal.Signals(signum).name)
        self.stopping = True

    # ---- workers ----------------------------------------------------------------------------

    def _start(self, h: WorkerHandle) -> None:
        h.spec = replace(h.spec, incarnation=h.incarnation, token=secrets.token_hex(16))
        h.identity = control.worker_identity(h.name, h.spec.token)
        h.process = self.mp.Process(target=worker_main, args=(h.spec,), name=f"neuralpipe-{h.name}", daemon=False)
        h.process.start()
        h.started = h.last_heartbeat = time.monotonic()
        h.state, h.exit_code, h.restart_due, h.ready = "starting", None, None, False
        h.killed, h.terminating, h.kill_at = False, False, None
        h.cpu_seen = 0.0
        self.poller.register(h.process.sentinel, zmq.POLLIN)
        self.log.info("worker_started", worker=h.name, worker_pid=h.process.pid, incarnation=h.incarnation)

    def _reap(self) -> None:
        """Handle every worker process that exited (its sentinel became readable); whatever state
        its last heartbeat said (a worker that stops on its own says "stopped" first)."""
        for h in self.workers.values():
            if h.process is not None and h.process.exitcode is not None:
                self._on_exit(h)

    def _forget_process(self, h: WorkerHandle) -> None:
        """Drop an exited worker's process (exitcode set: the join below returns at once)."""
        self.poller.unregister(h.process.sentinel)
        h.process.join()
        h.exit_code = h.process.exitcode
        h.process.close()
        h.process = None
        h.telemetry.end_incarnation()  # its counters stay counted; its gauges go

    def _on_exit(self, h: WorkerHandle) -> None:
        self._forget_process(h)
        self._unblock_outputs(h)
        if h.terminating:  # stopped by rest_for_one: its restart (or none) is decided already
            h.terminating, h.kill_at = False, None
            self.log.info("worker_terminated", worker=h.name, exit_code=h.exit_code)
            if h.restart_due is None:
                h.state = "stopped"
            return
        h.state = "stopped"
        self.log.warning("worker_exited", worker=h.name, exit_code=h.exit_code)
        if self.stopping:
            return
        if self.state == "starting" and not h.ready:
            # OTP's rule: a child that fails to start fails the supervisor's own start, so that
            # `run --detach` reports it instead of a restart loop hiding it
            raise Escalation(f"worker {h.name!r} failed during start-up (exit code {h.exit_code})")
        if not self._should_restart(h):
            if h.exit_code != 0:
                h.state = "failed"  # exited abnormally and stays down (temporary)
            return
        victims = [h]
        if self.cfg.supervisor.strategy == "rest_for_one":
            # OTP: every later worker is stopped, and restarted unless it is temporary
            order = list(self.workers)
            for other in (self.workers[n] for n in order[order.index(h.name) + 1 :]):
                self._terminate(other, "rest_for_one")
                if other.restart != "temporary":
                    victims.append(other)
        for victim in victims:
            self._schedule_restart(victim)

    def _should_restart(self, h: WorkerHandle) -> bool:
        if h.restart == "temporary":
            return False
        return h.restart == "permanent" or h.exit_code != 0

    def _schedule_restart(self, h: WorkerHandle) -> None:
        now = time.monotonic()
        period, intensity = self.cfg.supervisor.period_s, self.cfg.supervisor.intensity
        while h.restart_times and h.restart_times[0] < now - period:
            h.restart_times.popleft()
        if len(h.restart_times) >= intensity:
            raise Escalation(
                f"worker {h.name!r} needed more than {intensity} restarts in {period:g} s"
                f" (last exit code {h.exit_code})"
            )
        h.restart_times.append(now)
        backoff = self.cfg.supervisor.backoff_initial_s * 2.0 ** min(len(h.restart_times) - 1, 60)
        h.restart_due = now + min(backoff, self.cfg.supervisor.backoff_max_s)
        h.state = "backoff"

    def _restart_due(self, now: float) -> None:
        for h in self.workers.values():
            # h.process is None: a worker stopped by rest_for_one has exited (it holds its rings)
            if h.restart_due is not None and h.restart_due <= now and h.process is None and not self.stopping:
                h.incarnation += 1
                h.restarts += 1
                self._start(h)
                self.log.info("worker_restarted", worker=h.name, restarts=h.restarts)
                self.notices.worker_restarted(h.name, h.restarts, now)

    def _unblock_outputs(self, h: WorkerHandle) -> None:
        """Clear any record the dead worker left half-written in its output rings (shm only: the
        other transports have no claim to clear)."""
        for ring_name in self.cfg.workers[h.name].outputs:
            ring = self.rings.get(ring_name)
            if ring is not None and ring.unblock():
                self.log.warning("ring_unblocked", ring=ring.name, worker=h.name)

    def _check_heartbeats(self, now: float) -> None:
        """Kill a worker whose heartbeats stopped (hung, SIGSTOPped); its exit restarts it."""
        timeout = self.cfg.engine.heartbeat_timeout_s
        for h in self.workers.values():
            if not h.alive or h.killed or h.terminating:
                continue
            limit = timeout + (STARTUP_GRACE_S if h.state == "starting" else 0.0)
            if now - h.last_heartbeat > limit:
                self.log.error(
                    "worker_hung", worker=h.name, worker_pid=h.pid, heartbeat_age_s=round(now - h.last_heartbeat, 3)
                )
                h.process.kill()  # not joined: its sentinel wakes the loop, and _reap handles the exit
                h.killed = True

    def _terminate(self, h: WorkerHandle, why: str) -> None:
        """Stop one worker (rest_for_one) without waiting: SIGTERM, which a worker obeys at once
        even before it has connected its control socket; SIGKILL ``TERMINATE_GRACE_S`` later if
        it is still there (``_kill_overdue``). Its exit comes through its sentinel."""
        h.restart_due = None
        if not h.alive or h.terminating:
            return
        h.process.terminate()
        h.terminating, h.kill_at = True, time.monotonic() + TERMINATE_GRACE_S
        self.log.info("worker_terminating", worker=h.name, reason=why)

    def _kill_overdue(self, now: float) -> None:
        for h in self.workers.values():
            if h.kill_at is not None and now >= h.kill_at:
                h.kill_at = None
                if h.alive:
                    self.log.warning("worker_killed", worker=h.name, reason="no exit after SIGTERM")
                    h.process.kill()

    def _stop_all(self) -> None:
        """Graceful stop: drain workers in topology order, so each finishes what upstream left."""
        self.stopping = True
        deadline_s = self.cfg.engine.stop_timeout_s
        for h in self.workers.values():
            h.restart_due = None
            if not h.alive:
                if h.process is not None:
                    self._forget_process(h)
                continue
            self._send(h.identity, "drain")
            h.state = "draining"
            h.process.join(deadline_s)
            if h.process.exitcode is None:
                self.log.warning("worker_drain_timeout", worker=h.name)
                h.process.terminate()
                h.process.join(TERMINATE_GRACE_S)
            if h.process.exitcode is None:
                h.process.kill()
                h.process.join()
            self._forget_process(h)
            h.state = "stopped"
            self._unblock_outputs(h)

    # ---- control plane ----------------------------------------------------------------------

    def _send(self, identity: bytes, msg_type: str, **fields: Any) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.router.send_multipart([identity, control.encode(msg_type, **fields)], zmq.NOBLOCK)

    def _refuse(self, identity: bytes, why: str) -> None:
        """Answer a bad control message with an error; log the 1st, 2nd, 4th, 8th ... refusal."""
        self.refused += 1
        if self.refused & (self.refused - 1) == 0:
            self.log.warning(
                "control_message_refused", sender=control.excerpt(identity), error=why, refused=self.refused
            )
        self._send(identity, "error", message=why)

    def _handle_messages(self) -> None:
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                self.log.warning("bad_control_frames", frames=len(frames))
                continue
            identity, frame = frames
            try:
                msg = control.decode(frame, _RECEIVED)
            except control.ProtocolError as exc:
                self._refuse(identity, str(exc))
                continue
            if msg["type"] in control.WORKER_TO_SUPERVISOR:
                handle = self.workers.get(msg["worker"])
                if handle is None or handle.identity != identity:
                    self._refuse(identity, f"{msg['type']} refused: not a worker of this engine")
                    continue
                self._on_worker_message(handle, msg)
            elif control.expired(msg, time.monotonic_ns()):
                self._expired(identity, msg)
            elif msg["type"] == "status":
                self._send(identity, "status", **self.status())
            elif msg["type"] == "shutdown":
                self._send(identity, "ack")
                self.log.info("shutdown_requested", client=control.excerpt(identity))
                self.stopping = True
            elif msg["type"] in ("pause", "resume"):
                self._forward(identity, msg)

    def _expired(self, client: bytes, msg: dict[str, Any]) -> None:
        """A client's request read after its deadline (this supervisor was stalled): its client
        has reported a failure and gone, so it is not carried out."""
        late_ms = (time.monotonic_ns() - msg["deadline_ns"]) / 1e6
        self.log.warning(
            "control_request_expired", request=msg["type"], client=control.excerpt(client), late_ms=round(late_ms, 1)
        )
        self._send(
            client, "error", message=f"{msg['type']} read {late_ms:.0f} ms after its client's deadline: not done"
        )

    def _forward(self, client: bytes, msg: dict[str, Any]) -> None:
        """Pass a client's pause/resume to the named worker."""
        target = self.workers.get(msg["worker"])
        if target is None or not target.alive:
            self._send(client, "error", message=f"no running worker named {control.excerpt(msg['worker'])}")
            return
        if not target.pausable:
            self._send(client, "error", message=f"worker {target.name!r} runs an asyncio stage, which cannot be paused")
            return
        self._send(target.identity, msg["type"])
        self._send(client, "ack")
        self.log.info("worker_" + msg["type"], worker=target.name, client=control.excerpt(client))

    def _on_worker_message(self, h: WorkerHandle, msg: dict[str, Any]) -> None:
        h.last_heartbeat = time.monotonic()
        if h.terminating:  # its last words: it is on its way out
            return
        kind = msg["type"]
        if kind == "heartbeat":
            if h.state not in ("draining", "stopped", "backoff"):
                h.state = msg["state"]
            h.processed = msg["processed"]
            h.stats = msg["stats"]
            self._take_telemetry(h, msg["telemetry"])
        elif kind == "hello":
            h.pausable = msg["pausable"]
        elif kind == "ready":
            h.state, h.ready = "running", True
            self._check_ready()
        elif kind == "error":
            self.log.error("worker_error", worker=h.name, message=msg["message"])

    def _take_telemetry(self, h: WorkerHandle, snapshot: dict[str, Any]) -> None:
        """A heartbeat's metrics, once checked; a bad one is dropped (logged 1st, 2nd, 4th ... time)."""
        problem = check_snapshot(snapshot)
        if problem is None:
            h.telemetry.update(snapshot)
            return
        self.telemetry_refused += 1
        if self.telemetry_refused & (self.telemetry_refused - 1) == 0:
            self.log.warning("telemetry_refused", worker=h.name, error=problem, refused=self.telemetry_refused)

    # ---- health and status ------------------------------------------------------------------

    def _samples(self, now: float) -> tuple[list[RingSample], list[WorkerSample], EgressSample]:
        readers = {ring: name for name, wcfg in self.cfg.workers.items() for ring in wcfg.inputs}
        rings = [_ring_sample(name, ring, readers.get(name, "")) for name, ring in self.rings.items()]
        workers = []
        for name, h in self.workers.items():
            workers.append(
                WorkerSample(
                    name=name,
                    group=h.spec.stage,  # replicas of one stage share a group
                    state=h.state,
                    alive=h.alive,
                    restarts=h.restarts,
                    heartbeat_age_s=now - h.last_heartbeat if h.alive else 0.0,
                    processed=h.processed,
                )
            )
        sinks = [h for h in self.workers.values() if not h.spec.outputs]
        egress = EgressSample(**{k: sum(_counter(h.stats, k) for h in sinks) for k in _EGRESS_KEYS})
        return rings, workers, egress

    def _health_tick(self, now: float) -> None:
        log_name = f"{self.instance}.log"  # a detached engine's (its stderr): kept to its size
        kept = keep_under(STDERR, self.dir.base_fd, log_name, self.cfg.engine.log_max_bytes)
        if kept is not None:
            self.log.info("log_cut", file=log_name, kept=kept or None, max_bytes=self.cfg.engine.log_max_bytes)
        rings, workers, egress = self._samples(now)
        leaked = sum(1 for s in list_segments() if not s.live)
        self.pas = self.health.observe(now, rings, workers, egress, leaked_segments=leaked)
        self.notices.pas_scored(self.pas)
        for w in workers:
            last = self._rate_base.get(w.name)
            if last is not None and now > last[0]:
                self.rates[w.name] = max(0.0, (w.processed - last[1]) / (now - last[0]))
            self._rate_base[w.name] = (now, w.processed)
        self._process_metrics()
        totals = [h.telemetry.totals() for h in self.workers.values()]
        self.merged = merge([*totals, values_of(self.telemetry.snapshot())])
        self.metrics.update(rings, workers, self.pas, self._worker_info(), self.merged)

    def _process_metrics(self) -> None:
        """Each live worker's CPU time and resident memory, from /proc; the CPU counter adds what
        the process used since the last tick (a dead incarnation's stays counted)."""
        self.telemetry.clear("neuralpipe_worker_resident_memory_bytes")
        for h in self.workers.values():
            pid = h.pid
            cpu = cpu_seconds(pid) if pid is not None else None
            if cpu is None:
                continue
            self.telemetry.count("neuralpipe_worker_cpu_seconds_total", max(0.0, cpu - h.cpu_seen), worker=h.name)
            h.cpu_seen = max(cpu, h.cpu_seen)
            rss = rss_bytes(pid)
            if rss is not None:
                self.telemetry.set("neuralpipe_worker_resident_memory_bytes", rss, worker=h.name)

    def _worker_info(self) -> dict[str, dict]:
        """neuralpipe_worker_info: each worker's stage (its alias, e.g. "compute") and the short
        texts its stats report (e.g. compute's backend and adapter), at most 8."""
        info = {}
        for h in self.workers.values():
            facts = [(k, v) for k, v in h.stats.items() if isinstance(v, str) and len(v) <= 64][:8]
            info[h.name] = {**dict(facts), "stage": _STAGE_NAMES.get(h.spec.stage, h.spec.stage)}
        return info

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "instance": self.instance,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 3),
            "state": self.state,
            "runtime_dir": self.dir.path,
            "metrics_port": self.metrics_port,
            "transport": self.cfg.engine.transport,
            "workers": [
                {
                    "name": h.name,
                    "pid": h.pid,
                    "state": h.state,
                    "ready": h.ready,
                    "incarnation": h.incarnation,
                    "uptime_s": round(now - h.started, 3) if h.alive else 0.0,
                    "restarts": h.restarts,
                    "heartbeat_age_s": round(now - h.last_heartbeat, 3) if h.alive else None,
                    "processed": h.processed,
                    "rate_per_s": round(self.rates.get(h.name, 0.0), 1),
                    "stats": h.stats,
                }
                for h in self.workers.values()
            ],
            "rings": [_ring_status(name, ring) for name, ring in self.rings.items()]
            + [self.ports.describe(channel) for channel in self.channels.values()],
            "pas": None if self.pas is None else _pas_dict(self.pas),
            "upstreams": upstream_health(self.merged),
        }


def _version() -> str:
    try:
        return metadata.version("neuralpipe")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _counter(stats: dict[str, Any], key: str) -> int:
    """A sink's counter from its heartbeat stats (free-form JSON: anything else counts 0)."""
    value = stats.get(key, 0)
    return value if type(value) is int else 0


def _ring_sample(name: str, ring: Ring, consumer: str) -> RingSample:
    """The ring's header, validated as any reader would see it (a corrupt one scores integrity)."""
    try:
        return RingSample(name, read_header(ring.name), consumer=consumer)
    except (RingCorrupt, FileNotFoundError) as exc:
        return RingSample(name, None, str(exc), consumer=consumer)


def _ring_status(name: str, ring: Ring) -> dict[str, Any]:
    hdr = ring.header()
    return {
        "name": name,
        "segment": ring.name,
        "capacity": hdr.capacity,
        "used": hdr.used,
        "occupancy": round(hdr.occupancy, 4),
        "records_written": hdr.records_written,
        "records_read": hdr.records_read,
        "backpressure_events": hdr.backpressure_events,
        "drops": hdr.drops,
        "unblocks": hdr.unblocks,
        "producer_pid": hdr.producer_pid,
        "consumer_pid": hdr.consumer_pid,
    }


def _pas_dict(pas: Pas) -> dict[str, Any]:
    return {
        "score": round(pas.score, 4),
        "status": pas.status,
        "integrity": round(pas.integrity, 4),
        "stability": round(pas.stability, 4),
        "symmetry": round(pas.symmetry, 4),
        "consistency": round(pas.consistency, 4),
    }
