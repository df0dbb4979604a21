"""Stage params: the base of every stage's params model, and parsing with the key named.

Each stage declares its params as a subclass of :class:`StageParams` in a light module
(``stages/<stage>/params.py``: pydantic and the engine, no aiohttp, wgpu or uvloop) and names it in
its class (``Params = ComputeParams``). ``engine.config.check_stage_params`` validates every
worker's params with it when the configuration is loaded to run, before anything starts; the
stage's ``start`` reads the same model (``Stage.parse_params``), so no stage parses dicts by hand.
Closed (an unknown key is an error, so a typo never silently means "default"), strict (TOML is
typed) and frozen, like the engine's own config models.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError


class StageParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


M = TypeVar("M", bound=BaseModel)


def _within(low: float, high: float):
    def check(value: float) -> float:
        if not low <= value <= high:
            raise ValueError(f"must be in [{low!r}, {high!r}], got {value!r}")
        return value

    return AfterValidator(check)


def IntIn(low: int, high: int) -> Any:
    """An integer in ``[low, high]`` (the message names both bounds)."""
    return Annotated[int, _within(low, high)]


def FloatIn(low: float, high: float) -> Any:
    """A finite number in ``[low, high]``."""
    return Annotated[float, _within(low, high)]


def parse(model: type[M], params: Mapping[str, Any], prefix: str = "params") -> M:
    """``params`` as ``model``; ValueError with one line per problem, each naming its key
    (``params.batch_rows: must be in [1, 65536], got 0``)."""
    from engine.config import describe_error  # the wording config errors use

    try:
        return model.model_validate(dict(params))
    except ValidationError as exc:
        raise ValueError("\n".join(describe_error(error, model, prefix) for error in exc.errors())) from None
