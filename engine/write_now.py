"""Run an aiohttp ``StreamResponse.write`` to its end at once, without a task per write.

The gateway writes a stream's tokens and the embedded upstream its ticks this way: a task per
write costs more than the write. aiohttp's write hands the framed bytes to the transport first and
only then may wait to drain a full buffer (the callers check the buffer first, so it seldom does).
Such a wait is dropped, the bytes being out already, as a task takes a future it is handed: the
future's blocking mark is cleared (asyncio's Task does the same). Left set, the next await of that
future, aiohttp's one drain waiter per connection, raised "await wasn't used with future": the
gateway cut a stream read slower than it came with an internal error.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any


def write_now(write: Coroutine[Any, Any, None]) -> None:
    """Step ``write`` (a ``response.write(data)`` coroutine) once; drop the drain it may wait on."""
    try:
        waited = write.send(None)
    except StopIteration:
        return
    write.close()
    if waited is not None:  # a future (a bare yield, as asyncio.sleep(0)'s, marks nothing)
        waited._asyncio_future_blocking = False
