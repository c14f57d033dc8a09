"""The ``llama-cpp-python`` backend type: a GGUF model loaded in the gateway's
own process with llama-cpp-python, serving chat completions, completions and
embeddings in the shapes of llama.cpp's OpenAI-compatible server.

How it runs:

* ``instances`` copies of the model are loaded at startup (off the event loop).
  One copy serves one request at a time; a request that finds every copy busy
  waits (in arrival order) for the next free one.
* Generation runs in a worker thread per copy. A stream hands each event from
  that thread to the event loop as it is produced, through a small bounded
  channel: when the client reads slowly, the worker blocks instead of piling
  up events (backpressure).
* A request that is abandoned (client disconnect, stream closed, task
  cancelled) sets its job's cancel flag; the generation loop checks it before
  computing each token, so the copy is back in the pool within a token.

``llama_cpp`` is imported only when a backend of this type is configured, so
installing Comox without the ``llama`` extra costs nothing.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
from pydantic import ConfigDict, Field, model_validator

import comox
from comox.backends import BackendResponse
from comox.errors import ConfigError, InvalidRequest
from comox.request import GatewayRequest, check_number
from comox.settings import BackendSettings

__all__ = ["LlamaCppPythonBackend", "LlamaCppPythonSettings", "check_model_file", "GGUF_MAGIC"]

log = logging.getLogger("comox.llama_cpp_python")

GGUF_MAGIC = b"GGUF"
STREAM_DEPTH = 8
"""Events a stream may run ahead of the client before the worker blocks."""

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream")]
DONE = b"data: [DONE]\n\n"


class LlamaCppPythonSettings(BackendSettings):
    model_config = ConfigDict(extra="forbid")

    type: str = "llama-cpp-python"
    model_path: str
    """Path of a GGUF model file (``~`` is expanded)."""
    n_ctx: int = Field(2048, ge=0)
    """Context window in tokens per copy; 0 takes the model's training context."""
    n_threads: int | None = Field(None, ge=1)
    """CPU threads for generation per copy; by default llama-cpp-python's (half the cores)."""
    n_gpu_layers: int = Field(0, ge=-1)
    """Layers offloaded to the GPU; -1 offloads all of them (needs a GPU build)."""
    chat_format: str | None = None
    """A llama-cpp-python chat format (``gemma``, ``chatml``, ``llama-3``, …); by
    default the chat template stored in the GGUF."""
    instances: int = Field(1, ge=1, le=64)
    """Copies of the model; one copy serves one request at a time."""
    embedding: bool = False
    """Load the copies as an embedding model: serve ``/v1/embeddings`` only."""

    @model_validator(mode="after")
    def _one_request_per_copy(self) -> LlamaCppPythonSettings:
        # Requests beyond the copies wait in the gateway's queue for saturated
        # backends (server.queue_timeout_ms), like any other backend's.
        if self.max_concurrency is None:
            self.max_concurrency = self.instances
        return self


