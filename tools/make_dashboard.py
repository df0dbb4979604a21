"""Write the Grafana dashboard of neuralpipe, engine/monitoring/dashboard.json, from code (grafana-foundation-sdk).

    python3 tools/make_dashboard.py            # (re)write engine/monitoring/dashboard.json
    python3 tools/make_dashboard.py --stdout   # print it instead (tests/test_dashboard.py compares)

Every panel is one row of ROWS below: its title, kind, unit and PromQL queries. The queries read the
engine's own metrics (not the recording rules), so the dashboard works on a Prometheus without the
rules loaded. ``$engine`` selects engines (the `engine` label, the instance id), ``$__rate_interval``
is Grafana's rate window. docs/observability.md, "Dashboard", describes each row.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, Threshold, ThresholdsMode, VariableRefresh

OUTPUT = Path(__file__).resolve().parent.parent / "engine" / "monitoring" / "dashboard.json"
UID = "neuralpipe-engine"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
E = 'engine=~"$engine"'  # every selector: the engines picked in the $engine variable
RATE = "[$__rate_interval]"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"  # or "stat": the latest value, big
    width: int = 8
    description: str = ""
    pas_thresholds: bool = False  # coloured by the PAS bands of docs/health.md
    max: float | None = None


def q(expr: str, legend: str) -> Query:
    return Query(expr, legend)


def quantiles(metric: str, by: str, what: str) -> tuple[Query, ...]:
    """p50 and p99 of a histogram, per ``by`` ("" for one over everything)."""
    group = f"{by}, le" if by else "le"
    return tuple(
        q(
            f"histogram_quantile({p}, sum by ({group}) (rate({metric}_bucket{{{E}}}{RATE})))",
            f"{{{{{by}}}}} p{int(p * 100)}" if by else f"p{int(p * 100)}",
        )
        for p in (0.5, 0.99)
    )


def rate_by(metric: str, by: str, legend: str) -> Query:
    return q(f"sum by ({by}) (rate({metric}{{{E}}}{RATE}))", legend)


ROWS: tuple[tuple[str, tuple[PanelSpec, ...]], ...] = (
    (
        "Overview",
        (
            PanelSpec(
                "PAS",
                (q(f"neuralpipe_pas_score{{{E}}}", "{{engine}}"),),
                kind="stat",
                unit="none",
                width=4,
                pas_thresholds=True,
                description="Pipeline alignment score: healthy >= 0.90, warning >= 0.85, critical below.",
            ),
            PanelSpec(
                "PAS and its four sub-scores",
                (
                    q(f"neuralpipe_pas_score{{{E}}}", "PAS {{engine}}"),
                    q(f"neuralpipe_pas_subscore{{{E}}}", "{{subscore}} {{engine}}"),
                ),
                unit="none",
                width=8,
                max=1,
            ),
            PanelSpec(
                "Tokens/s by stage",
                (rate_by("neuralpipe_tokens_total", "stage", "{{stage}}"),),
                unit="short",
                width=6,
                description="Tokens each stage passed on; broadcast is what consumers receive.",
            ),
            PanelSpec(
                "Streams",
                (
                    q(f"sum(neuralpipe_streams_active{{{E}}})", "open"),
                    rate_by("neuralpipe_streams_total", "outcome", "ended/s {{outcome}}"),
                ),
                width=6,
            ),
            PanelSpec(
                "Latency by stage, p50 and p99",
                quantiles("neuralpipe_stage_latency_seconds", "stage", "latency"),
                unit="s",
                width=24,
                description="Upstream event received to the stage committing it; broadcast is end to end"
                " (budget: p99 5 ms).",
            ),
        ),
    ),
    (
        "Workers",
        (
            PanelSpec("Workers up", (q(f"neuralpipe_worker_up{{{E}}}", "{{worker}}"),), unit="none", width=6, max=1),
            PanelSpec(
                "Restarts in 5 min",
                (q(f"sum by (worker) (increase(neuralpipe_worker_restarts_total{{{E}}}[5m]))", "{{worker}}"),),
                width=6,
            ),
            PanelSpec(
                "CPU (1 = one core)",
                (rate_by("neuralpipe_worker_cpu_seconds_total", "worker", "{{worker}}"),),
                unit="percentunit",
                width=6,
            ),
            PanelSpec(
                "Resident memory",
                (q(f"sum by (worker) (neuralpipe_worker_resident_memory_bytes{{{E}}})", "{{worker}}"),),
                unit="bytes",
                width=6,
            ),
        ),
    ),
    (
        "Rings",
        (
            PanelSpec(
                "Occupancy",
                (q(f"neuralpipe_ring_occupancy_ratio{{{E}}}", "{{ring}}"),),
                unit="percentunit",
                max=1,
            ),
            PanelSpec(
                "Back-pressure and drops /s",
                (
                    rate_by("neuralpipe_ring_backpressure_events_total", "ring", "full {{ring}}"),
                    rate_by("neuralpipe_ring_drops_total", "ring", "dropped {{ring}}"),
                ),
            ),
            PanelSpec("Written bytes/s", (rate_by("neuralpipe_ring_written_bytes_total", "ring", "{{ring}}"),), "Bps"),
        ),
    ),
    (
        "Upstreams",
        (
            PanelSpec(
                "Upstreams up", (q(f"neuralpipe_upstream_up{{{E}}}", "{{upstream}}"),), unit="none", width=4, max=1
            ),
            PanelSpec(
                "Requests and errors /s",
                (
                    rate_by("neuralpipe_upstream_requests_total", "upstream", "requests {{upstream}}"),
                    rate_by("neuralpipe_upstream_errors_total", "upstream, kind", "{{kind}} {{upstream}}"),
                ),
                width=7,
            ),
            PanelSpec(
                "Time to first token",
                quantiles("neuralpipe_time_to_first_token_seconds", "upstream", "ttft"),
                unit="s",
                width=7,
            ),
            PanelSpec(
                "In flight",
                (q(f"sum by (upstream) (neuralpipe_upstream_in_flight{{{E}}})", "{{upstream}}"),),
                width=6,
            ),
        ),
    ),
    (
        "Cache",
        (
            PanelSpec(
                "Hit ratio",
                (
                    q(
                        f"sum(rate(neuralpipe_cache_hits_total{{{E}}}{RATE})) / (sum(rate(neuralpipe_cache_hits_total"
                        f"{{{E}}}{RATE})) + sum(rate(neuralpipe_cache_misses_total{{{E}}}{RATE})))",
                        "hit ratio",
                    ),
                ),
                unit="percentunit",
                max=1,
            ),
            PanelSpec(
                "Size",
                (
                    q(f"sum(neuralpipe_cache_bytes{{{E}}})", "bytes"),
                    q(f"sum(neuralpipe_cache_entries{{{E}}})", "entries"),
                ),
                unit="bytes",
            ),
            PanelSpec("Evictions/s", (q(f"sum(rate(neuralpipe_cache_evictions_total{{{E}}}{RATE}))", "evictions"),)),
        ),
    ),
    (
        "Broadcast",
        (
            PanelSpec("Subscribers", (q(f"sum(neuralpipe_broadcast_subscribers{{{E}}})", "subscribers"),), width=6),
            PanelSpec(
                "Messages/s", (q(f"sum(rate(neuralpipe_broadcast_messages_total{{{E}}}{RATE}))", "messages"),), width=6
            ),
            PanelSpec("Drops/s", (q(f"sum(rate(neuralpipe_broadcast_drops_total{{{E}}}{RATE}))", "drops"),), width=6),
            PanelSpec(
                "Gap refills/s",
                (q(f"sum(rate(neuralpipe_broadcast_gap_refills_total{{{E}}}{RATE}))", "refills"),),
                width=6,
                description="`batches` and snapshot requests answered: consumers repairing what they missed.",
            ),
        ),
    ),
    (
        "Gateway",
        (
            PanelSpec(
                "Requests/s by endpoint and code",
                (rate_by("neuralpipe_gateway_requests_total", "endpoint, code", "{{endpoint}} {{code}}"),),
            ),
            PanelSpec(
                "Request duration and time to first token",
                (
                    *quantiles("neuralpipe_gateway_request_duration_seconds", "endpoint", "duration"),
                    *quantiles("neuralpipe_gateway_time_to_first_token_seconds", "", "ttft"),
                ),
                unit="s",
            ),
            PanelSpec(
                "Active streams",
                (q(f"sum(neuralpipe_gateway_active_streams{{{E}}})", "streams"),),
            ),
            PanelSpec(
                "Tokens waiting for slow clients",
                (q(f"sum(neuralpipe_gateway_backlog_tokens{{{E}}})", "tokens"),),
                description="Streams' tokens their clients have not read yet; max_total_backlog bounds them.",
            ),
            PanelSpec(
                "Whole answers being collected",
                (q(f"sum(neuralpipe_gateway_whole_answer_bytes{{{E}}})", "JSON"),),
                unit="bytes",
                description="Estimated JSON of non-streamed answers held until they end; bound: max_total_whole_bytes.",
            ),
            PanelSpec(
                "Requests cut/s by bound",
                (rate_by("neuralpipe_gateway_cut_total", "bound", "{{bound}}"),),
                description="Requests ended for holding too much: client_too_slow, response_too_large, gateway_busy.",
            ),
            PanelSpec(
                "Tokens/s per key",
                (rate_by("neuralpipe_gateway_key_tokens_total", "key, kind", "{{key}} {{kind}}"),),
                width=12,
            ),
            PanelSpec(
                "Limited requests/s per key",
                (rate_by("neuralpipe_gateway_limited_total", "key, reason", "{{key}} {{reason}}"),),
                width=12,
                description="Requests refused with 429: rpm, tpm, concurrent streams or token budget.",
            ),
        ),
    ),
)


def _panel(spec: PanelSpec, panel_id: int) -> timeseries.Panel | stat.Panel:
    panel = (stat.Panel() if spec.kind == "stat" else timeseries.Panel()).id(panel_id).title(spec.title)
    panel = panel.datasource(DATASOURCE).unit(spec.unit).span(spec.width).height(8).min(0)
    if spec.max is not None:
        panel = panel.max(spec.max)
    if spec.description:
        panel = panel.description(spec.description)
    if spec.pas_thresholds:
        steps = [Threshold(value=None, color="red"), Threshold(value=0.85, color="orange"), Threshold(0.9, "green")]
        panel = panel.decimals(3).max(1).thresholds(gd.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(steps))
    for ref, query in zip("ABCDEFGH", spec.queries, strict=False):
        panel = panel.with_target(
            prometheus.Dataquery().ref_id(ref).datasource(DATASOURCE).expr(query.expr).legend_format(query.legend)
        )
    return panel


def build() -> gd.Dashboard:
    board = (
        gd.Dashboard("neuralpipe")
        .uid(UID)
        .description(
            "One neuralpipe engine or several: PAS, throughput, latency, workers, rings, upstreams,"
            " cache, broadcast, gateway. Generated by tools/make_dashboard.py."
        )
        .tags(["neuralpipe", "generated"])
        .refresh("10s")
        .time("now-1h", "now")
        .timezone("browser")
        .with_variable(gd.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(
            gd.QueryVariable("engine")
            .label("Engine")
            .datasource(DATASOURCE)
            .query("label_values(neuralpipe_worker_up, engine)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
    )
    panel_id = 0
    for title, panels in ROWS:
        panel_id += 1
        board = board.with_row(gd.Row(title).id(panel_id))
        for spec in panels:
            panel_id += 1
            board = board.with_panel(_panel(spec, panel_id))
    return board


def render() -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(build().build()) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdout", action="store_true", help="print the JSON instead of writing the file")
    args = parser.parse_args(argv)
    text = render()
    if args.stdout:
        sys.stdout.write(text)
    else:
        OUTPUT.write_text(text)
        print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
