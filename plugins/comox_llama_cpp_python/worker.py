"""The worker side: generation runs in a worker thread per model copy.

* :class:`Job` is one request on one copy: its cancel flag and token counts.
* :func:`cancellable_llama_class` is ``llama_cpp.Llama`` whose token loop
  checks the job's cancel flag before computing each token.
* :class:`Channel` hands a stream's events from the worker thread to the event
  loop, at most :data:`STREAM_DEPTH` ahead of the reader (backpressure).
* :func:`pump` runs a llama stream into a channel.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from .settings import import_llama_cpp

if TYPE_CHECKING:
    import llama_cpp

__all__ = ["DONE", "STREAM_DEPTH", "Channel", "Job", "cancellable_llama_class", "pump", "sse", "usage_chunk"]

STREAM_DEPTH = 8
"""Events a stream may run ahead of the client before the worker blocks."""

DONE = b"data: [DONE]\n\n"


class Job:
    """One request on one model copy: its cancel flag, how many tokens it made
    and when (for llama.cpp-style ``timings``)."""

    __slots__ = ("cancel", "interrupted", "tokens", "tokens_at_cancel", "eog", "prompt_n", "cache_n", "started", "first", "last")

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.interrupted = False  # stopped early because the caller went away
        self.tokens = 0
        self.tokens_at_cancel: int | None = None
        self.eog = False  # the last token was an end of generation (not part of the answer)
        self.prompt_n = 0
        self.cache_n = 0
        self.started = self.first = self.last = 0.0

    def stop(self) -> None:
        """The caller went away: the worker stops before its next token."""
        if not self.cancel.is_set():
            self.tokens_at_cancel = self.tokens
            self.cancel.set()

    def timings(self) -> dict[str, Any]:
        """What llama.cpp's server reports as ``timings``."""
        evaluated = max(self.prompt_n - self.cache_n, 0)
        prompt_ms = max((self.first or self.started) - self.started, 0.0) * 1000.0
        predicted_ms = max(self.last - self.first, 0.0) * 1000.0 if self.tokens > 1 else 0.0
        return {
            "cache_n": self.cache_n,
            "prompt_n": evaluated,
            "prompt_ms": round(prompt_ms, 3),
            "prompt_per_second": round(evaluated / prompt_ms * 1000.0, 3) if prompt_ms > 0 else None,
            "predicted_n": self.tokens,
            "predicted_ms": round(predicted_ms, 3),
            "predicted_per_second": round((self.tokens - 1) / predicted_ms * 1000.0, 3) if predicted_ms > 0 else None,
        }

    def usage(self) -> dict[str, Any]:
        """OpenAI's ``usage``, counted as llama-cpp-python counts it in a
        non-streaming answer (the end-of-generation token is not counted)."""
        completion = self.tokens - self.eog
        return {"prompt_tokens": self.prompt_n, "completion_tokens": completion, "total_tokens": self.prompt_n + completion}


def cancellable_llama_class() -> type[llama_cpp.Llama]:
    """``llama_cpp.Llama`` whose token loop checks the running job's cancel flag
    before computing each token and counts what it generated."""
    import_llama_cpp()  # ConfigError saying what to install when it is missing
    from llama_cpp import Llama, llama_vocab_is_eog

    class CancellableLlama(Llama):
        comox_job: Job | None = None

        def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> Generator[int, Sequence[int] | None, None]:
            job = self.comox_job
            if job is None:
                yield from super().generate(tokens, *args, **kwargs)
                return
            tokens = list(tokens)
            job.prompt_n = len(tokens)
            job.cache_n = self._cached_prefix(tokens)
            job.started = time.perf_counter()
            is_eog, vocab = llama_vocab_is_eog, self._model.vocab
            inner = super().generate(tokens, *args, **kwargs)
            try:
                while True:
                    if job.cancel.is_set():
                        job.interrupted = True
                        return
                    try:
                        token = next(inner)
                    except StopIteration:
                        return
                    job.last = time.perf_counter()
                    if not job.tokens:
                        job.first = job.last
                    job.tokens += 1
                    job.eog = is_eog(vocab, token)
                    yield token
            finally:
                inner.close()

        def _cached_prefix(self, tokens: list[int]) -> int:
            """Prompt tokens already in the KV cache (llama's own prefix reuse)."""
            if not self.n_tokens:
                return 0
            n = 0
            for a, b in zip(self._input_ids[: self.n_tokens], tokens):
                if a != b:
                    break
                n += 1
            return n - 1 if n == len(tokens) else n  # the last one is evaluated again

    return CancellableLlama


class Channel:
    """Events from a worker thread to the event loop, at most ``depth`` ahead
    of the reader. ``put`` blocks the worker while the reader is behind and
    returns False once the reader went away."""

    _END = object()

    def __init__(self, loop: asyncio.AbstractEventLoop, depth: int = STREAM_DEPTH):
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.slots = threading.Semaphore(depth)
        self.closed = threading.Event()

    # worker thread
    def put(self, item: Any) -> bool:
        self.slots.acquire()
        if self.closed.is_set():
            return False
        return self._send(item)

    def finish(self, error: BaseException | None = None) -> None:
        self._send(error if error is not None else self._END)

    def _send(self, item: Any) -> bool:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening
            self.closed.set()
            return False
        return True

    # event loop
    async def get(self) -> Any:
        item = await self.queue.get()
        self.slots.release()
        return item

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            self.slots.release(STREAM_DEPTH + 1)  # wake a worker blocked in put()


def sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n\n"


def pump(channel: Channel, start: Callable[[], Iterator[dict[str, Any]]], job: Job, *,
         include_usage: bool = False, shape: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    """Worker: start a llama stream and hand each event (passed through
    ``shape``, if given) to the channel. The event with the ``finish_reason``
    carries ``timings``, as llama.cpp's. With ``include_usage``, every event
    has ``"usage": null`` and the stream ends with an event whose ``choices``
    are empty and whose ``usage`` counts the tokens, as OpenAI's. Whatever
    happens, the channel gets its end (or the error)."""
    error = None
    events = None
    last = None
    try:
        events = start()  # a chat template error is raised here, before any token
        for chunk in events:
            choices = chunk.get("choices")
            if choices and choices[0].get("finish_reason") is not None:
                chunk["timings"] = job.timings()
            if shape is not None:
                chunk = shape(chunk)
            if include_usage:
                chunk["usage"] = None
            last = chunk
            if not channel.put(sse(chunk)):
                job.interrupted = True
                break
        else:
            if include_usage and last is not None:
                channel.put(sse(usage_chunk(last, job)))
            channel.put(DONE)
    except BaseException as exc:  # handed to the reader, raised there
        error = exc
    finally:
        try:
            close = getattr(events, "close", None)
            if close is not None:
                close()  # GeneratorExit inside llama's loop: generation stops
        finally:
            channel.finish(error)


def usage_chunk(last: dict[str, Any], job: Job) -> dict[str, Any]:
    """The event that ends a stream asked for ``stream_options.include_usage``:
    no choices, the ``usage`` (and ``timings``, which the gateway reads from a
    stream's last events)."""
    return {
        "id": last.get("id"), "object": last.get("object"), "created": last.get("created"), "model": last.get("model"),
        "choices": [], "usage": job.usage(), "timings": job.timings(),
    }
