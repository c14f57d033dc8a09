"""Streams that survive a dying node (comox/resume.py, issue 13): with
``resume_streams = true``, a stream whose node breaks off midway is continued
on another node of the group and spliced into the same client stream. Real
servers on 127.0.0.1: stand-ins that drop the connection mid-stream, and real
``llama_cpp.server`` processes, one killed in the middle of a stream."""

import json
import os
import signal

import httpx
import orjson
import pytest

import comox
from comox.testing import Fault, StandInUpstream, wait_for_http, wait_until
from tests.plugins.in_order import InOrderPolicy

PROMPT = {"model": "m", "prompt": "Count:", "max_tokens": 10, "stream": True}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "count"}], "stream": True}


class Shaped(StandInUpstream):
    """A stand-in whose streams look like a real server's: chunks carry its own
    ``id`` and ``created``, a chat stream starts with the role delta, and a
    usage chunk comes before ``[DONE]`` when the request asks for it.
    ``no_done = True``: streams end without ``[DONE]`` (and no finish reason)."""

    no_done = False

    async def __call__(self, scope, receive, send):
        path = scope["path"]
        state = {"first": True, "chunks": 0, "body": None}
        own = f'-{self.name}"'.encode()
        created = 1000 + len(self.name)

        async def shaped_receive():
            message = await receive()
            if message["type"] == "http.request" and state["body"] is None:
                state["body"] = json.loads(message.get("body") or b"{}")
            return message

        async def shaped_send(message):
            body = message.get("body", b"")
            if message["type"] == "http.response.body" and body.startswith(b"data: {"):
                body = body.replace(b'-standin"', own).replace(b'"created":1,', b'"created":%d,' % created)
                if state["first"] and path == "/v1/chat/completions":
                    role = {"id": f"chatcmpl-{self.name}", "object": "chat.completion.chunk", "created": created, "model": "m",
                            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
                    await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(role) + b"\n\n", "more_body": True})
                state["first"] = False
                state["chunks"] += 1
                message = {**message, "body": body}
            elif message["type"] == "http.response.body" and body.startswith(b"data: [DONE]") and self.no_done:
                message = {**message, "body": b""}
            elif message["type"] == "http.response.body" and body.startswith(b"data: [DONE]"):
                if ((state["body"] or {}).get("stream_options") or {}).get("include_usage"):
                    usage = {"id": f"x-{self.name}", "object": "chat.completion.chunk", "created": created, "model": "m", "choices": [],
                             "usage": {"prompt_tokens": 12, "completion_tokens": state["chunks"], "total_tokens": 12 + state["chunks"]}}
                    await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(usage) + b"\n\n", "more_body": True})
            await send(message)

        await super().__call__(scope, shaped_receive, shaped_send)


@pytest.fixture
def nodes(upstreams):
    """``nodes(name, **options)``: started :class:`Shaped` stand-ins."""
    return lambda name, **options: upstreams(name, kind=Shaped, **options)


def group(*backends, **options):
    return {"name": "m", "policy": "in_order", "resume_streams": True,
            "backends": [{"health_check": {"enabled": False}, **backend} for backend in backends], **options}


def serve(comox_serve, *groups, plugins=(), named=True):
    return comox_serve({"server": {"expose_backend_header": named}, "models": list(groups)}, plugins=[InOrderPolicy(), *plugins])


def events(body: str):
    """``(data objects, comment lines, [DONE] count)`` of an SSE body."""
    objects, comments, done = [], [], 0
    for block in body.replace("\r\n", "\n").split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: [DONE]"):
                done += 1
            elif line.startswith("data:"):
                objects.append(json.loads(line[5:]))
            elif line.startswith(":"):
                comments.append(line)
    return objects, comments, done


def resumed(comments):
    """The ``: comox-resumed {...}`` report."""
    found = [json.loads(line[len(": comox-resumed "):]) for line in comments if line.startswith(": comox-resumed ")]
    assert len(found) == 1, comments
    return found[0]


