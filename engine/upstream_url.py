"""An upstream's ``base_url``: the one rule the configuration and the ingest pool both check it by."""

from __future__ import annotations

from urllib.parse import urlsplit


def normalize_base_url(value: str) -> str:
    """``value`` as the server's root URL (``http(s)://host[:port][/prefix]``), or ValueError saying
    what is wrong. A trailing ``/v1`` is dropped: LM Studio and the OpenAI SDK write the base URL
    with it, the engine adds ``/v1/...`` itself (with both, every request went to ``/v1/v1/...``)."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string (got {type(value).__name__})")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL such as http://localhost:1234 (got {value!r})")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials (user:password@): give the key as api_key")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port outside 0..65535
    except ValueError:
        raise ValueError(f"has a port outside 1..65535 (got {value!r})") from None
    if parts.port == 0 or parts.query or parts.fragment or any(c.isspace() for c in value):
        raise ValueError(f"must be a plain URL with a port in 1..65535, no query, fragment or spaces (got {value!r})")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return f"{parts.scheme}://{parts.netloc}{path}"
