"""The compiled modules: the compute stage's per-record kernel (stages/compute/compiled.c),
ingest's usual read (stages/ingest/chunk.c) and its record fill (stages/ingest/rows.c).

Everything else is in pyproject.toml. ``optional``: where they cannot be built (no C compiler),
the install goes on and the stages run their Python paths (docs/compute.md, "The compiled record";
docs/ingest.md, "The usual read and the record fill in C").
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "stages.compute._compiled",
            ["stages/compute/compiled.c"],
            extra_compile_args=["-O2", "-ffp-contract=off"],  # no fused multiply-adds: numpy's rounding
            optional=True,
        ),
        Extension("stages.ingest._chunk", ["stages/ingest/chunk.c"], extra_compile_args=["-O2"], optional=True),
        Extension("stages.ingest._rows", ["stages/ingest/rows.c"], extra_compile_args=["-O2"], optional=True),
    ]
)
