"""The optional compiled core: built when a C compiler is there, skipped when not."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "dispatcher._speedups",
            ["dispatcher/_speedups.c"],
            # Floating point exactly as Python's: no fused multiply-add.
            extra_compile_args=["-O2", "-ffp-contract=off"],
            optional=True,
        )
    ]
)
