"""engine.config: defaults, round trip, precise error messages, env overrides, `config show`."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli import main
from engine.config import (
    ENV_OVERRIDES,
    STAGE_ALIASES,
    Config,
    ConfigError,
    EngineConfig,
    RingConfig,
    load_config,
    render_config,
)
from shm.wait import WaitStrategy

NO_ENV: dict[str, str] = {}

# A topology of two workers, used where the default one would get in the way.
PAIR = """
[workers.a]
stage = "counter"
outputs = ["r"]
[workers.b]
stage = "verify"
inputs = ["r"]
"""


@pytest.fixture
def write(tmp_path):
    """Write TOML text to a file named config.toml; returns its path."""

    def _write(text: str) -> str:
        path = tmp_path / "config.toml"
        path.write_text(text)
        return str(path)

    return _write


def error_of(path: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(path, env=NO_ENV if env is None else env)
    return str(exc.value)


def test_defaults_are_valid_and_give_the_demo_topology():
    cfg = load_config(env=NO_ENV)
    assert cfg == Config()
    assert list(cfg.workers) == ["ingest", "compute", "cache", "broadcast", "gateway"]
    assert [cfg.workers[name].stage for name in cfg.workers] == [
        STAGE_ALIASES[alias] for alias in ("ingest", "compute", "cache", "broadcast", "gateway")
    ]
    assert cfg.ring_names() == ["ingest-compute", "compute-cache", "cache-broadcast"]
    assert "upstreams" not in cfg.worker_params("ingest")  # no [[upstreams]]: the embedded upstream
    assert cfg.engine.metrics_port == 9464 and cfg.engine.log_level == "info"
    assert cfg.supervisor.strategy == "one_for_one" and cfg.supervisor.intensity == 5
    assert cfg.ring("cache-broadcast") == RingConfig()


def test_file_without_workers_gets_the_demo_topology(write):
    cfg = load_config(write("[engine]\nlog_level = 'debug'\n"), env=NO_ENV)
    assert cfg.engine.log_level == "debug"
    assert list(cfg.workers) == ["ingest", "compute", "cache", "broadcast", "gateway"]


def test_a_file_of_only_upstreams_points_the_default_topology_at_them(write):
    cfg = load_config(write(LMSTUDIO), env=NO_ENV)
    assert [u["base_url"] for u in cfg.worker_params("ingest")["upstreams"]] == ["http://localhost:1234"]


def test_ingest_takes_what_the_gateway_lets_through(write):
    """A gateway's max_body_bytes raised for images or long documents raises ingest's request limit
    with it (before, ingest's fixed 1 MiB refused them: the client waited for a 503); set below it,
    it is a config error naming the key."""
    # the default gateway's 1 MiB body and the submit around it
    assert load_config(env=NO_ENV).worker_params("ingest")["max_request_bytes"] == (1 << 20) + 65536
    cfg = load_config(write("[gateway]\nmax_body_bytes = 8388608\n"), env=NO_ENV)
    assert cfg.worker_params("ingest")["max_request_bytes"] == 8388608 + 65536
    text = "[gateway]\nmax_body_bytes = 8388608\n[params.ingest]\nmax_request_bytes = 2097152\n"
    assert "params.ingest.max_request_bytes: 2,097,152 bytes, less than" in error_of(write(text))


def test_round_trip_render_then_load(write):
    text = (
        PAIR
        + """
params = { mode = "strict", limits = [1, 2] }
[engine]
instance = "prod_1"
metrics_port = 0
heartbeat_interval_s = 0.5
heartbeat_timeout_s = 1
[supervisor]
strategy = "rest_for_one"
[ring_defaults]
capacity = 131072
full = "drop"
[rings.r]
capacity = 65536
wait = "spin"
"""
    )
    cfg = load_config(write(text), env=NO_ENV)
    rendered = render_config(cfg)
    assert load_config(write(rendered), env=NO_ENV) == cfg
    assert tomllib.loads(rendered)["rings"] == {"r": {"capacity": 65536, "wait": "spin"}}
    assert json.loads(render_config(cfg, as_json=True)) == tomllib.loads(rendered)


def test_stage_alias_resolved_and_module_reference_kept(write):
    cfg = load_config(write(PAIR.replace('"verify"', '"mypkg.sinks:Printer"')), env=NO_ENV)
    assert cfg.workers["a"].stage == "stages.testing.counter:CountingSource"
    assert cfg.workers["b"].stage == "mypkg.sinks:Printer"


def test_ring_overrides_merge_with_defaults(write):
    text = PAIR + "[ring_defaults]\ncapacity = 65536\nwait = 'yield'\n[rings.r]\nmax_record = 8000\nspins = 7\n"
    ring = load_config(write(text), env=NO_ENV).ring("r")
    assert (ring.capacity, ring.max_record, ring.wait, ring.spins) == (65536, 8000, "yield", 7)
    assert ring.wait_strategy() == WaitStrategy("yield", spins=7, yields=20, park_timeout_s=0.05)
    assert RingConfig(capacity=8192).resolved_max_record() == 8192 // 4 - 8
    with pytest.raises(KeyError):
        load_config(write(text), env=NO_ENV).ring("nope")


@pytest.mark.parametrize(
    ("rings", "message"),
    [
        # every stream stalled at one row while PAS said healthy
        ("[ring_defaults]\ncapacity = 4096\n", "ring_defaults.capacity: ring 'r' takes records of at most 1,016 bytes"),
        ("[rings.r]\ncapacity = 16384\n", "rings.r.capacity: ring 'r' takes records of at most 4,088 bytes"),
        ("[rings.r]\nmax_record = 1000\n", "rings.r.max_record: ring 'r' takes records of at most 1,000 bytes"),
    ],
)
def test_a_ring_that_cannot_carry_one_row_is_refused_with_its_key(write, rings: str, message: str):
    with pytest.raises(ConfigError) as error:
        load_config(write(PAIR + rings), env=NO_ENV)
    assert message in str(error.value)
    assert "set capacity >= 32,768" in str(error.value) or "set max_record >= 4,816" in str(error.value)


def test_workers_keep_file_order(write):
    text = "".join(
        f'[workers.{name}]\nstage = "relay"\ninputs = ["{src}"]\noutputs = ["{dst}"]\n'
        for name, src, dst in [("z", "r0", "r1"), ("a", "r1", "r2"), ("m", "r2", "r0")]
    )
    assert list(load_config(write(text), env=NO_ENV).workers) == ["z", "a", "m"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[engine]\nheartbeat_intervall_s = 1\n", "engine.heartbeat_intervall_s: unknown key"),
        ("[enginee]\n", "enginee: unknown key (did you mean 'engine'?)"),
        ("[engine]\nmetrics_port = '9000'\n", "engine.metrics_port: must be an integer (got '9000')"),
        ("[engine]\nstop_timeout_s = true\n", "engine.stop_timeout_s: must be a number (got True)"),
        ("[engine]\nstop_timeout_s = 0\n", "engine.stop_timeout_s: must be > 0 (got 0)"),
        # a microsecond heartbeat flooded the supervisor: it never reported running, and said not why
        ("[engine]\nheartbeat_interval_s = 1e-6\n", "engine.heartbeat_interval_s: must be >= 0.01 (got 1e-06)"),
        ("[engine]\nhealth_interval_s = 0.001\n", "engine.health_interval_s: must be >= 0.01 (got 0.001)"),
        ("[engine]\nlog_max_bytes = 4096\n", "engine.log_max_bytes: must be 0 (no limit) or 1048576..2**40 bytes"),
        ("[engine]\nmetrics_port = 70000\n", "engine.metrics_port: must be 1..65535, 0 (any free port) or -1"),
        ("[engine]\nlog_level = 'verbose'\n", "engine.log_level: must be one of debug, info, warning, error"),
        ("[engine]\ninstance = 'has-dash'\n", "engine.instance: must be"),
        ("[engine]\nruntime_dir = 'relative/dir'\n", 'engine.runtime_dir: must be "" (default) or an absolute'),
        ("[engine]\nheartbeat_timeout_s = 0.3\n", "engine.heartbeat_timeout_s: must be >= 2 x heartbeat_interval_s"),
        ("[engine]\nhealth_window_s = 0.5\n", "engine.health_window_s: must be >= health_interval_s"),
        ("[engine]\nlatency_budget_ms = inf\n", "engine.latency_budget_ms: must be a finite number"),
        ("[engine]\nsched_policy = 'fifo'\n", "engine.sched_policy: must be one of batch, normal"),
        ("[supervisor]\nstrategy = 'one_for_all'\n", "supervisor.strategy: must be one of one_for_one, rest_for_one"),
        ("[supervisor]\nintensity = -1\n", "supervisor.intensity: must be >= 0 (got -1)"),
        ("[supervisor]\nbackoff_max_s = 0.001\n", "supervisor.backoff_max_s: must be >= backoff_initial_s"),
        ("[ring_defaults]\ncapacity = 5000\n", "ring_defaults.capacity: must be a power of two in 4096..2**40"),
        ("[ring_defaults]\ncapacity = 4096.0\n", "ring_defaults.capacity: must be an integer (got 4096.0)"),
        ("[ring_defaults]\ncapacity = 4096\nmax_record = 4096\n", "ring_defaults.max_record: must be 0"),
        ("[ring_defaults]\nwait = 'sleep'\n", "ring_defaults.wait: must be one of spin, yield, block"),
        ("[ring_defaults]\npark_timeout_s = 0\n", "ring_defaults.park_timeout_s: must be in (0, 60]"),
        ("[rings.relay-sink]\nfull = 'never'\n", "rings.relay-sink.full: must be one of block, drop"),
        ("[rings.unused]\nwait = 'spin'\n", "rings.unused: ring is used by no worker"),
        ("ring_defaults = 3\n", "ring_defaults: must be a table (got 3)"),
        ("workers = {}\n", "workers: at least one worker is required"),
        ('[workers.relay]\nstage = "relay"\nrestart = "always"\n', "workers.relay.restart: must be one of"),
        ('[workers.relay]\nstage = "relay"\ncpus = [4096]\n', "workers.relay.cpus: CPU 4096 is not one this engine"),
        ('[workers.relay]\nstage = "relay"\ncpus = [-1]\n', "workers.relay.cpus: CPU -1 is not one this engine"),
        ('[workers.relay]\nstage = "relay"\ncpus = "0"\n', "workers.relay.cpus: must be"),
        ('[workers.a]\nrestart = "transient"\n', "workers.a.stage: required key is missing"),
        ('[workers.a]\nstage = "nomodule"\n', "workers.a.stage: must be one of counter, relay, verify"),
        ('[workers.a]\nstage = "relay"\ninputs = "r"\n', "workers.a.inputs: must be an array (got 'r')"),
    ],
)
def test_bad_values_name_the_key_and_reason(write, text, expected):
    path = write(text)
    message = error_of(path)
    assert message.startswith(path + ": ")
    assert expected in message


def test_enum_message_shape(write):
    path = write('[workers.relay]\nstage = "relay"\nrestart = "always"\ninputs = ["x"]\n')
    message = error_of(path)
    assert f"{path}: workers.relay.restart: must be one of permanent, transient, temporary (got 'always')" in message


def test_every_problem_is_reported_one_per_line(write):
    with pytest.raises(ConfigError) as exc:
        load_config(write("[engine]\nmetrics_port = 'x'\nlog_level = 3\n"), env=NO_ENV)
    assert len(exc.value.problems) == 2
    assert str(exc.value).count("\n") == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            PAIR + '[workers.c]\nstage = "counter"\noutputs = ["r"]\n',
            "workers.c.outputs: ring 'r' already has the producer 'a' (a ring has exactly one producer)",
        ),
        (
            PAIR + '[workers.c]\nstage = "verify"\ninputs = ["r"]\n',
            "workers.c.inputs: ring 'r' already has the consumer 'b' (a ring has exactly one consumer)",
        ),
        (PAIR + '[workers.c]\nstage = "counter"\noutputs = ["q"]\n', "workers.c.outputs: ring 'q' has no consumer"),
        (PAIR + '[workers.c]\nstage = "verify"\ninputs = ["q"]\n', "workers.c.inputs: ring 'q' has no producer"),
        (
            PAIR + '[workers.c]\nstage = "relay"\ninputs = ["q"]\noutputs = ["q"]\n',
            "workers.c.outputs: ring 'q' is also an input of this worker",
        ),
        (PAIR + '[workers."bad name"]\nstage = "relay"\n', "workers.\"bad name\": name 'bad name' must be"),
        (PAIR + '[workers.c]\nstage = "relay"\ninputs = ["-x"]\n', "workers.c.inputs[0]: ring name '-x' must be"),
        (PAIR + '[workers.c]\nstage = "relay"\ninputs = ["r", "r"]\n', "workers.c.inputs: ring 'r' listed twice"),
        (PAIR + '[rings."no space"]\nwait = "spin"\n', "rings.\"no space\": name 'no space' must be"),
        (
            PAIR + "[ring_defaults]\ncapacity = 8192\n[rings.r]\nmax_record = 5000\n",
            "rings.r.max_record: must be 0 (capacity // 4 - 8) or 1..4080 for capacity 8192 (got 5000)",
        ),
    ],
)
def test_topology_errors_name_the_key(write, text, expected):
    assert expected in error_of(write(text))


def test_ring_override_is_checked_against_merged_capacity(write):
    # Valid only because the defaults give the ring a large capacity: checked after merging.
    text = PAIR + "[ring_defaults]\ncapacity = 1073741824\n[rings.r]\nmax_record = 100000000\n"
    assert load_config(write(text), env=NO_ENV).ring("r").max_record == 100_000_000


def test_toml_syntax_error_names_file_and_line(write):
    path = write("[engine]\nlog_level = 'info'\nmetrics_port = = 3\n")
    message = error_of(path)
    assert message.startswith(f"{path}: TOML syntax error:")
    assert "line 3" in message


def test_unreadable_file(tmp_path):
    missing = str(tmp_path / "missing.toml")
    assert error_of(missing).startswith(f"{missing}: cannot read:")


def test_env_overrides_apply_over_the_file(write):
    env = {
        "NEURALPIPE_INSTANCE": "host7",
        "NEURALPIPE_RUNTIME_DIR": "/srv/np",
        "NEURALPIPE_STATE_DIR": "/srv/np-state",
        "NEURALPIPE_METRICS_HOST": "0.0.0.0",
        "NEURALPIPE_METRICS_PORT": "-1",
        "NEURALPIPE_LOG_LEVEL": "warning",
        "NEURALPIPE_GATEWAY_LISTEN": "127.0.0.1:0",
    }
    assert set(env) == set(ENV_OVERRIDES)
    cfg = load_config(write("[engine]\nmetrics_port = 1234\ninstance = 'file'\n"), env=env)
    engine = cfg.engine
    assert cfg.gateway == {"listen": "127.0.0.1:0"}
    assert (engine.instance, engine.runtime_dir, engine.metrics_host) == ("host7", "/srv/np", "0.0.0.0")
    assert (engine.metrics_port, engine.log_level, engine.state_dir) == (-1, "warning", "/srv/np-state")
    assert engine.resolved_runtime_dir() == "/srv/np"


def test_empty_env_variable_counts_as_unset(write):
    cfg = load_config(write("[engine]\nmetrics_port = 1234\n"), env={"NEURALPIPE_METRICS_PORT": ""})
    assert cfg.engine.metrics_port == 1234


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"NEURALPIPE_METRICS_PORT": "http"}, "NEURALPIPE_METRICS_PORT: engine.metrics_port: must be an integer"),
        ({"NEURALPIPE_METRICS_PORT": "65536"}, "NEURALPIPE_METRICS_PORT: engine.metrics_port: must be 1..65535"),
        ({"NEURALPIPE_LOG_LEVEL": "loud"}, "NEURALPIPE_LOG_LEVEL: engine.log_level: must be one of"),
        ({"NEURALPIPE_INSTANCE": "a-b"}, "NEURALPIPE_INSTANCE: engine.instance: must be"),
        ({"NEURALPIPE_RUNTIME_DIR": "rel"}, "NEURALPIPE_RUNTIME_DIR: engine.runtime_dir: must be"),
    ],
)
def test_bad_env_values_name_the_variable(env, expected):
    assert expected in error_of(None, env)


def test_resolved_runtime_dir_defaults():
    engine = EngineConfig()
    assert engine.resolved_runtime_dir({"XDG_RUNTIME_DIR": "/run/user/7"}) == "/run/user/7/neuralpipe"
    assert engine.resolved_runtime_dir({}).startswith("/tmp/neuralpipe-")


def test_models_are_frozen():
    cfg = load_config(env=NO_ENV)
    with pytest.raises(ValueError):
        cfg.engine.metrics_port = 1  # type: ignore[misc]
    assert cfg.engine.metrics_port == 9464


def test_documented_example_loads(write):
    doc = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    example = re.search(r"## Example\n.*?```toml\n(.*?)```", doc, re.S).group(1)
    cfg = load_config(write(example), env=NO_ENV)
    assert cfg.ring("relay-sink").full == "drop" and cfg.ring("source-relay").capacity == 1 << 20


# -- `neuralpipe config show` ---------------------------------------------------------------------

CLEAN_ENV = dict.fromkeys(ENV_OVERRIDES)  # None unsets each variable during the invocation


def test_config_show_prints_valid_toml(write):
    path = write(PAIR + "[engine]\nlog_level = 'debug'\n")
    result = CliRunner(env=CLEAN_ENV).invoke(main, ["config", "show", "--config", path])
    assert result.exit_code == 0, result.output
    shown = tomllib.loads(result.output)
    assert shown["engine"]["log_level"] == "debug"
    assert shown["workers"]["a"]["stage"] == STAGE_ALIASES["counter"]
    assert load_config(write(result.output), env=NO_ENV) == load_config(path, env=NO_ENV)


def test_config_show_defaults_and_json():
    result = CliRunner(env=CLEAN_ENV).invoke(main, ["config", "show", "--json"])
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.output)["workers"]) == ["ingest", "compute", "cache", "broadcast", "gateway"]


def test_config_show_applies_env():
    result = CliRunner(env={**CLEAN_ENV, "NEURALPIPE_METRICS_PORT": "9999"}).invoke(main, ["config", "show"])
    assert result.exit_code == 0, result.output
    assert tomllib.loads(result.output)["engine"]["metrics_port"] == 9999


def test_config_show_rejects_a_bad_file(write):
    path = write("[supervisor]\nstrategy = 'one_for_all'\n")
    result = CliRunner(env=CLEAN_ENV).invoke(main, ["config", "show", "--config", path])
    assert result.exit_code != 0
    assert f"Error: {path}: supervisor.strategy: must be one of one_for_one, rest_for_one" in result.output
    assert "Traceback" not in result.output


LMSTUDIO = """
[[upstreams]]
name = "lmstudio"
base_url = "http://localhost:1234"
models = ["qwen2.5-7b-instruct"]
"""


def test_top_level_upstreams_go_to_an_ingest_worker_that_lists_none(write):
    topology = '[workers.in]\nstage = "ingest"\noutputs = ["r"]\n[workers.b]\nstage = "verify"\ninputs = ["r"]\n'
    cfg = load_config(write(LMSTUDIO + topology), env=NO_ENV)
    ingest = [name for name, w in cfg.workers.items() if w.stage == STAGE_ALIASES["ingest"]]
    upstreams = cfg.worker_params(ingest[0])["upstreams"]
    assert upstreams == [
        {
            "name": "lmstudio",
            "base_url": "http://localhost:1234",
            "models": ["qwen2.5-7b-instruct"],
            "max_concurrency": 64,
            "weight": 1.0,
            "api_key": "",
            "requests_per_s": 0.0,
            "tokens_per_s": 0.0,
        }
    ]


def test_an_ingest_worker_with_its_own_upstreams_keeps_them(write):
    own = '[workers.in]\nstage = "ingest"\noutputs = ["r"]\nparams.upstreams = [{name = "x", base_url = "http://x"}]\n'
    cfg = load_config(write(LMSTUDIO + own + '[workers.b]\nstage = "verify"\ninputs = ["r"]\n'), env=NO_ENV)
    assert cfg.worker_params("in")["upstreams"] == [{"name": "x", "base_url": "http://x"}]
    assert "upstreams" not in cfg.worker_params("b")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[upstreams]]\nname = "a"\nbase_url = "localhost:1234"\n', "upstreams[0].base_url: must be an http://"),
        (
            '[[upstreams]]\nname = "a"\nbase_url = "http://x"\n[[upstreams]]\nname = "a"\nbase_url = "http://y"\n',
            "upstreams[1].name: upstream name 'a' is used twice",
        ),
        (
            '[[upstreams]]\nname = "a"\nbase_url = "http://x"\nmax_concurency = 3\n',
            "upstreams[0].max_concurency: unknown key (did you mean 'max_concurrency'?)",
        ),
        ('[[upstreams]]\nbase_url = "http://x"\n', "upstreams[0].name: required key is missing"),
    ],
)
def test_bad_upstreams_name_the_key(write, text, expected):
    assert expected in error_of(write(text))


def test_an_ingest_asks_the_topologys_cache_and_a_cache_name_that_is_none_is_refused(write):
    """Ingest's ``cache`` named the worker "cache" whatever the topology: a typo, or a topology
    without that worker, skipped every lookup silently (and retried the missing socket every 10 ms)."""
    assert load_config(env=NO_ENV).worker_params("ingest")["cache"] == "cache"
    ingest = '[workers.ingest]\nstage = "ingest"\noutputs = ["r"]\n'
    sink = '[workers.sink]\nstage = "verify"\ninputs = ["r"]\n'
    no_cache = load_config(write(ingest + sink), env=NO_ENV)
    assert no_cache.worker_params("ingest")["cache"] == ""  # nothing to ask
    kv = ingest.replace('["r"]', '["a"]') + '[workers.kv]\nstage = "cache"\ninputs = ["a"]\noutputs = ["r"]\n' + sink
    assert load_config(write(kv), env=NO_ENV).worker_params("ingest")["cache"] == "kv"  # its only cache
    typo = kv.replace('outputs = ["a"]\n', 'outputs = ["a"]\nparams.cache = "kb"\n', 1)
    assert error_of(write(typo)).endswith(
        "workers.ingest.params.cache: no cache worker named 'kb' (the cache workers: kv); \"\" turns lookups off"
    )
    override = kv + '[params.ingest]\ncache = "cahce"\n'
    assert "params.ingest.cache: no cache worker named 'cahce'" in error_of(write(override))
    off = ingest + sink + '[params.ingest]\ncache = ""\n'
    assert load_config(write(off), env=NO_ENV).worker_params("ingest")["cache"] == ""
    none = ingest.replace('outputs = ["r"]\n', 'outputs = ["r"]\nparams.cache = "cache"\n') + sink
    assert "this topology has no cache worker" in error_of(write(none))
