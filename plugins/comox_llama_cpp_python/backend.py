"""The backend object: the pool of model copies, and requests run on them."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson

from comox import BackendResponse, ConfigError, GatewayRequest, InvalidRequest

from .settings import LlamaCppPythonSettings, check_model_file, import_llama_cpp
from .translate import chat_kwargs, completion_kwargs, embedding_kwargs
from .worker import DONE, Channel, Job, cancellable_llama_class, pump

__all__ = ["LlamaCppPythonBackend"]

log = logging.getLogger("comox.llama_cpp_python")

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream")]


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
        TemplateError = ()  # noqa: N806
    if isinstance(exc, (ValueError, TypeError, KeyError, TemplateError)):
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
        if settings.chat_format is not None:
            registry = import_llama_cpp().llama_chat_format.LlamaChatCompletionHandlerRegistry()
            known = registry._chat_handlers
            if settings.chat_format not in known:
                raise ConfigError(
                    f"chat_format: unknown chat format {settings.chat_format!r} "
                    f"(known: {', '.join(sorted(known))})"
                )
        else:
            import_llama_cpp()
        self.copies: list[Any] = []
        self._free: asyncio.Queue | None = None
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

    # -- lifecycle ---------------------------------------------------------------

    def _load(self) -> list[Any]:
        cls = cancellable_llama_class()
        settings = self.settings
        options: dict[str, Any] = {
            "n_ctx": settings.n_ctx,
            "n_gpu_layers": settings.n_gpu_layers,
            "embedding": settings.embedding,
            "verbose": False,
        }
        if settings.n_threads is not None:
            options["n_threads"] = settings.n_threads
        if settings.chat_format is not None:
            options["chat_format"] = settings.chat_format
        if settings.embedding:
            # One vector per input, as llama.cpp's server gives with --embeddings.
            llama_cpp = import_llama_cpp()
            options["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        copies = []
        try:
            for _ in range(settings.instances):
                copies.append(cls(str(self.model_path), **options))
        except Exception as exc:
            for copy in copies:
                copy.close()
            raise ConfigError(f"model_path: llama.cpp could not load {str(self.model_path)!r}: {exc}") from None
        return copies

    async def startup(self) -> None:
        """Load the copies, off the event loop."""
        if self._free is not None:
            return
        self._executor = ThreadPoolExecutor(
            max_workers=self.settings.instances, thread_name_prefix=f"comox-llama-{self.name}"
        )
        loop = asyncio.get_running_loop()
        copies = await loop.run_in_executor(self._executor, self._load)
        self.copies = copies
        free: asyncio.Queue = asyncio.Queue()
        for copy in copies:
            free.put_nowait(copy)
        self._free = free

    async def aclose(self) -> None:
        for job in list(self._jobs):
            job.stop()
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)
        for copy in self.copies:
            copy.close()
        self.copies = []
        self._free = None

    def stats(self) -> dict:
        return {
            "instances": self.settings.instances,
            "loaded": len(self.copies),
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

    # -- the pool of copies --------------------------------------------------------

    async def _acquire(self) -> Any:
        if self._free is None:
            await self.startup()
        free = self._free
        if not self.waiting and not free.empty():
            copy = free.get_nowait()
        else:
            self.waiting += 1
            self.peak_waiting = max(self.peak_waiting, self.waiting)
            try:
                copy = await free.get()
            finally:
                self.waiting -= 1
        self.busy += 1
        self.peak_busy = max(self.peak_busy, self.busy)
        return copy

    def _run(self, copy: Any, work: Callable[[Job], Any]) -> tuple[Job, asyncio.Future]:
        """Start ``work`` on a worker thread with ``copy``; the copy returns to
        the pool when the thread is done with it, whatever happened."""
        job = Job()
        self._jobs.add(job)
        started = time.perf_counter()

        def run() -> Any:
            copy.comox_job = job
            try:
                return work(job)
            finally:
                copy.comox_job = None

        def done(_: asyncio.Future) -> None:
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
            if self._free is not None:
                self._free.put_nowait(copy)

        future = asyncio.get_running_loop().run_in_executor(self._executor, run)
        future.add_done_callback(done)
        return job, future

    # -- requests -----------------------------------------------------------------

    async def handle(self, request: GatewayRequest) -> BackendResponse:
        endpoint = request.endpoint
        body = request.json
        if endpoint == "embeddings":
            if not self.settings.embedding:
                raise InvalidRequest(
                    f"backend {self.name!r} does not serve embeddings (set embedding = true on a llama-cpp-python backend)",
                    code="unsupported_endpoint",
                )
            kwargs, encoding = embedding_kwargs(body)
            return await self._embed(request, kwargs, encoding)
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
        kwargs["model"] = request.model
        if request.stream:
            return await self._stream(method, kwargs)
        return await self._complete(method, kwargs)

    async def _complete(self, method: str, kwargs: dict) -> BackendResponse:
        copy = await self._acquire()

        def work(job: Job) -> bytes:
            result = getattr(copy, method)(**kwargs)
            result["timings"] = job.timings()
            return orjson.dumps(result)

        job, future = self._run(copy, work)
        try:
            body = await asyncio.shield(future)
        except asyncio.CancelledError:
            job.stop()  # the caller went away: stop at the next token
            raise
        except Exception as exc:
            return self._failure(exc)
        return BackendResponse(200, list(JSON_HEADERS), body=body)

    async def _embed(self, request: GatewayRequest, kwargs: dict, encoding: str) -> BackendResponse:
        copy = await self._acquire()

        def work(job: Job) -> bytes:
            result = copy.create_embedding(model=request.model, **kwargs)
            if encoding == "base64":
                import numpy as np

                for item in result["data"]:
                    item["embedding"] = base64.b64encode(np.asarray(item["embedding"], dtype="<f4").tobytes()).decode()
            return orjson.dumps(result)

        job, future = self._run(copy, work)
        try:
            body = await asyncio.shield(future)
        except asyncio.CancelledError:
            job.stop()
            raise
        except Exception as exc:
            return self._failure(exc)
        return BackendResponse(200, list(JSON_HEADERS), body=body)

    async def _stream(self, method: str, kwargs: dict) -> BackendResponse:
        copy = await self._acquire()
        channel = Channel(asyncio.get_running_loop())
        job, _ = self._run(copy, lambda job: pump(channel, lambda: getattr(copy, method)(stream=True, **kwargs), job))

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
