"""The one compiled module: the compute stage's per-record kernel (stages/compute/compiled.c).

Everything else is in pyproject.toml. ``optional``: where it cannot be built (no C compiler),
the install goes on and compute runs its numpy path (docs/compute.md, "The compiled record").
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "stages.compute._compiled",
            ["stages/compute/compiled.c"],
            extra_compile_args=["-O2", "-ffp-contract=off"],  # no fused multiply-adds: numpy's rounding
            optional=True,
        )
    ]
)
