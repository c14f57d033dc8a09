"""The backend's configuration keys, the model file check, and the import of
``llama_cpp`` (only when a backend of this type is configured)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from pydantic import ConfigDict, Field, model_validator

from comox import BackendSettings, ConfigError

__all__ = ["GGUF_MAGIC", "LlamaCppPythonSettings", "check_model_file", "import_llama_cpp"]

GGUF_MAGIC = b"GGUF"


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


def import_llama_cpp() -> ModuleType:
    """The ``llama_cpp`` module, or :class:`ConfigError` saying what to install."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ConfigError(
            f"type 'llama-cpp-python' needs the llama-cpp-python package ({exc}); "
            "install it with: pip install 'comox[llama]'"
        ) from None
    return llama_cpp
