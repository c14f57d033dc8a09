"""A test-only plugin that records how every request ended."""

import comox


class UsageSeen:
    """The status and ``request.usage`` of every finished request, in ``done``."""

    def __init__(self):
        self.done = []

    @comox.hookimpl
    def comox_request_done(self, request, status):
        self.done.append((status, request.usage))
