"""The backend object: its pools of model copies, and requests run on them.

A backend has its own copies (``instances`` of them, loaded at startup), and
loads on first demand one extra copy of the same file for what its own copies
cannot do: an embedding copy (``embedding=True``) for ``/v1/embeddings`` on a
generation backend, and a copy loaded with ``logits_all=True`` for requests
that ask for log probabilities (llama-cpp-python computes them only there)."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import orjson

from comox import BackendResponse, ConfigError, GatewayRequest, InvalidRequest

from .pool import Pool
from .settings import LlamaCppPythonSettings, check_model_file, import_llama_cpp
from .translate import chat_kwargs, completion_kwargs, embedding_kwargs, include_usage, trim_top_logprobs, wants_logprobs
from .worker import DONE, Channel, Job, cancellable_llama_class, pump

__all__ = ["LlamaCppPythonBackend"]

log = logging.getLogger("comox.llama_cpp_python")

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream")]
EXTRA_COPIES = 2
"""Copies a backend may load on demand: one for embeddings, one for log probabilities."""


def _dumps(result: dict[str, Any]) -> bytes:
    return orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY)  # logprobs are numpy floats


def _error_for(exc: BaseException) -> Exception:
    """What a generation failure becomes: bad input → 400, anything else → 500."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, ValueError) and "exceed context window" in message:
        return InvalidRequest(message, code="context_length_exceeded")
    if isinstance(exc, InvalidRequest):
        return exc
    try:
        from jinja2 import TemplateError
    except ImportError:  # pragma: no cover - llama-cpp-python depends on jinja2
        template_errors: tuple[type[Exception], ...] = ()
    else:
        template_errors = (TemplateError,)
    if isinstance(exc, (ValueError, TypeError, KeyError, *template_errors)):
        return InvalidRequest(f"the request could not be run on this model: {message}", code="invalid_request")
    return _ServerError(message)


class _ServerError(Exception):
    def response(self) -> BackendResponse:
        body = {"error": {"message": f"generation failed: {self}", "type": "server_error", "param": None, "code": None}}
        return BackendResponse(500, list(JSON_HEADERS), body=orjson.dumps(body))