def check_model_file(value: str) -> Path:
    """The model file as a path, or :class:`ConfigError` naming it when it is
    missing, unreadable or not a GGUF file."""
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"model_path: the model file {str(path)!r} does not exist")
    if not path.is_file():
        raise ConfigError(f"model_path: {str(path)!r} is not a file")
    try:
        with path.open("rb") as file:
            magic = file.read(4)
    except OSError as exc:
        raise ConfigError(f"model_path: the model file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if magic != GGUF_MAGIC:
        raise ConfigError(
            f"model_path: {str(path)!r} is not a GGUF model file "
            f"(it starts with {magic!r}, a GGUF file starts with {GGUF_MAGIC!r})"
        )
    return path


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise ConfigError(
            f"type 'llama-cpp-python' needs the llama-cpp-python package ({exc}); "
            "install it with: pip install 'comox[llama]'"
        ) from None
    return llama_cpp


# -- request translation -----------------------------------------------------------

_NUMBERS = ("temperature", "top_p", "min_p", "typical_p", "presence_penalty", "frequency_penalty",
            "repeat_penalty", "tfs_z", "mirostat_tau", "mirostat_eta")
_INTEGERS = ("top_k", "seed", "mirostat_mode")
_SAMPLING = frozenset(_NUMBERS + _INTEGERS + ("stop", "logit_bias", "max_tokens"))
_IGNORED = frozenset({"model", "stream", "user", "n", "stream_options"})
_COMPLETION = _SAMPLING | _IGNORED | {"prompt", "suffix", "echo", "logprobs", "best_of"}
_CHAT = _SAMPLING | _IGNORED | {
    "messages", "max_completion_tokens", "response_format", "tools", "tool_choice",
    "functions", "function_call", "logprobs", "top_logprobs",
}
_EMBEDDING = frozenset({"model", "input", "encoding_format", "user"})


def _unsupported(body: dict, allowed: frozenset | set, endpoint: str) -> None:
    for key, value in body.items():
        if key not in allowed and value is not None:
            raise InvalidRequest(
                f"'{key}' is not supported by llama-cpp-python backends on /v1/{endpoint}",
                param=key, code="unsupported_parameter",
            )


def _sampling(body: dict, endpoint: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidRequest("'n' must be 1: a llama-cpp-python backend generates one choice", param="n", code="unsupported_value")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidRequest("'stream_options' must be an object", param="stream_options", code="invalid_type")
        if options.get("include_usage"):
            raise InvalidRequest("'stream_options.include_usage' is not supported by llama-cpp-python backends",
                                 param="stream_options", code="unsupported_value")
    for key in _NUMBERS:
        value = body.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidRequest(f"'{key}' must be a number", param=key, code="invalid_type")
            kwargs[key] = float(value)
    for key in _INTEGERS:
        value = body.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRequest(f"'{key}' must be an integer", param=key, code="invalid_type")
            kwargs[key] = value
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("'stop' must be a string or an array of strings", param="stop", code="invalid_type")
        kwargs["stop"] = stop
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise InvalidRequest("'logit_bias' must be an object of token id → bias", param="logit_bias", code="invalid_type")
        parsed = {}
        for token, value in bias.items():
            try:
                token_id = int(token)
            except (TypeError, ValueError):
                raise InvalidRequest(f"'logit_bias' key {token!r} is not a token id", param="logit_bias", code="invalid_value") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
                raise InvalidRequest("'logit_bias' values must be numbers between -100 and 100", param="logit_bias", code="invalid_value")
            parsed[token_id] = float(value)
        kwargs["logit_bias"] = parsed
    return kwargs


def completion_kwargs(body: dict) -> dict[str, Any]:
    """``create_completion`` arguments for a /v1/completions body, or InvalidRequest."""
    _unsupported(body, _COMPLETION, "completions")
    kwargs = _sampling(body, "completions")
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            pass  # one prompt given as token ids
        else:
            raise InvalidRequest("'prompt' must be a string, or an array of token ids (one prompt per request)",
                                 param="prompt", code="unsupported_value")
    kwargs["prompt"] = prompt
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise InvalidRequest("'best_of' must be 1", param="best_of", code="unsupported_value")
    suffix = body.get("suffix")
    if suffix is not None:
        if not isinstance(suffix, str):
            raise InvalidRequest("'suffix' must be a string", param="suffix", code="invalid_type")
        kwargs["suffix"] = suffix
    echo = body.get("echo")
    if echo is not None:
        if not isinstance(echo, bool):
            raise InvalidRequest("'echo' must be a boolean", param="echo", code="invalid_type")
        kwargs["echo"] = echo
    check_number(body, "logprobs", 0, 20, integer=True)
    if body.get("logprobs") is not None:
        kwargs["logprobs"] = body["logprobs"]
    # OpenAI's default for legacy completions is 16 tokens, as llama_cpp.server's.
    kwargs["max_tokens"] = body.get("max_tokens") or 16
    return kwargs


def chat_kwargs(body: dict) -> dict[str, Any]:
    """``create_chat_completion`` arguments for a /v1/chat/completions body, or InvalidRequest."""
    _unsupported(body, _CHAT, "chat/completions")
    kwargs = _sampling(body, "chat/completions")
    kwargs["messages"] = body["messages"]
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    kwargs["max_tokens"] = max_tokens  # None: up to the end of the context window
    for key in ("tools", "functions"):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, list):
                raise InvalidRequest(f"'{key}' must be an array", param=key, code="invalid_type")
            kwargs[key] = value
    for key in ("tool_choice", "function_call"):
        if body.get(key) is not None:
            kwargs[key] = body[key]
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict) or response_format.get("type") not in ("text", "json_object", "json_schema"):
            raise InvalidRequest("'response_format.type' must be 'text', 'json_object' or 'json_schema'",
                                 param="response_format", code="invalid_value")
        if response_format["type"] == "json_object":
            kwargs["response_format"] = {"type": "json_object"}
        elif response_format["type"] == "json_schema":
            # OpenAI's shape → llama-cpp-python's (a grammar built from the schema)
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise InvalidRequest("'response_format.json_schema.schema' must be an object",
                                     param="response_format", code="invalid_value")
            kwargs["response_format"] = {"type": "json_object", "schema": schema}
    logprobs = body.get("logprobs")
    if logprobs is not None:
        if not isinstance(logprobs, bool):
            raise InvalidRequest("'logprobs' must be a boolean", param="logprobs", code="invalid_type")
        kwargs["logprobs"] = logprobs
    check_number(body, "top_logprobs", 0, 20, integer=True)
    if body.get("top_logprobs") is not None:
        kwargs["top_logprobs"] = body["top_logprobs"]
    return kwargs


