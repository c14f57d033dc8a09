"""``comox/server_cycle.py``: one request's ``receive``, ``send`` and run, in
process. Its response head is checked byte for byte, and its state and errors
value for value, against uvicorn's own ``RequestResponseCycle``; its last send
against the batched transport. (tests/test_server_protocol.py checks it on
the wire, under the protocol.)"""

from __future__ import annotations

import asyncio
import logging

import pytest
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from comox import server_cycle
from comox.server_cycle import ComoxResponseCycle
from comox.server_protocol import BatchedTransport
from tests.test_server_protocol import COMOX_HEADERS, Recorder


class Flow:
    write_paused = False

    def resume_reading(self) -> None:
        pass


DATE = [(b"date", b"Tue, 01 Dec 2026 20:00:00 GMT")]


class Connection:
    """What a ComoxResponseCycle reads of its protocol."""

    def __init__(self, transport, access_logger: logging.Logger | None = None) -> None:
        self.transport, self.flow = transport, Flow()
        self.access_logger, self.access_log = access_logger, access_logger is not None
        self.server_state = type("State", (), {"default_headers": DATE})()
        self.loop = asyncio.get_running_loop()
        self.completed = 0

    def on_response_complete(self) -> None:
        self.completed += 1


def cycle_over(cls, transport, method: str = "GET", keep_alive: bool = True,
               access_logger: logging.Logger | None = None):
    """A Comox cycle, or uvicorn's, for one request over ``transport``."""
    scope = {"method": method, "path": "/v1/chat completions", "raw_path": b"/v1/chat%20completions",
             "query_string": b"a=1", "http_version": "1.1", "client": ("127.0.0.1", 5000), "root_path": ""}
    if cls is ComoxResponseCycle:
        return cls(Connection(transport, access_logger), scope, keep_alive, True)  # type: ignore[arg-type]
    return cls(scope=scope, transport=transport, flow=Flow(), logger=None, access_logger=access_logger,
               access_log=access_logger is not None, default_headers=DATE, message_event=asyncio.Event(),
               expect_100_continue=True, keep_alive=keep_alive, on_response=lambda: None)


@pytest.fixture
def slow(monkeypatch) -> list[str]:
    """The messages whose head uvicorn's own send built (not the fast head)."""
    built: list[str] = []
    uvicorns_send = server_cycle._uvicorn_send

    def counted(cycle, message):
        built.append(message["type"])
        return uvicorns_send(cycle, message)

    monkeypatch.setattr(server_cycle, "_uvicorn_send", counted)
    return built


@pytest.mark.parametrize("status, headers, method, keep_alive", [
    (200, COMOX_HEADERS, "GET", True), (200, COMOX_HEADERS[:-1], "GET", False), (304, [], "GET", True),
    (200, [(b"transfer-encoding", b"chunked"), (b"content-length", b"3")], "POST", True), (200, [], "HEAD", True),
    (200, [(b"x-100%s%%", b"%s%d"), (b"content-length", b"0")], "GET", True)])  # % in a name and a value
def test_the_fast_head_is_taken_and_writes_and_sets_what_uvicorn_does(slow, status, headers, method, keep_alive):
    start = {"type": "http.response.start", "status": status, "headers": headers}
    async def run(cls) -> tuple[object, ...]:
        cycle = cycle_over(cls, recorder := Recorder(), method, keep_alive)
        first, second = cycle.send(start), cycle.send(start)  # both before either runs
        await first
        state = (cycle.response_started, cycle.waiting_for_100_continue, cycle.chunked_encoding,
                 cycle.expected_content_length, cycle.keep_alive)
        with pytest.raises(RuntimeError) as again:
            await second
        return recorder.writes, state, str(again.value)
    assert asyncio.run(run(ComoxResponseCycle)) == asyncio.run(run(RequestResponseCycle))
    assert slow == []  # the fast head built it (the second start is refused before any head)


