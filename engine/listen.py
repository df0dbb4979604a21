"""An HTTP listen address (``host:port``) and the rule that keeps an unauthenticated gateway on
this host: one definition that the configuration (engine/config.py, at load) and the gateway's
params (stages/gateway/params.py) both check by, and the gateway binds by. Stdlib only."""

from __future__ import annotations

import ipaddress

AUTH_MODES = ("off", "keys", "jwt")


def parse_listen(value: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"``, ``"[::1]:8080"``, ``"localhost:0"`` as (host, port); port 0: any free
    port. ValueError saying what is wrong."""
    if not isinstance(value, str) or len(value) > 300 or any(c.isspace() for c in value):
        raise ValueError(f"must be host:port, e.g. 127.0.0.1:8080 (got {str(value)[:80]!r})")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"must be host:port with a port in 0..65535, e.g. 127.0.0.1:8080 (got {value!r})")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"an IPv6 host is written in brackets, e.g. [::1]:8080 (got {value!r})")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address (got {value!r})") from None
    elif ":" in host:
        raise ValueError(f"write an IPv6 host in brackets, e.g. [::1]:8080 (got {value!r})")
    return host, int(port)


def is_loopback_host(host: str) -> bool:
    """Only this host can reach ``host`` (127.0.0.0/8, ::1, localhost); 0.0.0.0, ``*`` and names
    other than localhost can be reached from elsewhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposed_without_auth(listen: str, auth: str) -> str:
    """Why the gateway may not listen on ``listen`` with ``auth`` ("" when it may): without auth,
    anyone who reaches the address could spend the upstreams' tokens."""
    try:
        host, _ = parse_listen(listen)
    except ValueError:
        return ""  # the address's own error is reported where it is parsed
    if auth == "off" and not is_loopback_host(host):
        return (
            f'{listen} is reachable from other hosts, and with auth = "off" anyone there could use'
            ' the gateway: set auth = "keys" or "jwt" (docs/gateway.md, "Auth and limits") or listen on 127.0.0.1'
        )
    return ""