def text_of(objects, chat=False):
    if chat:
        return "".join(o["choices"][0]["delta"].get("content") or "" for o in objects if o.get("choices"))
    return "".join(o["choices"][0]["text"] for o in objects if o.get("choices"))


# -- the splice, with stand-ins -------------------------------------------------------


def test_a_completion_is_continued_from_the_text_sent(comox_serve, nodes, client_for):
    a, b = nodes("a", stream_chunks=5), nodes("b", stream_chunks=3)
    a.faults.append(Fault(close_after_chunks=2))
    server = serve(comox_serve, group({"name": "a", "url": a.url}, {"name": "b", "url": b.url}))
    stream = client_for(server).completions.create(model="m", prompt="Count:", max_tokens=10, stream=True)
    chunks = list(stream)
    # One answer: A's two tokens, then B's three, under A's id and created.
    assert "".join(c.choices[0].text for c in chunks) == "tok0 tok1 tok0 tok1 tok2 "
    assert {(c.id, c.created) for c in chunks} == {("cmpl-a", 1001)}
    # B was asked to continue the prompt plus what the client had, with the tokens left.
    assert b.requests[0]["body"]["prompt"] == "Count:tok0 tok1 "
    assert b.requests[0]["body"]["max_tokens"] == 8
    # A's failure is recorded as any broken stream's; B answered.
    gateway = server.app.gateway
    wait_until(lambda: gateway.backend("a").failures == 1)  # recorded after the last byte went out
    assert gateway.backend("a").failures == 1 and gateway.backend("a").last_error.startswith("stream broke off")
    assert gateway.backend("b").failures == 0
    assert gateway.backend("a").inflight == gateway.backend("b").inflight == 0


def test_the_stream_ends_once_and_says_how_many_tokens_each_node_produced(comox_serve, nodes):
    a, b = nodes("a", stream_chunks=5), nodes("b", stream_chunks=3)
    a.faults.append(Fault(close_after_chunks=2))
    server = serve(comox_serve, group({"name": "a", "url": a.url}, {"name": "b", "url": b.url}))
    reply = httpx.post(f"{server.url}/v1/completions", json=PROMPT, timeout=10)
    objects, comments, done = events(reply.text)
    assert reply.status_code == 200 and done == 1 and reply.text.endswith("data: [DONE]\n\n")
    assert not any("error" in o for o in objects)
    assert resumed(comments) == {"nodes": [{"backend": "a", "tokens": 2}, {"backend": "b", "tokens": 3}]}
    # Without the backend header, the nodes are not named.
    quiet = serve(comox_serve, group({"name": "a2", "url": a.url}, {"name": "b2", "url": b.url}), named=False)
    a.faults.append(Fault(close_after_chunks=1))
    _, comments, _ = events(httpx.post(f"{quiet.url}/v1/completions", json=PROMPT, timeout=10).text)
    assert resumed(comments) == {"nodes": [{"tokens": 1}, {"tokens": 3}]}


def test_a_chat_answer_is_continued_as_the_final_assistant_message(comox_serve, nodes, client_for):
    a, b = nodes("a", stream_chunks=5), nodes("b", stream_chunks=3)
    a.faults.append(Fault(close_after_chunks=2))
    # vllm: a backend type that continues a final assistant message
    server = serve(comox_serve, group({"name": "a", "url": a.url, "type": "vllm"}, {"name": "b", "url": b.url, "type": "vllm"}))
    stream = client_for(server).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "count"}], stream=True, max_completion_tokens=10,
        stream_options={"include_usage": True})
    chunks = list(stream)
    answer = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in answer) == "tok0 tok1 tok0 tok1 tok2 "
    assert [c.choices[0].delta.role for c in answer].count("assistant") == 1  # B's role delta was dropped
    assert {(c.id, c.created) for c in chunks} == {("chatcmpl-a", 1001)}
    sent = b.requests[0]["body"]
    assert sent["messages"] == [{"role": "user", "content": "count"}, {"role": "assistant", "content": "tok0 tok1 "}]
    assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
    assert sent["max_completion_tokens"] == 8
    # The usage is the whole answer's: B's prompt held A's two tokens.
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (10, 5, 15)
    assert usage.model_extra["comox_resumed"] == {"nodes": [{"backend": "a", "tokens": 2}, {"backend": "b", "tokens": 3}]}


