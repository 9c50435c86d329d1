"""Connecting a mailbox with a real browser: headless Chromium (driven by
Selenium through chromedriver) clicks "Connect Outlook" on an app page, picks
an account on the Microsoft simulator's sign-in page, and comes back to the
app. Nothing is auto-approved: the browser does what a person does, with the
module's real cookies and redirects."""
import contextlib
import os
import re
import shutil
import tempfile
import urllib.parse

import pytest

from conftest import sim_call
from test_signin import ADELE, Setup

CHROMIUM = os.environ.get("MSO_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("MSO_CHROMEDRIVER", "/usr/bin/chromedriver")
WAIT = 30           # seconds, for every explicit wait
STATE_COOKIE = "msoauth_flow_"
COOKIE_PATH = "/microsoft_outlook/"   # the folder of the confirm path

APP_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>ERP - Mail settings</title>
<style>body{font-family:sans-serif;margin:2em} #status{font-size:1.4em}
a#connect{display:inline-block;padding:.5em 1em;background:#0078d4;color:#fff;
text-decoration:none;border-radius:4px}</style></head>
<body>
<h1>ERP mail settings</h1>
<p><a id="connect"
  href="/microsoft_outlook/connect?mailbox=adele@contoso.com&amp;return_to=/app/index.html">Connect Outlook</a></p>
<p id="status">Not connected yet.</p>
<script>
  var q = new URLSearchParams(location.search), s = document.getElementById("status");
  if (q.get("msoauth") === "connected")
    s.textContent = "Outlook connected (account " + q.get("account") + ")";
  else if (q.get("msoauth") === "error")
    s.textContent = "Could not connect Outlook: " + q.get("reason");
  s.setAttribute("data-done", "1");
</script>
</body></html>
"""


def _require_browser():
    """The install script installs Chromium, chromedriver and Selenium: a missing
    one is a broken test environment, so the test fails (it does not skip)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    if missing:
        pytest.fail(f"browser test needs {', '.join(missing)}: install the Debian packages "
                    "chromium and chromium-driver (scripts install them)", pytrace=False)
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("browser test needs Selenium: install the Debian package python3-selenium "
                    "and run pytest with /usr/bin/python3", pytrace=False)


@contextlib.contextmanager
def chromium():
    """One headless Chromium with a fresh profile; always quit afterwards. Used
    inside the test (not as a fixture) so a missing browser is a test FAILURE."""
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="msoauth-chromium.")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1024,768",
                f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    driver = None
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        driver.set_page_load_timeout(WAIT)
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def browser_setup(httpd, simulator):
    """The module against the simulator (Setup from test_signin), the app page in
    htdocs, and a simulator that shows its sign-in page instead of auto-approving."""
    httpd.file("htdocs/app/index.html", APP_PAGE, 0o644)
    s = Setup(httpd, simulator)
    s.wait_schema()
    config = sim_call(simulator, "POST", "/_sim/config",
                      {"auto_approve": False, "auto_approve_user": None})
    assert config["auto_approve"] is False and config["auto_approve_user"] is None
    return s


def all_cookies(driver):
    """Every cookie in Chromium's jar, whatever its path (WebDriver's own
    get_cookies() only returns those the current page would be sent)."""
    return driver.execute_cdp_cmd("Network.getAllCookies", {})["cookies"]


def state_cookies(driver):
    return [c for c in all_cookies(driver) if c["name"].startswith(STATE_COOKIE)]


def wait(driver, what, cond):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        return WebDriverWait(driver, WAIT).until(lambda d: cond(d))
    except TimeoutException:
        raise AssertionError(f"timed out after {WAIT}s waiting for {what}; the browser is at "
                             f"{driver.current_url}:\n{driver.page_source[:3000]}") from None


