"""Building blocks for policy unit tests: a fleet in memory with a fake clock
and a seeded random generator, so every run makes the same decisions."""

from __future__ import annotations

import random

import orjson

from comox.fleet import BackendState, ModelGroup
from comox.request import GatewayRequest
from comox.settings import BackendSettings, ModelGroupSettings


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Inert:
    """A backend object policies never call (they only read BackendState)."""

    pins_slots = False

    def __init__(self, name: str):
        self.name = name


def make_group(policy_cls, n: int = 3, *, weights=None, clock=None, seed: int = 7, options=None,
               max_concurrency=None, slow_start_s: float = 0.0, backend=Inert) -> ModelGroup:
    clock = clock or Clock()
    states = []
    for i in range(n):
        settings = BackendSettings(name=f"b{i}", weight=(weights[i] if weights else 1),
                                   max_concurrency=max_concurrency, slow_start_s=slow_start_s)
        states.append(BackendState(backend(f"b{i}"), settings, clock=clock))
    group_settings = ModelGroupSettings(name="m", policy="x", policy_options=options or {}, backends=[BackendSettings()])
    group = ModelGroup("m", states, settings=group_settings, clock=clock, rng=random.Random(seed))
    group.policy = policy_cls(group)
    return group


def chat(*contents: str, session: str | None = None, user: str | None = None, max_tokens: int | None = None) -> GatewayRequest:
    roles = ["system", "user", "assistant"]
    messages = [{"role": roles[0] if i == 0 else roles[1 + (i - 1) % 2], "content": c} for i, c in enumerate(contents)]
    body = {"model": "m", "messages": messages}
    if user:
        body["user"] = user
    if max_tokens:
        body["max_tokens"] = max_tokens
    headers = [(b"x-session-id", session.encode())] if session else []
    return GatewayRequest(id="r", endpoint="chat/completions", path="/v1/chat/completions",
                          headers=headers, raw=orjson.dumps(body), json=body)


def pick(group: ModelGroup, request=None, exclude=()) -> BackendState:
    return group.choose(request if request is not None else chat("hi"), exclude)


def names(states) -> list[str]:
    return [s.name for s in states]
