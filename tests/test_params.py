"""Stage params: each stage's closed model, checked for every worker when the config is loaded to
run (before anything starts), with the key path named; ``[params.<worker>]`` overrides."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from engine_harness import Engine, pipeline_config, wait_for

from engine.config import ConfigError, check_stage_params, load_config, render_config
from engine.supervisor import StartupError, Supervisor

NO_ENV: dict[str, str] = {}

PAIR = """
[workers.a]
stage = "counter"
outputs = ["r"]
[workers.b]
stage = "verify"
inputs = ["r"]
"""

# The default topology, written out (so a worker's own params can be set).
DEFAULT_TOPOLOGY = """
[workers.ingest]
stage = "ingest"
outputs = ["ingest-compute"]
[workers.compute]
stage = "compute"
inputs = ["ingest-compute"]
outputs = ["compute-cache"]
[workers.cache]
stage = "cache"
inputs = ["compute-cache"]
outputs = ["cache-broadcast"]
[workers.broadcast]
stage = "broadcast"
inputs = ["cache-broadcast"]
"""


def _load(tmp_path, text: str, name: str = "c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path), load_config(str(path), env=NO_ENV)


def _problems(tmp_path, text: str) -> list[str]:
    path, cfg = _load(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        check_stage_params(cfg, path)
    return [p.removeprefix(f"{path}: ") for p in caught.value.problems]


# Values issue 13 item 10 names, and the like for every stage: each refused with its key path.
@pytest.mark.parametrize(
    ("worker", "params", "message"),
    [
        ("ingest", "batch_rows = 0", "workers.ingest.params.batch_rows: must be in [1, 65536], got 0"),
        ("ingest", "max_streams = 0", "workers.ingest.params.max_streams: must be in [1, 1048576], got 0"),
        ("ingest", "flush_ms = 1000", "workers.ingest.params.flush_ms: must be in [0.0, 100.0], got 1000.0"),
        ("ingest", 'cache_policy = "some"', "workers.ingest.params.cache_policy: must be one of deterministic"),
        ("ingest", 'upstreams = [{name = "x", base_url = "http://x", weigth = 2}]', "upstreams[0].weigth: unknown"),
        ("compute", "coalesce_rows = 0", "workers.compute.params.coalesce_rows: must be in [1, 65536], got 0"),
        ("compute", "hilbert_order = 16", "workers.compute.params.hilbert_order: must be in [1, 15], got 16"),
        ("compute", "repetition = { window = 0 }", "workers.compute.params.repetition.window: must be in"),
        ("compute", 'repetition = { acton = "cancel" }', "repetition.acton: unknown key (did you mean 'action'?)"),
        ("compute", "probes = { count = 33 }", "workers.compute.params.probes.count: must be in [0, 32], got 33"),
        ("cache", "max_replays = 0", "workers.cache.params.max_replays: must be in [1, 1048576], got 0"),
        ("cache", "ttl_s = 0", "workers.cache.params.ttl_s: must be > 0 (got 0)"),
        ("cache", 'replay = "slow"', "workers.cache.params.replay: must be one of full, paced (got 'slow')"),
        ("cache", "snapshot_interval_s = -1", "workers.cache.params.snapshot_interval_s: must be >= 0"),
        ("broadcast", "sndhwm = -1", "workers.broadcast.params.sndhwm: must be >= 0 (got -1)"),
        ("broadcast", "retention_s = 0", "workers.broadcast.params.retention_s: must be > 0 (got 0)"),
        ("broadcast", "heartbeat = 1", "workers.broadcast.params.heartbeat: unknown key (did you mean 'heartbeat_s'?)"),
    ],
)
def test_each_product_stage_refuses_a_bad_param_with_its_key_path(tmp_path, worker, params, message):
    text = DEFAULT_TOPOLOGY.replace(f'stage = "{worker}"\n', f'stage = "{worker}"\nparams = {{ {params} }}\n')
    problems = _problems(tmp_path, text)
    assert len(problems) == 1 and message in problems[0], problems


@pytest.mark.parametrize(
    ("worker", "params", "message"),
    [
        ("a", "batch = 0", "workers.a.params.batch: must be in [1, 65536], got 0"),
        ("a", "rate = -1.0", "workers.a.params.rate: must be >= 0 (got -1.0)"),
        ("a", "streams = 1.5", "workers.a.params.streams: must be an integer (got 1.5)"),
        ("b", "streams = 0", "workers.b.params.streams: must be in [1, 16777216], got 0"),
        ("b", "streamz = 4", "workers.b.params.streamz: unknown key (did you mean 'streams'?)"),
    ],
)
def test_each_test_stage_refuses_a_bad_param_with_its_key_path(tmp_path, worker, params, message):
    text = PAIR.replace(f"[workers.{worker}]\n", f"[workers.{worker}]\nparams = {{ {params} }}\n")
    assert _problems(tmp_path, text) == [message]


def test_a_relay_takes_no_params(tmp_path):
    text = PAIR.replace('outputs = ["r"]', 'outputs = ["s"]').replace('inputs = ["r"]', 'inputs = ["t"]')
    text += '[workers.relay]\nstage = "relay"\ninputs = ["s"]\noutputs = ["t"]\nparams = { rate = 1 }\n'
    assert _problems(tmp_path, text) == ["workers.relay.params.rate: unknown key"]


def test_every_problem_is_listed_and_good_params_pass(tmp_path):
    text = PAIR.replace('outputs = ["r"]', 'outputs = ["r"]\nparams = { batch = 0, total = -1 }')
    assert _problems(tmp_path, text) == [
        "workers.a.params.batch: must be in [1, 65536], got 0",
        "workers.a.params.total: must be >= 0 (got -1)",
    ]
    path, cfg = _load(tmp_path, PAIR.replace('outputs = ["r"]', 'outputs = ["r"]\nparams = { batch = 8, rate = 0 }'))
    check_stage_params(cfg, path)  # no error
    check_stage_params(load_config(None, env=NO_ENV))  # the default topology's defaults are valid


def test_the_ingest_upstreams_use_the_upstreams_table_model(tmp_path):
    text = '[params.ingest]\nupstreams = [{ name = "a", base_url = "http://h:0" }]\n'
    problems = _problems(tmp_path, text)
    assert problems == [
        "params.ingest.upstreams[0].base_url: must be a plain URL: a port in 1..65535, no fragment, no spaces"
        " (got 'http://h:0')"
    ]


# ---- [params.<worker>]: one worker's params without restating the topology ----------------------


def test_params_table_overrides_one_worker_of_the_default_topology(tmp_path):
    text = '[params.compute]\nhilbert_order = 6\n[params.compute.repetition]\naction = "cancel"\n'
    _, cfg = _load(tmp_path, text)
    assert list(cfg.workers) == ["ingest", "compute", "cache", "broadcast", "gateway"]  # the default topology
    assert cfg.worker_params("compute") == {"hilbert_order": 6, "repetition": {"action": "cancel"}}
    assert cfg.worker_params("cache") == {}
    check_stage_params(cfg)
    again = tmp_path / "again.toml"
    again.write_text(render_config(cfg))
    assert load_config(str(again), env=NO_ENV) == cfg


def test_params_table_merges_tables_key_by_key_over_the_workers_own(tmp_path):
    text = PAIR.replace('outputs = ["r"]', 'outputs = ["r"]\nparams = { batch = 8, rate = 10.0 }')
    _, cfg = _load(tmp_path, text + "[params.a]\nrate = 0\n")
    assert cfg.worker_params("a") == {"batch": 8, "rate": 0}
    _, cfg = _load(
        tmp_path,
        '[workers.ingest]\nstage = "ingest"\noutputs = ["r"]\nparams.pool = { retries = 1 }\n'
        '[workers.b]\nstage = "verify"\ninputs = ["r"]\n[params.ingest.pool]\nstrategy = "ewma"\n',
    )
    assert cfg.worker_params("ingest")["pool"] == {"retries": 1, "strategy": "ewma"}


def test_a_bad_override_is_named_where_it_was_written(tmp_path):
    assert _problems(tmp_path, "[params.ingest]\nbatch_rows = 0\n") == [
        "params.ingest.batch_rows: must be in [1, 65536], got 0"
    ]


def test_params_table_for_an_unknown_worker_or_exposed_tcp_is_refused_at_load(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[params.compte]\nhilbert_order = 6\n")
    with pytest.raises(ConfigError, match=r"params.compte: no worker named 'compte' \(workers: ingest, compute"):
        load_config(str(path), env=NO_ENV)
    path.write_text('[params.broadcast]\nsnapshot_url = "tcp://0.0.0.0:5599"\n')
    with pytest.raises(ConfigError, match=r"params.broadcast.snapshot_url: .*set curve = true"):
        load_config(str(path), env=NO_ENV)


# ---- where the check runs -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_run_refuses_a_bad_param_before_anything_starts(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[params.ingest]\nbatch_rows = 0\nmax_streams = 0\n")
    base = tmp_path / "run"
    env = dict(os.environ, NEURALPIPE_RUNTIME_DIR=str(base))
    for extra in ([], ["--detach"]):
        out = subprocess.run(
            [sys.executable, "-m", "engine.cli", "run", "--config", str(bad), *extra],
            capture_output=True,
            text=True,
            timeout=50,
            env=env,
        )
        assert out.returncode == 1
        assert f"{bad}: params.ingest.batch_rows: must be in [1, 65536], got 0" in out.stderr
        assert f"{bad}: params.ingest.max_streams: must be in [1, 1048576], got 0" in out.stderr
        assert not base.exists()  # no runtime directory, so no socket, segment or worker either


def test_the_supervisor_checks_params_before_its_set_up(tmp_path):
    _, cfg = _load(tmp_path, f'[engine]\nruntime_dir = "{tmp_path / "run"}"\n[params.cache]\nmax_replays = 0\n')
    with pytest.raises(StartupError, match=r"params.cache.max_replays: must be in \[1, 1048576\], got 0"):
        Supervisor(cfg).run()
    assert not (tmp_path / "run").exists()


def test_config_show_checks_params_and_light_commands_import_no_stage(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[params.compute]\ncoalesce_rows = 0\n")
    show = subprocess.run(
        [sys.executable, "-m", "engine.cli", "config", "show", "--config", str(bad)], capture_output=True, text=True
    )
    assert show.returncode == 1 and "params.compute.coalesce_rows: must be in [1, 65536], got 0" in show.stderr
    light = (
        "import sys; from engine.config import load_config; from engine import cli, check; "
        "from engine.clients import supervisor, tail; "
        f"load_config({str(bad)!r}); print(sorted(m for m in sys.modules if m.startswith('stages')))"
    )
    out = subprocess.run([sys.executable, "-c", light], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_stage_params_modules_stay_light_and_upstreams_have_one_definition():
    # a worker imports its stage's params module at start-up: engine.config (~50-85 ms) must not come with it
    mods = ", ".join(f"stages.{s}.params" for s in ("ingest", "compute", "cache", "broadcast", "testing"))
    code = f"import sys, {mods}; print('engine.config' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    from engine.config import Config
    from engine.upstreams import UpstreamEntry
    from stages.ingest.params import IngestParams
    from stages.ingest.pool import UpstreamConfig

    assert UpstreamConfig is UpstreamEntry
    assert Config.model_fields["upstreams"].annotation == IngestParams.model_fields["upstreams"].annotation


def _mapped(pid: int, library: str) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        return library in maps.read()


@pytest.mark.timeout(60)
def test_supervised_workers_get_validated_params_without_importing_pydantic(tmp_path):
    # the supervisor validated them at load: a worker reads the values it is handed, and its
    # start-up skips pydantic and the models (~80 ms of each worker's start-up, docs/recovery.md)
    engine = Engine(tmp_path, pipeline_config(total=320, rate=0), "validated").start()
    try:
        status = engine.status()
        assert _mapped(status["pid"], "_pydantic_core")  # the supervisor validates with it
        for worker in status["workers"]:
            assert not _mapped(worker["pid"], "_pydantic_core"), worker["name"]
        # the source's total (a non-default param) reached it: 320 tokens, as 20 batches of 16
        wait_for(lambda: engine.worker("sink")["stats"]["batches"] == 20, 20, "the source's 320 tokens at the sink")
    finally:
        assert engine.stop() == 0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_whole_bytes", "1"),
        ("max_whole_bytes", "2147483648"),
        ("max_whole_bytes", '"64M"'),
        ("send_timeout_s", "0"),
        ("send_timeout_s", "-1"),
        ("send_timeout_s", "1e9"),
        ("send_timeout_s", "nan"),
        ("send_timeout_s", '"60s"'),
        ("max_stream_backlog", "0"),
        ("max_stream_backlog", "16777217"),
        ("max_stream_backlog", "1.5"),
        ("max_stream_backlog", '"lots"'),
        ("max_total_backlog", "1023"),
        ("max_total_backlog", "1073741825"),
        ("max_total_backlog", "-5"),
        ("max_total_backlog", "true"),
        ("max_total_whole_bytes", "1048575"),
        ("max_total_whole_bytes", "1e20"),
        ("max_total_whole_bytes", '"1G"'),
    ],
)
def test_a_gateway_bound_out_of_range_is_refused_naming_it(tmp_path, key, value):
    problems = _problems(tmp_path, f"[gateway]\n{key} = {value}\n")
    assert len(problems) == 1 and problems[0].startswith(f"gateway.{key}: must be"), problems


def test_a_total_for_whole_answers_below_one_answers_bound_is_refused(tmp_path):
    """max_total_whole_bytes under max_whole_bytes would answer a lone large answer 503
    gateway_busy with Retry-After, a retry that can never succeed, instead of 400 response_too_large."""
    problems = _problems(tmp_path, "[gateway]\nmax_whole_bytes = 536870912\n")
    assert len(problems) == 1 and "max_total_whole_bytes" in problems[0] and "max_whole_bytes" in problems[0]
    assert "536870912" in problems[0], problems
