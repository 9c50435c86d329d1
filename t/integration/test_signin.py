"""Connecting a mailbox: msoauth-connect and msoauth-confirm against the
Microsoft simulator, with a real httpd, SQLite and PostgreSQL."""
import base64
import json
import re
import secrets
import time
import urllib.parse

import pytest

from conftest import Browser, open_sealed, pg_reset, psql, sim_call

ADELE = ("adele@contoso.com", "6e2b8f3a-1c4d-4e5f-8a9b-0c1d2e3f4a5b", "Adele Vance")
MEGAN = ("megan@contoso.com", "7f3c9a4b-2d5e-4f60-9bac-1d2e3f4a5b6c", "Megan Bowen")
TENANT = "b3a8f1e2-5c47-4d1a-9e36-2f0c8d7a6b51"
SECRET = "Sim8Q~test.secret_value-" + "x" * 12


class Setup:
    """One httpd with the module, one app registered at the simulator."""

    def __init__(self, httpd, simulator, db="sqlite3", pg_params=None, secret=SECRET,
                 extra="", register=True, audience="AzureADandPersonalMicrosoftAccount",
                 prepare=None, main_extra=""):
        self.h = httpd
        self.sim = simulator
        self.client_id = "0c9a7d52-6a0e-4c55-9d0e-3c2b1a0f9e8d"
        self.key_hex = secrets.token_hex(32)
        self.redirect_uri = f"{httpd.url}/microsoft_outlook/confirm"
        sim_call(simulator, "POST", "/_sim/reset")
        sim_call(simulator, "DELETE", "/_sim/log")
        sim_call(simulator, "POST", "/_sim/config", {"auto_approve": True})
        if register:
            sim_call(simulator, "POST", "/_sim/apps", {
                "client_id": self.client_id, "display_name": "ERP",
                "secrets": [{"value": SECRET}], "redirect_uris": [self.redirect_uri],
                "sign_in_audience": audience, "home_tenant": TENANT})
        if prepare:
            prepare(self)      # simulator state the module must find at its first tick
        httpd.file("keys/k1.hex", self.key_hex)
        self.db = db
        self.pg = pg_params
        params = pg_params if db == "pgsql" else f"{httpd.root}/data/msoauth.db"
        self.secret = secret
        httpd.start(f"""
DBDriver {db}
DBDParams "{params}"
MSOAuthTokenKeyFile keys/k1.hex
MSOAuthClientID {self.client_id}
MSOAuthClientSecret "{secret}"
{main_extra}
MSOAuthAuthorityURL {simulator.url}
MSOAuthGraphURL {simulator.url}
<MSOAuthCompany single>
  MSOAuthTenant {TENANT}
  MSOAuthEdition pro
</MSOAuthCompany>
<MSOAuthCompany fallback>
  MSOAuthClientSecret ""
  MSOAuthEdition basic
</MSOAuthCompany>
{extra}
<Location /microsoft_outlook/connect>
  SetHandler msoauth-connect
</Location>
<Location /microsoft_outlook/confirm>
  SetHandler msoauth-confirm
</Location>
""")
        self.browser = Browser()

    def connect_url(self, **params):
        q = urllib.parse.urlencode(params)
        return f"{self.h.url}/microsoft_outlook/connect" + (f"?{q}" if q else "")

    def sign_in(self, **params):
        """connect -> authorize (auto-approved) -> confirm; returns the three responses."""
        b = self.browser
        r1 = b.get(self.connect_url(**params))
        assert r1.status == 302, r1.text
        r2 = b.get(r1.location)
        if r2.status == 200 and "Sign in" in r2.text:
            r2 = self.pick_account(r1.location, r2)
        if r2.status != 302:
            return r1, r2, None
        assert r2.location.startswith(self.redirect_uri), r2.location
        r3 = b.get(r2.location)
        return r1, r2, r3

    def pick_account(self, page_url, page, user_oid=ADELE[1]):
        """Clicks an account on the simulator's sign-in page, as a person would."""
        action = re.search(r'<form method="POST" action="([^"]+)"', page.text).group(1)
        flow = re.search(r'name="flow" value="([^"]+)"', page.text).group(1)
        data = urllib.parse.urlencode({"flow": flow, "user": user_oid}).encode()
        return self.browser.request(urllib.parse.urljoin(page_url, action), method="POST",
                                    data=data, headers={"Content-Type":
                                                        "application/x-www-form-urlencoded"})

    def accounts(self):
        cols = ("id, company, mailbox, display_name, tenant_id, object_id, scopes, state, "
                "authority, access_expires_at, connected_by, last_error")
        return self.rows(f"SELECT {cols} FROM msoauth_accounts ORDER BY id", cols)

    def tokens(self, account_id):
        return {r["kind"]: r for r in self.rows(
            "SELECT kind, sealed, expires_at FROM msoauth_tokens WHERE account_id = "
            f"{int(account_id)}", "kind, sealed, expires_at")}

    def rows(self, sql, cols):
        names = [c.strip() for c in cols.split(",")]
        if self.db == "pgsql":
            out = psql(self.pg, sql.replace("SELECT ", "SELECT ", 1))
            lines = [l.split("|") for l in out.splitlines() if l]
        else:
            from test_database import SQLiteDB
            lines = SQLiteDB(self.h.root / "data" / "msoauth.db").query(sql)
        return [dict(zip(names, l)) for l in lines]

    def wait_schema(self):
        end = time.time() + 20
        while time.time() < end:
            try:
                self.accounts()
                return
            except AssertionError:
                time.sleep(0.1)
        raise AssertionError(self.h.log())

    def sim_tokens_in_log(self):
        return sim_call(self.sim, "GET", "/_sim/log")["requests"]


