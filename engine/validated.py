"""Stage params as the supervisor validated them, carried to a worker without pydantic.

Validating params takes pydantic (~60 ms of imports) and the stage's models (~20 ms more): most of a
compute, cache or broadcast worker's start-up beyond the runtime's own. The supervisor has already
validated every worker's params at config load (``engine.config.check_stage_params``), so it hands each
worker the result as :class:`ValidatedParams` (read-only attributes, like the model), and a stage names
its model by reference (:class:`ModelRef`), imported only where something validates a dict with it.
Stdlib only: a worker imports this at start-up.
"""

from __future__ import annotations

import importlib
from typing import Any


class ValidatedParams:
    """A validated params model's values, read like the model (``p.batch_rows``, ``p.probes.count``,
    ``p.model_dump()``), read-only; sub-models are ValidatedParams too, dict fields stay dicts.
    Made by ``engine.params.validated`` from a model instance, never from unchecked input."""

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, Any]) -> None:
        object.__setattr__(self, "_values", values)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"params are read-only ({key})")

    def __reduce__(self) -> tuple[Any, ...]:
        return (ValidatedParams, (self._values,))  # __slots__ and no __dict__: pickle through __init__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ValidatedParams) and self._values == other._values

    __hash__ = None  # type: ignore[assignment]  # dict and list fields are mutable

    def __repr__(self) -> str:
        return f"ValidatedParams({self._values!r})"

    def model_dump(self) -> dict[str, Any]:
        """The values as plain dicts and lists, as the model's ``model_dump()`` gives them."""
        return {key: _dumped(value) for key, value in self._values.items()}


def _dumped(value: Any) -> Any:
    if isinstance(value, ValidatedParams):
        return value.model_dump()
    if isinstance(value, list):
        return [_dumped(item) for item in value]
    return value


class ModelRef:
    """A stage's ``Params``: its model named ``"package.module:Class"``, imported on first access, so
    a worker that is handed ValidatedParams never imports pydantic or the model."""

    def __init__(self, ref: str) -> None:
        self.ref = ref

    def __get__(self, instance: object, owner: type) -> type:
        module, _, name = self.ref.partition(":")
        return getattr(importlib.import_module(module), name)
