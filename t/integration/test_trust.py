"""Trust boundaries seen from outside: the local API behind Require local is
not enough on its own (proxies, SSRF, DNS rebinding), connect is not a
cross-site GET, request values are text, secrets only go to configured hosts.
A real httpd with the module and the Microsoft simulator."""
import json
import re
import secrets
import socket
import time
import urllib.parse

import pytest

from conftest import REPO, Browser, sim_call, token_leaks
from test_job import ADMIN, connect, wait_for
from test_signin import ADELE, SECRET, Setup

API_KEY = secrets.token_hex(32)


@pytest.fixture
def keyed(httpd, simulator):
    """The local API with an API key; the token location trusts its proxy."""
    httpd.file("api.key", API_KEY + "\n")
    s = Setup(httpd, simulator, extra="""
MSOAuthAPIKeyFile api.key
<Location /microsoft_outlook/token>
  SetHandler msoauth-token
  Require local
</Location>
<Location /microsoft_outlook/proxied>
  SetHandler msoauth-token
  Require local
  MSOAuthTrustProxy on
</Location>
<Location /microsoft_outlook/admin>
  SetHandler msoauth-admin
  Require local
</Location>
""")
    s.wait_schema()
    yield s
    log = httpd.log()
    assert not token_leaks(log, SECRET, API_KEY)


def call(s, path, headers=None, method="GET", host=None):
    h = dict(headers or {})
    if host:
        h["Host"] = host
    r = Browser().request(s.h.url + path, method=method,
                          data=b"" if method == "POST" else None, headers=h)
    body = json.loads(r.text) if r.headers.get("Content-Type", "").startswith(
        "application/json") else None
    return r, body


def bearer(key=API_KEY):
    return {"Authorization": "Bearer " + key}


def test_api_key_required_by_token_and_admin_json(keyed):
    acc = connect(keyed, ADELE[0])
    r, body = call(keyed, f"/microsoft_outlook/token?account={acc}")
    assert r.status == 401 and body["reason"] == "forbidden", r.text
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert "access_token" not in r.text
    r, body = call(keyed, f"/microsoft_outlook/token?account={acc}",
                   bearer(API_KEY[:-1] + ("0" if API_KEY[-1] != "0" else "1")))
    assert r.status == 401, r.text
    r, body = call(keyed, f"/microsoft_outlook/token?account={acc}", bearer())
    assert r.status == 200 and body["access_token"], r.text

    # Admin: JSON and actions need the key; the HTML page (a browser behind
    # Require) does not.
    r, body = call(keyed, "/microsoft_outlook/admin/", {"Accept": "application/json"})
    assert r.status == 401, r.text
    r, body = call(keyed, "/microsoft_outlook/admin/accounts")
    assert r.status == 401, r.text
    r, body = call(keyed, f"/microsoft_outlook/admin/accounts/{acc}/disconnect", method="POST")
    assert r.status == 403 and "form of the status page" in body["detail"], r.text
    assert keyed.accounts()[0]["state"] == "connected"
    r, _ = call(keyed, "/microsoft_outlook/admin/")
    assert r.status == 200 and "mod_msoauth status" in r.text
    r, body = call(keyed, "/microsoft_outlook/admin/accounts", bearer())
    assert r.status == 200 and body[0]["mailbox"] == ADELE[0]


@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded", "Via"])
def test_requests_through_a_proxy_are_refused(keyed, header):
    acc = connect(keyed, ADELE[0])
    value = {"X-Forwarded-For": "203.0.113.9", "Forwarded": "for=203.0.113.9",
             "Via": "1.1 proxy.example"}[header]
    r, body = call(keyed, f"/microsoft_outlook/token?account={acc}",
                   dict(bearer(), **{header: value}))
    assert r.status == 403 and body["reason"] == "forbidden", r.text
    assert header in body["detail"] and "MSOAuthTrustProxy" in body["detail"]
    r, body = call(keyed, "/microsoft_outlook/admin/accounts", dict(bearer(), **{header: value}))
    assert r.status == 403, r.text
    # A location that trusts its proxy takes it.
    r, body = call(keyed, f"/microsoft_outlook/proxied?account={acc}",
                   dict(bearer(), **{header: value}))
    assert r.status == 200 and body["access_token"], r.text
    assert "MSO310" in keyed.h.log()


def test_host_must_name_this_server(keyed):
    """A DNS-rebound page reaches 127.0.0.1 with the attacker's own Host."""
    acc = connect(keyed, ADELE[0])
    path = f"/microsoft_outlook/token?account={acc}"
    r, body = call(keyed, path, bearer(), host="attacker.example")
    assert r.status == 403 and "does not name this server" in body["detail"], r.text
    for host in (f"127.0.0.1:{keyed.h.port}", f"localhost:{keyed.h.port}", "[::1]"):
        r, body = call(keyed, path, bearer(), host=host)
        assert r.status == 200, (host, r.text)


