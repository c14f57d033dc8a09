"""A test-only authentication plugin: the bearer token names one of a fixed set
of principals (any auth plugin's Principal is enough for the limits plugin)."""

import comox


class FixedPrincipal:
    def __init__(self, principals: dict[str, comox.Principal]):
        self.principals = principals

    @comox.hookimpl
    def comox_authenticate(self, request):
        scheme, _, token = (request.header(b"authorization") or b"").partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        return self.principals.get(token.strip().decode("latin-1"))