def embedding_kwargs(body: dict) -> tuple[dict[str, Any], str]:
    """``create_embedding`` arguments and the encoding format, or InvalidRequest."""
    _unsupported(body, _EMBEDDING, "embeddings")
    value = body["input"]
    if isinstance(value, list) and not all(isinstance(item, str) for item in value):
        raise InvalidRequest("'input' must be a string or an array of strings", param="input", code="unsupported_value")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be 'float' or 'base64'", param="encoding_format", code="invalid_value")
    return {"input": value}, encoding


# -- the worker side -----------------------------------------------------------------


class _Job:
    """One request on one model copy: its cancel flag, how many tokens it made
    and when (for llama.cpp-style ``timings``)."""

    __slots__ = ("cancel", "interrupted", "tokens", "tokens_at_cancel", "prompt_n", "cache_n", "started", "first", "last")

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.interrupted = False  # stopped early because the caller went away
        self.tokens = 0
        self.tokens_at_cancel: int | None = None
        self.prompt_n = 0
        self.cache_n = 0
        self.started = self.first = self.last = 0.0

    def stop(self) -> None:
        """The caller went away: the worker stops before its next token."""
        if not self.cancel.is_set():
            self.tokens_at_cancel = self.tokens
            self.cancel.set()

    def timings(self) -> dict:
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


def _cancellable_llama_class():
    """``llama_cpp.Llama`` whose token loop checks the running job's cancel flag
    before computing each token and counts what it generated."""
    llama_cpp = _import_llama_cpp()

    class CancellableLlama(llama_cpp.Llama):
        comox_job: _Job | None = None

        def generate(self, tokens, **kwargs):
            job = self.comox_job
            if job is None:
                yield from super().generate(tokens, **kwargs)
                return
            tokens = list(tokens)
            job.prompt_n = len(tokens)
            job.cache_n = self._cached_prefix(tokens)
            job.started = time.perf_counter()
            inner = super().generate(tokens, **kwargs)
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


class _Channel:
    """Events from a worker thread to the event loop, at most ``depth`` ahead
    of the reader. ``put`` blocks the worker while the reader is behind and
    returns False once the reader went away."""

    _END = object()

    def __init__(self, loop: asyncio.AbstractEventLoop, depth: int = STREAM_DEPTH):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
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


def _sse(chunk: dict) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _pump(channel: _Channel, start: Callable[[], Iterator[dict]], job: _Job) -> None:
    """Worker: start a llama stream and hand each event to the channel. The
    event with the ``finish_reason`` carries ``timings``, as llama.cpp's.
    Whatever happens, the channel gets its end (or the error)."""
    error = None
    events = None
    try:
        events = start()  # a chat template error is raised here, before any token
        for chunk in events:
            choices = chunk.get("choices")
            if choices and choices[0].get("finish_reason") is not None:
                chunk["timings"] = job.timings()
            if not channel.put(_sse(chunk)):
                job.interrupted = True
                break
        else:
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


# -- the backend ---------------------------------------------------------------------------


class LlamaCppPythonBackend:
    """A GGUF model in this process. ``stats()`` reports its load."""

    settings_model = LlamaCppPythonSettings

    def __init__(self, settings: LlamaCppPythonSettings):
        self.name = settings.name
        self.settings = settings
        self.model_path = check_model_file(settings.model_path)
        if settings.chat_format is not None:
            registry = _import_llama_cpp().llama_chat_format.LlamaChatCompletionHandlerRegistry()
            known = registry._chat_handlers
            if settings.chat_format not in known:
                raise ConfigError(
                    f"chat_format: unknown chat format {settings.chat_format!r} "
                    f"(known: {', '.join(sorted(known))})"
                )
        else:
            _import_llama_cpp()
        self.copies: list[Any] = []
        self._free: asyncio.Queue | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._jobs: set[_Job] = set()
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
        cls = _cancellable_llama_class()
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
            llama_cpp = _import_llama_cpp()
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

    def _run(self, copy: Any, work: Callable[[_Job], Any]) -> tuple[_Job, asyncio.Future]:
        """Start ``work`` on a worker thread with ``copy``; the copy returns to
        the pool when the thread is done with it, whatever happened."""
        job = _Job()
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

        def work(job: _Job) -> bytes:
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

        def work(job: _Job) -> bytes:
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
        channel = _Channel(asyncio.get_running_loop())
        job, _ = self._run(copy, lambda job: _pump(channel, lambda: getattr(copy, method)(stream=True, **kwargs), job))

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
        if first is _Channel._END:
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
                if item is _Channel._END:
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


@comox.hookimpl
def comox_backend_types():
    return {"llama-cpp-python": LlamaCppPythonBackend}
