"""The ``neuralpipe`` command line (click). Subcommands import what they need lazily, so that
``neuralpipe --help`` and quick commands stay fast."""

from __future__ import annotations

import contextlib
import math
from importlib.metadata import entry_points

import click

from engine.clients import FIRST_MESSAGE_WAIT_S
from engine.protocol.requests import MAX_STREAM_ID, MAX_TOKENS_LIMIT

PLUGINS = "neuralpipe.commands"  # entry points of other installed packages: bench's ``neuralpipe bench``


class _Main(click.Group):
    """The top-level group, with the commands other installed packages add through entry points
    (``neuralpipe bench`` comes from neuralpipe_bench): the engine never imports them by name, and
    only a command that is asked for is loaded."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *(ep.name for ep in entry_points(group=PLUGINS))})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        found = super().get_command(ctx, name)
        if found is None:
            found = next((ep.load() for ep in entry_points(group=PLUGINS, name=name)), None)
        return found


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="neuralpipe")
def main() -> None:
    """neuralpipe: a multiprocess shared-memory dataflow engine for LLM token streams."""


@main.command()
@click.option("--instance", help="Engine instance id (default: the engine running under the runtime directory).")
@click.option("--all", "every", is_flag=True, help="Every engine's segments on this machine.")
@click.option("--clean", is_flag=True, help="Remove segments left by dead engine instances (never a live one's).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def check(instance: str | None, every: bool, clean: bool, as_json: bool) -> None:
    """Inspect this engine's ring segments read-only; exit 0 healthy, 1 warning, 2 critical."""
    from engine.check import run_check, this_engine

    if instance is None and not every:
        from engine.rundir import RuntimeDirError

        try:
            instance = this_engine(_load(None))
        except RuntimeDirError as exc:
            raise click.ClickException(f"{exc} (name one with --instance, or --all)") from None
    raise SystemExit(run_check(instance=instance, clean=clean, as_json=as_json))


@main.group()
def config() -> None:
    """Configuration: validate and show the effective config."""


@config.command("show")
@click.option("--config", "path", type=click.Path(exists=True, dir_okay=False), help="TOML config file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of TOML.")
def config_show(path: str | None, as_json: bool) -> None:
    """Print the effective configuration (file, then environment overrides, then defaults)."""
    from engine.config import render_config

    click.echo(render_config(_load(path, stage_params=True), as_json=as_json), nl=False)


