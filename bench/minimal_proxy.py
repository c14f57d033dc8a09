"""The reference points for ``bench/perf.py``: the smallest pure-ASGI proxy that
can be written, under uvicorn, forwarding to a fixed upstream.

``MINPROXY_CLIENT`` picks how bytes move upstream:

* ``aiohttp`` (default): one shared ``aiohttp.ClientSession`` — the limit a
  Python gateway can reach on this stack;
* ``httpx``: one stock ``httpx.AsyncClient``;
* ``httpx-aiohttp``: httpx's API over the aiohttp transport (``httpx-aiohttp``);
* ``pyreqwest``: one shared ``pyreqwest`` client (Rust's reqwest and hyper),
  the limit for a gateway whose client is not Python;
* ``memory``: no upstream at all, uvicorn answering from memory;
* ``comox-transport``: Comox's own ``AiohttpTransport`` (``comox.transport``),
  to tell its cost apart from the rest of the gateway.

``MINPROXY_TUNE_GC=1`` tunes the garbage collector after startup as ``comox serve``
does (``comox.app.tune_gc``), to tell that gain apart from the rest.

``MINPROXY_UPSTREAM`` is the JSON upstream's base URL and ``MINPROXY_UPSTREAM_SSE``
the streaming one's; a body containing ``"stream":true`` goes to the latter
(a byte search, so the proxy parses nothing), at the request's own path
(``/v1/chat/completions``; ``/v1/messages`` or ``/v1/responses`` for perf.py's
native pass-through rows).
"""

from __future__ import annotations

import gc
import os

CLIENT = os.environ.get("MINPROXY_CLIENT", "aiohttp")
UPSTREAM = os.environ.get("MINPROXY_UPSTREAM", "http://127.0.0.1:8081").rstrip("/")
UPSTREAM_SSE = os.environ.get("MINPROXY_UPSTREAM_SSE", UPSTREAM).rstrip("/")

JSON_BODY = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"bench",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":9,"total_tokens":18}}'
)
SSE_BODY = b"".join(
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,"model":"bench",'
    b'"choices":[{"index":0,"delta":{"content":"tok' + str(i).encode() + b' "},"finish_reason":null}]}\n\n'
    for i in range(8)
) + b"data: [DONE]\n\n"

_client = None


def _make_client():
    if CLIENT == "comox-transport":
        from comox.transport import AiohttpTransport

        return AiohttpTransport(default_headers={"content-type": "application/json"})
    if CLIENT == "comox-httptools":
        from comox.transport_httptools import HttptoolsTransport

        return HttptoolsTransport(default_headers={"content-type": "application/json"})
    if CLIENT == "pyreqwest":
        from datetime import timedelta

        from pyreqwest.client import ClientBuilder

        return (ClientBuilder().max_connections(1024).pool_idle_timeout(timedelta(seconds=30)).no_proxy()
                .gzip(False).brotli(False).zstd(False).deflate(False).follow_redirects(False).build())
    if CLIENT == "aiohttp":
        import aiohttp

        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1024, keepalive_timeout=30),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )
    import httpx

    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    if CLIENT == "httpx":
        return httpx.AsyncClient(limits=limits, trust_env=False)
    if CLIENT == "httpx-aiohttp":
        from httpx_aiohttp import AiohttpTransport

        return httpx.AsyncClient(transport=AiohttpTransport(), limits=limits, trust_env=False)
    raise SystemExit(f"unknown MINPROXY_CLIENT {CLIENT!r}")


async def _read_body(receive) -> bytes:
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


async def app(scope, receive, send):
    global _client
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if CLIENT != "memory":
                    _client = _make_client()
                if os.environ.get("MINPROXY_TUNE_GC"):  # what comox.app.tune_gc does, without importing Comox
                    gc.collect()
                    gc.freeze()
                    gc.set_threshold(7000, *gc.get_threshold()[1:])
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if _client is not None:
                    await _client.close() if CLIENT in ("aiohttp", "pyreqwest") else await _client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = await _read_body(receive)
    stream = b'"stream":true' in body or b'"stream": true' in body
    url = (UPSTREAM_SSE if stream else UPSTREAM) + scope["path"]
    headers = {"content-type": "application/json"}
    if CLIENT == "memory":
        payload = SSE_BODY if stream else JSON_BODY
        ctype = b"text/event-stream" if stream else b"application/json"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", ctype), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
    elif CLIENT == "aiohttp":
        async with _client.post(url, data=body, headers=headers) as response:
            ctype = response.headers.get("content-type", "application/json").encode()
            if stream:
                await send({"type": "http.response.start", "status": response.status, "headers": [(b"content-type", ctype)]})
                async for chunk in response.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            else:
                payload = await response.read()
                await send({"type": "http.response.start", "status": response.status, "headers": [(b"content-type", ctype), (b"content-length", str(len(payload)).encode())]})
                await send({"type": "http.response.body", "body": payload})
    elif CLIENT == "pyreqwest":
        builder = _client.post(url).headers(headers).body_bytes(body)
        if stream:
            async with builder.build_streamed() as response:
                ctype = (response.headers.get("content-type") or "text/event-stream").encode()
                await send({"type": "http.response.start", "status": response.status, "headers": [(b"content-type", ctype)]})
                reader = response.body_reader
                while (chunk := await reader.read_chunk()) is not None:
                    await send({"type": "http.response.body", "body": bytes(chunk), "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        else:
            response = await builder.build().send()
            payload = bytes(await response.bytes())
            ctype = (response.headers.get("content-type") or "application/json").encode()
            await send({"type": "http.response.start", "status": response.status, "headers": [(b"content-type", ctype), (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
    elif CLIENT in ("comox-transport", "comox-httptools"):
        response = await _client.post(url, body, {})
        try:
            if stream:
                await send({"type": "http.response.start", "status": response.status, "headers": response.headers})
                async for chunk in response.stream:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            else:
                payload = response.body
                await send({"type": "http.response.start", "status": response.status, "headers": response.headers + [(b"content-length", str(len(payload)).encode())]})
                await send({"type": "http.response.body", "body": payload})
        finally:
            await response.aclose()
    else:
        request = _client.build_request("POST", url, content=body, headers=headers)
        response = await _client.send(request, stream=True)
        try:
            ctype = response.headers.get("content-type", "application/json").encode()
            if stream:
                await send({"type": "http.response.start", "status": response.status_code, "headers": [(b"content-type", ctype)]})
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            else:
                payload = await response.aread()
                await send({"type": "http.response.start", "status": response.status_code, "headers": [(b"content-type", ctype), (b"content-length", str(len(payload)).encode())]})
                await send({"type": "http.response.body", "body": payload})
        finally:
            await response.aclose()
