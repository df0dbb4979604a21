"""ZeroMQ CURVE keys: the engine's server key pair, clients' key pairs and the allow-list of the
client public keys a CURVE endpoint accepts (docs/security.md).

    <keys dir>/                   0700: $NEURALPIPE_KEYS_DIR, else $XDG_STATE_HOME/neuralpipe/keys,
                                  else ~/.local/state/neuralpipe/keys (persistent: clients pin the
                                  server's public key, so it must outlive a reboot)
      server.key, server.key_secret     the engine's pair, made on first use
      allowed/<name>.key                client public keys a CURVE endpoint accepts
      clients/<name>.key, .key_secret   pairs made by ``neuralpipe curve new`` (give them to the client)

Files are ZeroMQ's certificate format (``zmq.auth.load_certificate`` reads them), written 0600
without following symlinks. A client proves it holds a listed key; anyone else gets nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.auth

from engine.rundir import open_private_dir, open_private_file

KEYS_DIR_ENV = "NEURALPIPE_KEYS_DIR"
SERVER = "server"
ALLOWED = "allowed"
CLIENTS = "clients"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_Z85_KEY = re.compile(rb"[0-9a-zA-Z.:+=^!/*?&<>()\[\]{}@%$#-]{40}")


class KeyError_(ValueError):
    """A key cannot be made, read or used; the text says which and why (one line)."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # z85, 40 characters
    secret: bytes


@dataclass(frozen=True)
class ClientKeys:
    """What a client needs to connect to a CURVE endpoint: the server's public key and its own pair."""

    server_public: bytes
    public: bytes
    secret: bytes

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client (before it connects)."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def default_keys_dir(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    if env.get(KEYS_DIR_ENV):
        return env[KEYS_DIR_ENV]
    state = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "neuralpipe", "keys")


# -- tcp endpoints beyond this host ---------------------------------------------------------------


def is_loopback_tcp(url: str) -> bool:
    """True for ``tcp://`` endpoints only this host can reach (127.0.0.0/8, localhost, [::1])."""
    host = url.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name, a host name: reachable beyond this host


def exposed_without_curve(url: str, curve: bool) -> str:
    """Why ``url`` may not be bound without CURVE ("" when it may): a tcp endpoint beyond loopback
    would hand every stream to anyone who can reach this host."""
    if url.startswith("tcp://") and not curve and not is_loopback_tcp(url):
        return (
            f"{url} is reachable from other hosts, and without CURVE anyone there could read it:"
            " set curve = true in this worker's params (docs/security.md) or bind 127.0.0.1"
        )
    return ""


# -- files ----------------------------------------------------------------------------------------


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise KeyError_(f"key name must be 1-64 characters of [A-Za-z0-9_-] (got {name!r})")
    return name


