"""The compiled tar walker (optional: without a C compiler the pure-Python walk is used).

Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "flamingo_cli.shards._tarlist",
            ["flamingo_cli/shards/_tarlist.c"],
            optional=True,
        )
    ]
)