def test_with_an_access_log_uvicorn_builds_the_head_and_logs_the_request(slow, caplog):
    logger = logging.getLogger("comox.tests.access")
    start = {"type": "http.response.start", "status": 201, "headers": COMOX_HEADERS}
    async def run(cls) -> tuple[object, ...]:
        caplog.clear()
        cycle = cycle_over(cls, recorder := Recorder(), access_logger=logger)
        with caplog.at_level(logging.INFO, logger=logger.name):
            await cycle.send(start)
        return recorder.writes, [record.getMessage() for record in caplog.records], cycle.chunked_encoding
    comox, uvicorn = asyncio.run(run(ComoxResponseCycle)), asyncio.run(run(RequestResponseCycle))
    assert comox == uvicorn
    assert comox[1] == ['127.0.0.1:5000 - "GET /v1/chat%20completions?a=1 HTTP/1.1" 201']
    assert slow == ["http.response.start"]


@pytest.mark.parametrize("start", [
    {"type": "http.response.start", "status": 200, "headers": [(b"x", b"1", b"2")]},
    {"type": "http.response.start", "status": 200, "headers": [(b"x",)]},
    {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"a"), (b"x", b"1", b"2")]},
    {"type": "http.response.start", "status": 200, "headers": [("x-str", b"1")]},
    {"type": "http.response.start", "status": 200, "headers": [(memoryview(b"x-mv"), b"1")]},
    {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"x")]},
    {"type": "http.response.start", "status": 200, "headers": [(b"connection", memoryview(b"close"))]},
    {"type": "http.response.start", "status": 200,  # names the fast head has seen valid, a value not
     "headers": [(name, b"mi\x00ss" if name == b"x-comox-cache" else value) for name, value in COMOX_HEADERS]},
    {"type": "http.response.start", "status": 99, "headers": []},
    {"type": "http.response.start", "headers": []},
    {"type": "http.response.body", "body": b""}])
def test_a_start_uvicorn_refuses_raises_what_uvicorn_raises(start):
    async def run(cls) -> tuple[object, ...]:
        cycle = cycle_over(cls, recorder := Recorder())
        with pytest.raises(Exception) as raised:
            await cycle.send(start)
        return (type(raised.value), str(raised.value), recorder.writes, cycle.response_started,
                cycle.chunked_encoding, cycle.expected_content_length, cycle.keep_alive)
    assert asyncio.run(run(ComoxResponseCycle)) == asyncio.run(run(RequestResponseCycle))


@pytest.mark.parametrize("chunks", [[b'{"ok":true}'], [b"data: 1\n\n", b"data: 2\n\n", b""]], ids=["json", "stream"])
def test_the_apps_last_send_returns_once_its_answer_is_written(chunks):
    """Not before: what the app does after answering (its logs, metrics and
    accounting) must not hold back the answer's one write."""
    async def run() -> tuple[list[bytes], list[bytes]]:
        recorder = Recorder()
        cycle = cycle_over(ComoxResponseCycle, BatchedTransport(recorder, asyncio.get_running_loop()))  # type: ignore[arg-type]
        await cycle.send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for n, chunk in enumerate(chunks[:-1]):
            await cycle.send({"type": "http.response.body", "body": chunk, "more_body": True})
            assert n or recorder.writes == []  # held: the turn has not ended
        before_last = list(recorder.writes)
        await cycle.send({"type": "http.response.body", "body": chunks[-1]})
        return before_last, list(recorder.writes)  # as the app finds them when its send returns
    before_last, written = asyncio.run(run())
    assert before_last == []
    answer = b"".join(written)
    assert len(written) == 1 and answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"\r\n0\r\n\r\n")  # the chunked body's end: the whole answer
    assert all(chunk in answer for chunk in chunks)


