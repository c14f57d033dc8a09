"""OpenAI chat completions ⇄ Anthropic Messages, both ways: pure functions and
two stateful stream translators, no I/O. Import everything from here (the
package is split in two modules only to keep each one short).

=========================================  =========================================
OpenAI client, Anthropic upstream           Anthropic client, OpenAI-format upstream
(the ``anthropic`` backend type)            (an inbound ``/v1/messages`` endpoint)
=========================================  =========================================
:func:`openai_to_anthropic_request`        :func:`anthropic_to_openai_request`
:func:`anthropic_to_openai_response`       :func:`openai_to_anthropic_response`
:class:`AnthropicStreamTranslator`         :class:`OpenAIStreamTranslator`
:func:`anthropic_to_openai_error`          :func:`openai_to_anthropic_error`
:func:`openai_usage`                       :func:`anthropic_usage`
=========================================  =========================================

:class:`SSEDecoder` splits either side's server-sent events; :func:`openai_sse`
and :func:`anthropic_sse` frame them. A request the other API cannot express
raises :class:`comox.InvalidRequest` (400) naming the parameter.

Usage: Anthropic counts ``cache_read_input_tokens`` and
``cache_creation_input_tokens`` beside ``input_tokens``; OpenAI counts cached
tokens inside ``prompt_tokens`` (``prompt_tokens_details.cached_tokens``). Each
direction converts so that no token is counted twice, and the OpenAI side keeps
both Anthropic figures as ``usage.cache_read_input_tokens`` and
``usage.cache_creation_input_tokens`` (so cache writes can be priced).
"""

from .messages import (
    ERRORS,
    FINISH,
    JSON_TOOL,
    STOP,
    Translated,
    anthropic_to_openai_error,
    anthropic_to_openai_request,
    anthropic_to_openai_response,
    anthropic_usage,
    drop_prefix,
    finish_reason,
    openai_to_anthropic_error,
    openai_to_anthropic_request,
    openai_to_anthropic_response,
    openai_usage,
    reasoning_of,
    stop_of,
)
from .streams import AnthropicStreamTranslator, OpenAIStreamTranslator, SSEDecoder, anthropic_sse, openai_sse

__all__ = [
    # OpenAI client, Anthropic upstream
    "openai_to_anthropic_request", "anthropic_to_openai_response", "AnthropicStreamTranslator",
    "anthropic_to_openai_error", "openai_usage",
    # Anthropic client, OpenAI-format upstream
    "anthropic_to_openai_request", "openai_to_anthropic_response", "OpenAIStreamTranslator",
    "openai_to_anthropic_error", "anthropic_usage", "reasoning_of", "stop_of",
    # shared
    "Translated", "SSEDecoder", "openai_sse", "anthropic_sse", "finish_reason", "drop_prefix", "JSON_TOOL", "FINISH", "STOP", "ERRORS",
]
