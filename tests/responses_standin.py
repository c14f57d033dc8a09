"""Stand-ins for the Responses API tests, speaking real wire formats over real
HTTP: chat completions with scripted answers (text, reasoning, tool calls; JSON
or SSE, usage as OpenAI reports it), and a server that serves ``/v1/responses``
itself (as vLLM and llama.cpp's server do)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from comox.testing import Fault, StandInUpstream

USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
         "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 2}}


@dataclass
class Answer:
    """What the chat completion answers: ``content`` (streamed a word at a
    time), ``reasoning`` (``reasoning_content``), ``tool_calls`` as ``(id,
    name, arguments)`` (the arguments streamed in two halves)."""

    content: str | None = "hello from upstream"
    reasoning: str | None = None
    tool_calls: list[tuple[str, str, str]] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=lambda: dict(USAGE))

    @property
    def finish(self) -> str:
        return self.finish_reason or ("tool_calls" if self.tool_calls else "stop")


class ScriptedUpstream(StandInUpstream):
    """Chat completions answered from ``answers`` (a queue of :class:`Answer`;
    empty: the default answer); ``/v1/responses`` answered natively."""

    def __init__(self, name: str = "upstream", **kwargs: Any):
        super().__init__(name, **kwargs)
        self.answers: deque[Answer] = deque()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v1/responses":
            await super().__call__(scope, receive, send)  # chat completions come back through the methods below
            return
        raw = b""
        message = {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            raw += message.get("body", b"")
        self.requests.append({"path": scope["path"], "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
                              "body": orjson.loads(raw), "raw": raw})
        await self._native(send, orjson.loads(raw), self.faults.popleft() if self.faults else Fault())

    def _completion(self, payload: dict[str, Any], chat: bool) -> dict[str, Any]:
        if not chat:
            return super()._completion(payload, chat)
        return self._chat(payload, self.answers.popleft() if self.answers else Answer())

    async def _stream(self, receive, send, payload: dict[str, Any], chat: bool, fault: Fault, extra) -> None:
        if not chat:
            await super()._stream(receive, send, payload, chat, fault, extra)
            return
        answer = self.answers.popleft() if self.answers else Answer()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i, chunk in enumerate(self._chunks(payload, answer)):
            if fault.close_after_chunks is not None and i >= fault.close_after_chunks:
                raise ConnectionAbortedError("stand-in drops the connection mid-stream")
            await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(chunk) + b"\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    def _chat(self, body: dict[str, Any], answer: Answer) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": answer.content}
        if answer.reasoning:
            message["reasoning_content"] = answer.reasoning
        if answer.tool_calls:
            message["tool_calls"] = [{"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                                     for i, n, a in answer.tool_calls]
        return {"id": "chatcmpl-scripted", "object": "chat.completion", "created": 1, "model": body.get("model"),
                "choices": [{"index": 0, "message": message, "finish_reason": answer.finish}], "usage": answer.usage}

    def _chunks(self, body: dict[str, Any], answer: Answer) -> list[dict[str, Any]]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 1, "model": body.get("model"),
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        chunks = [chunk({"role": "assistant", "content": ""})]
        if answer.reasoning:
            half = len(answer.reasoning) // 2
            chunks += [chunk({"reasoning_content": answer.reasoning[:half]}), chunk({"reasoning_content": answer.reasoning[half:]})]
        if answer.content:
            chunks += [chunk({"content": word if i == 0 else " " + word}) for i, word in enumerate(answer.content.split(" "))]
        for index, (call_id, name, arguments) in enumerate(answer.tool_calls):
            half = len(arguments) // 2
            chunks.append(chunk({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                                 "function": {"name": name, "arguments": ""}}]}))
            chunks += [chunk({"tool_calls": [{"index": index, "function": {"arguments": part}}]})
                       for part in (arguments[:half], arguments[half:])]
        chunks.append(chunk({}, answer.finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 1,
                           "model": body.get("model"), "choices": [], "usage": answer.usage})
        return chunks

    async def _native(self, send, body: dict[str, Any], fault: Fault) -> None:
        """``/v1/responses`` as a server that speaks it answers (a stream
        dropped after ``fault.close_after_chunks`` events)."""
        text = f"hello natively from {self.name}"
        message = {"type": "message", "id": "msg_native", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}
        response = {"id": "resp_native", "object": "response", "created_at": 1, "status": "completed", "model": body.get("model"),
                    "output": [message], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                    "usage": {"input_tokens": 3, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 4,
                              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 7}}
        if not body.get("stream"):
            await self._json(send, 200, response, [])
            return
        events = [("response.created", {"response": {**response, "status": "in_progress", "output": []}}),
                  ("response.output_text.delta", {"item_id": "msg_native", "output_index": 0, "content_index": 0, "delta": text}),
                  ("response.completed", {"response": response})]
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for n, (kind, data) in enumerate(events):
            if fault.close_after_chunks is not None and n >= fault.close_after_chunks:
                raise ConnectionAbortedError("stand-in drops the connection mid-stream")
            event = b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, "sequence_number": n, **data}) + b"\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
