"""Human-readable rendering of a supervisor's status reply."""

from __future__ import annotations

from typing import Any


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def gateway_view(st: dict[str, Any]) -> dict[str, Any] | None:
    """``gateway`` of ``neuralpipe status``: the /v1 base URL OpenAI clients use, from the gateway
    worker's stats (None without a gateway, or before it listens)."""
    for w in st.get("workers", ()):
        url = (w.get("stats") or {}).get("url")
        if isinstance(url, str) and url.startswith("http"):
            return {"url": url, "worker": w["name"]}
    return None


def format_status(st: dict[str, Any]) -> str:
    pas = st.get("pas") or {}
    waiting = [w["name"] for w in st["workers"] if not w["ready"]]
    state = st["state"]
    if state == "starting" and waiting:
        state += f" (waiting for {', '.join(waiting)} to be ready)"
    head = (
        f"engine {st['instance']}  {state}  pid {st['pid']}  up {st['uptime_s']:.1f} s"
        f"  metrics port {st.get('metrics_port')}\n"
        f"PAS {pas.get('score', float('nan')):.3f} ({pas.get('status', 'n/a')})"
        f"  integrity {pas.get('integrity', 0):.3f}"
        f"  stability {pas.get('stability', 0):.3f}  symmetry {pas.get('symmetry', 0):.3f}"
        f"  consistency {pas.get('consistency', 0):.3f}"
    )
    workers = [["worker", "pid", "state", "ready", "uptime_s", "restarts", "heartbeat_s", "processed", "rate/s"]]
    for w in st["workers"]:
        hb = w["heartbeat_age_s"]
        workers.append(
            [
                w["name"],
                str(w["pid"] or "-"),
                w["state"],
                "yes" if w["ready"] else "no",
                f"{w['uptime_s']:.1f}",
                str(w["restarts"]),
                "-" if hb is None else f"{hb:.2f}",
                str(w["processed"]),
                f"{w['rate_per_s']:.0f}",
            ]
        )
    rings = [["ring", "occupancy", "written", "read", "backpressure", "drops", "unblocks"]]
    for r in st["rings"]:
        if "occupancy" not in r:  # a queue or zmq ring (bench transports): no header to read
            rings.append([r["name"], f"n/a ({r.get('transport')})", "n/a", "n/a", "n/a", "n/a", "n/a"])
            continue
        rings.append(
            [
                r["name"],
                f"{r['occupancy']:.1%}",
                str(r["records_written"]),
                str(r["records_read"]),
                str(r["backpressure_events"]),
                str(r["drops"]),
                str(r["unblocks"]),
            ]
        )
    text = f"{head}\n\n{_table(workers)}\n\n{_table(rings)}"
    upstreams = st.get("upstreams") or []
    return f"{text}\n\n{_table(_upstream_rows(upstreams))}" if upstreams else text


def _upstream_rows(upstreams: list[dict[str, Any]]) -> list[list[str]]:
    """Upstream health as ingest's pool sees it: up or down (``?`` while no ingest reports it),
    requests in flight, requests, failed requests (by kind), time to first token."""
    rows = [["upstream", "health", "in_flight", "requests", "errors", "ttft_p50_ms", "ttft_p99_ms"]]
    for u in upstreams:
        kinds = ", ".join(f"{kind} {n}" for kind, n in u["errors_by_kind"].items())
        rows.append(
            [
                u["name"],
                "?" if u["up"] is None else "up" if u["up"] else "down",
                str(u["in_flight"]),
                str(u["requests"]),
                f"{u['errors']} ({kinds})" if kinds else str(u["errors"]),
                _ms(u["ttft_p50_s"]),
                _ms(u["ttft_p99_s"]),
            ]
        )
    return rows


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"