def _load(path: str | None, stage_params: bool = False):
    """The config; with ``stage_params`` every worker's params checked by its stage's model too
    (this imports the stages: only where they will run, or to show the config)."""
    from engine.config import ConfigError, check_stage_params, load_config

    try:
        cfg = load_config(path)
        if stage_params:
            check_stage_params(cfg, path if path is not None else "defaults")
        return cfg
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _emit(obj, as_json: bool, text: str) -> None:
    if as_json:
        import orjson

        click.echo(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(text)


@main.command()
@click.option("--config", "path", type=click.Path(exists=True, dir_okay=False), help="TOML config file.")
@click.option("--detach", is_flag=True, help="Run the supervisor in the background and return once it is up.")
@click.option("--json", "as_json", is_flag=True, help="With --detach: print the engine's info as JSON.")
def run(path: str | None, detach: bool, as_json: bool) -> None:
    """Start the engine (the supervisor and its workers) in the foreground; Ctrl-C stops it."""
    cfg = _load(path, stage_params=True)
    if detach:
        from engine.launcher import LaunchError, launch_detached

        try:
            info = launch_detached(cfg, path)
        except LaunchError as exc:
            raise click.ClickException(f"engine not started: {exc}") from None
        _emit(info, as_json, f"engine {info['instance']} running (pid {info['pid']}, log {info['log']})")
        return
    from engine.supervisor import StartupError, Supervisor

    try:
        code = Supervisor(cfg).run()
    except StartupError as exc:
        raise click.ClickException(f"engine not started: {exc}") from None
    raise SystemExit(code)


def _engine(path: str | None, instance: str | None) -> dict:
    from engine.clients.supervisor import EngineNotFound, find_engine
    from engine.rundir import RuntimeDirError

    cfg = _load(path)
    try:
        return find_engine(cfg.engine.resolved_runtime_dir(), instance or cfg.engine.instance or None)
    except (EngineNotFound, RuntimeDirError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--config", "path", type=click.Path(exists=True, dir_okay=False), help="TOML config file.")
@click.option("--instance", help="Engine instance id (default: the only one running).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(path: str | None, instance: str | None, as_json: bool) -> None:
    """Show each worker (pid, state, uptime, restarts, rates), ring occupancy, the PAS and each
    upstream's health (up or down, requests in flight, requests, errors, time to first token)."""
    from engine.clients.supervisor import request
    from engine.redact import redact
    from engine.status_view import format_status, gateway_view

    info = _engine(path, instance)
    try:
        reply = request(info["control"], "status")
    except TimeoutError as exc:
        raise click.ClickException(str(exc)) from None
    reply.pop("type", None)
    reply = redact(reply)  # a worker's free-form stats must not show a credential
    reply["gateway"] = gateway_view(reply)
    _emit(reply, as_json, format_status(reply))


@main.command()
@click.option("--config", "path", type=click.Path(exists=True, dir_okay=False), help="TOML config file.")
@click.option("--instance", help="Engine instance id (default: the only one running).")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for the engine to exit.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def stop(path: str | None, instance: str | None, timeout: float, as_json: bool) -> None:
    """Drain and stop a running engine; returns once its supervisor has exited."""
    from engine.clients.supervisor import SHUTDOWN_TIMEOUT_S, request
    from engine.launcher import wait_exit

    info = _engine(path, instance)
    try:
        request(info["control"], "shutdown", timeout_s=SHUTDOWN_TIMEOUT_S)
    except TimeoutError as exc:
        raise click.ClickException(str(exc)) from None
    stopped = wait_exit(info["pid"], timeout)
    result = {"instance": info["instance"], "pid": info["pid"], "stopped": stopped}
    _emit(
        result,
        as_json,
        f"engine {info['instance']} " + ("stopped" if stopped else f"still running after {timeout:g} s"),
    )
    if not stopped:
        raise SystemExit(1)


def _worker_command(command: str, path: str | None, instance: str | None, worker: str, as_json: bool) -> None:
    from engine.clients.supervisor import request

    info = _engine(path, instance)
    try:
        reply = request(info["control"], command, worker=worker)
    except TimeoutError as exc:
        raise click.ClickException(str(exc)) from None
    if reply["type"] == "error":
        raise click.ClickException(reply.get("message", "refused"))
    _emit({"worker": worker, command: True}, as_json, f"{worker}: {command} sent")


@main.command()
@click.argument("worker")
@click.option("--config", "path", type=click.Path(exists=True, dir_okay=False), help="TOML config file.")
@click.option("--instance", help="Engine instance id (default: the only one running).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def pause(worker: str, path: str | None, instance: str | None, as_json: bool) -> None:
    """Pause a worker: it stops processing (its input ring fills) but keeps its heartbeats."""
    _worker_command("pause", path, instance, worker, as_json)


@main.command()
@click.argument("worker")
@click.option("--config", "path", type=click.Path(exists=True, dir_okay=False), help="TOML config file.")
@click.option("--instance", help="Engine instance id (default: the only one running).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def resume(worker: str, path: str | None, instance: str | None, as_json: bool) -> None:
    """Resume a paused worker."""
    _worker_command("resume", path, instance, worker, as_json)


@main.group()
def cache() -> None:
    """Operate the cache worker: stats, clear, snapshot."""


def _cache_command(command: str, worker: str, path: str | None, instance: str | None, as_json: bool) -> None:
    from engine.clients.cache import CacheClient
    from engine.protocol.cache import CacheProtocolError, socket_path

    info = _engine(path, instance)
    try:
        with CacheClient(socket_path(info["runtime_dir"], worker)) as client:
            reply = client.call(command)
    except (FileNotFoundError, TimeoutError, CacheProtocolError) as exc:
        raise click.ClickException(str(exc)) from None
    reply.pop("type", None)
    body = reply.get("stats", reply)
    _emit(body, as_json, "\n".join(f"{key:<16} {value}" for key, value in body.items()))


for _name, _help in (
    ("stats", "Hits, misses, evictions, bytes, entries, hit ratio, replays."),
    ("clear", "Drop every entry."),
    ("snapshot", "Write the snapshot file now (atomically)."),
):

    def _make(command: str):
        @click.option("--worker", default="cache", show_default=True, help="Name of the cache worker.")
        @click.option("--config", "path", type=click.Path(exists=True, dir_okay=False), help="TOML config file.")
        @click.option("--instance", help="Engine instance id (default: the only one running).")
        @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
        def command_(worker: str, path: str | None, instance: str | None, as_json: bool) -> None:
            _cache_command(command, worker, path, instance, as_json)

        return command_

    cache.command(_name, help=_help)(_make(_name))


@main.command()
@click.option("--config", "path", type=click.Path(exists=True, dir_okay=False), help="TOML config file.")
@click.option("--prompts", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--max-tokens", type=click.IntRange(1, 4096), default=24, show_default=True)
def demo(path: str | None, prompts: int, max_tokens: int) -> None:
    """Start the engine, stream a few prompts through it (one twice: a cache hit), print the
    tokens with their computed columns, throughput, latency and PAS, and stop."""
    from engine.demo import run_demo
    from engine.launcher import LaunchError

    try:
        code = run_demo(_load(path), path, prompts, max_tokens, _write)
    except LaunchError as exc:
        raise click.ClickException(f"engine not started: {exc}") from None
    raise SystemExit(code)


@main.command()
@click.option(
    "--stream", "stream_id", type=click.IntRange(0, MAX_STREAM_ID), help="Only this stream (and return when it ends)."
)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--config", "path", type=click.Path(exists=True, dir_okay=False), help="TOML config file.")
@click.option("--instance", help="Engine instance id (default: the only one running).")
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(0, min_open=True),
    default=FIRST_MESSAGE_WAIT_S,
    show_default=True,
    help="With --stream: give up when nothing of the stream came within this many seconds.",
)
def tail(stream_id: int | None, fmt: str, path: str | None, instance: str | None, wait_s: float) -> None:
    """Print live tokens from the engine's broadcast (every stream, or one from its beginning)."""
    from engine.clients.consumer import StreamConsumer
    from engine.clients.tail import follow

    info = _engine(path, instance)
    one, ended = stream_id is not None, None
    with StreamConsumer.for_engine(info["runtime_dir"], stream_id) as consumer, contextlib.suppress(KeyboardInterrupt):
        ended = follow(consumer, fmt, _write, one_stream=one, first_timeout_s=wait_s if one else None)
    if ended == "timeout":
        raise click.ClickException(
            f"nothing of stream {stream_id} reached the broadcast within {wait_s:g} s"
            " (no such stream, or it ended longer ago than the broadcast retains)"
        )
    if one and ended != "end":
        raise SystemExit(1)


def _write(text: str) -> None:
    click.echo(text, nl=False)


def _not_nan(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """click's FloatRange lets NaN through (no comparison with it fails); JSON would carry it as null."""
    if value is not None and math.isnan(value):
        raise click.BadParameter("must be a number, not NaN")
    return value


@main.command()
@click.argument("prompt")
@click.option("--model", default="", help="Model name to route by (default: any upstream's).")
@click.option("--max-tokens", type=click.IntRange(1, MAX_TOKENS_LIMIT), default=64, show_default=True)
@click.option(
    "--temperature",
    type=click.FloatRange(0, 2),
    callback=_not_nan,
    default=None,
    help="Sampling temperature (0 = deterministic).",
)
@click.option(
    "--reasoning-effort",
    type=click.Choice(["none", "minimal", "low", "medium", "high"]),
    help="For a reasoning model: how long it thinks (its thinking prints between [thinking] and [/thinking]).",
)
@click.option("--config", "path", type=click.Path(exists=True, dir_okay=False), help="TOML config file.")
@click.option("--instance", help="Engine instance id (default: the only one running).")
@click.option("--follow", is_flag=True, help="Then print the stream's tokens until it ends.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (with --follow: JSON lines).")
def submit(
    prompt: str,
    model: str,
    max_tokens: int,
    temperature: float | None,
    reasoning_effort: str | None,
    path: str | None,
    instance: str | None,
    follow: bool,
    as_json: bool,
) -> None:
    """Submit a chat prompt to the engine's ingest; prints the new stream id at once. With --follow
    the exit code says how the stream ended: 0 complete, 1 ended by an error."""
    from engine.clients.requests import RequestClient
    from engine.protocol.requests import RequestError, ingest_endpoint

    if not prompt.strip():
        raise click.BadParameter("the prompt is empty", param_hint="PROMPT")
    info = _engine(path, instance)
    body: dict = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    if model:
        body["model"] = model
    if temperature is not None:
        body["temperature"] = temperature
    if reasoning_effort is not None:
        body["reasoning_effort"] = reasoning_effort
    try:
        with RequestClient(ingest_endpoint(info["runtime_dir"])) as client:
            stream_id = client.submit(body)
    except (RequestError, TimeoutError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json and follow:  # JSON lines only: the stream id is one line like the ones after it
        import orjson

        click.echo(orjson.dumps({"stream_id": stream_id}).decode())
    else:
        _emit({"stream_id": stream_id}, as_json, f"stream {stream_id}")
    if follow:
        from engine.clients.consumer import StreamConsumer
        from engine.clients.tail import follow as print_stream

        with StreamConsumer.for_engine(info["runtime_dir"], stream_id) as consumer:
            ended = print_stream(consumer, "json" if as_json else "text", _write, one_stream=True)
        if ended != "end":
            raise SystemExit(1)


@main.group()
def keys() -> None:
    """API keys for the gateway ([gateway] auth = "keys"): made here, stored hashed in the state
    directory ([engine] state_dir), with their limits and usage (docs/gateway.md)."""


_INSTANCE_OPTION = click.option(
    "--instance", help="Engine instance id whose state directory holds the keys (default: [engine] instance)."
)
_CONFIG_OPTION = click.option(
    "--config", "path", type=click.Path(exists=True, dir_okay=False), help="TOML config file."
)
_JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


def _keystore(path: str | None, instance: str | None):
    from engine.auth.keystore import KeyStore, KeyStoreError, keystore_path
    from engine.rundir import RuntimeDirError
    from engine.statedir import state_dir

    cfg = _load(path)
    try:
        return KeyStore(keystore_path(state_dir(instance or cfg.engine.instance, cfg.engine.state_dir or None)))
    except (KeyStoreError, RuntimeDirError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


def _limit_option(flag: str, what: str):
    from engine.auth.limits import MAX_LIMIT

    return click.option(flag, type=click.IntRange(1, MAX_LIMIT), help=f"{what} (default: no limit).")


@keys.command("create")
@click.argument("name")
@_limit_option("--rpm", "Requests per minute")
@_limit_option("--tpm", "Tokens delivered per minute")
@_limit_option("--max-streams", "Streams open at once")
@_limit_option("--budget-tokens", "Prompt + completion tokens per budget period")
@click.option(
    "--budget-days", type=click.IntRange(1, 366), default=30, show_default=True, help="The budget period, in days."
)
@_CONFIG_OPTION
@_INSTANCE_OPTION
@click.option("--json", "as_json", is_flag=True, help='Print {"key": ..., "name": ...}.')
def keys_create(
    name: str,
    rpm: int | None,
    tpm: int | None,
    max_streams: int | None,
    budget_tokens: int | None,
    budget_days: int,
    path: str | None,
    instance: str | None,
    as_json: bool,
) -> None:
    """Make the API key NAME and print it: the only time it is shown (only its hash is kept)."""
    from engine.auth.keystore import KeyStoreError
    from engine.auth.limits import DAY_S, Limits

    limits = Limits(rpm, tpm, max_streams, budget_tokens, budget_days * DAY_S)
    with _keystore(path, instance) as store:
        try:
            key = store.create(name, limits)
        except KeyStoreError as exc:
            raise click.ClickException(str(exc)) from None
    _emit({"key": key, "name": name}, as_json, key)
    if not as_json:
        click.echo(f"API key {name!r} made; it is shown this once: store it now.", err=True)


@keys.command("list")
@_CONFIG_OPTION
@_INSTANCE_OPTION
@_JSON_OPTION
def keys_list(path: str | None, instance: str | None, as_json: bool) -> None:
    """The keys made here (revoked ones too) and their limits; never the keys themselves."""
    import time

    with _keystore(path, instance) as store:
        infos = [info.as_dict() for info in store.list()]
    lines = [f"{'name':<24} {'prefix':<10} {'created':<20} {'state':<8} limits"]
    for info in infos:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(info["created"]))
        limits = [f"{k}={v}" for k in ("rpm", "tpm", "max_streams", "budget_tokens") if (v := info[k]) is not None]
        state = "revoked" if info["revoked"] else "live"
        lines.append(f"{info['name']:<24} {info['prefix']:<10} {created:<20} {state:<8} {' '.join(limits) or '-'}")
    _emit({"keys": infos}, as_json, "\n".join(lines) if infos else "no keys")


@keys.command("revoke")
@click.argument("name")
@_CONFIG_OPTION
@_INSTANCE_OPTION
@_JSON_OPTION
def keys_revoke(name: str, path: str | None, instance: str | None, as_json: bool) -> None:
    """Revoke the key NAME: refused from the gateway's next request on (its usage stays)."""
    from engine.auth.keystore import KeyStoreError

    with _keystore(path, instance) as store:
        try:
            revoked = store.revoke(name)
        except KeyStoreError as exc:
            raise click.ClickException(str(exc)) from None
    if not revoked:
        raise click.ClickException(f"no live key named {name!r}")
    _emit({"name": name, "revoked": True}, as_json, f"revoked {name}")


@keys.command("usage")
@click.argument("name", required=False)
@click.option("--jwt", "jwt_subjects", is_flag=True, help="JWT subjects' usage instead of the keys'.")
@_CONFIG_OPTION
@_INSTANCE_OPTION
@_JSON_OPTION
def keys_usage(name: str | None, jwt_subjects: bool, path: str | None, instance: str | None, as_json: bool) -> None:
    """Requests, prompt, completion and cached tokens per key (or of NAME), all time; for a key with
    a budget also budget_tokens and budget_used (prompt + completion tokens of its current period)."""
    import time

    from engine.auth.keystore import KeyStoreError

    with _keystore(path, instance) as store:
        try:
            usage = store.usage(name, "jwt" if jwt_subjects else "key")
            for info in [] if jwt_subjects else store.list():
                if info.name in usage and info.limits.budget_tokens is not None and info.revoked is None:
                    since = time.time() - info.limits.budget_period_s
                    usage[info.name]["budget_tokens"] = info.limits.budget_tokens
                    usage[info.name]["budget_used"] = store.budget_used(info.name, since)
        except KeyStoreError as exc:
            raise click.ClickException(str(exc)) from None
    if name is not None and not usage:
        raise click.ClickException(f"no {'JWT subject' if jwt_subjects else 'key'} named {name!r}")
    lines = [f"{'name':<24} {'requests':>10} {'prompt':>12} {'completion':>12} {'cached':>12}  budget"]
    for who, u in usage.items():
        row = f"{u['requests']:>10} {u['prompt_tokens']:>12} {u['completion_tokens']:>12} {u['cached_tokens']:>12}"
        budget = f"{u['budget_used']}/{u['budget_tokens']}" if "budget_tokens" in u else "-"
        lines.append(f"{who:<24} {row}  {budget}")
    _emit(usage, as_json, "\n".join(lines))


@main.group()
def curve() -> None:
    """CURVE key pairs for tcp endpoints (docs/security.md): the engine's server key, client pairs
    and the allow-list of client public keys."""


_KEYS_DIR = click.option("--dir", "keys_dir", help="Keys directory (default: $NEURALPIPE_KEYS_DIR or the state dir).")


def _keys_dir(keys_dir: str | None):
    from engine.keys import KeyError_, KeysDir
    from engine.rundir import RuntimeDirError

    try:
        return KeysDir(keys_dir)
    except (KeyError_, RuntimeDirError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


@curve.command("new")
@click.argument("name")
@click.option("--no-allow", is_flag=True, help="Do not add its public key to the allow-list.")
@_KEYS_DIR
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def curve_new(name: str, no_allow: bool, keys_dir: str | None, as_json: bool) -> None:
    """Make the client key pair NAME (files 0600) and allow its public key."""
    from engine.keys import CLIENTS, KeyError_

    with _keys_dir(keys_dir) as kd:
        try:
            pair = kd.new_client(name, allow=not no_allow)
            server = kd.server()
        except KeyError_ as exc:
            raise click.ClickException(str(exc)) from None
        where = f"{kd.path}/{CLIENTS}/{name}.key_secret"
    info = {"name": name, "public_key": pair.public.decode(), "secret_file": where, "allowed": not no_allow}
    info["server_public_key"] = server.public.decode()
    _emit(info, as_json, f"client {name}: public key {info['public_key']}\nsecret: {where} (for that client only)")


@curve.command("list")
@_KEYS_DIR
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def curve_list(keys_dir: str | None, as_json: bool) -> None:
    """The server public key, the allow-listed client keys and the client pairs made here."""
    with _keys_dir(keys_dir) as kd:
        info = {
            "keys_dir": kd.path,
            "server_public_key": kd.server().public.decode(),
            "allowed": {name: key.decode() for name, key in kd.allowed().items()},
            "clients": {name: key.decode() for name, key in kd.clients().items()},
        }
    lines = [f"keys dir  {info['keys_dir']}", f"server    {info['server_public_key']}"]
    lines += [f"allowed   {key}  {name}" for name, key in info["allowed"].items()]
    lines += [f"client    {key}  {name}" for name, key in info["clients"].items()]
    _emit(info, as_json, "\n".join(lines))


@curve.command("allow")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", help="Name in the allow-list (default: the file's name without .key).")
@_KEYS_DIR
def curve_allow(file: str, name: str | None, keys_dir: str | None) -> None:
    """Allow the client public key in FILE (a ZeroMQ certificate, e.g. made by `curve new` elsewhere)."""
    import os

    import zmq.auth

    from engine.keys import KeyError_

    try:
        public, _ = zmq.auth.load_certificate(file)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{file}: {exc}") from None
    name = name or os.path.basename(file).split(".")[0]
    with _keys_dir(keys_dir) as kd:
        try:
            kd.allow(name, public)
        except KeyError_ as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"allowed {name}: {public.decode()}")


if __name__ == "__main__":
    main()
