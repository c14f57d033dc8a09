"""comox.deadlines: timeouts noted in a queue, given a timer only when they
outlive PROMOTE_AFTER_S, firing at their own deadline all the same."""

import asyncio

from comox.deadlines import PROMOTE_AFTER_S, Deadlines, deadlines_for


def run(coro):
    return asyncio.run(coro)


def test_a_deadline_fires_at_its_time_not_at_the_check():
    async def main():
        loop = asyncio.get_running_loop()
        fired = loop.create_future()
        started = loop.time()
        Deadlines().add(0.15, lambda: fired.set_result(loop.time()))
        at = await asyncio.wait_for(fired, 2)
        return at - started

    waited = run(main())
    assert 0.15 <= waited < 0.15 + 0.1


def test_a_short_deadline_gets_its_timer_at_once():
    async def main():
        loop = asyncio.get_running_loop()
        fired = loop.create_future()
        deadlines = Deadlines()
        deadline = deadlines.add(PROMOTE_AFTER_S / 4, lambda: fired.set_result(True))
        assert deadline.handle is not None and not deadlines.open
        return await asyncio.wait_for(fired, 1)

    assert run(main()) is True


def test_deadlines_cancelled_early_never_get_a_timer_and_leave_the_queue():
    async def main():
        deadlines = Deadlines()
        calls = []
        pending = [deadlines.add(5, calls.append, i) for i in range(1000)]
        for deadline in pending:
            deadline.cancel()
        await asyncio.sleep(PROMOTE_AFTER_S * 3)
        return calls, pending, deadlines

    calls, pending, deadlines = run(main())
    assert calls == []
    assert all(deadline.handle is None for deadline in pending)
    assert not deadlines.open and not deadlines.armed


def test_a_deadline_cancelled_after_its_timer_was_set_does_not_fire():
    async def main():
        deadlines = Deadlines()
        calls = []
        deadline = deadlines.add(0.2, calls.append, "late")
        await asyncio.sleep(PROMOTE_AFTER_S * 3)
        assert deadline.handle is not None  # promoted: it outlived the check
        deadline.cancel()
        await asyncio.sleep(0.3)
        return calls

    assert run(main()) == []


def test_only_the_outstanding_are_promoted_and_each_fires_once():
    async def main():
        deadlines = Deadlines()
        calls = []
        kept = deadlines.add(0.1, calls.append, "kept")
        for i in range(50):
            deadlines.add(0.1, calls.append, i).cancel()
        await asyncio.sleep(0.3)
        return calls, kept

    calls, kept = run(main())
    assert calls == ["kept"]
    assert kept.finished


def test_each_loop_has_its_own():
    async def mine():
        loop = asyncio.get_running_loop()
        return deadlines_for(loop), deadlines_for(loop)

    first, again = run(mine())
    other, _ = run(mine())
    assert first is again
    assert other is not first