@pytest.fixture
def setup(httpd, simulator):
    s = Setup(httpd, simulator)
    s.wait_schema()
    return s


def assert_no_secrets(s, *texts):
    for t in texts:
        assert s.secret not in t
    assert s.secret not in s.h.log()


# --- the happy path ---------------------------------------------------------

@pytest.mark.parametrize("db", ["sqlite3", "pgsql"])
def test_full_flow_connects_the_mailbox(httpd, simulator, pg_params, db):
    if db == "pgsql":
        pg_reset(pg_params)
    s = Setup(httpd, simulator, db=db, pg_params=pg_params)
    s.wait_schema()
    r1, r2, r3 = s.sign_in(mailbox="Adele@Contoso.com", return_to="/app/settings?tab=mail")

    # connect: 302 to the authorize endpoint with everything the platform needs
    auth = urllib.parse.urlsplit(r1.location)
    q = dict(urllib.parse.parse_qsl(auth.query))
    assert f"{auth.scheme}://{auth.netloc}" == simulator.url
    assert auth.path == "/common/oauth2/v2.0/authorize"
    assert q["client_id"] == s.client_id
    assert q["response_type"] == "code" and q["response_mode"] == "query"
    assert q["redirect_uri"] == s.redirect_uri
    assert q["code_challenge_method"] == "S256" and re.fullmatch(r"[\w-]{43}", q["code_challenge"])
    assert len(q["state"]) >= 43 and len(q["nonce"]) >= 43 and q["state"] != q["nonce"]
    assert q["login_hint"] == "adele@contoso.com"
    assert q["scope"].split() == ["openid", "profile", "email", "offline_access",
                                  "https://graph.microsoft.com/Mail.Read"]
    assert r1.headers["Cache-Control"] == "no-store"
    cookie = r1.headers["Set-Cookie"]
    assert re.match(r"msoauth_flow_[0-9a-z]+_" + re.escape(q["state"][:16]) + "=", cookie)
    for attr in ("Path=/microsoft_outlook/", "Max-Age=600", "HttpOnly", "SameSite=Lax"):
        assert attr in cookie
    assert "Secure" not in cookie          # http://127.0.0.1 base URL

    # confirm: back to the app, connected
    assert r3.status == 302, r3.text
    assert r3.location.startswith("/app/settings?tab=mail&msoauth=connected&account=")
    account_id = int(r3.query()["account"])
    assert "max-age=0" in r3.headers["Set-Cookie"].lower()     # the state cookie is spent

    (acct,) = s.accounts()
    assert int(acct["id"]) == account_id
    assert acct["company"] == "default"
    assert acct["mailbox"] == "adele@contoso.com"
    assert acct["display_name"] == ADELE[2]
    assert acct["tenant_id"] == TENANT and acct["object_id"] == ADELE[1]
    assert "Mail.Read" in acct["scopes"].split()
    assert acct["state"] == "connected"
    assert acct["authority"] == f"{simulator.url}/common"
    assert abs(int(acct["access_expires_at"]) - (time.time() + 3600)) < 60
    assert acct["last_error"] in ("", None)

    # tokens: sealed, opening with the key to what Microsoft issued, never in clear
    toks = s.tokens(account_id)
    assert set(toks) == {"refresh", "graph"}
    # bound to the company's client ID and the account, not to names
    bound = f"{s.client_id.lower()}:{account_id}"
    rt = open_sealed(s.key_hex, toks["refresh"]["sealed"], f"token:v2:refresh:{bound}")
    at = open_sealed(s.key_hex, toks["graph"]["sealed"], f"token:v2:graph:{bound}")
    assert rt.startswith("0.AX") and at.startswith("EwA")
    if db == "sqlite3":
        raw = b"".join(p.read_bytes() for p in (httpd.root / "data").glob("msoauth.db*"))
        assert rt.encode() not in raw and at.encode() not in raw
        assert b"0.AX" not in raw and b"EwA" + at[3:10].encode() not in raw
    else:
        dump = psql(pg_params, "SELECT string_agg(sealed, ' ') FROM msoauth_tokens")
        assert rt not in dump and at not in dump
    for t in (rt, at):
        assert t not in httpd.log()
    assert_no_secrets(s, r1.text, r3.text)


