"""Who may see the fleet page: the admin key, or a session the login form
started with it.

The cookie never holds the key. It holds a session token — ``v1.<expires>.<id>``
and an HMAC-SHA256 of that under a secret derived from the admin key — so
every worker and replica that has the same key accepts it without sharing
anything, and changing the key ends every session. Logging out records the
session's id in ``gateway.shared_state`` until it would have expired, so a copy
of the cookie is refused too. Every comparison is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

from comox import SharedState

__all__ = ["COOKIE", "SESSION_S", "Sessions"]

COOKIE = "comox_dashboard"
SESSION_S = 8 * 3600
"""How long a login lasts."""
LOGIN_TRIES = 10
"""Login attempts a client address may make at once; one more comes back every
``LOGIN_REFILL_S`` seconds."""
LOGIN_REFILL_S = 6.0
_REVOKED = "dashboard:revoked:"


class Sessions:
    """The admin key and the sessions signed with it."""

    def __init__(self, key: str, state: SharedState):
        self._key = key.encode()
        self._secret = hmac.new(self._key, b"comox-dashboard-session-v1", hashlib.sha256).digest()
        self._state = state

    def is_key(self, candidate: str) -> bool:
        return hmac.compare_digest(candidate.encode("utf-8", "replace"), self._key)

    def bearer(self, authorization: str) -> bool:
        """``Authorization: Bearer <admin key>``."""
        scheme, _, token = authorization.partition(" ")
        # Always compare, so timing does not tell a wrong scheme from a wrong key.
        ok = self.is_key(token.strip())
        return ok and scheme.lower() == "bearer"

    def issue(self) -> str:
        """A new session token, valid for ``SESSION_S``."""
        body = f"v1.{int(time.time()) + SESSION_S}.{secrets.token_urlsafe(16)}"
        return f"{body}.{self._sign(body)}"

    async def valid(self, token: str) -> bool:
        parsed = self._parse(token)
        if parsed is None:
            return False
        expires, session = parsed
        return expires > time.time() and await self._state.get(_REVOKED + session) is None

    async def revoke(self, token: str) -> None:
        """Log a session out: refused from now on, wherever it is presented."""
        parsed = self._parse(token)
        if parsed is not None:
            expires, session = parsed
            await self._state.set(_REVOKED + session, b"1", ttl_s=max(1.0, expires - time.time()))

    async def may_try(self, client: str) -> float:
        """0 when ``client`` may try a key now, else the seconds until it may."""
        bucket = await self._state.take(f"dashboard:login:{client}", 1, capacity=LOGIN_TRIES, per_s=1 / LOGIN_REFILL_S)
        return 0.0 if bucket.allowed else max(1.0, bucket.retry_after_s)

    def _sign(self, body: str) -> str:
        digest = hmac.new(self._secret, body.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def _parse(self, token: str) -> tuple[int, str] | None:
        """(expires, session id) of a token signed here, else None."""
        body, _, signature = token.rpartition(".")
        good = hmac.compare_digest(signature.encode("utf-8", "replace"), self._sign(body).encode())
        parts = body.split(".")
        if not good or len(parts) != 3 or parts[0] != "v1" or not parts[1].isdigit():
            return None
        return int(parts[1]), parts[2]
