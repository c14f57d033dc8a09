"""The fleet page (plugins/comox_dashboard, docs/dashboard.md) against a real
gateway under uvicorn in front of two stand-in upstreams: who may see it, what
its event stream holds (never a key, never content), and in a real browser —
Debian's chromium driven by Playwright, never a downloaded browser — a backend
going unhealthy when its server stops and healthy again when it restarts, on
a laptop's and a phone's screen.

Screenshots are kept in tests/artifacts/ (ignored by git): dashboard-laptop.png,
dashboard-unhealthy.png and dashboard-phone.png.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import httpx
import orjson
import pytest

from comox.testing import Fault, ServerThread, StandInUpstream
from tests.secrets_check import secret

KEY = secret("dash-admin-key-0123456789", "admin key")
CANARY = "PROMPT-CANARY-7f3a"
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium")
LAPTOP = {"width": 1366, "height": 768}
PHONE = {"width": 390, "height": 844}


@pytest.fixture
def two_upstreams(upstreams):
    return [upstreams("a"), upstreams("b")]


def settings(ups):
    check = {"enabled": True, "interval_s": 0.1, "timeout_s": 1.0}
    return {"models": [{"name": "m", "backends": [{"name": up.name, "url": up.url, "health_check": check} for up in ups]}]}


@pytest.fixture
def gateway(monkeypatch, comox_serve, two_upstreams, caplog):
    monkeypatch.setenv("COMOX_ADMIN_KEY", KEY)
    caplog.set_level(logging.INFO, logger="comox.events")  # as `comox serve` logs them
    return comox_serve(settings(two_upstreams))


def restart(upstream: StandInUpstream) -> None:
    """Start the stand-in's server again, on the port it had."""
    assert upstream.server is not None
    port = upstream.server.port
    upstream.server = ServerThread(upstream, lifespan="off", port=port).start()


def read_stream(url: str, headers: dict[str, str], messages: int) -> tuple[str, list[dict]]:
    """The raw text of ``/dashboard/events`` until ``messages`` messages came, and those messages."""
    text, found = "", []
    with httpx.stream("GET", f"{url}/dashboard/events", headers=headers, timeout=30) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            text += line + "\n"
            if line.startswith("data: "):
                found.append(orjson.loads(line[6:]))
                if len(found) == messages:
                    break
    return text, found


def chat(url: str, content: str, stream: bool = False) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "stream": stream}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


# -- who may see it ---------------------------------------------------------------


def test_off_without_an_admin_key(monkeypatch, comox_serve, two_upstreams):
    monkeypatch.delenv("COMOX_ADMIN_KEY", raising=False)
    server = comox_serve(settings(two_upstreams))
    for path in ("/dashboard", "/dashboard/login", "/dashboard/events"):
        assert httpx.get(f"{server.url}{path}", headers={"authorization": f"Bearer {KEY}"}).status_code == 404


def test_the_admin_key_env_is_the_admin_plugins(monkeypatch, comox_serve, two_upstreams):
    monkeypatch.delenv("COMOX_ADMIN_KEY", raising=False)
    monkeypatch.setenv("OPS_KEY", KEY)
    server = comox_serve({**settings(two_upstreams), "plugins": {"admin": {"key_env": "OPS_KEY"}}})
    assert httpx.get(f"{server.url}/dashboard", headers={"authorization": f"Bearer {KEY}"}).status_code == 200


def test_without_login_the_page_redirects_to_the_form_and_the_stream_is_401(gateway):
    page = httpx.get(f"{gateway.url}/dashboard")
    assert page.status_code == 303 and page.headers["location"] == "/dashboard/login"
    assert httpx.get(f"{gateway.url}/dashboard/events").status_code == 401
    for header in ("Bearer wrong", f"Basic {KEY}", f"Bearer {KEY}x"):
        for path in ("/dashboard", "/dashboard/events"):
            reply = httpx.get(f"{gateway.url}{path}", headers={"authorization": header})
            assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
            assert KEY not in reply.text
    page = httpx.get(f"{gateway.url}/dashboard", headers={"authorization": f"Bearer {KEY}"})
    assert page.status_code == 200 and "<title>Comox fleet</title>" in page.text and KEY not in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]


