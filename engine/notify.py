"""Webhook notifications from the supervisor: a JSON POST to every configured webhook when the PAS status
changes, when the supervisor escalates (gives up) and when a worker is in a restart storm.

The supervisor's loop must never wait on a webhook, so :meth:`Notifier.notify` only appends to a
bounded queue per webhook (the oldest notification is dropped when it is full: the newest state is
what matters) and one daemon thread per webhook delivers, with retries and exponential back-off. A
dead or slow receiver therefore costs its own thread's time and nothing else; the supervisor spawns
its workers with ``spawn`` (fork + exec), so the threads are never copied into a child.

Webhook URLs are secrets in practice (Slack-style URLs carry a token in their path): logs name only
their origin (scheme, host, port). The payload is docs/observability.md, "Notifications".
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from typing import TYPE_CHECKING, Any

from engine.logs import JsonLogger
from engine.redact import url_origin
from engine.upstream_url import split_http_url

if TYPE_CHECKING:
    from engine.config import NotifyConfig
    from engine.health import Pas

PAYLOAD_VERSION = 1
MAX_WEBHOOKS = 16
MAX_URL_LENGTH = 2048
MAX_BACKOFF_S = 60.0
_RETRYABLE_HTTP = frozenset({408, 425, 429})  # and every 5xx: the receiver may get better


def check_webhook_url(value: str) -> str:
    """``value`` if it is a usable webhook URL, else ValueError saying what is wrong."""
    if len(value) > MAX_URL_LENGTH:
        raise ValueError(f"must be at most {MAX_URL_LENGTH} characters (got {len(value)})")
    split_http_url(value, "put a token in the path or query")
    return value


class RestartStorms:
    """A worker restarting ``threshold`` times within ``window_s`` is in a storm: reported once, when it
    begins; the worker is re-armed once its restarts within the window fall below the threshold."""

    def __init__(self, threshold: int, window_s: float) -> None:
        self.threshold = threshold
        self.window_s = window_s
        self._times: dict[str, deque[float]] = {}
        self._storming: set[str] = set()

    def restarted(self, worker: str, now: float) -> int | None:
        """Record one restart at ``now`` (monotonic); the restarts in the window when a storm begins."""
        times = self._times.setdefault(worker, deque())
        times.append(now)
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if len(times) < self.threshold:
            self._storming.discard(worker)
            return None
        if worker in self._storming:
            return None
        self._storming.add(worker)
        return len(times)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not an instruction: a webhook must not move a POST elsewhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


class _Sender:
    """One webhook: a bounded queue and the daemon thread that delivers it."""

    def __init__(self, url: str, notifier: Notifier) -> None:
        self.url = url
        self.origin = url_origin(url)
        self.n = notifier
        self.queue: deque[bytes] = deque()
        self.busy = False  # a notification is being delivered (taken off the queue)
        self.thread = threading.Thread(target=self._run, name=f"notify {self.origin}", daemon=True)

    def put(self, body: bytes) -> bool:
        """Queue ``body``; False when the queue was full and its oldest entry was dropped."""
        with self.n.cond:
            dropped = len(self.queue) >= self.n.queue_size
            if dropped:
                self.queue.popleft()
            self.queue.append(body)
            self.n.cond.notify_all()
        return not dropped

    def _run(self) -> None:
        while True:
            with self.n.cond:
                while not self.queue and not self.n.stopped.is_set():
                    self.n.cond.wait()
                if self.n.stopped.is_set():
                    return
                body = self.queue.popleft()
                self.busy = True
            try:
                self._deliver(body)
            finally:
                with self.n.cond:
                    self.busy = False
                    self.n.cond.notify_all()

    def _deliver(self, body: bytes) -> None:
        n = self.n
        attempts = 0
        while True:
            retry, error = self._post(body)
            attempts += 1
            if not error:
                n.counted("sent")
                return
            if not retry or attempts > n.retries:
                break
            if n.stopped.wait(min(n.backoff_s * 2 ** (attempts - 1), MAX_BACKOFF_S)):
                break  # closing: no more waiting
        n.counted("failed")
        n.log.warning("notify_failed", webhook=self.origin, error=error, attempts=attempts)

    def _post(self, body: bytes) -> tuple[bool, str]:
        """One POST: (retryable, error); error "" on a 2xx answer."""
        request = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "neuralpipe-notify"},
        )
        try:
            with _OPENER.open(request, timeout=self.n.timeout_s) as response:
                response.read(4096)
                return False, ""
        except urllib.error.HTTPError as exc:
            with contextlib.suppress(OSError):
                exc.close()
            return exc.code >= 500 or exc.code in _RETRYABLE_HTTP, f"HTTP {exc.code}"
        except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError is an OSError
            # no answer, or one that is not HTTP (a hostile or broken receiver): worth another try
            reason = getattr(exc, "reason", exc)
            return True, f"{type(exc).__name__}: {str(reason)[:200]}"


class Notifier:
    """Posts notifications to webhooks from background threads; :meth:`notify` never blocks."""

    def __init__(
        self,
        instance: str,
        webhooks: list[str] | tuple[str, ...],
        *,
        timeout_s: float = 2.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        queue_size: int = 100,
        log: JsonLogger | None = None,
    ) -> None:
        self.instance = instance
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.queue_size = queue_size
        self.log = log or JsonLogger("notify")
        self.cond = threading.Condition()
        self.stopped = threading.Event()
        self.counts = {"queued": 0, "dropped": 0, "sent": 0, "failed": 0}
        self._senders = [_Sender(url, self) for url in dict.fromkeys(webhooks)]
        for sender in self._senders:
            sender.thread.start()

    @property
    def flush_budget_s(self) -> float:
        """How long :meth:`close` waits for the queue at most: a failed try, a back-off, one more try."""
        return min(10.0, 2 * self.timeout_s + self.backoff_s)

    def counted(self, what: str) -> int:
        with self.cond:
            self.counts[what] += 1
            return self.counts[what]

    def notify(self, event: str, summary: str, **fields: Any) -> None:
        """Queue one notification for every webhook (a no-op without webhooks)."""
        if not self._senders or self.stopped.is_set():
            return
        payload = {
            "version": PAYLOAD_VERSION,
            "source": "neuralpipe",
            "instance": self.instance,
            "event": event,
            "time": round(time.time(), 3),
            "summary": summary,
            "text": f"[neuralpipe {self.instance}] {summary}",  # what Slack-style receivers display
            **fields,
        }
        body = json.dumps(payload, default=str).encode()
        for sender in self._senders:
            if sender.put(body):
                self.counted("queued")
                continue
            dropped = self.counted("dropped")
            if dropped & (dropped - 1) == 0:  # logged the 1st, 2nd, 4th ... time: a flood must not flood the log
                self.log.warning("notify_dropped", webhook=sender.origin, dropped=dropped)

    def close(self, flush_s: float | None = None) -> None:
        """Give the queued notifications up to ``flush_s`` (default :attr:`flush_budget_s`) to go out,
        then stop the threads (the daemon thread of a receiver that still hangs dies with the process)."""
        deadline = time.monotonic() + (self.flush_budget_s if flush_s is None else flush_s)
        with self.cond:
            while any(s.queue or s.busy for s in self._senders):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            self.stopped.set()
            self.cond.notify_all()
        for sender in self._senders:
            sender.thread.join(max(0.0, deadline - time.monotonic()) + 0.1)


SUBSCORES = ("integrity", "stability", "symmetry", "consistency")


class SupervisorNotices:
    """What the supervisor tells the webhooks; each method is one hook line in its loop."""

    def __init__(self, instance: str, cfg: NotifyConfig, log: JsonLogger) -> None:
        self.notifier = Notifier(
            instance,
            cfg.webhooks,
            timeout_s=cfg.timeout_s,
            retries=cfg.retries,
            backoff_s=cfg.backoff_s,
            queue_size=cfg.queue_size,
            log=log,
        )
        self.storms = RestartStorms(cfg.storm_restarts, cfg.storm_window_s)
        self.pas_status = "healthy"  # an engine that starts unhealthy is a change worth a notice

    def pas_scored(self, pas: Pas) -> None:
        """A notice when the PAS status (healthy / warning / critical) differs from the last one."""
        if pas.status == self.pas_status:
            return
        previous, self.pas_status = self.pas_status, pas.status
        scores = {name: round(getattr(pas, name), 4) for name in SUBSCORES}
        lowest = min(scores, key=scores.__getitem__)
        self.notifier.notify(
            "pas_status",
            f"PAS {pas.status} ({pas.score:.3f}, was {previous}); lowest sub-score {lowest} {scores[lowest]:.3f}",
            status=pas.status,
            previous=previous,
            pas={"score": round(pas.score, 4), **scores},
        )

    def worker_restarted(self, worker: str, restarts: int, now: float) -> None:
        """A notice when this restart begins a restart storm of ``worker``."""
        in_window = self.storms.restarted(worker, now)
        if in_window is None:
            return
        window = self.storms.window_s
        self.notifier.notify(
            "restart_storm",
            f"worker {worker} restarted {in_window} times in {window:g} s ({restarts} since start)",
            worker=worker,
            restarts_in_window=in_window,
            window_s=window,
            restarts_total=restarts,
        )

    def escalated(self, reason: str) -> None:
        self.notifier.notify("escalation", f"supervisor gave up, the engine stops: {reason}", reason=reason)

    def close(self) -> None:
        self.notifier.close()