def _certificate(public: bytes, secret: bytes | None) -> bytes:
    lines = ["#   ZeroMQ CURVE " + ("**Secret** Certificate: give it to no one" if secret else "Public Certificate")]
    lines += ["metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return ("\n".join(lines) + "\n").encode()


def _write_new(dir_fd: int, name: str, data: bytes) -> None:
    """Write ``name`` (0600, no symlink followed) whole or not at all: a temporary file linked into
    place, so a reader never sees half a key; refused if it exists (keys are never overwritten)."""
    tmp = f".{name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    with os.fdopen(open_private_file(dir_fd, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
        f.write(data)
    try:
        os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError:
        raise KeyError_(f"{name} exists already; remove it first to replace it") from None
    finally:
        os.unlink(tmp, dir_fd=dir_fd)


def _read(dir_fd: int, name: str) -> tuple[bytes, bytes | None]:
    """(public, secret or None) of the certificate ``name`` in ``dir_fd``."""
    fd = open_private_file(dir_fd, name, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        text = f.read(64 << 10)
    found: dict[bytes, bytes] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(b"=")
        if sep and key.strip() in (b"public-key", b"secret-key"):
            found[key.strip()] = value.strip(b" \t'\"")
    public, secret = found.get(b"public-key", b""), found.get(b"secret-key")
    if not _Z85_KEY.fullmatch(public) or (secret is not None and not _Z85_KEY.fullmatch(secret)):
        raise KeyError_(f"{name}: not a ZeroMQ CURVE certificate (public-key/secret-key of 40 z85 characters)")
    return public, secret


class KeysDir:
    """The keys directory, opened (created 0700) without following symlinks and checked ours."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or default_keys_dir()
        self.fd = open_private_dir(self.path)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> KeysDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sub(self, name: str) -> int:
        return open_private_dir(name, dir_fd=self.fd)

    def server(self) -> KeyPair:
        """The engine's server pair, made (0600) on first use."""
        with contextlib.suppress(FileNotFoundError):
            return self._server_pair()
        public, secret = zmq.curve_keypair()
        with contextlib.suppress(KeyError_):  # another process made it first: use that one
            _write_new(self.fd, SERVER + ".key_secret", _certificate(public, secret))
        pair = self._server_pair()
        with contextlib.suppress(KeyError_):
            _write_new(self.fd, SERVER + ".key", _certificate(pair.public, None))
        return pair

    def _server_pair(self) -> KeyPair:
        public, secret = _read(self.fd, SERVER + ".key_secret")
        if secret is None:
            raise KeyError_(f"{self.path}/{SERVER}.key_secret holds no secret key")
        return KeyPair(public, secret)

    def new_client(self, name: str, allow: bool = True) -> KeyPair:
        """A new client pair in clients/ (and its public key in allowed/ when ``allow``)."""
        _check_name(name)
        public, secret = zmq.curve_keypair()
        fd = self._sub(CLIENTS)
        try:
            _write_new(fd, name + ".key_secret", _certificate(public, secret))
            _write_new(fd, name + ".key", _certificate(public, None))
        finally:
            os.close(fd)
        if allow:
            self.allow(name, public)
        return KeyPair(public, secret)

    def allow(self, name: str, public: bytes) -> None:
        """Add a client public key to the allow-list as ``name``."""
        _check_name(name)
        if not _Z85_KEY.fullmatch(public):
            raise KeyError_(f"not a CURVE public key (40 z85 characters): {public[:60]!r}")
        fd = self._sub(ALLOWED)
        try:
            _write_new(fd, name + ".key", _certificate(public, None))
        finally:
            os.close(fd)

    def allowed(self) -> dict[str, bytes]:
        """name -> public key of every client the allow-list accepts."""
        return self._certificates(ALLOWED)

    def clients(self) -> dict[str, bytes]:
        """name -> public key of every client pair made here."""
        return self._certificates(CLIENTS, "_secret")

    def client_keys(self, name: str) -> ClientKeys:
        """The keys client ``name`` (made by :meth:`new_client`) connects with."""
        fd = self._sub(CLIENTS)
        try:
            public, secret = _read(fd, _check_name(name) + ".key_secret")
        except FileNotFoundError:
            raise KeyError_(f"no client key pair {name!r} in {self.path}/{CLIENTS}") from None
        finally:
            os.close(fd)
        assert secret is not None
        return ClientKeys(self.server().public, public, secret)

    def _certificates(self, sub: str, suffix: str = "") -> dict[str, bytes]:
        fd = self._sub(sub)
        found = {}
        try:
            for entry in sorted(os.listdir(fd)):
                if not entry.endswith(".key" + suffix):
                    continue
                with contextlib.suppress(KeyError_, OSError):
                    st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode):
                        found[entry[: -len(".key" + suffix)]] = _read(fd, entry)[0]
        finally:
            os.close(fd)
        return found


def load_client_keys(name: str, keys_dir: str | None = None) -> ClientKeys:
    """The keys client ``name`` connects with (for ``StreamConsumer(curve=...)``)."""
    with KeysDir(keys_dir) as keys:
        return keys.client_keys(name)


# -- the server side ------------------------------------------------------------------------------


class _AllowList:
    """The ZAP callback: a client key is accepted while its public key is in allowed/. Re-read when
    the directory changes, so ``neuralpipe curve allow`` (or removing a file) takes effect for the next
    connection without a restart."""

    def __init__(self, keys: KeysDir) -> None:
        self.keys = keys
        self.lock = threading.Lock()
        self.stamp: tuple[int, float] | None = None
        self.accepted: frozenset[bytes] = frozenset()

    def callback(self, domain: str, key: bytes) -> bool:
        with self.lock:
            fd = self.keys._sub(ALLOWED)
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            stamp = (st.st_ino, st.st_mtime_ns)
            if stamp != self.stamp:
                self.accepted, self.stamp = frozenset(self.keys.allowed().values()), stamp
            return key in self.accepted


class CurveServer:
    """CURVE for a worker's tcp sockets: the server pair, and a ZAP authenticator (a thread in the
    worker's context) that accepts only the allow-listed client keys."""

    def __init__(self, ctx: zmq.Context, keys_dir: str = "") -> None:
        self.keys = KeysDir(keys_dir or None)
        self.pair = self.keys.server()
        # here: it imports asyncio (~20 ms), which a worker without curve would pay at every start
        from zmq.auth.thread import ThreadAuthenticator

        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.auth.configure_curve_callback("*", credentials_provider=_AllowList(self.keys))

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server (before it binds)."""
        sock.curve_secretkey = self.pair.secret
        sock.curve_publickey = self.pair.public
        sock.curve_server = True

    def stop(self) -> None:
        self.auth.stop()
        self.keys.close()

    def describe(self) -> dict[str, Any]:
        return {"server_public_key": self.pair.public.decode(), "keys_dir": self.keys.path}