def test_unknown_admin_paths_are_404(keyed):
    for path in ("/microsoft_outlook/admin/nothing", "/microsoft_outlook/admin/accounts/1/explode",
                 "/microsoft_outlook/admin/accounts/x", "/microsoft_outlook/admin/accounts/1/test/x"):
        r, body = call(keyed, path, bearer())
        assert r.status == 404 and body["reason"] == "not_found", (path, r.text)
    r, body = call(keyed, "/microsoft_outlook/admin/accounts/999", bearer())
    assert r.status == 404 and body["reason"] == "not_found", r.text
    r, body = call(keyed, "/microsoft_outlook/token?account=999", bearer())
    assert r.status == 404 and body["reason"] == "not_found", r.text


def test_connect_refuses_cross_site_and_always_prompts(httpd, simulator):
    s = Setup(httpd, simulator)
    b = Browser()
    r = b.get(s.connect_url(mailbox=ADELE[0]), headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status == 403 and "cross_site" in r.text, r.text
    assert not b.cookies("msoauth_flow_")
    for site in ("same-origin", "none"):
        r = b.get(s.connect_url(), headers={"Sec-Fetch-Site": site})
        assert r.status == 302, r.text
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(r.location).query))
    assert q["prompt"] == "select_account" and "login_hint" not in q
    # With a mailbox: Microsoft refuses select_account next to login_hint, so
    # the person signs in as that mailbox instead of being signed in silently.
    r = b.get(s.connect_url(mailbox=ADELE[0]))
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(r.location).query))
    assert q["prompt"] == "login" and q["login_hint"] == ADELE[0]


@pytest.mark.parametrize("query", [
    "company=%FF", "company=ac%01me", "mailbox=a%0Ab%40example.com", "mailbox=%C0%AF%40x.com",
    "return_to=/a%C2%85b", "mailbox=adele%40contoso.com&x=%ED%A0%80",
])
def test_hostile_parameters_are_400(httpd, simulator, query):
    s = Setup(httpd, simulator)
    r = Browser().get(f"{httpd.url}/microsoft_outlook/connect?{query}")
    assert r.status == 400 and "bad_request" in r.text, r.text


def trap_listener():
    """A socket that records whether anything connected to it."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    return srv


def knocked(srv):
    try:
        conn, _ = srv.accept()
        conn.close()
        return True
    except BlockingIOError:
        return False


def test_refresh_never_follows_the_database_authority(keyed):
    """Whoever can write msoauth_accounts must not receive the client secret
    and refresh token by pointing the account's authority at their host."""
    acc = connect(keyed, ADELE[0])
    trap = trap_listener()
    port = trap.getsockname()[1]
    keyed_sql(keyed, f"UPDATE msoauth_accounts SET authority = 'http://127.0.0.1:{port}/x', "
                     f"refresh_due_at = 0 WHERE id = {acc}")
    before = sim_call(keyed.sim, "GET", "/_sim/counters")["token_grants"].get("refresh_token", 0)
    wait_for("the refresh", lambda: sim_call(keyed.sim, "GET", "/_sim/counters")["token_grants"]
             .get("refresh_token", 0) > before)
    wait_for("the refresh to be stored",
             lambda: int(keyed.accounts()[0]["access_expires_at"] or 0) > time.time() + 3000)
    assert not knocked(trap)
    trap.close()


def keyed_sql(s, statement):
    from test_database import SQLiteDB
    SQLiteDB(s.h.root / "data" / "msoauth.db").query(statement)


def test_shipped_sample_protects_connect_and_the_local_api(httpd):
    """conf/msoauth.conf as shipped: connect needs a signed-in user, the local
    API the key, and a proxied request is refused."""
    httpd.file("msoauth.key", secrets.token_hex(32) + "\n")
    httpd.file("msoauth-secret.txt", SECRET + "\n")
    httpd.file("msoauth-api.key", API_KEY + "\n")
    httpd.modules += ["auth_basic", "authn_core", "authn_file", "authz_user"]
    sample = (REPO / "conf" / "msoauth.conf").read_text()
    sample = sample.replace("/var/lib/apache2/msoauth/msoauth.db",
                            str(httpd.root / "data" / "msoauth.db"))
    sample = re.sub(r"MSOAuthClientID 0{8}-0{4}-0{4}-0{4}-0{12}",
                    "MSOAuthClientID 0c9a7d52-6a0e-4c55-9d0e-3c2b1a0f9e8d", sample)
    httpd.file("msoauth.conf", sample, 0o644)
    httpd.start("Include msoauth.conf\n")
    r = Browser().get(httpd.url + "/microsoft_outlook/connect")
    assert r.status == 401, r.text
    for path in ("/microsoft_outlook/token?account=1", "/microsoft_outlook/admin/accounts",
                 "/microsoft_outlook/attachment?account=1&message=M&attachment=A"):
        r = Browser().get(httpd.url + path)
        assert r.status == 401, (path, r.text)
        r = Browser().get(httpd.url + path, headers=dict(bearer(), **{"X-Forwarded-For": "1.2.3.4"}))
        assert r.status == 403, (path, r.text)
    r = Browser().get(httpd.url + "/microsoft_outlook/admin/accounts", headers=bearer())
    assert r.status == 200 and json.loads(r.text) == [], r.text


