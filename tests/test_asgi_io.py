"""``comox/asgi_io.py``'s Responder forwarding a real upstream stream (the
httptools transport's, from a raw HTTP/1.1 server on 127.0.0.1): the ASGI
messages it sends, and so the writes the server makes. A stream the transport
has read whole goes out with the response's end in one message; one still
arriving goes chunk by chunk; one whose upstream closed in the middle of an
event ends with an error event, never a clean end."""

from __future__ import annotations

import asyncio

from comox.asgi_io import Responder
from comox.transport_httptools import HttptoolsTransport

EVENTS = [b'data: {"n":%d}\n\n' % n for n in range(3)] + [b"data: [DONE]\n\n"]


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def forward(answer) -> list[dict]:
    """Serve one request with ``answer(writer)``, fetch it through the httptools
    transport and forward it with a Responder: the ASGI messages sent."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        await answer(writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    transport = HttptoolsTransport()
    try:
        port = server.sockets[0].getsockname()[1]
        response = await transport.post(f"http://127.0.0.1:{port}/v1/chat/completions", b"{}", {})
        assert response.stream is not None
        response.head = await anext(response.stream)  # as the core reads it (comox/dispatch.py)
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def receive() -> dict:
            await asyncio.Event().wait()  # the client never leaves
            return {}

        result = await asyncio.wait_for(Responder(send).stream(receive, response, []), 10)
        return [result, *sent]
    finally:
        await transport.aclose()
        server.close()
        await server.wait_closed()


def bodies(sent: list[dict]) -> list[tuple[bytes, bool]]:
    return [(m["body"], m.get("more_body", False)) for m in sent if m["type"] == "http.response.body"]


def test_a_stream_read_whole_goes_out_with_the_end_in_one_message():
    async def whole(writer):
        body = b"".join(EVENTS)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()

    result, *sent = asyncio.run(forward(whole))
    assert sent[0]["type"] == "http.response.start"
    assert bodies(sent) == [(b"".join(EVENTS), False)]
    assert result.complete and result.events == 4 and result.end.endswith(b"data: [DONE]\n\n")
    assert result.counted == 0  # all of it is in end: nothing was counted while it was sent


def test_a_stream_still_arriving_goes_chunk_by_chunk_and_its_last_chunk_ends_it():
    async def slowly(writer):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for event in EVENTS[:-1]:
            writer.write(chunked(event))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(chunked(EVENTS[-1]) + b"0\r\n\r\n")  # the last event and the end, in one read
        await writer.drain()

    result, *sent = asyncio.run(forward(slowly))
    assert bodies(sent) == [(event, True) for event in EVENTS[:-1]] + [(EVENTS[-1], False)]
    assert result.complete and result.events == 4
    assert result.counted == 2 and result.end == EVENTS[-2] + EVENTS[-1]  # counted as they left the last two


def test_a_stream_read_whole_but_cut_in_an_event_ends_with_an_error_event():
    async def cut(writer):
        body = EVENTS[0] + b'data: {"n":'
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()

    result, *sent = asyncio.run(forward(cut))
    sent_bodies = bodies(sent)
    assert sent_bodies[0] == (EVENTS[0] + b'data: {"n":', True)
    assert sent_bodies[-1][1] is False and b'"stream_interrupted"' in sent_bodies[-1][0]
    assert sent_bodies[-1][0].startswith(b"\n\n")  # the partial event is closed first
    assert not result.complete and result.error is not None


def test_a_whole_answer_goes_to_comox_serves_cycle_in_one_call_and_through_any_other_send_as_messages():
    from tests.test_server_cycle import ComoxResponseCycle, Recorder, cycle_over

    async def run(wrapped: bool) -> tuple[list[bytes], list[str], bool]:
        cycle = cycle_over(ComoxResponseCycle, recorder := Recorder())
        messages: list[str] = []

        async def middleware_send(message: dict) -> None:  # a middleware's own send, around the cycle's
            messages.append(message["type"])
            await cycle.send(message)

        responder = Responder(middleware_send if wrapped else cycle.send)
        assert (responder.cycle is None) is wrapped
        await responder.json(200, b'{"ok":true}', [(b"content-type", b"application/json")])
        return recorder.writes, messages, responder.finished
    direct, through = asyncio.run(run(False)), asyncio.run(run(True))
    assert direct[0] == through[0] and direct[0][0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert direct[1] == [] and through[1] == ["http.response.start", "http.response.body"]
    assert direct[2] and through[2]


def test_a_stream_goes_to_comox_serves_cycle_in_plain_calls_and_writes_what_the_messages_write():
    from comox.backends import BackendResponse
    from tests.test_server_cycle import ComoxResponseCycle, Recorder, cycle_over

    async def run(wrapped: bool) -> tuple[list[bytes], list[str], object]:
        cycle = cycle_over(ComoxResponseCycle, recorder := Recorder())
        messages: list[str] = []

        async def middleware_send(message: dict) -> None:
            messages.append(message["type"])
            await cycle.send(message)

        async def events():
            for event in EVENTS[1:]:
                yield event

        async def receive() -> dict:
            await asyncio.Event().wait()
            return {}

        response = BackendResponse(200, [(b"content-type", b"text/event-stream")], stream=events())
        response.head = EVENTS[0]
        sent = await Responder(middleware_send if wrapped else cycle.send).stream(receive, response, [])
        return recorder.writes, messages, (sent.complete, sent.events, cycle.response_complete)
    direct, through = asyncio.run(run(False)), asyncio.run(run(True))
    assert direct[0] == through[0] and b"".join(direct[0]).endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert direct[1] == [] and through[1] == ["http.response.start"] + ["http.response.body"] * 5
    assert direct[2] == through[2] == (True, 4, True)
