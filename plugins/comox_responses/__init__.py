"""The ``responses`` plugin: OpenAI's Responses API (``/v1/responses``) over the
same fleet, keys, limits, cache, routing and failover as chat completions.

* ``POST /v1/responses`` — passed through byte for byte to a model group whose
  backends serve ``/v1/responses`` themselves (``native_apis =
  ["responses"]``); otherwise translated to a chat completion and back
  (:mod:`comox_responses.translate`, :mod:`comox_responses.output`), its
  stream as the Responses API's typed events (:mod:`comox_responses.stream`).
* ``GET`` / ``DELETE /v1/responses/{id}``, ``POST /v1/responses/{id}/cancel``,
  ``GET /v1/responses/{id}/input_items`` — answered from the stored responses
  (:mod:`comox_responses.store`): kept in ``gateway.shared_state`` (every
  replica's, with the ``redis`` plugin) for ``ttl_s``, under the key id of the
  caller that created them, never when the request said ``store: false``.
* ``previous_response_id`` — the stored conversation (its input items and
  output) is put before the request's input, in ``comox_admit``, so limits
  and the cache see the whole prompt.

Settings: ``[plugins.responses]`` (:class:`ResponsesSettings`). See docs/responses.md.
"""

from __future__ import annotations

from collections.abc import Awaitable

from pydantic import BaseModel, ConfigDict, Field

import comox
from comox import GatewayRequest

from .api import ResponsesAPI

__all__ = ["ResponsesSettings", "ResponsesAPI"]

DAY_S = 86_400.0


class ResponsesSettings(BaseModel):
    """``[plugins.responses]``"""

    model_config = ConfigDict(extra="forbid")

    ttl_s: float = Field(30 * DAY_S, gt=0)
    """How long a stored response can be retrieved or continued
    (``previous_response_id``) after it was created: 30 days, as OpenAI keeps them."""
    max_entry_bytes: int = Field(16 * 1024 * 1024, ge=1)
    """A stored response holds its whole conversation; one larger than this is
    not stored (logged), so it cannot be retrieved or continued."""


@comox.hookimpl
def comox_plugin_settings() -> type[BaseModel]:
    return ResponsesSettings


@comox.hookimpl
def comox_inbound_apis(gateway: comox.Gateway) -> list[comox.InboundAPI]:
    settings = gateway.plugin_settings("responses")
    if not isinstance(settings, ResponsesSettings):  # registered under another name
        settings = ResponsesSettings()
    return [ResponsesAPI(gateway, ttl_s=settings.ttl_s, max_entry_bytes=settings.max_entry_bytes)]


@comox.hookimpl(tryfirst=True)
def comox_admit(request: GatewayRequest) -> Awaitable[None] | None:
    """Put the conversation of ``previous_response_id`` before the input, before
    other admission checks estimate the prompt. (A plain function: a request
    of another API costs no coroutine.)"""
    api = request.api
    if isinstance(api, ResponsesAPI):
        return api.admit(request)
    return None
