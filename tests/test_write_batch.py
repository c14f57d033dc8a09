"""``comox/write_batch.py``: writers held in one event loop turn are flushed
once, in order, at its end; one writer's failure is logged, not the others'."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from comox.write_batch import WriteBatch, batch_for

uvloop = pytest.importorskip("uvloop")


class Writer:
    def __init__(self, name: str, flushed: list[str], fail: bool = False):
        self.name, self.flushed, self.fail = name, flushed, fail

    def flush(self) -> None:
        self.flushed.append(self.name)
        if self.fail:
            raise OSError("broken")


@pytest.mark.parametrize("factory", [None, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_writers_held_in_a_turn_are_flushed_once_in_order_at_its_end(factory):
    async def main():
        batch = batch_for(asyncio.get_running_loop())
        flushed: list[str] = []
        a, b = Writer("a", flushed), Writer("b", flushed)
        batch.hold(a)
        batch.hold(b)
        batch.hold(a)  # held twice: flushed twice (a second flush finds nothing held)
        assert flushed == []
        await asyncio.sleep(0)
        assert flushed == ["a", "b", "a"]
        await asyncio.sleep(0)
        assert flushed == ["a", "b", "a"]  # nothing more without a new hold
        batch.hold(b)
        await asyncio.sleep(0)
        return flushed

    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(main()) == ["a", "b", "a", "b"]


def test_one_writers_failure_is_logged_and_the_others_are_flushed(caplog):
    async def main():
        batch = WriteBatch()
        batch.loop = lambda: asyncio.get_running_loop()
        flushed: list[str] = []
        batch.hold(Writer("broken", flushed, fail=True))
        batch.hold(Writer("next", flushed))
        await asyncio.sleep(0)
        return flushed

    with caplog.at_level(logging.ERROR, logger="comox"):
        assert asyncio.run(main()) == ["broken", "next"]
    assert "could not write to a connection" in caplog.text and "OSError: broken" in caplog.text


def test_each_loop_has_its_own_batch_which_does_not_keep_it_alive():
    async def mine():
        loop = asyncio.get_running_loop()
        assert batch_for(loop) is batch_for(loop)
        return batch_for(loop)

    first = asyncio.run(mine())
    gc.collect()
    assert first.loop() is None  # the loop is gone, with its entry
    assert asyncio.run(mine()) is not first
