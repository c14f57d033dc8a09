"""A test-only routing policy, ``in_order``: the first candidate in config
order, so a request starts on the first node and a retry or a resumed stream
goes to the second."""

import comox


class InOrder:
    def __init__(self, group):
        pass

    def choose(self, request, candidates):
        return candidates[0]


class InOrderPolicy:
    @comox.hookimpl
    def comox_routing_policies(self):
        return {"in_order": InOrder}
