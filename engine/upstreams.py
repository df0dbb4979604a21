"""One OpenAI-compatible upstream server: the one definition that ``[[upstreams]]`` (engine.config),
ingest's ``params.upstreams`` (stages/ingest/params.py) and the ingest pool (its ``UpstreamConfig``)
all use. Light on purpose (pydantic and the URL rule only): an ingest worker imports it at start-up."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from engine.upstream_url import normalize_base_url


def _tuple_of_list(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value  # TOML and JSON give arrays as lists


class UpstreamEntry(BaseModel):
    """One server (docs/upstreams.md); ``UpstreamEntry("a", "http://host:8000", models=[...])``
    or validated from a table. No entries in a configuration: ingest starts its embedded upstream."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    name: str = Field(min_length=1)
    base_url: str
    models: Annotated[tuple[str, ...], BeforeValidator(_tuple_of_list)] = ()  # model names it serves; empty: any
    max_concurrency: int = Field(64, ge=1)  # streams in flight at once; more wait for a slot
    weight: float = Field(1.0, gt=0)  # relative capacity, for least_outstanding and ewma
    api_key: str = ""  # sent as "Authorization: Bearer ..." when set
    requests_per_s: float = Field(0.0, ge=0)  # new requests per second, burst of one second's worth; 0: unlimited
    tokens_per_s: float = Field(0.0, ge=0)  # tokens read per second over all its streams, likewise; 0: unlimited

    def __init__(self, *name_and_url: str, **fields: Any) -> None:
        # name and URL may come positionally, as the pool's callers write them (pydantic calls this
        # for a table too, with keywords only: a missing key stays pydantic's "missing" error)
        if len(name_and_url) > 2:
            raise TypeError(f"at most 2 positional arguments (name, base_url), got {len(name_and_url)}")
        super().__init__(**dict(zip(("name", "base_url"), name_and_url, strict=False)), **fields)

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return normalize_base_url(value)