def open_sign_in_page(driver, s):
    """App page -> click "Connect Outlook" -> the simulator's sign-in page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    driver.get(f"{s.h.url}/app/index.html")
    link = wait(driver, "the Connect Outlook link", EC.element_to_be_clickable((By.ID, "connect")))
    assert link.text == "Connect Outlook"
    link.click()
    wait(driver, "the simulator's sign-in page",
         lambda d: d.current_url.startswith(s.sim.url + "/") and d.title == "Sign in to your account")
    auth = urllib.parse.urlsplit(driver.current_url)
    q = dict(urllib.parse.parse_qsl(auth.query))
    assert auth.path == "/common/oauth2/v2.0/authorize"
    assert q["client_id"] == s.client_id and q["redirect_uri"] == s.redirect_uri
    assert q["login_hint"] == "adele@contoso.com"
    # the module left its state cookie, scoped to the connect/confirm folder only
    (cookie,) = state_cookies(driver)
    assert re.fullmatch(STATE_COOKIE + r"[0-9a-z]+_" + re.escape(q["state"][:16]), cookie["name"])
    assert cookie["path"] == COOKIE_PATH
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Lax"
    assert cookie["domain"] == "127.0.0.1"
    return q


def wait_back_at_app(driver, s):
    """Waits for the app page (script run) after the module's redirect; returns its query."""
    from selenium.webdriver.common.by import By

    def landed(d):
        u = urllib.parse.urlsplit(d.current_url)
        return (f"{u.scheme}://{u.netloc}" == s.h.url and u.path == "/app/index.html"
                and "msoauth=" in u.query)
    wait(driver, "the redirect back to /app/index.html", landed)
    wait(driver, "the app page's script",
         lambda d: d.find_element(By.ID, "status").get_attribute("data-done") == "1")
    return urllib.parse.parse_qsl(urllib.parse.urlsplit(driver.current_url).query)


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(b"\x89PNG\r\n\x1a\n"), path


def test_chromium_connects_a_mailbox(httpd, simulator, tmp_path):
    with chromium() as chrome:
        connect_and_pick_adele(chrome, httpd, simulator, tmp_path)


def connect_and_pick_adele(chrome, httpd, simulator, tmp_path):
    from selenium.webdriver.common.by import By

    s = browser_setup(httpd, simulator)
    open_sign_in_page(chrome, s)

    # the real sign-in page: Adele first (the login_hint), Megan too, and Cancel
    page = chrome.find_element(By.TAG_NAME, "body").text
    assert "ERP" in page and "Mail.Read" in page and "Cancel" in page
    buttons = chrome.find_elements(By.CSS_SELECTOR, 'button[name="user"]')
    assert [b.get_attribute("value") for b in buttons][0] == ADELE[1]
    assert "Adele Vance <adele@contoso.com>" in buttons[0].text
    signin_png = tmp_path / "signin.png"
    assert chrome.save_screenshot(str(signin_png))
    assert_png(signin_png)

    chrome.find_element(By.CSS_SELECTOR, f'button[name="user"][value="{ADELE[1]}"]').click()
    query = wait_back_at_app(chrome, s)

    # back on the app page, connected, with the account's id
    assert [k for k, _ in query] == ["msoauth", "account"], query
    q = dict(query)
    assert q["msoauth"] == "connected" and q["account"].isdigit()
    account_id = int(q["account"])
    status = chrome.find_element(By.ID, "status").text
    assert status == f"Outlook connected (account {account_id})"
    landing_png = tmp_path / "landing.png"
    assert chrome.save_screenshot(str(landing_png))
    assert_png(landing_png)

    # the account row
    (acct,) = s.accounts()
    assert int(acct["id"]) == account_id
    assert acct["mailbox"] == "adele@contoso.com"
    assert acct["display_name"] == ADELE[2] and acct["object_id"] == ADELE[1]
    assert acct["state"] == "connected"

    # the state cookie is spent: gone from Chromium's jar, for every path
    assert state_cookies(chrome) == [], state_cookies(chrome)

    # the person really used the page: a GET showed it, a POST submitted it,
    # then the code was redeemed once
    log = sim_call(simulator, "GET", "/_sim/log")["requests"]
    kinds = [r["kind"] for r in log]
    assert "authorize" in kinds and "authorize_submit" in kinds, kinds
    assert sum(1 for r in log if r.get("grant_type") == "authorization_code") == 1


def test_chromium_cancel_on_the_sign_in_page(httpd, simulator, tmp_path):
    with chromium() as chrome:
        connect_and_cancel(chrome, httpd, simulator, tmp_path)


def connect_and_cancel(chrome, httpd, simulator, tmp_path):
    from selenium.webdriver.common.by import By

    s = browser_setup(httpd, simulator)
    open_sign_in_page(chrome, s)
    chrome.find_element(By.CSS_SELECTOR, 'button[name="cancel"]').click()
    q = dict(wait_back_at_app(chrome, s))

    assert q["msoauth"] == "error" and q["reason"] == "access_denied", q
    assert q.get("aadsts", "65004") == "65004", q
    assert "account" not in q
    assert chrome.find_element(By.ID, "status").text == "Could not connect Outlook: access_denied"
    png = tmp_path / "cancelled.png"
    assert chrome.save_screenshot(str(png))
    assert_png(png)
    assert s.accounts() == []
    assert state_cookies(chrome) == [], state_cookies(chrome)
    kinds = [r["kind"] for r in sim_call(simulator, "GET", "/_sim/log")["requests"]]
    assert "authorize_submit" in kinds and "token" not in kinds, kinds