def test_login_logout_and_the_session_cookie(gateway):
    url = gateway.url
    wrong = httpx.post(f"{url}/dashboard/login", data={"key": "not-the-key"})
    assert wrong.status_code == 401 and "Wrong key." in wrong.text and "set-cookie" not in wrong.headers

    login = httpx.post(f"{url}/dashboard/login", data={"key": KEY})
    assert login.status_code == 303 and login.headers["location"] == "/dashboard"
    cookie = login.headers["set-cookie"]
    assert re.search(r"(?i)\bhttponly\b", cookie) and re.search(r"(?i)\bsamesite=strict\b", cookie)
    assert re.search(r"(?i)\bpath=/dashboard\b", cookie) and KEY not in cookie
    token = login.cookies["comox_dashboard"]
    assert httpx.get(f"{url}/dashboard", cookies={"comox_dashboard": token}).status_code == 200

    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    assert httpx.get(f"{url}/dashboard", cookies={"comox_dashboard": forged}).status_code == 303
    assert httpx.get(f"{url}/dashboard/events", cookies={"comox_dashboard": forged}).status_code == 401

    out = httpx.post(f"{url}/dashboard/logout", cookies={"comox_dashboard": token})
    assert out.status_code == 303 and out.headers["location"] == "/dashboard/login"
    assert re.search(r"(?i)max-age=0", out.headers["set-cookie"])
    # A copy of the cookie kept after logging out is refused too.
    assert httpx.get(f"{url}/dashboard", cookies={"comox_dashboard": token}).status_code == 303


def test_login_tries_are_limited(gateway):
    answers = [httpx.post(f"{gateway.url}/dashboard/login", data={"key": f"guess-{i}"}).status_code for i in range(11)]
    assert answers == [401] * 10 + [429]


# -- what the stream holds ----------------------------------------------------------


def test_the_stream_holds_the_fleet_and_never_a_key_or_content(gateway, two_upstreams):
    a, b = two_upstreams
    a.faults.append(Fault(status=500))  # one retry: a fleet event naming the request
    for i in range(4):
        assert chat(gateway.url, f"{CANARY} {i}", stream=bool(i % 2)).status_code == 200
    auth = {"authorization": f"Bearer {KEY}"}
    text, messages = read_stream(gateway.url, auth, 3)
    assert KEY not in text and CANARY not in text

    first = messages[0]
    assert first["reset"] is True and not any(m["reset"] for m in messages[1:])
    (group,) = first["groups"]
    assert group["name"] == "m" and {row["name"] for row in group["backends"]} == {"a", "b"}
    assert {row["state"] for row in group["backends"]} == {"healthy"}
    assert sum(row["requests"] for row in group["backends"]) >= 4
    samples = [s for m in messages for s in m["samples"]]
    assert samples and set(samples[-1]["b"]) == {"a", "b"}
    ttfts = [s["b"][name][3] for s in samples for name in s["b"] if s["b"][name][3] is not None]
    assert ttfts, "the streamed answers' time to first token is sampled"
    assert "request_retried" in {e["event"] for m in messages for e in m["events"]}
    assert first["spend"]["budgets"][0]["budget"] == "day"  # the failover plugin is loaded

    # Reconnecting with the last id carries on: no reset, only newer samples.
    last_id = re.findall(r"^id: (\S+)$", text, re.M)[-1]
    text2, again = read_stream(gateway.url, {**auth, "last-event-id": last_id}, 1)
    assert again[0]["reset"] is False and all(s["seq"] > samples[-1]["seq"] for s in again[0]["samples"])
    assert KEY not in text2 and CANARY not in text2


def test_each_stream_ends_and_says_when_to_reconnect(gateway, monkeypatch):
    from comox_dashboard import routes

    monkeypatch.setattr(routes, "STREAM_S", 0.5)
    with httpx.stream("GET", f"{gateway.url}/dashboard/events", headers={"authorization": f"Bearer {KEY}"}, timeout=10) as reply:
        text = reply.read().decode()
    assert text.startswith("retry: 1000\n\n") and text.count("data: ") >= 1


def test_no_spend_panel_without_the_failover_plugin(monkeypatch, comox_serve, two_upstreams):
    monkeypatch.setenv("COMOX_ADMIN_KEY", KEY)
    monkeypatch.setenv("COMOX_BLOCK_PLUGINS", "failover")
    server = comox_serve(settings(two_upstreams))
    _, messages = read_stream(server.url, {"authorization": f"Bearer {KEY}"}, 1)
    assert messages[0]["spend"] is None


def test_mounted_in_a_host_app(monkeypatch, two_upstreams):
    import fastapi

    import comox

    monkeypatch.setenv("COMOX_ADMIN_KEY", KEY)
    app = fastapi.FastAPI()
    app.mount("/llm", comox.create_app(comox.Settings(auth="none", **settings(two_upstreams))))
    with ServerThread(app) as server:
        assert httpx.get(f"{server.url}/llm/dashboard").headers["location"] == "/llm/dashboard/login"
        form = httpx.get(f"{server.url}/llm/dashboard/login")
        assert 'action="/llm/dashboard/login"' in form.text and 'href="/llm/dashboard/static/dashboard.css"' in form.text
        login = httpx.post(f"{server.url}/llm/dashboard/login", data={"key": KEY})
        assert login.headers["location"] == "/llm/dashboard"
        assert re.search(r"(?i)\bpath=/llm/dashboard\b", login.headers["set-cookie"])
        assert httpx.get(f"{server.url}/llm/dashboard/static/dashboard.js").status_code == 200
        _, messages = read_stream(f"{server.url}/llm", {"authorization": f"Bearer {KEY}"}, 1)
        assert messages[0]["groups"][0]["name"] == "m"
        assert messages[0]["spend"]["currency"] == "USD"  # /admin/spend reached through the host's router