def test_without_return_to_a_page_says_connected(setup):
    _, _, r3 = setup.sign_in()
    assert r3.status == 200
    assert "Mailbox connected" in r3.text and "adele@contoso.com" in r3.text
    assert r3.headers["Content-Type"].startswith("text/html")
    assert r3.headers["Cache-Control"] == "no-store"


def test_connected_by_comes_from_the_authenticated_user(httpd, simulator):
    import hashlib
    digest = base64.b64encode(hashlib.sha1(b"pw").digest()).decode()
    httpd.file("users", f"erpadmin:{{SHA}}{digest}\n", 0o644)
    httpd.modules += ["auth_basic", "authn_core", "authn_file", "authz_user"]
    s = Setup(httpd, simulator, extra=f"""
<Location /secure/connect>
  SetHandler msoauth-connect
  AuthType Basic
  AuthName ERP
  AuthUserFile {httpd.root}/users
  Require valid-user
</Location>""")
    s.wait_schema()
    b = s.browser
    auth = {"Authorization": "Basic " + base64.b64encode(b"erpadmin:pw").decode()}
    assert b.get(f"{httpd.url}/secure/connect").status == 401
    r1 = b.get(f"{httpd.url}/secure/connect?return_to=/x&mailbox={ADELE[0]}", headers=auth)
    r2 = b.get(r1.location)
    r3 = b.get(r2.location)
    assert r3.query()["msoauth"] == "connected"
    assert s.accounts()[0]["connected_by"] == "erpadmin"


def test_parallel_flows_in_one_browser(setup):
    """Two Connect clicks before either returns: both complete."""
    b = setup.browser
    sim_call(setup.sim, "POST", "/_sim/config", {"auto_approve": True})
    a1 = b.get(setup.connect_url(mailbox=ADELE[0], return_to="/a"))
    a2 = b.get(setup.connect_url(mailbox=MEGAN[0], return_to="/b"))
    assert len(setup.browser.cookies("msoauth_flow_")) == 2
    c2 = b.get(b.get(a2.location).location)
    c1 = b.get(b.get(a1.location).location)
    assert c1.location.startswith("/a?msoauth=connected")
    assert c2.location.startswith("/b?msoauth=connected")
    assert sorted(a["mailbox"] for a in setup.accounts()) == [ADELE[0], MEGAN[0]]


def test_reconnect_updates_the_same_account(setup):
    _, _, first = setup.sign_in(mailbox=ADELE[0], return_to="/a")
    id1 = first.query()["account"]
    old = setup.tokens(id1)
    _, _, again = setup.sign_in(mailbox=ADELE[0], return_to="/a")
    assert again.query()["account"] == id1
    assert len(setup.accounts()) == 1
    new = setup.tokens(id1)
    assert new["refresh"]["sealed"] != old["refresh"]["sealed"]


def test_reconnect_of_a_broken_account_keeps_old_tokens_until_success(setup):
    _, _, first = setup.sign_in(mailbox=ADELE[0], return_to="/a")
    id1 = first.query()["account"]
    old = setup.tokens(id1)
    # The new code exchange fails: nothing of the account changes.
    sim_call(setup.sim, "POST", "/_sim/scenarios", {"endpoint": "token", "status": 503})
    _, _, r3 = setup.sign_in(mailbox=ADELE[0], return_to="/a")
    assert r3.query()["reason"] == "token_endpoint_unreachable"
    assert setup.tokens(id1) == old
    assert setup.accounts()[0]["state"] == "connected"