def test_a_node_that_breaks_off_while_continuing_is_replaced_too(comox_serve, nodes):
    a, b, c = nodes("a", stream_chunks=5), nodes("b", stream_chunks=5), nodes("c", stream_chunks=2)
    a.faults.append(Fault(close_after_chunks=2))
    b.faults.append(Fault(close_after_chunks=1))
    server = serve(comox_serve, group(*({"name": n.name, "url": n.url} for n in (a, b, c))))
    objects, comments, done = events(httpx.post(f"{server.url}/v1/completions", json=PROMPT, timeout=10).text)
    assert text_of(objects) == "tok0 tok1 tok0 tok0 tok1 " and done == 1
    assert c.requests[0]["body"]["prompt"] == "Count:tok0 tok1 tok0 " and c.requests[0]["body"]["max_tokens"] == 7
    assert resumed(comments)["nodes"] == [{"backend": "a", "tokens": 2}, {"backend": "b", "tokens": 1},
                                          {"backend": "c", "tokens": 2}]
    gateway = server.app.gateway
    # The first node's failure is recorded once the stream's last byte went out, which the
    # client may see first.
    wait_until(lambda: [gateway.backend(n).failures for n in "abc"] == [1, 1, 0])
    assert [gateway.backend(n).failures for n in "abc"] == [1, 1, 0]
    wait_until(lambda: [gateway.backend(n).inflight for n in "abc"] == [0, 0, 0])


def test_a_continuation_that_ends_before_the_answer_did_is_replaced_too(comox_serve, nodes):
    a, b, c = nodes("a", stream_chunks=5), nodes("b", stream_chunks=2), nodes("c", stream_chunks=2)
    a.faults.append(Fault(close_after_chunks=2))
    b.no_done = True  # a clean end, but no [DONE] nor finish reason: cut short
    server = serve(comox_serve, group(*({"name": n.name, "url": n.url} for n in (a, b, c))))
    objects, comments, done = events(httpx.post(f"{server.url}/v1/completions", json=PROMPT, timeout=10).text)
    assert text_of(objects) == "tok0 tok1 tok0 tok1 tok0 tok1 " and done == 1
    assert c.requests[0]["body"]["prompt"] == "Count:tok0 tok1 tok0 tok1 "
    assert [n["tokens"] for n in resumed(comments)["nodes"]] == [2, 2, 2]
    assert server.app.gateway.backend("b").failures == 1
    # With no node left to continue, such a stream ends with the error event.
    a.faults.append(Fault(close_after_chunks=2))
    server.app.gateway.set_draining("c", True)
    objects, comments, done = events(httpx.post(f"{server.url}/v1/completions", json=PROMPT, timeout=10).text)
    assert done == 0 and objects[-1]["error"]["code"] == "stream_interrupted" and not comments


def test_an_answer_out_of_tokens_is_ended_without_asking_another_node(comox_serve, nodes):
    a, b = nodes("a", stream_chunks=5), nodes("b")
    a.faults.append(Fault(close_after_chunks=3))
    server = serve(comox_serve, group({"name": "a", "url": a.url}, {"name": "b", "url": b.url}))
    objects, comments, done = events(httpx.post(f"{server.url}/v1/completions", json={**PROMPT, "max_tokens": 3}, timeout=10).text)
    assert text_of(objects) == "tok0 tok1 tok2 " and objects[-1]["choices"][0]["finish_reason"] == "length"
    assert done == 1 and resumed(comments) == {"nodes": [{"backend": "a", "tokens": 3}]}
    assert b.requests == []


