"""Streams that survive a dying node (``resume_streams = true`` on a model
group; docs/failover.md, "Resuming streams").

When the node answering a stream breaks off midway — its connection fails
after some tokens, not a client that leaves — another node of the group
continues the answer from the text the client already has, and its events are
spliced into the same client stream:

* While such a stream runs, its SSE events are read as they pass (only in
  groups that turned this on: the default path forwards chunks untouched) to
  keep the text sent, the first chunk's ``id``/``object``/``created``/``model``
  and the tokens each node produced. Events are forwarded whole, so half an
  event a node sent as it died never reaches the client.
* The continuation: ``/v1/completions`` with the prompt plus the text sent;
  ``/v1/chat/completions`` with a final assistant message holding it and
  ``continue_final_message: true, add_generation_prompt: false``; and
  ``max_tokens`` (``max_completion_tokens``) less the tokens already
  produced. Only a node whose backend type can continue that endpoint
  (:class:`comox.SupportsContinuation`) is asked.
* Its events are rewritten to the first node's fields, without a second role
  delta; before the one ``data: [DONE]``, the SSE comment
  ``: comox-resumed {"nodes": [...]}`` says how many tokens each node
  produced, as does ``usage.comox_resumed`` when the client asked for usage.

Only nodes of the group are asked, never ``comox_failover``: a resumed stream
stays on the local fleet (``request.local_only`` or not) and spends no cloud
budget. When no node can continue, the stream ends with an error event, as it
does without resumption. The first node's failure is recorded by the
pipeline (the :class:`~comox.asgi_io.SentStream` it gets says how it broke).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import orjson

from .asgi_io import SentStream
from .backends import BackendResponse, SupportsContinuation
from .dispatch import _attempt, _Moved, _observed, observed
from .errors import BackendUnavailable
from .events import emit
from .request import GatewayRequest
from .usage import Usage

if TYPE_CHECKING:
    from .fleet import BackendState, ModelGroup
    from .gateway import Gateway

__all__ = ["resumable", "Splice", "continuation_body", "not_resumable", "can_continue", "COMMENT"]

COMMENT = b": comox-resumed "
"""Starts the SSE comment line of a resumed stream, before its ``data: [DONE]``."""

ENDPOINTS = frozenset({"completions", "chat/completions"})
# Fields that constrain an answer from its first token: a continuation would
# start the constraint over in the middle of the answer.
CONSTRAINTS = ("grammar", "json_schema", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
               "structured_outputs")
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def not_resumable(endpoint: str, body: dict[str, Any]) -> str | None:
    """Why a stream of this request could not be continued by another node
    whatever it had sent; None when it could."""
    if endpoint not in ENDPOINTS:
        return f"/v1/{endpoint} is not resumed"
    if body.get("n") not in (None, 1) or body.get("best_of") not in (None, 1):
        return "more than one choice"
    response_format = body.get("response_format")
    if (isinstance(response_format, dict) and response_format.get("type") not in (None, "text")) or any(
            key in body for key in CONSTRAINTS):
        return "a grammar or response format constrains the whole answer"
    if endpoint == "completions":
        prompt = body.get("prompt")
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str))):
            return "the prompt is not one string"
        if body.get("echo"):
            return "echo: the answer repeats the prompt"
        return None
    last = body["messages"][-1]
    if last.get("role") == "assistant" and not (body.get("continue_final_message") is True
                                                and isinstance(last.get("content"), str)):
        return "the messages end with an assistant message that is not continued"
    return None


def can_continue(state: BackendState, endpoint: str) -> bool:
    """Whether ``state``'s backend can continue a partial answer to ``endpoint``."""
    backend = state.backend
    return isinstance(backend, SupportsContinuation) and endpoint in backend.continues


def continuation_body(endpoint: str, body: dict[str, Any], text: str, produced: int) -> dict[str, Any]:
    """The body asking a node to continue ``text``, the answer to ``body`` so
    far, in which ``produced`` tokens were generated."""
    out = dict(body)
    for key in ("max_tokens", "max_completion_tokens"):
        limit = body.get(key)
        if isinstance(limit, int):
            out[key] = limit - produced
    if not text:
        return out
    if endpoint == "completions":
        prompt = body["prompt"]
        out["prompt"] = (prompt if isinstance(prompt, str) else prompt[0]) + text
        return out
    messages = list(body["messages"])
    last = messages[-1]
    if last.get("role") == "assistant":  # the client's own start of the answer (continue_final_message)
        messages[-1] = {**last, "content": last["content"] + text}
    else:
        messages.append({"role": "assistant", "content": text})
    out["messages"] = messages
    out["continue_final_message"] = True
    out["add_generation_prompt"] = False
    return out


