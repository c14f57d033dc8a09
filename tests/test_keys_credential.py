"""comox_keys/credential.py: the key a request presents, read from its headers
(compiled with mypyc when installed: these run against what the install built)."""

import hashlib

import pytest
from comox_keys.credential import MAX_KEY_BYTES, Malformed, credential, digest_of

KEY = b"cmx-0123456789abcdef"


@pytest.mark.parametrize("headers", [
    [(b"authorization", b"Bearer " + KEY)],
    [(b"authorization", b"bearer  " + KEY + b" ")],  # the scheme in any case; spaces around the key
    [(b"x-api-key", KEY)],
    [(b"content-type", b"application/json"), (b"x-api-key", KEY), (b"authorization", b"Bearer " + KEY)],
    ([b"x-api-key", KEY],),  # ASGI's pairs may be lists, in any iterable
])
def test_the_key_is_read_from_either_header(headers):
    assert credential(headers) == KEY


def test_no_key_is_none():
    assert credential([(b"content-type", b"application/json")]) is None
    assert credential([]) is None


@pytest.mark.parametrize("headers", [
    [(b"authorization", b"Basic " + KEY)],
    [(b"authorization", b"Bearer")],
    [(b"authorization", b"Bearer " + KEY), (b"authorization", b"Bearer " + KEY)],
    [(b"x-api-key", KEY), (b"x-api-key", KEY)],
    [(b"x-api-key", KEY), (b"authorization", b"Bearer other")],
    [(b"x-api-key", b"")],
    [(b"x-api-key", b"k" * (MAX_KEY_BYTES + 1))],
    [(b"x-api-key", b"cmx-a\tb")],
    [(b"x-api-key", "clé".encode())],
])
def test_anything_else_is_malformed(headers):
    with pytest.raises(Malformed):
        credential(headers)


def test_the_digest_is_sha256():
    assert digest_of(KEY) == hashlib.sha256(KEY).digest()
