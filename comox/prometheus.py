"""Reading Prometheus text exposition, for backends whose engines publish
their load at ``/metrics`` (llama.cpp, vLLM, TGI, SGLang)."""

from __future__ import annotations

__all__ = ["parse_prometheus"]


def parse_prometheus(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Sum of each named metric over its label sets, from Prometheus text.
    Metrics absent from ``text`` are absent from the result."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        for name in names:
            if line.startswith(name) and len(line) > len(name) and line[len(name)] in "{ ":
                try:
                    value = float(line.rsplit(None, 1)[-1] if line[len(name)] == " " else line.rsplit("}", 1)[1].split()[0])
                except (ValueError, IndexError):
                    continue
                found[name] = found.get(name, 0.0) + value
    return found
