"""Stage params: the base of every stage's params model, and parsing with the key named.

Each stage declares its params as a subclass of :class:`StageParams` in a light module
(``stages/<stage>/params.py``: pydantic and the engine, no aiohttp, wgpu or uvloop) and names it in
its class by reference (``Params = ModelRef("stages.compute.params:ComputeParams")``, engine/validated.py).
``engine.config.check_stage_params`` validates every worker's params with it when the configuration is
loaded to run, before anything starts, and the supervisor hands each worker the result
(:func:`validated`: plain values, so a worker imports neither pydantic nor the model); the stage's
``start`` reads them through ``Stage.parse_params``, which validates a dict it is given directly
(tests, tools) with the same model, so no stage parses dicts by hand.
Closed (an unknown key is an error, so a typo never silently means "default"), strict (TOML is
typed) and frozen, like the engine's own config models.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from engine.validated import ValidatedParams


class StageParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


M = TypeVar("M", bound=BaseModel)
# the shortest period a timer of the configuration may have (heartbeats, health ticks): a timer
# firing every microsecond floods what it feeds rather than helping anyone
MIN_PERIOD_S = 0.01


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


def validated(model: BaseModel) -> ValidatedParams:
    """A validated model's values for a worker: sub-models (also in lists) as ValidatedParams, the rest as is."""
    return ValidatedParams({name: _plain(getattr(model, name)) for name in type(model).model_fields})


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return validated(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value