@pytest.mark.parametrize("status, headers, method, keep_alive", [
    (200, COMOX_HEADERS, "GET", True), (200, COMOX_HEADERS[:-1], "POST", False), (404, [(b"content-length", b"2")], "HEAD", True),
    (200, [(b"transfer-encoding", b"chunked")], "POST", True)])
def test_answer_writes_and_sets_what_a_start_and_a_body_do(status, headers, method, keep_alive):
    body = b"{}"
    if not any(name == b"transfer-encoding" for name, _ in headers):
        headers = [(name, value) for name, value in headers if name != b"content-length"] + [(b"content-length", b"2")]

    async def run(whole: bool) -> tuple[object, ...]:
        cycle = cycle_over(ComoxResponseCycle, recorder := Recorder(), method, keep_alive)
        if whole:
            turn = cycle.answer(status, list(headers), body)
        else:
            await cycle.send({"type": "http.response.start", "status": status, "headers": list(headers)})
            await cycle.send({"type": "http.response.body", "body": body})
            turn = False  # (a Recorder holds nothing: send takes no turn)
        return (recorder.writes, turn, cycle.response_started, cycle.response_complete, cycle.keep_alive,
                cycle.chunked_encoding, cycle.expected_content_length, cycle.protocol.completed, recorder.closed)
    assert asyncio.run(run(True)) == asyncio.run(run(False))


def test_answer_says_when_the_app_should_give_the_loop_a_turn():
    async def run() -> tuple[bool | None, list[bytes], list[bytes]]:
        recorder = Recorder()
        cycle = cycle_over(ComoxResponseCycle, BatchedTransport(recorder, asyncio.get_running_loop()))  # type: ignore[arg-type]
        turn = cycle.answer(200, [(b"content-length", b"2")], b"{}")
        held = list(recorder.writes)
        await asyncio.sleep(0)
        return turn, held, recorder.writes
    turn, held, written = asyncio.run(run())
    assert turn is True and held == [] and len(written) == 1 and written[0].endswith(b"\r\n\r\n{}")


@pytest.mark.parametrize("case", ["started", "disconnected", "write paused", "access log", "a head uvicorn builds"])
def test_answer_leaves_to_send_what_send_must_do_and_changes_nothing(case):
    async def run() -> tuple[object, ...]:
        logger = logging.getLogger("comox.tests.access") if case == "access log" else None
        cycle = cycle_over(ComoxResponseCycle, recorder := Recorder(), access_logger=logger)
        headers = [(b"Content-Length", b"2")] if case == "a head uvicorn builds" else [(b"content-length", b"2")]
        if case == "started":
            await cycle.send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        elif case == "disconnected":
            cycle.client_left()
        elif case == "write paused":
            cycle.flow = type("Paused", (Flow,), {"write_paused": True})()
        before = (list(recorder.writes), cycle.response_started, cycle.response_complete, cycle.expected_content_length)
        answered = cycle.answer(200, headers, b"{}")
        return answered, before == (recorder.writes, cycle.response_started, cycle.response_complete,
                                    cycle.expected_content_length)
    assert asyncio.run(run()) == (None, True)


def test_send_body_leaves_to_send_a_body_before_the_start_after_the_end_or_while_writes_wait():
    async def run() -> list[object]:
        cycle = cycle_over(ComoxResponseCycle, recorder := Recorder())
        seen: list[object] = [cycle.send_body(b"x", True)]  # no start yet: send raises uvicorn's error for it
        assert cycle.send_start(200, [(b"transfer-encoding", b"chunked")])
        seen.append(cycle.send_body(b"abc", True))
        cycle.flow = type("Paused", (Flow,), {"write_paused": True})()
        seen.append(cycle.send_body(b"d", True))  # send drains first
        cycle.flow = Flow()
        seen += [cycle.send_body(b"", False), cycle.send_body(b"late", False), recorder.writes[1:]]
        return seen
    assert asyncio.run(run()) == [None, False, None, False, None, [b"3\r\nabc\r\n", b"0\r\n\r\n"]]
