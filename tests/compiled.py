"""What setup.py compiles with mypyc, as the tests see it: the modules it
names, and any compiled module older than its source (a stale build)."""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent


def compiled_sources() -> list[str]:
    """setup.py's ``COMPILED``: the source paths it compiles."""
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "COMPILED" for t in node.targets):
            return [ast.literal_eval(item) for item in node.value.elts]
    raise AssertionError("setup.py names no COMPILED")


def module_of(source: str) -> str:
    """``comox/usage.py`` -> ``comox.usage``; ``plugins/comox_limits/local.py`` -> ``comox_limits.local``."""
    parts = Path(source).with_suffix("").parts
    return ".".join(parts[1:] if parts[0] == "plugins" else parts)


def stale() -> list[str]:
    """Compiled modules in the tree built before their source's last change:
    the tests would run the old code."""
    found = []
    for top in ("comox", "plugins"):
        for built in (ROOT / top).rglob("*.so"):
            source = built.with_name(built.name.split(".")[0] + ".py")
            if source.exists() and source.stat().st_mtime > built.stat().st_mtime:
                found.append(str(source.relative_to(ROOT)))
    return sorted(found)