# --- the status page, as an administrator uses it ----------------------------------------

ADMIN_LOCATION = """
<Location /microsoft_outlook/admin>
  SetHandler msoauth-admin
  Require local
</Location>
"""


def other_site(html):
    """Another origin (localhost, not 127.0.0.1) serving one page: its URL."""
    import http.server
    import threading

    body = html.encode()

    class Page(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://localhost:{srv.server_address[1]}/index.html"


def test_chromium_disconnects_from_the_status_page(httpd, simulator, tmp_path):
    """The administrator opens the status page, clicks Disconnect on an
    account and sees it disconnected; a form of another site that posts to
    the same action is refused and changes nothing."""
    with chromium() as chrome:
        admin_disconnect(chrome, httpd, simulator, tmp_path)


def admin_disconnect(chrome, httpd, simulator, tmp_path):
    from selenium.webdriver.common.by import By

    httpd.file("api.key", "k" * 64 + "\n")
    s = Setup(httpd, simulator, extra=ADMIN_LOCATION + "MSOAuthAPIKeyFile api.key\n")
    s.wait_schema()
    _, _, r3 = s.sign_in(mailbox="adele@contoso.com", return_to="/a")
    acc = int(r3.query()["account"])
    admin = f"{s.h.url}/microsoft_outlook/admin/"

    # Another site's page (another origin: localhost, not 127.0.0.1) with a
    # form that posts to the action as soon as it loads.
    forged = other_site(f"""<!DOCTYPE html><html><body>
<form id="f" method="POST" action="{admin}accounts/{acc}/disconnect">
<input type="hidden" name="csrf" value="guessed-token"></form>
<script>document.getElementById("f").submit();</script></body></html>""")

    chrome.get(admin)
    wait(chrome, "the status page", lambda d: d.title == "mod_msoauth status")
    row = chrome.find_element(By.ID, f"account-{acc}")
    assert "adele@contoso.com" in row.text and "connected" in row.text
    reconnect = chrome.find_element(By.ID, f"reconnect-{acc}").get_attribute("href")
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(reconnect).query))
    assert urllib.parse.urlsplit(reconnect).path == "/microsoft_outlook/connect"
    assert q == {"company": "default", "mailbox": "adele@contoso.com",
                 "return_to": "/microsoft_outlook/admin/"}, q
    session = [c for c in all_cookies(chrome) if c["name"] == "msoauth_admin"]
    assert len(session) == 1 and session[0]["httpOnly"] and session[0]["sameSite"] == "Strict"
    assert session[0]["path"] == "/microsoft_outlook/admin"
    page_png = tmp_path / "admin.png"
    assert chrome.save_screenshot(str(page_png))
    assert_png(page_png)

    # The forged form: the browser posts it, the module refuses it.
    chrome.get(forged)
    wait(chrome, "the forged form's answer",
         lambda d: "/microsoft_outlook/admin/accounts/" in d.current_url)
    assert "forbidden" in chrome.find_element(By.TAG_NAME, "body").text
    assert s.accounts()[0]["state"] == "connected"

    # Disconnect, clicked on the page.
    chrome.get(admin)
    wait(chrome, "the status page", lambda d: d.title == "mod_msoauth status")
    chrome.find_element(By.ID, f"disconnect-{acc}").click()
    wait(chrome, "the answer of Disconnect", lambda d: d.title.startswith("Disconnect"))
    assert "disconnected" in chrome.find_element(By.ID, "result").text
    done_png = tmp_path / "disconnected.png"
    assert chrome.save_screenshot(str(done_png))
    assert_png(done_png)
    assert s.accounts()[0]["state"] == "disconnected"
    chrome.find_element(By.ID, "back").click()
    wait(chrome, "the status page again", lambda d: d.title == "mod_msoauth status")
    row = chrome.find_element(By.ID, f"account-{acc}")
    assert row.find_element(By.CLASS_NAME, "state").text == "disconnected"
    assert not chrome.find_elements(By.ID, f"disconnect-{acc}")