def test_long_return_to_values_never_lock_out_sign_ins(httpd, simulator):
    """Flow cookies are budgeted by bytes: abandoned sign-ins with long
    return_to values must not grow the Cookie header past what httpd accepts
    (LimitRequestFieldSize), which would refuse connect and confirm."""
    s = Setup(httpd, simulator)
    b = s.browser
    for i in range(6):
        r = b.get(s.connect_url(return_to="/" + "a" * 2000 + str(i)))
        assert r.status == 302, r.text
        total = sum(len(c.name) + len(c.value) + 2 for c in b.cookies("msoauth_flow_"))
        assert total <= 4096, total
    _, _, r3 = s.sign_in(mailbox=ADELE[0], return_to="/a")
    assert r3.query()["msoauth"] == "connected", r3.location


def noauth_user(sim):
    """A user of another tenant whose ID token claims Adele's address."""
    fabrikam = sim_call(sim, "POST", "/_sim/tenants", {"name": "Fabrikam",
                                                       "domains": ["fabrikam.example"]})
    return sim_call(sim, "POST", "/_sim/users", {
        "tenant_id": fabrikam["id"], "upn": "mallory@fabrikam.example", "name": "Mallory",
        "email_claim": ADELE[0], "preferred_username_claim": ADELE[0]})


def test_id_token_email_claims_never_name_the_mailbox(httpd, simulator):
    """nOAuth: with MSOAuthTenant common, another tenant's user whose unverified
    email claim is someone else's address must not become that mailbox."""
    s = Setup(httpd, simulator)
    s.wait_schema()
    mallory = noauth_user(simulator)
    sim_call(simulator, "POST", "/_sim/config", {"auto_approve_user": "mallory@fabrikam.example"})
    # Asking for Adele's mailbox: Graph says who really signed in.
    _, _, r3 = s.sign_in(mailbox=ADELE[0], return_to="/a")
    assert r3.query() == {"msoauth": "error", "reason": "mailbox_mismatch"}, r3.location
    assert s.accounts() == []
    # Not asking: the account is Mallory's own mailbox, never Adele's.
    s.browser = Browser()
    _, _, r3 = s.sign_in(return_to="/a")
    assert r3.query()["msoauth"] == "connected", r3.location
    (a,) = s.accounts()
    assert a["mailbox"] == "mallory@fabrikam.example"
    assert a["object_id"] == mallory["oid"] and a["tenant_id"] != "" and ADELE[0] not in str(a)


def test_same_company_name_on_two_hosts_never_mixes_credentials(httpd, simulator):
    """Two virtual hosts on one database, each with a company "default" of
    its own app: an account connected through one is never served, refreshed
    or shown through the other's credentials."""
    other = "11111111-2222-3333-4444-555555555555"
    httpd.file("api.key", API_KEY + "\n")
    s = Setup(httpd, simulator, extra=f"""
MSOAuthAPIKeyFile api.key
<Location /microsoft_outlook/token>
  SetHandler msoauth-token
  Require local
</Location>
<Location /microsoft_outlook/admin>
  SetHandler msoauth-admin
  Require local
</Location>
<VirtualHost 127.0.0.1:{httpd.port}>
  ServerName other.example
  MSOAuthClientID {other}
  MSOAuthClientSecret "another-secret-value-0123456789"
  MSOAuthAuthorityURL {simulator.url}
  MSOAuthGraphURL {simulator.url}
  MSOAuthBaseURL http://127.0.0.1:{httpd.port}
  <Location /microsoft_outlook/token>
    SetHandler msoauth-token
    Require local
  </Location>
  <Location /microsoft_outlook/admin>
    SetHandler msoauth-admin
    Require local
  </Location>
</VirtualHost>
<VirtualHost 127.0.0.1:{httpd.port}>
  ServerName 127.0.0.1:{httpd.port}
</VirtualHost>
""")
    s.wait_schema()
    acc = connect(s, ADELE[0])
    r, body = call(s, f"/microsoft_outlook/token?account={acc}", bearer())
    assert r.status == 200 and body["access_token"], r.text
    r, body = call(s, f"/microsoft_outlook/token?account={acc}", bearer(), host="other.example")
    assert r.status == 404 and body["reason"] in ("not_configured", "not_found"), r.text
    assert "access_token" not in r.text
    r, body = call(s, "/microsoft_outlook/admin/accounts", bearer(), host="other.example")
    assert r.status == 200 and body == [], r.text