def test_a_client_that_leaves_is_not_resumed_and_leaves_no_node_held(comox_serve, nodes):
    a, b = nodes("a", stream_chunks=200, chunk_delay=0.02), nodes("b", stream_chunks=200, chunk_delay=0.02)
    server = serve(comox_serve, group({"name": "a", "url": a.url}, {"name": "b", "url": b.url}))
    gateway = server.app.gateway

    def read(chunks):
        with httpx.stream("POST", f"{server.url}/v1/completions", json=PROMPT, timeout=10) as reply:
            seen = 0
            for line in reply.iter_lines():
                seen += line.startswith("data: {")
                if seen == chunks:
                    return  # the client goes away

    # Leaving is not breaking off: nobody is asked to continue.
    read(3)
    wait_until(lambda: a.disconnects == 1 and gateway.backend("a").inflight == 0)
    assert b.requests == [] and gateway.backend("a").failures == 0
    # Leaving while another node continues lets go of that node too.
    a.faults.append(Fault(close_after_chunks=2))
    read(4)
    wait_until(lambda: b.disconnects == 1)
    wait_until(lambda: gateway.backend("a").inflight == gateway.backend("b").inflight == 0)
    wait_until(lambda: gateway.backend("a").failures == 1)  # recorded after the last byte went out
    assert len(b.requests) == 1 and gateway.backend("b").failures == 0


# -- when a stream is not resumed -------------------------------------------------------


def test_only_groups_that_ask_resume_their_streams(comox_serve, nodes):
    a, b = nodes("a", stream_chunks=5), nodes("b")
    backends = [{"name": "a", "url": a.url}, {"name": "b", "url": b.url}]
    server = serve(comox_serve, group(*backends),
                   {**group(*({**x, "name": x["name"] + "-plain"} for x in backends)), "name": "plain", "resume_streams": False})
    a.faults.extend([Fault(close_after_chunks=2)] * 2)
    objects, _, done = events(httpx.post(f"{server.url}/v1/completions", json=PROMPT, timeout=10).text)
    assert done == 1 and len(b.requests) == 1
    objects, comments, done = events(httpx.post(f"{server.url}/v1/completions", json={**PROMPT, "model": "plain"}, timeout=10).text)
    # As before: an error event, never a clean [DONE]; nobody else asked.
    assert done == 0 and objects[-1]["error"]["code"] == "stream_interrupted" and not comments
    assert text_of(objects[:-1]) == "tok0 tok1 " and len(b.requests) == 1
    wait_until(lambda: server.app.gateway.backend("a-plain").failures == 1)  # recorded after the last byte went out


def test_no_resume_where_no_other_node_can_continue(comox_serve, nodes):
    # openai: continues a completion, not a chat message (no continue_final_message).
    a, b = nodes("a", stream_chunks=5), nodes("b")
    a.faults.extend([Fault(close_after_chunks=2)] * 2)
    server = serve(comox_serve, group({"name": "a", "url": a.url, "type": "vllm"}, {"name": "b", "url": b.url}))
    objects, _, done = events(httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=10).text)
    assert done == 0 and objects[-1]["error"]["code"] == "stream_interrupted" and b.requests == []
    objects, _, done = events(httpx.post(f"{server.url}/v1/completions", json=PROMPT, timeout=10).text)
    assert done == 1 and len(b.requests) == 1  # the same node continues a completion
    wait_until(lambda: server.app.gateway.backend("a").failures == 2)  # recorded after the last byte went out


def test_no_resume_when_the_other_nodes_are_gone(comox_serve, nodes):
    a, b = nodes("a", stream_chunks=5), nodes("b")
    a.faults.append(Fault(close_after_chunks=2))
    server = serve(comox_serve, group({"name": "a", "url": a.url}, {"name": "b", "url": b.url}))
    server.app.gateway.set_draining("b", True)
    objects, comments, done = events(httpx.post(f"{server.url}/v1/completions", json=PROMPT, timeout=10).text)
    assert done == 0 and objects[-1]["error"]["code"] == "stream_interrupted" and not comments
    assert b.requests == []
    # Once B is back, the same break is continued there; a stream that does
    # not break off is passed on as it came.
    server.app.gateway.set_draining("b", False)
    a.faults.append(Fault(close_after_chunks=2))
    objects, comments, done = events(httpx.post(f"{server.url}/v1/completions", json=PROMPT, timeout=10).text)
    assert done == 1 and text_of(objects) == "tok0 tok1 tok0 tok1 tok2 " and len(b.requests) == 1
    objects, comments, done = events(httpx.post(f"{server.url}/v1/completions", json=PROMPT, timeout=10).text)
    assert done == 1 and not comments and text_of(objects) == "tok0 tok1 tok2 tok3 tok4 "


