"""The clients of a running engine (engine/clients/) and the contracts they speak (engine/protocol/)
import with only pyzmq, numpy and orjson: a consumer program need not have the engine's heavy
dependencies. import-linter checks the static imports (.importlinter); this runs the imports in a
fresh interpreter where the heavy packages cannot be imported at all."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("pydantic", "aiohttp", "wgpu", "uvloop", "prometheus_client", "click", "jwt")
BLOCKER = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
"""


@pytest.mark.timeout(60)
def test_every_client_and_contract_imports_without_the_heavy_packages():
    modules = subprocess.run(
        [sys.executable, "-c", "import pkgutil, engine.clients as c, engine.protocol as p; "
         "print(' '.join(m.name for pkg in (c, p) for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + '.')))"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert "engine.clients.consumer" in modules and "engine.protocol.wire" in modules
    code = (
        BLOCKER
        + "".join(f"\nimport {m}" for m in modules)
        + "\nprint(sorted(m for m in sys.modules if m.split('.')[0] in "
        + repr(HEAVY)
        + "))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
