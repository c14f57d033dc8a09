"""Comox's build: pyproject.toml says what Comox is; this compiles the modules
in :data:`COMPILED` with mypyc (C extensions beside the same Python source), for
the hot path. ``COMOX_COMPILE=0`` installs pure Python; ``auto`` (the default)
falls back to it when nothing can compile (no C compiler); ``1`` fails instead.
Which modules are compiled and why: docs/deployment.md, "Compiled modules".
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

# Plain computation on plain classes, run on every request; no pydantic model
# (mypyc cannot compile one) and no pluggy hook marker (a compiled function
# cannot carry one): those stay in each package's other, Python modules.
COMPILED = [
    "comox/parse.py",
    "comox/usage.py",
    "plugins/comox_keys/credential.py",
    "plugins/comox_limits/admission.py",
    "plugins/comox_limits/local.py",
    "plugins/comox_metrics/series.py",
]


# The setup.py commands that build; the others (egg_info, dist_info: the metadata
# pip asks for first) need no extension, and mypyc's type check takes half a minute.
BUILDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop"}


def ext_modules() -> list:
    mode = os.environ.get("COMOX_COMPILE", "auto")
    if mode == "0" or not BUILDS.intersection(sys.argv[1:]):
        return []
    try:
        from mypyc.build import mypycify

        # mypyc.ini: the options to compile with (an isolated build has none of
        # Comox's dependencies, so not pyproject's strict check, which CI runs).
        return mypycify(["--config-file", "mypyc.ini", *COMPILED], group_name="comox_native", opt_level="3")
    except (Exception, SystemExit) as exc:  # (mypyc exits on a type error)
        if mode == "1":
            raise
        print(f"comox: not compiled with mypyc ({type(exc).__name__}: {exc}); installing pure Python", file=sys.stderr)
        return []


setup(ext_modules=ext_modules())
