import asyncio
import types

import pytest

from comox.disconnects import SERVER_CYCLE, DisconnectWatch, running_loop, watch_current, watch_for


def run(coro):
    return asyncio.run(coro)


def test_short_streams_get_no_watcher_and_share_one_timer():
    async def go():
        loop = asyncio.get_running_loop()
        watch = DisconnectWatch(after_s=0.05)
        never = loop.create_future()
        streams = [watch.add(asyncio.current_task(), lambda: never) for _ in range(100)]
        assert watch.armed and len(watch.open) == 100
        for stream in streams:
            stream.close()  # all done well within after_s
        await asyncio.sleep(0.08)
        assert all(stream.watcher is None for stream in streams)
        assert not watch.open and not watch.armed  # nothing left: the timer is not re-armed
        never.cancel()

    run(go())


def test_a_client_leaving_a_long_stream_cancels_its_task():
    async def go():
        loop = asyncio.get_running_loop()
        watch = DisconnectWatch(after_s=0.02)
        left = asyncio.Event()

        async def receive():
            await left.wait()
            return {"type": "http.disconnect"}

        async def stream_forever():
            watched = watch.add(asyncio.current_task(), receive)
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                return "cancelled", watched
            finally:
                watched.close()
            return "finished", watched

        task = loop.create_task(stream_forever())
        await asyncio.sleep(0.05)
        left.set()  # the client goes away after the watcher started
        outcome, watched = await asyncio.wait_for(task, 2)
        assert outcome == "cancelled" and watched.disconnected and watched.watcher is not None

    run(go())


def test_each_stream_is_watched_after_its_own_delay():
    async def go():
        loop = asyncio.get_running_loop()
        watch = DisconnectWatch(after_s=0.5)  # wide margins: a loaded CI box may wake us late
        never = loop.create_future()
        first = watch.add(asyncio.current_task(), lambda: never)
        await asyncio.sleep(0.25)
        second = watch.add(asyncio.current_task(), lambda: never)
        await asyncio.sleep(0.35)  # first is ~600 ms old, second ~350 ms
        assert first.watcher is not None and second.watcher is None
        await asyncio.sleep(0.4)
        assert second.watcher is not None and not watch.open
        for stream in (first, second):
            stream.close()
        await asyncio.sleep(0)
        assert first.watcher.cancelled() and second.watcher.cancelled()
        never.cancel()

    run(go())


def test_one_watch_per_event_loop():
    async def mine():
        return watch_for(asyncio.get_running_loop())

    async def same_loop_twice():
        return await mine() is await mine()

    assert run(same_loop_twice())
    assert run(mine()) is not run(mine())  # each asyncio.run has its own loop


def test_watch_current_watches_the_running_task_on_its_loops_watch():
    async def go():
        loop = asyncio.get_running_loop()
        never = loop.create_future()
        watched = watch_current(lambda: never)
        try:
            assert watched.task is asyncio.current_task()
            assert watch_for(loop).open[-1] is watched and watch_for(loop).armed
        finally:
            watched.close()
            never.cancel()

    run(go())


def test_running_loop_is_asyncios_or_the_one_the_servers_cycle_names():
    async def go():
        assert running_loop() is asyncio.get_running_loop()
        named = object()  # read off the cycle, not asked of asyncio (a getpid() on 3.11)
        token = SERVER_CYCLE.set(types.SimpleNamespace(protocol=types.SimpleNamespace(loop=named)))
        try:
            assert running_loop() is named
        finally:
            SERVER_CYCLE.reset(token)
        assert running_loop() is asyncio.get_running_loop()

    run(go())


@pytest.mark.transports
def test_a_client_that_leaves_before_its_answer_starts_cancels_the_upstream_call(comox_serve, upstreams):
    """Non-streaming, or a stream still waiting for its first byte: the
    client leaves, and the upstream call is closed and its slot freed at once
    instead of running to the end of the generation."""
    import socket
    import time

    from comox.testing import Fault, wait_until

    slow = upstreams("slow")
    slow.faults.append(Fault(delay=4))  # short, so the stand-in's own handler ends soon after
    done = []

    import comox

    class Done:
        @comox.hookimpl
        def comox_request_done(self, status):
            done.append(status)

    server = comox_serve({"models": [{"name": "m", "backends": [{"name": "slow", "url": slow.url, "health_check": {"enabled": False}}]}]},
                         plugins=[Done()])
    state = server.app.gateway.backend("slow")
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: state.inflight == 1)
    started = time.monotonic()
    wait_until(lambda: state.inflight == 0, timeout=3)  # freed when the client left, not when the answer came
    assert time.monotonic() - started < 2
    wait_until(lambda: done == [499])