# --- state: tampered, missing, expired, replayed --------------------------------

def seal_state(key_hex, state, payload):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    master = bytes.fromhex(key_hex)
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"mso-state-v1").derive(master)
    kid = HKDF(algorithm=hashes.SHA256(), length=4, salt=None, info=b"mso-kid-v1").derive(master)
    header = bytes([1]) + kid
    nonce = secrets.token_bytes(12)
    ct = AESGCM(key).encrypt(nonce, json.dumps(payload).encode(),
                             header + bytes([2]) + f"flow:{state}".encode())
    return base64.urlsafe_b64encode(header + nonce + ct).decode().rstrip("=")


def confirm_with_cookie(s, state, value, code="abc", created=None):
    import http.client
    created = int(time.time()) if created is None else created
    when = ""
    while True:
        when = "0123456789abcdefghijklmnopqrstuvwxyz"[created % 36] + when
        created //= 36
        if not created:
            break
    conn = http.client.HTTPConnection("127.0.0.1", s.h.port, timeout=30)
    conn.request("GET", f"/microsoft_outlook/confirm?code={code}&state={state}",
                 headers={"Cookie": f"msoauth_flow_{when}_{state[:16]}={value}"})
    r = conn.getresponse()
    return r.status, dict(r.getheaders()), r.read().decode()


def test_tampered_state_cookie(setup):
    r1 = setup.browser.get(setup.connect_url(return_to="/a"))
    state = r1.query()["state"]
    value = r1.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    bad = value[:40] + ("A" if value[40] != "A" else "B") + value[41:]
    status, headers, body = confirm_with_cookie(setup, state, bad)
    assert status == 400 and "state_invalid" in body and "Start again" in body


def test_abandoned_sign_ins_do_not_pile_up(setup):
    """Connect clicked many times without finishing: at most 5 flow cookies live,
    so the browser's requests never grow past the server's header limit."""
    b = setup.browser
    for i in range(30):
        r = b.get(setup.connect_url(mailbox=ADELE[0], return_to="/a"))
        assert r.status == 302
        assert len(b.cookies("msoauth_flow_")) <= 5
    last = r
    # The newest flow still completes.
    r3 = b.get(b.get(last.location).location)
    assert r3.query()["msoauth"] == "connected"


def test_missing_cookie_and_missing_state(setup):
    b = Browser()
    r = b.get(f"{setup.h.url}/microsoft_outlook/confirm?code=x&state=" + "a" * 43)
    assert r.status == 400 and "state_invalid" in r.text
    r = b.get(f"{setup.h.url}/microsoft_outlook/confirm?code=x")
    assert r.status == 400 and "state_invalid" in r.text


def test_state_cookie_for_another_state(setup):
    r1 = setup.browser.get(setup.connect_url())
    value = r1.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    other = secrets.token_urlsafe(32)
    status, _, body = confirm_with_cookie(setup, other, value)
    assert status == 400 and "state_invalid" in body


def test_expired_state(setup):
    state = secrets.token_urlsafe(32)
    now = int(time.time())
    value = seal_state(setup.key_hex, state, {
        "v": 1, "s": state, "n": "n" * 43, "pv": "v" * 64, "c": "default", "rt": "/back",
        "iat": now - 700, "exp": now - 100})
    status, headers, _ = confirm_with_cookie(setup, state, value)
    assert status == 302
    assert headers["Location"] == "/back?msoauth=error&reason=state_expired"


def test_replayed_callback_gets_a_clear_page(setup):
    b = setup.browser
    r1 = b.get(setup.connect_url(return_to="/a", mailbox=ADELE[0]))
    value = r1.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    r2 = b.get(r1.location)
    first = b.get(r2.location)
    assert first.query()["msoauth"] == "connected"
    # A reload: the browser no longer has the cookie.
    again = b.get(r2.location)
    assert again.status == 400 and "state_invalid" in again.text
    # A replay with the saved cookie (double click, or an attacker): refused once used.
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(r2.location).query))
    status, _, body = confirm_with_cookie(setup, q["state"], value, code=q["code"])
    assert status == 400 and "already handled" in body
    counters = sim_call(setup.sim, "GET", "/_sim/counters")
    assert len(setup.accounts()) == 1
    assert "AADSTS54005" not in setup.h.log()      # the code was never sent twice
    assert counters


# --- bad input -------------------------------------------------------------------

