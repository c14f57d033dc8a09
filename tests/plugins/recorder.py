"""A test-only plugin that records and steers every per-request stage."""

import comox
from comox import BackendResponse, Principal


class Recorder:
    def __init__(self):
        self.calls = []
        self.cache = {}
        self.done = []
        self.seen = []

    @comox.hookimpl
    async def comox_authenticate(self, request):
        self.calls.append("authenticate")
        if request.header(b"authorization") == b"Bearer let-me-in":
            return Principal(key_id="k1")
        return None

    @comox.hookimpl
    def comox_admit(self, request, principal):
        self.calls.append(("admit", principal.key_id))
        if request.json.get("user") == "over-limit":
            raise comox.RateLimited("too many requests for this key", retry_after=7)
        if request.json.get("user") == "rewrite":
            request.set_json({**request.json, "user": "rewritten"})

    @comox.hookimpl
    async def comox_cache_lookup(self, request):
        self.calls.append("cache_lookup")
        body = self.cache.get(request.raw)
        return None if body is None else BackendResponse(200, body=body)

    @comox.hookimpl
    def comox_cache_store(self, request, response):
        self.calls.append("cache_store")
        self.cache[request.raw] = response.body

    @comox.hookimpl
    async def comox_request_done(self, request, status, backend, error):
        self.done.append((status, backend, type(error).__name__ if error else None))
        self.seen.append((request.endpoint, request.model))


class Failover:
    @comox.hookimpl
    async def comox_failover(self, request, error):
        if request.principal.local_only:
            return None
        return BackendResponse(200, body=b'{"answered_by": "failover", "because": "%s"}' % error.code.encode())
