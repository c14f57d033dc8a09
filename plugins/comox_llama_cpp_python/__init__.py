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
* What the backend's own copies cannot do is served by one extra copy of the
  same file, loaded on the first request that needs it: an embedding copy for
  ``/v1/embeddings`` on a generation backend, a ``logits_all`` copy for
  ``logprobs``.

``llama_cpp`` is imported only when a backend of this type is configured, so
installing Comox without the ``llama`` extra costs nothing.

Modules: :mod:`.settings` (configuration keys, the model file check),
:mod:`.translate` (request bodies → llama-cpp-python arguments),
:mod:`.worker` (worker threads: jobs, the cancellable ``Llama``, the stream
channel), :mod:`.pool` (loaded copies, at startup or on first demand),
:mod:`.backend` (the backend object: its own copies, and the extra embedding
and logprobs copies it loads when a request first needs them).
"""

from __future__ import annotations

import comox

from .backend import LlamaCppPythonBackend
from .settings import GGUF_MAGIC, LlamaCppPythonSettings, check_model_file
from .worker import Job as _Job  # noqa: F401 - bench/llama_overhead.py times the worker side with these
from .worker import cancellable_llama_class as _cancellable_llama_class  # noqa: F401

__all__ = ["LlamaCppPythonBackend", "LlamaCppPythonSettings", "check_model_file", "GGUF_MAGIC"]


@comox.hookimpl
def comox_backend_types() -> dict[str, type]:
    return {"llama-cpp-python": LlamaCppPythonBackend}