@pytest.mark.parametrize("return_to", ["https://evil.example/", "//evil.example/x",
                                       "/\\evil.example", "javascript:alert(1)", "relative/path"])
def test_bad_return_to_is_a_400(setup, return_to):
    r = setup.browser.get(setup.connect_url(return_to=return_to))
    assert r.status == 400 and "bad_request" in r.text
    assert not setup.browser.cookies("msoauth_flow_")
    assert "evil.example" not in (r.headers.get("Location") or "")


def test_bad_mailbox_and_duplicate_parameters(setup):
    r = setup.browser.get(setup.connect_url(mailbox="not an address"))
    assert r.status == 400 and "bad_request" in r.text
    r = setup.browser.get(f"{setup.h.url}/microsoft_outlook/connect?company=default&company=x")
    assert r.status == 400


def test_unknown_company(setup):
    r = setup.browser.get(setup.connect_url(company="nosuch"))
    assert r.status == 404 and "not_configured" in r.text
    r = setup.browser.get(setup.connect_url(company="nosuch", return_to="/x"))
    assert r.status == 302 and r.location == "/x?msoauth=error&reason=not_configured"


def test_company_with_empty_secret_uses_the_main_servers(setup):
    _, _, r3 = setup.sign_in(company="fallback", return_to="/x")
    assert r3.query()["msoauth"] == "connected"
    assert setup.accounts()[0]["company"] == "fallback"


def test_html_in_parameters_is_escaped(setup):
    r = setup.browser.get(setup.connect_url(company="<script>"))
    assert r.status == 400 and "<script>" not in r.text


def test_post_is_refused(setup):
    r = setup.browser.request(setup.connect_url(), method="POST", data=b"")
    assert r.status == 405


# --- Microsoft's answers ---------------------------------------------------------

@pytest.mark.parametrize("error,reason,aadsts", [
    ("access_denied", "access_denied", 65004),
    ("consent_required", "consent_required", 65001),
    ("admin_consent_required", "admin_consent_required", 90094),
    ("server_error", "token_endpoint_unreachable", 50000),
])
def test_authorize_errors(setup, error, reason, aadsts):
    sim_call(setup.sim, "POST", "/_sim/scenarios", {"endpoint": "authorize", "error": error})
    _, _, r3 = setup.sign_in(return_to="/a")
    assert r3.status == 302
    assert r3.query() == {"msoauth": "error", "reason": reason, "aadsts": str(aadsts)}
    assert f"AADSTS{aadsts}" in setup.h.log()
    assert not setup.accounts()


@pytest.mark.parametrize("scenario,reason,aadsts,fix", [
    ({"error": "invalid_client", "code": 7000215, "status": 401}, "invalid_client_secret",
     7000215, "not the Secret"),
    ({"error": "invalid_client", "code": 7000222, "status": 401}, "client_secret_expired",
     7000222, "Create a new client secret"),
    ({"error": "invalid_request", "code": 50011}, "redirect_uri_mismatch", 50011,
     "/microsoft_outlook/confirm"),
    ({"error": "unauthorized_client", "code": 700016}, "app_not_found", 700016,
     "MSOAuthClientID"),
    ({"error": "invalid_request", "code": 50194}, "wrong_tenant", 50194, "MSOAuthTenant"),
    ({"error": "invalid_grant", "code": 54005}, "state_invalid", 54005, "Start again"),
    ({"status": 503, "retry_after": 5}, "token_endpoint_unreachable", 0, "Try again"),
])
def test_token_errors_give_a_page_with_the_fix(setup, scenario, reason, aadsts, fix):
    sim_call(setup.sim, "POST", "/_sim/scenarios", dict(scenario, endpoint="token"))
    _, _, r3 = setup.sign_in()
    assert r3.status >= 400
    assert f"<code>{reason}</code>" in r3.text
    assert fix in r3.text
    if aadsts:
        assert f"AADSTS{aadsts}" in r3.text
        assert re.search(r"Trace ID</dt><dd>[0-9a-f-]{36}<", r3.text), r3.text
        assert f"AADSTS{aadsts}" in setup.h.log()
    assert setup.redirect_uri in r3.text
    assert_no_secrets(setup, r3.text)
    assert not setup.accounts()