class Cloud:
    """A failover plugin that records every call."""

    def __init__(self):
        self.calls = []

    @comox.hookimpl
    def comox_failover(self, request, trigger):
        self.calls.append(request.json)
        return comox.BackendResponse(200, body=b'{"answered_by": "cloud"}')


def test_resuming_stays_on_the_local_fleet(comox_serve, nodes):
    a, b = nodes("a", stream_chunks=5), nodes("b", stream_chunks=3)
    cloud = Cloud()
    server = serve(comox_serve, group({"name": "a", "url": a.url}, {"name": "b", "url": b.url}), plugins=[cloud])
    # A request that must stay local resumes on another local node.
    a.faults.append(Fault(close_after_chunks=2))
    local = {"x-comox-local-only": "true"}
    objects, _, done = events(httpx.post(f"{server.url}/v1/completions", json=PROMPT, headers=local, timeout=10).text)
    assert done == 1 and text_of(objects) == "tok0 tok1 tok0 tok1 tok2 " and len(b.requests) == 1
    # With no local node left to continue, neither it nor a request that may
    # leave is continued in the cloud: both end with the error event.
    server.app.gateway.set_draining("b", True)
    for headers in (local, {}):
        a.faults.append(Fault(close_after_chunks=2))
        objects, _, done = events(httpx.post(f"{server.url}/v1/completions", json=PROMPT, headers=headers, timeout=10).text)
        assert done == 0 and objects[-1]["error"]["code"] == "stream_interrupted"
    assert cloud.calls == [] and len(b.requests) == 1


# -- a real llama_cpp.server killed in the middle of a stream -------------------------------

COUNT = {"model": "m", "prompt": "Count: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 48, "temperature": 0, "stream": True}


def test_a_killed_llama_server_node_is_continued_by_another(comox_serve, llama_processes):
    """The client's stream completes with the text of an uninterrupted run: no
    token repeated or lost at the splice. (The prompt is one whose greedy
    continuation has no near-ties: after any splice, the second node goes on
    exactly as the first would have.)"""
    a, b = llama_processes(), llama_processes()
    for node in (a, b):
        wait_for_http(f"{node.url}/v1/models", proc=node.proc, timeout=120)
    reference = httpx.post(f"{b.url}/v1/completions", json={**COUNT, "stream": False}, timeout=120).json()
    expected = reference["choices"][0]["text"]
    assert reference["usage"]["completion_tokens"] == 48
    server = serve(comox_serve, group({"name": "a", "url": a.url, "type": "llamacpp"},
                                      {"name": "b", "url": b.url, "type": "llamacpp"}))
    gateway = server.app.gateway
    lines = []
    with httpx.stream("POST", f"{server.url}/v1/completions", json=COUNT, timeout=120) as reply:
        for line in reply.iter_lines():
            lines.append(line)
            if sum(1 for x in lines if x.startswith("data: {")) == 4 and a.proc.poll() is None:
                os.kill(a.proc.pid, signal.SIGKILL)
    objects, comments, done = events("\n".join(lines) + "\n\n")
    assert a.proc.wait(10) == -signal.SIGKILL
    assert done == 1 and not any("error" in o for o in objects)
    assert text_of(objects) == expected
    nodes = resumed(comments)["nodes"]
    assert [n["backend"] for n in nodes] == ["a", "b"]
    assert nodes[0]["tokens"] >= 4 and nodes[1]["tokens"] > 0 and nodes[0]["tokens"] + nodes[1]["tokens"] == 48
    wait_until(lambda: gateway.backend("a").failures == 1)
    assert gateway.backend("b").failures == 0