class LlamaCppPythonBackend:
    """A GGUF model in this process. ``stats()`` reports its load."""

    settings_model = LlamaCppPythonSettings

    def __init__(self, settings: LlamaCppPythonSettings):
        self.name = settings.name
        self.settings = settings
        self.model_path = check_model_file(settings.model_path)
        llama_cpp = import_llama_cpp()
        if settings.chat_format is not None:
            known = llama_cpp.llama_chat_format.LlamaChatCompletionHandlerRegistry()._chat_handlers
            if settings.chat_format not in known:
                raise ConfigError(
                    f"chat_format: unknown chat format {settings.chat_format!r} "
                    f"(known: {', '.join(sorted(known))})"
                )
        # One vector per input, as llama.cpp's server gives with --embeddings.
        embedding = {"embedding": True, "pooling_type": llama_cpp.LLAMA_POOLING_TYPE_MEAN}
        own = embedding if settings.embedding else {}
        self.own = Pool("model copies", partial(self._make, settings.instances, **own))
        self.embedder = self.own if settings.embedding else Pool("embedding copy", partial(self._make, 1, **embedding))
        self.scorer = Pool("logprobs copy", partial(self._make, 1, logits_all=True))
        self._executor: ThreadPoolExecutor | None = None
        self._jobs: set[Job] = set()
        # load figures
        self.busy = 0
        self.waiting = 0
        self.peak_busy = 0
        self.peak_waiting = 0
        self.served = 0
        self.cancelled = 0
        self.last_cancelled_tokens: int | None = None
        self.last_cancel_overrun: int | None = None
        self.generated_tokens = 0
        self.tokens_per_s: float | None = None

    @property
    def copies(self) -> list[Any]:
        """The backend's own loaded copies."""
        return self.own.copies

    # -- lifecycle ---------------------------------------------------------------

    def _make(self, count: int, **extra: Any) -> list[Any]:
        """``count`` copies of the model (in a worker thread), or ConfigError."""
        cls = cancellable_llama_class()
        settings = self.settings
        options: dict[str, Any] = {"n_ctx": settings.n_ctx, "n_gpu_layers": settings.n_gpu_layers, "verbose": False, **extra}
        if settings.n_threads is not None:
            options["n_threads"] = settings.n_threads
        if settings.chat_format is not None:
            options["chat_format"] = settings.chat_format
        copies = []
        try:
            for _ in range(count):
                copies.append(cls(str(self.model_path), **options))
        except Exception as exc:
            for copy in copies:
                copy.close()
            raise ConfigError(f"model_path: llama.cpp could not load {str(self.model_path)!r}: {exc}") from None
        return copies

    async def startup(self) -> None:
        """Load the backend's own copies, off the event loop."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self.settings.instances + EXTRA_COPIES, thread_name_prefix=f"comox-llama-{self.name}"
            )
        await self.own.ready(self._executor)

    async def aclose(self) -> None:
        for job in list(self._jobs):
            job.stop()
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)
        for pool in {self.own, self.embedder, self.scorer}:
            pool.close()

    def stats(self) -> dict[str, Any]:
        return {
            "instances": self.settings.instances,
            "loaded": len(self.own.copies),
            "embedding_copy_loaded": bool(self.embedder.copies) and self.embedder is not self.own,
            "logprobs_copy_loaded": bool(self.scorer.copies),
            "busy": self.busy,
            "waiting": self.waiting,
            "peak_busy": self.peak_busy,
            "peak_waiting": self.peak_waiting,
            "served": self.served,
            "cancelled": self.cancelled,
            "last_cancelled_tokens": self.last_cancelled_tokens,
            "last_cancel_overrun": self.last_cancel_overrun,
            "generated_tokens": self.generated_tokens,
            "tokens_per_s": None if self.tokens_per_s is None else round(self.tokens_per_s, 2),
        }

    # -- the pools of copies -------------------------------------------------------

    async def _acquire(self, pool: Pool) -> Any:
        """An idle copy of ``pool``, in arrival order (loading the pool first
        if need be)."""
        if self._executor is None:
            await self.startup()
        free = pool.free
        if free is not None and not pool.waiting and not free.empty():
            copy = free.get_nowait()
        else:
            self.waiting += 1
            pool.waiting += 1
            self.peak_waiting = max(self.peak_waiting, self.waiting)
            try:
                free = await pool.ready(self._executor)
                copy = await free.get()
            finally:
                self.waiting -= 1
                pool.waiting -= 1
        self.busy += 1
        self.peak_busy = max(self.peak_busy, self.busy)
        return copy

    def _run(self, pool: Pool, copy: Any, work: Callable[[Job], Any]) -> tuple[Job, asyncio.Future[Any]]:
        """Start ``work`` on a worker thread with ``copy``; the copy returns to
        its pool when the thread is done with it, whatever happened."""
        job = Job()
        self._jobs.add(job)
        started = time.perf_counter()

        def run() -> Any:
            copy.comox_job = job
            try:
                return work(job)
            finally:
                copy.comox_job = None

        def done(_: asyncio.Future[Any]) -> None:
            self._jobs.discard(job)
            self.busy -= 1
            self.served += 1
            self.generated_tokens += job.tokens
            elapsed = time.perf_counter() - started
            if job.interrupted:
                self.cancelled += 1
                self.last_cancelled_tokens = job.tokens
                if job.tokens_at_cancel is not None:
                    # tokens made after the cancel: what "stops within a token" means
                    self.last_cancel_overrun = job.tokens - job.tokens_at_cancel
            elif job.tokens > 1 and elapsed > 0:
                rate = job.tokens / elapsed
                self.tokens_per_s = rate if self.tokens_per_s is None else self.tokens_per_s + 0.3 * (rate - self.tokens_per_s)
            if pool.free is not None:
                pool.free.put_nowait(copy)

        future = asyncio.get_running_loop().run_in_executor(self._executor, run)
        future.add_done_callback(done)
        return job, future

    # -- requests -----------------------------------------------------------------

    async def handle(self, request: GatewayRequest) -> BackendResponse:
        endpoint = request.endpoint
        body = request.json
        if endpoint == "embeddings":
            kwargs, encoding = embedding_kwargs(body)
            return await self._answer(self.embedder, partial(_embed, model=request.model, encoding=encoding, **kwargs))
        if self.settings.embedding:
            raise InvalidRequest(
                f"backend {self.name!r} is an embedding model (embedding = true); it serves only /v1/embeddings",
                code="unsupported_endpoint",
            )
        if endpoint == "chat/completions":
            kwargs, method = chat_kwargs(body), "create_chat_completion"
        elif endpoint == "completions":
            kwargs, method = completion_kwargs(body), "create_completion"
        else:  # pragma: no cover - the core routes only the three endpoints
            raise InvalidRequest(f"unsupported endpoint /v1/{endpoint}")
        usage = include_usage(body)
        kwargs["model"] = request.model
        pool = self.scorer if wants_logprobs(kwargs) else self.own
        shape = None
        if method == "create_chat_completion" and wants_logprobs(kwargs):
            shape = partial(trim_top_logprobs, count=kwargs["top_logprobs"])
        if request.stream:
            return await self._stream(pool, method, kwargs, usage, shape)
        return await self._answer(pool, partial(_generate, method=method, shape=shape, **kwargs))

    async def _answer(self, pool: Pool, work: Callable[[Any, Job], bytes]) -> BackendResponse:
        """A JSON answer: ``work(copy, job)`` on a copy of ``pool``."""
        try:
            copy = await self._acquire(pool)
        except Exception as exc:  # the pool could not be loaded
            return self._failure(exc)
        job, future = self._run(pool, copy, partial(work, copy))
        try:
            body = await asyncio.shield(future)
        except asyncio.CancelledError:
            job.stop()  # the caller went away: stop at the next token
            raise
        except Exception as exc:
            return self._failure(exc)
        return BackendResponse(200, list(JSON_HEADERS), body=body)

    async def _stream(self, pool: Pool, method: str, kwargs: dict[str, Any], usage: bool,
                      shape: Callable[[dict[str, Any]], dict[str, Any]] | None) -> BackendResponse:
        try:
            copy = await self._acquire(pool)
        except Exception as exc:  # the pool could not be loaded
            return self._failure(exc)
        channel = Channel(asyncio.get_running_loop())
        start = partial(getattr(copy, method), stream=True, **kwargs)
        job, _ = self._run(pool, copy, lambda job: pump(channel, start, job, include_usage=usage, shape=shape))

        def stop() -> None:
            job.stop()
            channel.close()

        # Wait for the first event so that a request llama.cpp refuses (e.g. a
        # prompt longer than the context) gets a proper status, not a broken stream.
        try:
            first = await channel.get()
        except asyncio.CancelledError:
            stop()
            raise
        if first is Channel._END:
            first = DONE
        elif isinstance(first, BaseException):
            stop()
            return self._failure(first)

        async def events() -> AsyncIterator[bytes]:
            yield first
            if first is DONE:
                return
            while True:
                item = await channel.get()
                if item is Channel._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item

        async def close() -> None:
            stop()

        return BackendResponse(200, list(SSE_HEADERS), stream=events(), close=close)

    @staticmethod
    def _failure(exc: BaseException) -> BackendResponse:
        error = _error_for(exc)
        if isinstance(error, _ServerError):
            log.error("llama-cpp-python generation failed: %r", exc)
            return error.response()
        raise error


def _generate(copy: Any, job: Job, *, method: str, shape: Callable[[dict[str, Any]], dict[str, Any]] | None, **kwargs: Any) -> bytes:
    """Worker: a completion or chat answer, with llama.cpp-style ``timings``."""
    result = getattr(copy, method)(**kwargs)
    result["timings"] = job.timings()
    return _dumps(shape(result) if shape is not None else result)


def _embed(copy: Any, job: Job, *, encoding: str, **kwargs: Any) -> bytes:
    """Worker: an embeddings answer, the vectors as floats or base64 (little-endian float32)."""
    result = copy.create_embedding(**kwargs)
    if encoding == "base64":
        import numpy as np

        for item in result["data"]:
            item["embedding"] = base64.b64encode(np.asarray(item["embedding"], dtype="<f4").tobytes()).decode()
    return _dumps(result)