# -- in a real browser --------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed here (apt-get install chromium; CI installs it)")
    from playwright.sync_api import sync_playwright  # the test extra installs it

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


def log_in(browser, url: str, viewport: dict[str, int], **options):
    """A new browser context, logged in through the form, on the fleet page."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport=viewport, **options)
    page = context.new_page()
    elsewhere: list[str] = []  # requests to other origins, and errors (a script's, a refused style or script)
    page.on("request", lambda request: None if request.url.startswith(url) else elsewhere.append(request.url))
    page.on("pageerror", lambda error: elsewhere.append(f"page error: {error}"))
    page.on("console", lambda message: elsewhere.append(f"console: {message.text}") if message.type == "error" else None)
    page.goto(f"{url}/dashboard")
    expect(page).to_have_url(f"{url}/dashboard/login")
    page.fill("#key", "wrong")
    page.click("button[type=submit]")
    expect(page.get_by_role("alert")).to_have_text("Wrong key.")
    assert all("401" in problem for problem in elsewhere)  # the browser notes the refusal
    elsewhere.clear()
    page.fill("#key", KEY)
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{url}/dashboard")
    return context, page, elsewhere


def backend(page, name: str):
    return page.locator(f'article[data-backend="{name}"]')


def horizontal_overflow(page) -> int:
    return int(page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth"))


def test_the_page_shows_a_backend_go_unhealthy_and_come_back(browser, gateway, two_upstreams):
    from playwright.sync_api import expect

    a, _ = two_upstreams
    ARTIFACTS.mkdir(exist_ok=True)
    context, page, elsewhere = log_in(browser, gateway.url, LAPTOP)
    try:
        cookie = next(c for c in context.cookies() if c["name"] == "comox_dashboard")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/dashboard"
        assert KEY not in cookie["value"]
        for name in ("a", "b"):
            expect(backend(page, name)).to_have_attribute("data-state", "healthy", timeout=15_000)
        expect(page.locator("#status")).to_have_attribute("data-live", "live", timeout=15_000)
        chat(gateway.url, CANARY, stream=True)
        expect(page.locator("#spend-panel")).to_be_visible(timeout=15_000)
        ttft = page.locator('article[data-backend] [data-field="ttft"]').filter(has_text=re.compile(r"\d ms"))
        expect(ttft.first).to_be_visible(timeout=15_000)  # the streamed answer's time to first token
        expect(page.locator("article[data-backend] polyline").first).to_be_attached(timeout=15_000)
        page.screenshot(path=str(ARTIFACTS / "dashboard-laptop.png"), full_page=True)
        assert horizontal_overflow(page) <= 0

        a.server.stop()  # the node's server goes away
        expect(backend(page, "a")).to_have_attribute("data-state", re.compile("unhealthy|ejected"), timeout=15_000)
        expect(backend(page, "b")).to_have_attribute("data-state", "healthy")
        expect(page.locator('#events li[data-event="backend_unhealthy"]').first).to_contain_text("backend a", timeout=15_000)
        page.screenshot(path=str(ARTIFACTS / "dashboard-unhealthy.png"), full_page=True)

        restart(a)
        expect(backend(page, "a")).to_have_attribute("data-state", "healthy", timeout=15_000)
        expect(page.locator('#events li[data-event="backend_recovered"]').first).to_contain_text("backend a", timeout=15_000)

        content = page.content()
        assert KEY not in content and CANARY not in content
        assert elsewhere == [], "the page loaded something from elsewhere, or failed"

        page.get_by_role("button", name="Log out").click()
        expect(page).to_have_url(f"{gateway.url}/dashboard/login")
        page.goto(f"{gateway.url}/dashboard")
        expect(page).to_have_url(f"{gateway.url}/dashboard/login")
    finally:
        context.close()
    print(f"screenshots: {ARTIFACTS}")


def test_the_page_fits_a_phone(browser, gateway):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    context, page, elsewhere = log_in(browser, gateway.url, PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    try:
        expect(backend(page, "a")).to_have_attribute("data-state", "healthy", timeout=15_000)
        expect(backend(page, "b")).to_be_visible()
        expect(page.locator("#events li[data-event]").first).to_be_visible(timeout=15_000)
        assert horizontal_overflow(page) <= 0
        # One column: the second backend's card is below the first one, not beside it.
        first, second = backend(page, "a").bounding_box(), backend(page, "b").bounding_box()
        assert first is not None and second is not None and second["y"] >= first["y"] + first["height"]
        assert first["width"] <= PHONE["width"]
        page.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)
        login = context.new_page()
        login.goto(f"{gateway.url}/dashboard/login")
        assert horizontal_overflow(login) <= 0
        assert elsewhere == []
    finally:
        context.close()
