"""A test-only plugin: JWT-style bearer tokens (HS256, signed with a shared
secret) instead of Comox's own keys. It shows that ``comox_authenticate``
replaces the built-in key check: a config with no ``[[keys]]`` starts, since
this plugin vouches for callers.

A token is ``base64url(header).base64url(claims).base64url(signature)``; the
claims used are ``sub`` (the caller: the principal's ``key_id``), ``exp``
(seconds since the epoch) and ``models`` (globs the caller may use).
"""

import base64
import hashlib
import hmac
import json
import time

import comox


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_token(secret: bytes, sub: str, *, exp: float | None = None, models: list[str] | None = None,
               alg: str = "HS256") -> str:
    header = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    claims = {"sub": sub, "exp": int(exp if exp is not None else time.time() + 3600)}
    if models is not None:
        claims["models"] = models
    body = _b64(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(signature)}"


class JWTAuth:
    """Register with ``create_app(settings, plugins=[JWTAuth(secret)])``."""

    def __init__(self, secret: bytes, clock=time.time):
        self.secret = secret
        self.clock = clock

    @comox.hookimpl
    def comox_authenticate(self, request):
        scheme, _, token = (request.header(b"authorization") or b"").partition(b" ")
        if scheme.lower() != b"bearer" or token.count(b".") != 2:
            return None  # not a token of ours: the core answers 401
        try:
            header, body, signature = token.decode("ascii").split(".")
            expected = hmac.new(self.secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(_unb64(signature), expected):
                raise ValueError("bad signature")
            if json.loads(_unb64(header)).get("alg") != "HS256":
                raise ValueError("not HS256")
            claims = json.loads(_unb64(body))
        except (ValueError, UnicodeDecodeError):
            raise comox.AuthenticationFailed("invalid token") from None
        if not isinstance(claims, dict) or not isinstance(claims.get("sub"), str):
            raise comox.AuthenticationFailed("invalid token")
        if not isinstance(claims.get("exp"), int) or claims["exp"] <= self.clock():
            raise comox.AuthenticationFailed("the token has expired")
        models = claims.get("models")
        return comox.Principal(key_id=claims["sub"], allowed_models=frozenset(models) if models else None)
