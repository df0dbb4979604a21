"""The embedding table and probe vectors of the probes kernel.

``table = "hashed"`` (default): a fixed random feature table of ``rows`` x ``dim`` (a token's
row is its id modulo ``rows``), the same for a given ``seed`` in every process. A path to a GGUF
file: the model's own ``token_embd.weight`` (F32 or F16), read with the ``gguf`` package.
Probes: ``vectors`` (a list of K lists of ``dim`` numbers) or K random directions from ``seed``;
either way normalised to unit length.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def probe_table(params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(table f32[rows, dim], probes f32[K, dim] unit vectors) from the ``probes`` params."""
    seed = int(params.get("seed", 0))
    source = params.get("table", "hashed")
    if source == "hashed":
        rng = np.random.default_rng(seed)
        table = rng.standard_normal((int(params.get("rows", 4096)), int(params.get("dim", 64)))).astype(np.float32)
    else:
        table = _gguf_embeddings(str(source))
    vectors = params.get("vectors")
    if vectors is not None:
        probes = np.asarray(vectors, dtype=np.float32)
        if probes.ndim != 2 or probes.shape[1] != table.shape[1]:
            raise ValueError(f"probes.vectors must be K lists of {table.shape[1]} numbers (got shape {probes.shape})")
    else:
        count = int(params.get("count", 4))
        probes = np.random.default_rng(seed + 1).standard_normal((count, table.shape[1])).astype(np.float32)
    norms = np.linalg.norm(probes, axis=1, keepdims=True)
    if not norms.all():
        raise ValueError("probes.vectors: a probe vector is all zeros")
    return table, (probes / norms).astype(np.float32)


def _gguf_embeddings(path: str) -> np.ndarray:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ValueError("probes.table names a GGUF file, but the gguf package is not installed") from None
    reader = GGUFReader(path)
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            data = np.asarray(tensor.data)
            if data.dtype not in (np.float32, np.float16):
                raise ValueError(f"{path}: token_embd.weight is {tensor.tensor_type.name}; only F32 and F16 are read")
            return data.astype(np.float32).reshape(-1, data.shape[-1])
    raise ValueError(f"{path}: no token_embd.weight tensor")
