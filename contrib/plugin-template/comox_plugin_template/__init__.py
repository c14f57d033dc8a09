"""A template Comox plugin: one startup hook (an extra route) and one
per-request hook (an ``async`` admission check)."""

from starlette.responses import JSONResponse
from starlette.routing import Route

import comox


async def hello(request):
    return JSONResponse({"hello": "from comox-plugin-template"})


@comox.hookimpl
def comox_routes(gateway):
    return [Route("/-/plugin-template", hello)]


@comox.hookimpl
async def comox_admit(request, principal):
    # Per-request hooks may be async; raise a ComoxError to reject.
    if request.json.get("user") == "blocked-by-template":
        raise comox.PermissionDenied("this user is blocked by comox-plugin-template", param="user")
