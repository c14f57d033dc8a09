"""The keys of one gateway: the ``[[keys]]`` entries of its config and those
of its ``keys_file``, as SHA-256 digests only, and the check of a presented key.

A presented key is hashed and its digest looked up among the stored ones
(:meth:`KeyRing.lookup`): keys themselves are never compared, so how long the
check takes says nothing about any stored key. The clear key is never kept,
logged or put in an error.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, field_validator, model_validator

import comox

from .credential import MAX_KEY_BYTES, credential, digest_of

__all__ = ["KeyEntry", "KeysSection", "KeyRing", "credential", "describe", "MAX_KEY_BYTES"]

log = logging.getLogger("comox.keys")



class KeyEntry(BaseModel):
    """One ``[[keys]]`` entry."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=128)
    """The key's name: what logs, limits and cache keys use (never the key)."""
    key_sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    """SHA-256 of the key, in hex (``comox keys new`` prints it)."""
    models: list[str] = Field(["*"], min_length=1)
    """Globs of the model groups the key may use; others are invisible to it (404)."""
    rpm: int | None = Field(None, ge=0)
    """Requests per minute (held by the limits plugin; 0 refuses every request)."""
    tpm: int | None = Field(None, ge=0)
    """Tokens per minute (held by the limits plugin)."""
    max_concurrency: int | None = Field(None, ge=0)
    """Requests in flight at once (held by the limits plugin)."""
    local_only: bool = False
    """The key's requests never leave for a cloud backend."""
    cloud_usd_per_day: float | None = Field(None, ge=0)
    """What the key's requests may spend on cloud failover per UTC day (the
    failover plugin, docs/failover.md)."""

    @field_validator("key_sha256")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()

    def principal(self) -> comox.Principal:
        return comox.Principal(
            key_id=self.id,
            allowed_models=None if "*" in self.models else frozenset(self.models),
            local_only=self.local_only,
            limits={"rpm": self.rpm, "tpm": self.tpm, "max_concurrency": self.max_concurrency,
                    "cloud_usd_per_day": self.cloud_usd_per_day},
        )


def _unique(entries: Sequence[KeyEntry], seen: Sequence[KeyEntry] = ()) -> None:
    """Raise ValueError when two entries share an id or a key (``seen``: the
    config's, when ``entries`` are a keys file's)."""
    ids = {entry.id for entry in seen}
    digests = {entry.key_sha256: entry.id for entry in seen}
    for i, entry in enumerate(entries):
        if entry.id in ids:
            raise ValueError(f"keys[{i}].id: the id {entry.id!r} is used twice")
        ids.add(entry.id)
        if entry.key_sha256 in digests:
            raise ValueError(f"keys[{i}].key_sha256: the same key as the key {digests[entry.key_sha256]!r}")
        digests[entry.key_sha256] = entry.id


class KeysSection(RootModel[list[KeyEntry]]):
    """The ``[[keys]]`` array of tables (absent: no keys)."""

    section: ClassVar[str] = "keys"

    @model_validator(mode="before")
    @classmethod
    def _absent(cls, value: Any) -> Any:
        return [] if value == {} else value  # the gateway passes {} for an absent table

    @model_validator(mode="after")
    def _no_twins(self) -> KeysSection:
        _unique(self.root)
        return self


class KeysFile(BaseModel):
    """A ``keys_file``: ``[[keys]]`` entries and nothing else."""

    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = []


def describe(exc: ValidationError) -> str:
    """One line naming each bad key: ``keys[0].key_sha256: String should match …``
    (messages only: a value, which could be a key pasted by mistake, never)."""
    lines = []
    for err in exc.errors():
        key = ""
        for part in err["loc"]:
            key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
        lines.append(f"{key}: {err['msg']}" if key else str(err.get("ctx", {}).get("error", err["msg"])))
    return "; ".join(lines)


class KeyRing:
    """The keys one gateway accepts: its config's ``[[keys]]`` and, when it
    has one, its ``keys_file`` (reloaded by :meth:`reload`).

    :param inline: the ``[[keys]]`` entries.
    :param keys_file: absolute path of the keys file, or None.
    :param forbidden: digests no entry may have (the admin key's), with a
        name for the error.
    """

    def __init__(self, inline: Sequence[KeyEntry], keys_file: str | None,
                 forbidden: dict[bytes, str] | None = None) -> None:
        self.inline = tuple(inline)
        self.keys_file = keys_file
        self.forbidden = dict(forbidden or {})
        self.signature: tuple[int, ...] | None = None
        self.table: dict[bytes, comox.Principal] = {}
        self.entries: tuple[KeyEntry, ...] = ()
        self.install(self.inline + (self._read_file() if keys_file else ()))

    @property
    def configured(self) -> bool:
        """Whether any keys were configured (a keys file counts, even empty)."""
        return bool(self.inline) or self.keys_file is not None

    def install(self, entries: tuple[KeyEntry, ...]) -> None:
        """Use ``entries`` from now on; ValueError (and nothing changes) when
        one is a forbidden key."""
        for entry in entries:
            name = self.forbidden.get(bytes.fromhex(entry.key_sha256))
            if name is not None:
                raise ValueError(f"keys: the key {entry.id!r} is the {name}: a client key must be a different key")
        self.entries = entries
        self.table = {bytes.fromhex(entry.key_sha256): entry.principal() for entry in entries}

    def lookup(self, key: bytes) -> comox.Principal | None:
        """The principal of ``key``, found by its SHA-256 digest in a hash
        table (as fast with 10,000 keys as with one). Keys themselves are
        never compared: how long a lookup takes can depend only on the digest
        of what was presented, which tells nothing about any stored key."""
        return self.table.get(digest_of(key))

    # -- the keys file ---------------------------------------------------------

    def stat(self) -> tuple[int, ...] | None:
        """What tells a changed file: device, inode, size, mtime — of the file
        a symlink points to (a Kubernetes Secret swaps a symlink). None: absent."""
        assert self.keys_file is not None
        try:
            st = os.stat(self.keys_file)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _read_file(self) -> tuple[KeyEntry, ...]:
        """The file's entries, checked against the config's; ValueError with
        one line saying what is wrong."""
        assert self.keys_file is not None
        self.signature = self.stat()
        try:
            with open(self.keys_file, "rb") as file:
                data = tomllib.load(file)
            entries = KeysFile.model_validate(data).keys
            _unique(entries, self.inline)
        except OSError as exc:
            raise ValueError(f"keys_file {self.keys_file}: cannot read it: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"keys_file {self.keys_file}: not valid TOML: {exc}") from None
        except ValidationError as exc:
            raise ValueError(f"keys_file {self.keys_file}: {describe(exc)}") from None
        except ValueError as exc:
            raise ValueError(f"keys_file {self.keys_file}: {exc}") from None
        return tuple(entries)

    def reload(self, why: str) -> bool:
        """Read the keys file again; on any problem keep the last good set and
        log one warning saying why. Whether the new set is in use."""
        try:
            self.install(self.inline + self._read_file())
        except ValueError as exc:
            log.warning("%s; keeping the last good set of %d keys (reload on %s)", exc, len(self.entries), why)
            return False
        log.info("keys_file %s reloaded on %s: %d keys", self.keys_file, why, len(self.entries))
        return True

    def poll(self) -> None:
        """Reload when the file changed since it was last read."""
        signature = self.stat()
        if signature != self.signature:
            self.reload("a change of the file" if signature is not None else "the file's removal")