def test_wrong_secret_for_real(httpd, simulator):
    """The simulator's own check of the secret, not an injected error."""
    s = Setup(httpd, simulator, secret="0f3b8a52-1c1e-4d1b-9a7e-2b9f6c1d4e5a")
    s.wait_schema()
    _, _, r3 = s.sign_in()
    assert "<code>invalid_client_secret</code>" in r3.text and "AADSTS7000215" in r3.text
    assert "0f3b8a52-1c1e-4d1b-9a7e-2b9f6c1d4e5a" not in r3.text
    assert "0f3b8a52-1c1e-4d1b-9a7e-2b9f6c1d4e5a" not in httpd.log()


def test_expired_secret_for_real(httpd, simulator):
    s = Setup(httpd, simulator, register=False)
    sim_call(simulator, "POST", "/_sim/apps", {
        "client_id": s.client_id, "secrets": [{"value": SECRET,
                                               "expires_at": "2020-01-01T00:00:00Z"}],
        "redirect_uris": [s.redirect_uri], "sign_in_audience": "AzureADandPersonalMicrosoftAccount"})
    s.wait_schema()
    _, _, r3 = s.sign_in()
    assert "<code>client_secret_expired</code>" in r3.text and "AADSTS7000222" in r3.text


def test_mailbox_mismatch(setup):
    sim_call(setup.sim, "POST", "/_sim/config", {"auto_approve_user": ADELE[0]})
    _, _, r3 = setup.sign_in(mailbox=MEGAN[0], return_to="/a")
    assert r3.query() == {"msoauth": "error", "reason": "mailbox_mismatch"}
    assert not setup.accounts()
    _, _, page = setup.sign_in(mailbox=MEGAN[0])
    assert page.status == 409 and MEGAN[0] in page.text and ADELE[0] in page.text


def test_mailbox_of_another_microsoft_account_is_not_taken_over(setup):
    _, _, first = setup.sign_in(mailbox=ADELE[0], return_to="/a")
    acc = first.query()["account"]
    # The account belongs to another Microsoft object than the one signing in.
    setup.rows(f"UPDATE msoauth_accounts SET object_id = 'another-object' WHERE id = {acc}", "x")
    old = setup.tokens(acc)
    _, _, r3 = setup.sign_in(mailbox=ADELE[0], return_to="/a")
    assert r3.query() == {"msoauth": "error", "reason": "mailbox_mismatch"}
    assert setup.tokens(acc) == old
    assert setup.accounts()[0]["object_id"] == "another-object"
    assert "another-object" in setup.h.log()
    # Released (as a disconnect does), the next sign-in takes it over: same account.
    setup.rows(f"UPDATE msoauth_accounts SET object_id = NULL WHERE id = {acc}", "x")
    _, _, r4 = setup.sign_in(mailbox=ADELE[0], return_to="/a")
    assert r4.query()["account"] == acc
    assert setup.accounts()[0]["object_id"] == ADELE[1]


def test_single_tenant_company_uses_its_tenant(setup):
    sim_call(setup.sim, "POST", "/_sim/config", {"auto_approve_user": ADELE[0]})
    r1, _, r3 = setup.sign_in(company="single", return_to="/a")
    assert urllib.parse.urlsplit(r1.location).path == f"/{TENANT}/oauth2/v2.0/authorize"
    assert "Mail.ReadWrite" in dict(urllib.parse.parse_qsl(
        urllib.parse.urlsplit(r1.location).query))["scope"]
    assert r3.query()["msoauth"] == "connected"
    acct = setup.accounts()[0]
    assert acct["company"] == "single" and acct["authority"].endswith("/" + TENANT)


@pytest.mark.parametrize("tamper,problem", [
    ("signature", "signature"), ("audience", "audience"), ("issuer", "issuer"),
    ("nonce", "nonce"), ("expired", "expired"),
])
def test_bad_id_token_is_refused(setup, tamper, problem):
    sim_call(setup.sim, "POST", "/_sim/config", {"id_token_tamper": tamper})
    _, _, r3 = setup.sign_in(return_to="/a")
    assert r3.query() == {"msoauth": "error", "reason": "id_token_invalid"}
    assert f"ID token check failed ({problem})" in setup.h.log()
    assert not setup.accounts()


def test_signing_key_rotation_is_picked_up(setup):
    _, _, r3 = setup.sign_in(mailbox=ADELE[0], return_to="/a")
    assert r3.query()["msoauth"] == "connected"
    sim_call(setup.sim, "POST", "/_sim/keys/rotate", {})
    # The next ID token carries a kid the module has not seen: it fetches the
    # keys again instead of refusing the sign-in.
    _, _, again = setup.sign_in(mailbox=MEGAN[0], return_to="/a")
    assert again.query()["msoauth"] == "connected", setup.h.log()
