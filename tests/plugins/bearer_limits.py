"""Test-only authentication: ``Authorization: Bearer <name>:<rpm>`` is the key
``<name>`` allowed ``<rpm>`` requests a minute (``principal.limits``, which
the ``limits`` plugin enforces). For tests of the shared state that need
keys with limits but not the keys file.

A replica process: ``python -m uvicorn tests.plugins.bearer_limits:create_app
--factory`` with the config in ``COMOX_CONFIG``.
"""

import logging
import sys

import comox


@comox.hookimpl
def comox_authenticate(request):
    scheme, _, token = (request.header(b"authorization") or b"").partition(b" ")
    name, _, rpm = token.decode().partition(":")
    if scheme.lower() != b"bearer" or not name or not rpm.isdigit():
        raise comox.AuthenticationFailed("send Authorization: Bearer <name>:<rpm>")
    return comox.Principal(key_id=name, limits={"rpm": int(rpm)})


def create_app():
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # as comox serve logs
    return comox.create_app(plugins=[sys.modules[__name__]])
