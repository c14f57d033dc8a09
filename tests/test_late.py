"""comox.late: entries promoted only once they outlive after_s, finished ones
dropped unpromoted, one timer per queue re-armed while any is open."""

import asyncio

from comox.late import LateQueue


class Item:
    def __init__(self, started):
        self.started = started
        self.finished = False


class Recording(LateQueue):
    def __init__(self, after_s):
        super().__init__(after_s)
        self.promoted = []

    def promote(self, entry, loop):
        self.promoted.append(entry)


def test_only_entries_still_open_after_after_s_are_promoted_each_once():
    async def main():
        loop = asyncio.get_running_loop()
        queue = Recording(0.05)
        short, long_ = Item(loop.time()), Item(loop.time())
        queue.queue(short, loop)
        queue.queue(long_, loop)
        assert queue.armed
        short.finished = True
        await asyncio.sleep(0.2)
        return queue, long_

    queue, long_ = asyncio.run(main())
    assert queue.promoted == [long_]
    assert not queue.open and not queue.armed


def test_a_later_entry_waits_for_its_own_time():
    async def main():
        loop = asyncio.get_running_loop()
        queue = Recording(0.1)
        first = Item(loop.time())
        queue.queue(first, loop)
        await asyncio.sleep(0.06)
        second = Item(loop.time())
        queue.queue(second, loop)
        await asyncio.sleep(0.07)  # first is due, second not yet
        seen = list(queue.promoted)
        await asyncio.sleep(0.15)
        return seen, queue.promoted, first, second

    seen, promoted, first, second = asyncio.run(main())
    assert seen == [first]
    assert promoted == [first, second]


def test_per_loop_gives_each_loop_its_own_value_and_forgets_a_closed_loop():
    import gc
    import weakref

    from comox.late import per_loop

    made = []

    def factory():
        made.append(object())
        return made[-1]

    for_loop = per_loop(factory)
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        a = for_loop(first)
        assert for_loop(first) is a  # the last loop's, without a lookup
        b = for_loop(second)
        assert b is not a and for_loop(second) is b
        assert for_loop(first) is a  # and back: the table's, not a new one
        assert len(made) == 2
    finally:
        first.close()
        second.close()
    gone = weakref.ref(first)
    del first
    gc.collect()
    assert gone() is None  # neither the table nor the last-asked cache keeps a loop alive
