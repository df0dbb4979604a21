"""The HTTP URLs a configuration holds, checked by one rule: an upstream's ``base_url`` (the
configuration and the ingest pool both check it here) and a webhook's URL (engine/notify.py)."""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit


def split_http_url(value: str, credentials: str) -> SplitResult:
    """The parts of ``value`` if it is an ``http(s)://`` URL with a host, a port in 1..65535, no
    credentials (``credentials`` says where they go instead), no fragment and no spaces or control
    characters; else ValueError saying what is wrong."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string (got {type(value).__name__})")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL such as http://localhost:1234 (got {value[:80]!r})")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"must not carry credentials (user:password@): {credentials}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"has a port outside 1..65535 (got {value[:80]!r})") from None
    if port == 0 or parts.fragment or any(c.isspace() or ord(c) < 32 for c in value):
        raise ValueError(f"must be a plain URL: a port in 1..65535, no fragment, no spaces (got {value[:80]!r})")
    return parts


def normalize_base_url(value: str) -> str:
    """``value`` as the server's root URL (``http(s)://host[:port][/prefix]``), or ValueError saying
    what is wrong. A trailing ``/v1`` is dropped: LM Studio and the OpenAI SDK write the base URL
    with it, the engine adds ``/v1/...`` itself (with both, every request went to ``/v1/v1/...``)."""
    parts = split_http_url(value, "give the key as api_key")
    if parts.query:
        raise ValueError(f"must be a plain URL: no query (got {value[:80]!r})")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return f"{parts.scheme}://{parts.netloc}{path}"