def resumable(gateway: Gateway, request: GatewayRequest, group: ModelGroup, state: BackendState | None,
              response: BackendResponse) -> Splice | None:
    """A :class:`Splice` around ``response``, the stream a node of ``group``
    (with ``resume_streams``) answers ``request`` with, when another node
    could continue it; else None: the stream goes to the client untouched."""
    endpoint = request.endpoint
    if (state is None or response.stream is None or response.status != 200 or response.native
            or not_resumable(endpoint, request.json) is not None
            or not any(other is not state and can_continue(other, endpoint) for other in group.backends)):
        return None
    return Splice(gateway, request, group, state, response)


class Splice:
    """One resumable stream: the events of the node answering it, then of
    each node that continued it. ``response`` is what the client is sent."""

    def __init__(self, gateway: Gateway, request: GatewayRequest, group: ModelGroup, state: BackendState,
                 response: BackendResponse):
        self.gateway = gateway
        self.request = request
        self.group = group
        self.chat = request.endpoint == "chat/completions"
        self.upstream = response  # the node's answer being forwarded now
        self.node = state
        self.owned: BackendState | None = None  # a continuing node acquired here (the pipeline releases the first)
        self.tried = [state]
        self.names = [state.name]
        self.tokens = [0]  # tokens each node produced
        self.text: list[str] = []  # what the client was sent
        self.fields: dict[str, Any] = {}  # id, object, created, model of the first chunk
        self.finish: str | None = None
        self.exhausted = False  # out of max_tokens when its node broke off
        self.done = False
        self.plain = True  # nothing but text so far: a continuation can take over
        self.prompt_tokens: int | None = None
        self.broke: str | None = None  # how the first node broke off
        self.response = BackendResponse(response.status, response.headers, stream=self._events(response.head or b""),
                                        close=self.aclose)

    # -- the stream ---------------------------------------------------------------

    async def _events(self, pending: bytes) -> AsyncIterator[bytes]:
        first = upstream = self.upstream
        while True:
            assert upstream.stream is not None
            chunks = upstream.stream
            taken = None
            while True:
                cut = _whole(pending)
                if cut:
                    out = self._read(pending[:cut]) if upstream is first else self._rewrite(pending[:cut])
                    pending = pending[cut:]
                    if out:
                        yield out
                try:
                    pending += await anext(chunks)
                    continue
                except StopAsyncIteration:
                    if pending.strip():  # a last event without its blank line
                        out = self._read(pending + b"\n\n") if upstream is first else self._rewrite(pending + b"\n\n")
                        pending = b""
                        if out:
                            yield out
                    if upstream is first or self.done or self.finish is not None:
                        break
                    # A continuing node that ends without ending the answer broke off too.
                    exc: Exception = ConnectionError("the stream ended before the answer did")
                except Exception as error:  # the node broke off (a client that leaves is a CancelledError)
                    exc = error
                taken = await self._take_over(exc)
                if taken is None:
                    yield self._ending()
                    return
                break
            if taken is None:  # the answer ended
                if upstream is not first and not self.done:
                    yield self._trailer()
                return
            upstream, pending = taken, taken.head or b""

    def _read(self, events: bytes) -> bytes:
        """The first node's whole events, noted and passed on unchanged."""
        for payload in _payloads(events):
            self._note(payload)
        return events

    def _note(self, payload: bytes) -> dict[str, Any] | None:
        """Note what an event tells (text, fields, finish); its JSON object, or
        None for ``[DONE]`` and events that are not one."""
        if payload == b"[DONE]":
            self.done = True
            return None
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.plain = False
            return None
        if not isinstance(obj, dict):
            self.plain = False
            return None
        if not self.fields:
            self.fields = {key: obj[key] for key in ("id", "object", "created", "model") if key in obj}
        if "error" in obj:
            self.plain = False
        choices = obj.get("choices")
        if not choices:
            return obj
        choice = choices[0]
        if len(choices) > 1 or not isinstance(choice, dict) or choice.get("index", 0) != 0:
            self.plain = False
            return obj
        if self.chat:
            text = None
            delta = choice.get("delta")
            for key, value in (delta.items() if isinstance(delta, dict) else ()):
                if key == "content":
                    text = value
                elif key != "role" and value:
                    self.plain = False  # tool calls, reasoning, a refusal: not continued
        else:
            text = choice.get("text")
        if isinstance(text, str):
            if text:
                self.text.append(text)
                self.tokens[-1] += 1
        elif text is not None:
            self.plain = False
        if choice.get("finish_reason"):
            self.finish = choice["finish_reason"]
        return obj

    def _rewrite(self, events: bytes) -> bytes:
        """A continuing node's whole events as the client gets them: the first
        node's fields, no second role delta, the usage of the whole answer,
        and the trailer before ``[DONE]``."""
        out = []
        for event in _EVENT_END.split(events):
            if not event:
                continue
            payload = _data(event)
            if payload is None:
                out.append(event + b"\n\n")  # a comment or a ping
                continue
            obj = self._note(payload)
            if payload == b"[DONE]":
                out.append(self._trailer())
                continue
            if obj is None:
                out.append(b"data: " + payload + b"\n\n")
                continue
            obj.update(self.fields)
            choices = obj.get("choices")
            usage = obj.get("usage")
            if self.chat and choices and isinstance(choices[0], dict):
                choice = choices[0]
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    delta.pop("role", None)
                    if all(value is None or value == "" for value in delta.values()) and not choice.get("finish_reason") \
                            and not usage:
                        continue  # it was only the role: the client has it
            if isinstance(usage, dict):
                self._whole_usage(usage)
            out.append(b"data: " + orjson.dumps(obj) + b"\n\n")
        return b"".join(out)

    def _whole_usage(self, usage: dict[str, Any]) -> None:
        """A continuing node's usage made the whole answer's: its own
        completion tokens (exact) plus those before it; its prompt less them
        (the answer so far was part of its prompt)."""
        before = sum(self.tokens[:-1])
        completion = usage.get("completion_tokens")
        if isinstance(completion, int):
            self.tokens[-1] = completion
        usage["completion_tokens"] = before + self.tokens[-1]
        prompt = usage.get("prompt_tokens")
        if isinstance(prompt, int):
            self.prompt_tokens = usage["prompt_tokens"] = max(prompt - before, 0)
            usage["total_tokens"] = self.prompt_tokens + usage["completion_tokens"]
        usage["comox_resumed"] = self.report()

    # -- taking over --------------------------------------------------------------

    async def _take_over(self, exc: Exception) -> BackendResponse | None:
        """Another node's answer continuing the stream, or None when the answer
        is already whole; raises ``exc`` when no node can continue it."""
        broken = self.node
        reason = f"stream broke off: {type(exc).__name__}"
        await self.upstream.aclose()
        if self.broke is None:
            self.broke = reason  # the first node: the pipeline records it
        else:
            broken.record_failure(reason)
        self._release()
        request = self.request
        group = self.group
        if self.done or self.finish is not None:
            return None  # it broke off after the answer's end
        why = not_resumable(request.endpoint, request.json) if self.plain else \
            "the answer so far is not only text (tool calls, reasoning, an error or an unreadable event)"
        produced = sum(self.tokens)
        if why is None:
            limits = [request.json.get(key) for key in ("max_tokens", "max_completion_tokens")]
            if any(isinstance(limit, int) and limit - produced <= 0 for limit in limits):
                self.exhausted = True
                return None
            continuation = self._continuation(produced)
            unable = [other for other in group.backends if not can_continue(other, request.endpoint)]
            while True:
                state = group.choose(continuation, self.tried + unable)
                if state is None:
                    why = "no other node of the group can continue it"
                    break
                self.tried.append(state)
                response = await self._try(state, continuation)
                if response is None:
                    continue
                self.owned = self.node = state
                self.upstream = response
                self.names.append(state.name)
                self.tokens.append(0)
                emit("stream_resumed", f"request {request.id} of model {group.name}: {state.name} continues the stream "
                     f"{broken.name} broke off after {produced} tokens", request_id=request.id, model=group.name,
                     backend=state.name, previous=broken.name, tokens=produced)
                return response
        emit("stream_not_resumed", f"request {request.id} of model {group.name}: the stream {broken.name} broke off "
             f"could not be resumed: {why}", level=logging.WARNING, request_id=request.id, model=group.name,
             backend=broken.name, reason=why)
        raise exc

    async def _try(self, state: BackendState, request: GatewayRequest) -> BackendResponse | None:
        """``request`` sent to ``state`` (its first chunk read within its
        first-byte timeout); None when it gave no stream."""
        state.acquire()
        started = time.perf_counter()
        try:
            if observed(self.gateway):
                response = await _observed(self.gateway, state, request, "resume")
            else:
                response = await _attempt(state, request, state.first_byte_timeout_s)
        except (BackendUnavailable, _Moved) as failure:
            state.release()
            state.record_failure(failure.message if isinstance(failure, BackendUnavailable) else str(failure))
            return None
        except BaseException:
            state.release()
            raise
        if response.status != 200 or response.stream is None:
            await response.aclose()
            state.release()
            if response.status == 429:
                state.record_failure("HTTP 429", 429)  # busy: a latency penalty, not towards ejection
            return None
        state.record_success(time.perf_counter() - started)
        return response

    def _continuation(self, produced: int) -> GatewayRequest:
        original = self.request
        body = continuation_body(original.endpoint, original.json, "".join(self.text), produced)
        request = GatewayRequest(id=original.id, endpoint=original.endpoint, path=original.path,
                                 headers=original.headers, raw=orjson.dumps(body), json=body, gateway=original.gateway)
        request.model_group = original.model_group
        request.local_only = original.local_only
        request.principal = original.principal
        request.state = original.state
        return request

    # -- the end ------------------------------------------------------------------

    def settle(self, sent: SentStream) -> SentStream:
        """What the pipeline records of the stream the client was sent: once
        its first node broke off, that failure (``broke``) even when another
        node finished the answer, and then ``request.usage`` is the whole
        answer's (the nodes' own figures are not recorded)."""
        if self.broke is None:
            return sent
        if sent.complete:
            self.request.usage = self.usage()
        return sent._replace(broke=self.broke)

    def report(self) -> dict[str, Any]:
        """How many tokens each node produced, in order (with the backends'
        names when ``server.expose_backend_header`` is on)."""
        named = self.gateway.expose_backend_header
        return {"nodes": [{"backend": name, "tokens": tokens} if named else {"tokens": tokens}
                          for name, tokens in zip(self.names, self.tokens)]}

    def _trailer(self) -> bytes:
        self.done = True
        return COMMENT + orjson.dumps(self.report()) + b"\n\ndata: [DONE]\n\n"

    def _ending(self) -> bytes:
        """The end of an answer that was whole (or out of tokens) when its node
        broke off: its last chunk if it never came, and the trailer."""
        if self.done:
            return b""
        out = b""
        if self.exhausted:
            choice: dict[str, Any] = ({"index": 0, "delta": {}, "finish_reason": "length"} if self.chat
                                      else {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"})
            out = b"data: " + orjson.dumps({**self.fields, "choices": [choice]}) + b"\n\n"
        return out + self._trailer()

    def usage(self) -> Usage:
        """The whole answer's usage (for ``request.usage``)."""
        return Usage(prompt=self.prompt_tokens, completion=sum(self.tokens))

    def _release(self) -> None:
        owned, self.owned = self.owned, None
        if owned is not None:
            owned.release()

    async def aclose(self) -> None:
        try:
            await self.upstream.aclose()
        finally:
            self._release()


def _whole(data: bytes) -> int:
    """Where the last whole SSE event in ``data`` ends (0: none does)."""
    end = data.rfind(b"\n\n")
    end = end + 2 if end >= 0 else 0
    crlf = data.rfind(b"\r\n\r\n")
    if crlf >= 0 and crlf + 4 > end:
        end = crlf + 4
    cr = data.rfind(b"\r\r")
    if cr >= 0 and cr + 2 > end:
        end = cr + 2
    return end


def _data(event: bytes) -> bytes | None:
    """The ``data`` of one SSE event, None when it has none."""
    data = [line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(data) if data else None


def _payloads(events: bytes) -> Iterator[bytes]:
    """The ``data`` of each event in ``events`` (whole events) that has one."""
    for event in _EVENT_END.split(events):
        data = _data(event)
        if data is not None:
            yield data
