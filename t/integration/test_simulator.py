"""Tests for the Microsoft simulator (t/sim/mssim.py), over HTTP with urllib and http.client only."""
import base64
import hashlib
import json
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

SIM = Path(__file__).resolve().parents[1] / "sim" / "mssim.py"
MSA_TENANT = "9188040d-6c67-4c5b-b112-36a304b66dad"
GUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
REDIRECT = "http://127.0.0.1:8080/microsoft_outlook/confirm"
SCOPE = "openid profile email offline_access https://graph.microsoft.com/Mail.ReadWrite"


# -- harness -------------------------------------------------------------------

class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


OPENER = urllib.request.build_opener(NoRedirect)


class Resp:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    @property
    def text(self):
        return self.body.decode()


def call(method, url, body=None, headers=None, form=None, js=None, timeout=10):
    headers = dict(headers or {})
    if form is not None:
        body = urlencode(form).encode()
        headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
    if js is not None:
        body = json.dumps(js).encode()
        headers.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with OPENER.open(req, timeout=timeout) as r:
            return Resp(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Resp(e.code, e.headers, e.read())


class Sim:
    def __init__(self, url):
        self.url = url
        self.client_id = None
        self.secret = None

    def ctl(self, method, path, data=None):
        r = call(method, self.url + "/_sim" + path, js=data if data is not None else None)
        assert r.status < 300, (path, r.status, r.body)
        return r.json() if r.body else None

    # identity helpers
    def authorize_url(self, tenant="common", **params):
        p = {"client_id": self.client_id, "response_type": "code", "redirect_uri": REDIRECT,
             "scope": SCOPE, "state": "st-123", "nonce": "n-456", "response_mode": "query"}
        p.update(params)
        return f"{self.url}/{tenant}/oauth2/v2.0/authorize?" + urlencode(p)

    def get_code(self, user="adele@contoso.com", tenant="common", verifier=None, **params):
        """Auto-approved authorize leg -> (code, verifier, redirect query)."""
        verifier = verifier or secrets.token_urlsafe(48)
        challenge = b64url(hashlib.sha256(verifier.encode()).digest())
        self.ctl("POST", "/config", {"auto_approve": True})
        r = call("GET", self.authorize_url(tenant, login_hint=user, code_challenge=challenge,
                                           code_challenge_method="S256", **params))
        assert r.status == 302, r.text
        q = parse_qs(urlsplit(r.headers["Location"]).query)
        assert "code" in q, q
        return q["code"][0], verifier, q

    def token(self, tenant="common", headers=None, auth="post", **form):
        form.setdefault("client_id", self.client_id)
        if auth == "post":
            form.setdefault("client_secret", self.secret)
        return call("POST", f"{self.url}/{tenant}/oauth2/v2.0/token", form=form, headers=headers)

    def redeem(self, code, verifier, tenant="common", **extra):
        return self.token(tenant, grant_type="authorization_code", code=code, code_verifier=verifier,
                          redirect_uri=REDIRECT, scope=SCOPE, **extra)

    def sign_in(self, user="adele@contoso.com"):
        code, verifier, _ = self.get_code(user)
        r = self.redeem(code, verifier)
        assert r.status == 200, r.text
        return r.json()

    def graph(self, method, path, token, body=None, headers=None, url=None):
        h = {"Authorization": f"Bearer {token}"}
        h.update(headers or {})
        return call(method, url or self.url + "/v1.0" + path, js=body, headers=h)


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sim_server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SIM), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    assert line.strip() == f"mssim listening on http://127.0.0.1:{port}", line
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def sim(sim_server):
    s = Sim(sim_server)
    s.ctl("POST", "/reset")
    app = s.ctl("POST", "/apps", {"redirect_uris": [REDIRECT], "display_name": "test app",
                                  "sign_in_audience": "AzureADandPersonalMicrosoftAccount",
                                  "secrets": [{"value": "Zq8~a+b/c%d&e=f secret"}]})
    s.client_id, s.secret = app["client_id"], app["secrets"][0]["value"]
    return s


def assert_aad_error(r, status, error, code):
    """Token-endpoint error body exactly as Microsoft shapes it."""
    assert r.status == status, r.text
    body = r.json()
    assert body["error"] == error, body
    assert body["error_codes"] == [code]
    assert re.fullmatch(rf"AADSTS{code}: .+\r\nTrace ID: {GUID}\r\nCorrelation ID: {GUID}\r\n"
                        r"Timestamp: \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", body["error_description"],
                        re.S), body["error_description"]
    assert re.fullmatch(GUID, body["trace_id"]) and re.fullmatch(GUID, body["correlation_id"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", body["timestamp"])
    assert body["error_uri"] == f"https://login.microsoftonline.com/error?code={code}"
    return body


# -- identity --------------------------------------------------------------------

def test_discovery_issuer_template_and_tenants(sim):
    r = call("GET", sim.url + "/common/v2.0/.well-known/openid-configuration")
    assert r.status == 200
    assert "max-age=86400" in r.headers["Cache-Control"]
    doc = r.json()
    assert doc["issuer"] == sim.url + "/{tenantid}/v2.0"
    assert doc["token_endpoint"] == sim.url + "/common/oauth2/v2.0/token"
    assert doc["authorization_endpoint"] == sim.url + "/common/oauth2/v2.0/authorize"
    assert doc["jwks_uri"] == sim.url + "/common/discovery/v2.0/keys"
    assert doc["end_session_endpoint"] == sim.url + "/common/oauth2/v2.0/logout"
    assert doc["id_token_signing_alg_values_supported"] == ["RS256"]
    assert "client_secret_basic" in doc["token_endpoint_auth_methods_supported"]
    assert "form_post" in doc["response_modes_supported"]

    tid = sim.ctl("GET", "/state")["default"]["tenant_id"]
    by_domain = call("GET", sim.url + "/contoso.com/v2.0/.well-known/openid-configuration").json()
    assert by_domain["issuer"] == f"{sim.url}/{tid}/v2.0"
    assert by_domain["token_endpoint"] == f"{sim.url}/{tid}/oauth2/v2.0/token"
    consumers = call("GET", sim.url + "/consumers/v2.0/.well-known/openid-configuration").json()
    assert consumers["issuer"] == f"{sim.url}/{MSA_TENANT}/v2.0"

    bad = call("GET", sim.url + "/nosuch.example/v2.0/.well-known/openid-configuration")
    assert_aad_error(bad, 400, "invalid_request", 90002)


def test_id_token_verifies_against_jwks(sim):
    tokens = sim.sign_in()
    header_b64, claims_b64, sig_b64 = tokens["id_token"].split(".")
    header = json.loads(b64url_decode(header_b64))
    claims = json.loads(b64url_decode(claims_b64))
    assert header["alg"] == "RS256" and header["typ"] == "JWT"

    jwks = call("GET", sim.url + "/common/discovery/v2.0/keys").json()
    jwk = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    assert jwk["kty"] == "RSA" and jwk["use"] == "sig"
    assert jwk["issuer"] == sim.url + "/{tenantid}/v2.0"
    pub = rsa.RSAPublicNumbers(int.from_bytes(b64url_decode(jwk["e"]), "big"),
                               int.from_bytes(b64url_decode(jwk["n"]), "big")).public_key()
    pub.verify(b64url_decode(sig_b64), f"{header_b64}.{claims_b64}".encode(),
               padding.PKCS1v15(), hashes.SHA256())        # raises if the signature is bad

    user = next(u for u in sim.ctl("GET", "/state")["users"] if u["upn"] == "adele@contoso.com")
    assert claims["iss"] == jwk["issuer"].replace("{tenantid}", claims["tid"])
    assert claims["aud"] == sim.client_id
    assert claims["tid"] == user["tenant_id"] and claims["oid"] == user["oid"]
    assert claims["nonce"] == "n-456"
    assert claims["preferred_username"] == "adele@contoso.com"
    assert claims["email"] == "adele@contoso.com" and claims["name"] == "Adele Vance"
    assert claims["ver"] == "2.0"
    assert claims["nbf"] <= time.time() + 5 and claims["exp"] - claims["iat"] == 3600


def test_code_pkce_redemption(sim):
    code, verifier, q = sim.get_code()
    assert q["state"] == ["st-123"]
    r = sim.redeem(code, verifier)
    assert r.status == 200, r.text
    assert r.headers["Cache-Control"] == "no-store"
    t = r.json()
    assert t["token_type"] == "Bearer"
    assert t["scope"] == "Mail.ReadWrite User.Read openid profile email offline_access"
    assert t["expires_in"] == 3600 and t["ext_expires_in"] == 3600
    assert t["refresh_token"] and t["id_token"].count(".") == 2
    me = sim.graph("GET", "/me", t["access_token"])
    assert me.status == 200 and me.json()["userPrincipalName"] == "adele@contoso.com"
    counters = sim.ctl("GET", "/counters")
    assert counters["token_grants"] == {"authorization_code": 1}
    assert counters["refresh_tokens_valid"] == 1


def test_client_secret_basic_and_no_refresh_token_without_offline_access(sim):
    code, verifier, _ = sim.get_code(scope="openid Mail.Read")
    basic = base64.b64encode(f"{sim.client_id}:{urlencode({'': sim.secret})[1:]}".encode()).decode()
    r = sim.token(auth="basic", headers={"Authorization": f"Basic {basic}"},
                  grant_type="authorization_code", code=code, code_verifier=verifier,
                  redirect_uri=REDIRECT, scope="openid Mail.Read")
    assert r.status == 200, r.text
    t = r.json()
    assert t["scope"] == "Mail.Read User.Read openid"
    assert "refresh_token" not in t and "id_token" in t
    log = sim.ctl("GET", "/log")["requests"]
    assert [e["client_auth"] for e in log if e["kind"] == "token"] == ["client_secret_basic"]


def test_code_is_single_use(sim):
    code, verifier, _ = sim.get_code()
    assert sim.redeem(code, verifier).status == 200
    assert_aad_error(sim.redeem(code, verifier), 400, "invalid_grant", 54005)


def test_unknown_and_expired_code(sim):
    assert_aad_error(sim.redeem("0.Anot-a-code", "x" * 43), 400, "invalid_grant", 70000)
    code, verifier, _ = sim.get_code()
    sim.ctl("POST", "/tokens/expire", {"kinds": ["code"]})
    assert_aad_error(sim.redeem(code, verifier), 400, "invalid_grant", 70008)


def test_pkce_mismatch(sim):
    code, _, _ = sim.get_code()
    assert_aad_error(sim.redeem(code, secrets.token_urlsafe(48)), 400, "invalid_grant", 501481)


def test_redemption_checks_redirect_and_tenant(sim):
    code, verifier, _ = sim.get_code()
    r = sim.token(grant_type="authorization_code", code=code, code_verifier=verifier,
                  redirect_uri=REDIRECT + "/", scope=SCOPE)
    assert_aad_error(r, 400, "invalid_grant", 50011)
    code, verifier, _ = sim.get_code()
    assert_aad_error(sim.redeem(code, verifier, tenant="organizations"), 400, "invalid_grant", 700005)


def test_wrong_and_missing_secret(sim):
    code, verifier, _ = sim.get_code()
    r = sim.redeem(code, verifier, client_secret="not-the-secret")
    body = assert_aad_error(r, 401, "invalid_client", 7000215)
    assert "not-the-secret" not in body["error_description"]
    # The code was not burnt by a client-authentication failure.
    assert sim.redeem(code, verifier).status == 200


def test_expired_secret(sim):
    app = sim.ctl("POST", "/apps", {"redirect_uris": [REDIRECT],
                                    "secrets": [{"value": "old~secret", "expires_at": "2020-01-01"}]})
    sim.client_id, sim.secret = app["client_id"], "old~secret"
    code, verifier, _ = sim.get_code()
    assert_aad_error(sim.redeem(code, verifier), 401, "invalid_client", 7000222)


def test_two_resources_in_one_token_request(sim):
    code, verifier, _ = sim.get_code(
        scope=SCOPE + " https://outlook.office.com/IMAP.AccessAsUser.All")
    r = sim.token(grant_type="authorization_code", code=code, code_verifier=verifier,
                  redirect_uri=REDIRECT,
                  scope="offline_access Mail.ReadWrite https://outlook.office.com/IMAP.AccessAsUser.All")
    assert_aad_error(r, 400, "invalid_scope", 700022)


def test_authorize_errors_are_pages_not_redirects(sim):
    r = call("GET", sim.authorize_url(redirect_uri="http://127.0.0.1:8080/other/confirm",
                                      code_challenge="x" * 43, code_challenge_method="S256"))
    assert r.status == 400 and "Location" not in r.headers
    assert "text/html" in r.headers["Content-Type"] and "AADSTS50011" in r.text

    r = call("GET", sim.authorize_url(client_id="00000000-1111-2222-3333-444444444444",
                                      code_challenge="x" * 43))
    assert r.status == 400 and "Location" not in r.headers and "AADSTS700016" in r.text

    single = sim.ctl("POST", "/apps", {"redirect_uris": [REDIRECT], "sign_in_audience": "AzureADMyOrg"})
    r = call("GET", sim.authorize_url(client_id=single["client_id"], code_challenge="x" * 43))
    assert r.status == 400 and "Location" not in r.headers and "AADSTS50194" in r.text


def test_authorize_without_pkce_redirects_error(sim):
    r = call("GET", sim.authorize_url())
    assert r.status == 302
    q = parse_qs(urlsplit(r.headers["Location"]).query)
    assert q["error"] == ["invalid_request"] and q["state"] == ["st-123"]
    assert q["error_description"][0].startswith("AADSTS900144: ")


def test_sign_in_page_pick_user_and_cancel(sim):
    challenge = b64url(hashlib.sha256(b"v" * 43).digest())
    url = sim.authorize_url(login_hint="megan@contoso.com", code_challenge=challenge,
                            code_challenge_method="S256")
    page = call("GET", url)
    assert page.status == 200 and "text/html" in page.headers["Content-Type"]
    assert "Adele Vance" in page.text and "Megan Bowen" in page.text
    assert re.search(r'value="[^"]+" autofocus class=selected>Megan Bowen', page.text)
    flow = re.search(r'name="flow" value="([^"]+)"', page.text).group(1)
    action = sim.url + re.search(r'form method="POST" action="([^"]+)"', page.text).group(1)
    megan = re.search(r'value="([^"]+)" autofocus', page.text).group(1)

    r = call("POST", action, form={"flow": flow, "user": megan})
    assert r.status == 302
    loc = r.headers["Location"]
    assert loc.startswith(REDIRECT + "?code=")
    q = parse_qs(urlsplit(loc).query)
    r = sim.token(grant_type="authorization_code", code=q["code"][0], code_verifier="v" * 43,
                  redirect_uri=REDIRECT, scope=SCOPE)
    claims = json.loads(b64url_decode(r.json()["id_token"].split(".")[1]))
    assert claims["preferred_username"] == "megan@contoso.com"

    page = call("GET", url)
    flow = re.search(r'name="flow" value="([^"]+)"', page.text).group(1)
    r = call("POST", action, form={"flow": flow, "cancel": "1"})
    q = parse_qs(urlsplit(r.headers["Location"]).query)
    assert q["error"] == ["access_denied"] and q["state"] == ["st-123"]
    assert re.fullmatch(rf"AADSTS65004: .+\r\nTrace ID: {GUID}\r\nCorrelation ID: {GUID}\r\n"
                        r"Timestamp: .+", q["error_description"][0], re.S)


def test_form_post_and_authorize_scenario(sim):
    challenge = b64url(hashlib.sha256(b"v" * 43).digest())
    sim.ctl("POST", "/config", {"auto_approve_user": "adele@contoso.com"})
    r = call("GET", sim.authorize_url(response_mode="form_post", code_challenge=challenge,
                                      code_challenge_method="S256"))
    assert r.status == 200
    assert f'action="{REDIRECT}"' in r.text and 'name="code"' in r.text
    assert 'name="state" value="st-123"' in r.text and "document.forms[0].submit()" in r.text

    sim.ctl("POST", "/scenarios", {"endpoint": "authorize", "error": "admin_consent_required"})
    r = call("GET", sim.authorize_url(code_challenge=challenge, code_challenge_method="S256"))
    q = parse_qs(urlsplit(r.headers["Location"]).query)
    assert q["error"] == ["consent_required"]
    assert q["error_description"][0].startswith("AADSTS90094: ")
    # one-shot: the next sign-in works
    r = call("GET", sim.authorize_url(code_challenge=challenge, code_challenge_method="S256"))
    assert "code" in parse_qs(urlsplit(r.headers["Location"]).query)


def test_refresh_rotation_default_and_strict(sim):
    t = sim.sign_in()
    rt1 = t["refresh_token"]
    r = sim.token(grant_type="refresh_token", refresh_token=rt1, scope=SCOPE)
    assert r.status == 200, r.text
    rt2 = r.json()["refresh_token"]
    assert rt2 != rt1
    # Microsoft keeps the old refresh token usable.
    r = sim.token(grant_type="refresh_token", refresh_token=rt1, scope=SCOPE)
    assert r.status == 200 and r.json()["refresh_token"] not in (rt1, rt2)

    sim.ctl("POST", "/config", {"strict_rotation": True})
    r = sim.token(grant_type="refresh_token", refresh_token=rt2, scope=SCOPE)
    assert r.status == 200
    rt3 = r.json()["refresh_token"]
    assert_aad_error(sim.token(grant_type="refresh_token", refresh_token=rt2, scope=SCOPE),
                     400, "invalid_grant", 70000)
    assert sim.token(grant_type="refresh_token", refresh_token=rt3, scope=SCOPE).status == 200
    assert sim.ctl("GET", "/counters")["token_grants"] == {"authorization_code": 1, "refresh_token": 4}


def test_refresh_for_outlook_resource(sim):
    code, verifier, _ = sim.get_code(
        scope=SCOPE + " https://outlook.office.com/IMAP.AccessAsUser.All https://outlook.office.com/SMTP.Send")
    t = sim.redeem(code, verifier).json()
    r = sim.token(grant_type="refresh_token", refresh_token=t["refresh_token"],
                  scope="https://outlook.office.com/IMAP.AccessAsUser.All offline_access")
    assert r.status == 200, r.text
    o = r.json()
    assert o["scope"] == ("https://outlook.office.com/IMAP.AccessAsUser.All "
                          "https://outlook.office.com/SMTP.Send offline_access")
    me = sim.graph("GET", "/me", o["access_token"])
    assert me.status == 401
    assert me.json()["error"]["code"] == "InvalidAuthenticationToken"
    assert "audience" in me.json()["error"]["message"]


def test_revocation_and_inactivity(sim):
    t = sim.sign_in()
    sim.ctl("POST", "/revoke", {"user": "adele@contoso.com", "code": 700082})
    assert_aad_error(sim.token(grant_type="refresh_token", refresh_token=t["refresh_token"]),
                     400, "invalid_grant", 700082)
    t = sim.sign_in()
    sim.ctl("POST", "/revoke", {"user": "adele@contoso.com", "code": 50076})
    assert_aad_error(sim.token(grant_type="refresh_token", refresh_token=t["refresh_token"]),
                     400, "interaction_required", 50076)
    # Inactivity by the clock, without any revocation.
    t = sim.sign_in()
    sim.ctl("POST", "/clock", {"advance": 91 * 86400})
    assert_aad_error(sim.token(grant_type="refresh_token", refresh_token=t["refresh_token"]),
                     400, "invalid_grant", 700082)
    assert sim.ctl("GET", "/counters")["refresh_tokens_valid"] == 0


def test_origin_header_and_json_body_rejected(sim):
    code, verifier, _ = sim.get_code()
    r = sim.redeem(code, verifier, headers={"Origin": "https://app.example"})
    body = assert_aad_error(r, 400, "invalid_request", 9002326)
    assert "https://app.example" in body["error_description"]
    r = call("POST", sim.url + "/common/oauth2/v2.0/token",
             js={"grant_type": "authorization_code", "client_id": sim.client_id})
    assert_aad_error(r, 400, "invalid_request", 900144)
    # Neither burnt the code.
    assert sim.redeem(code, verifier).status == 200


def test_token_429_injection_then_recovery(sim):
    t = sim.sign_in()
    sim.ctl("POST", "/scenarios", {"endpoint": "token", "status": 429, "retry_after": 7, "times": 2,
                                   "match": {"grant_type": "refresh_token"}})
    for _ in range(2):
        r = sim.token(grant_type="refresh_token", refresh_token=t["refresh_token"])
        assert r.headers["Retry-After"] == "7"
        assert_aad_error(r, 429, "temporarily_unavailable", 90055)
    assert sim.token(grant_type="refresh_token", refresh_token=t["refresh_token"]).status == 200


def test_token_hang_outlasts_client_timeout(sim):
    t = sim.sign_in()
    sim.ctl("POST", "/scenarios", {"endpoint": "token", "hang": 1.5})
    started = time.time()
    with pytest.raises((socket.timeout, TimeoutError, urllib.error.URLError)):
        sim_token = call("POST", f"{sim.url}/common/oauth2/v2.0/token", timeout=0.5,
                         form={"grant_type": "refresh_token", "refresh_token": t["refresh_token"],
                               "client_id": sim.client_id, "client_secret": sim.secret})
        print(sim_token.status)
    assert time.time() - started < 1.4


def test_key_rollover(sim):
    before = call("GET", sim.url + "/common/discovery/v2.0/keys").json()["keys"]
    old_kid = before[0]["kid"]
    rolled = sim.ctl("POST", "/keys/rotate", {"mode": "add"})
    assert len(rolled["kids"]) == 2 and rolled["signing_kid"] == old_kid
    rolled = sim.ctl("POST", "/keys/rotate", {"mode": "activate"})
    new_kid = rolled["signing_kid"]
    assert new_kid != old_kid
    header = json.loads(b64url_decode(sim.sign_in()["id_token"].split(".")[0]))
    assert header["kid"] == new_kid
    sim.ctl("POST", "/keys/rotate", {"mode": "remove_old"})
    kids = [k["kid"] for k in call("GET", sim.url + "/common/discovery/v2.0/keys").json()["keys"]]
    assert kids == [new_kid]


# -- Graph -----------------------------------------------------------------------

def test_graph_me_and_auth_errors(sim):
    t = sim.sign_in()
    oid = json.loads(b64url_decode(t["id_token"].split(".")[1]))["oid"]
    r = sim.graph("GET", "/me?$select=id,displayName,mail,userPrincipalName", t["access_token"],
                  headers={"client-request-id": "11111111-2222-3333-4444-555555555555"})
    assert r.status == 200
    me = r.json()
    assert (me["id"], me["displayName"], me["mail"], me["userPrincipalName"]) == \
        (oid, "Adele Vance", "adele@contoso.com", "adele@contoso.com")
    assert r.headers["client-request-id"] == "11111111-2222-3333-4444-555555555555"
    assert re.fullmatch(GUID, r.headers["request-id"])

    r = call("GET", sim.url + "/v1.0/me")
    err = r.json()["error"]
    assert r.status == 401 and err["code"] == "InvalidAuthenticationToken"
    assert set(err["innerError"]) == {"request-id", "date", "client-request-id"}
    assert r.headers["WWW-Authenticate"].startswith("Bearer ")
    assert sim.graph("GET", "/me", "EwAbogus").status == 401
    sim.ctl("POST", "/tokens/expire", {"user": "adele@contoso.com"})
    r = sim.graph("GET", "/me", t["access_token"])
    assert r.status == 401 and "expired" in r.json()["error"]["message"]


def test_read_only_token_cannot_write(sim):
    code, verifier, _ = sim.get_code(scope="openid profile offline_access Mail.Read")
    at = sim.token(grant_type="authorization_code", code=code, code_verifier=verifier,
                   redirect_uri=REDIRECT, scope="openid profile offline_access Mail.Read").json()["access_token"]
    msg = sim.ctl("POST", "/mailbox/adele@contoso.com/messages", {"count": 1})["messages"][0]
    r = sim.graph("PATCH", f"/me/messages/{msg['id']}", at, {"isRead": True})
    assert r.status == 403 and r.json()["error"]["code"] == "ErrorAccessDenied"
    assert sim.ctl("GET", "/counters")["graph_writes_total"] == 0


def delta_round(sim, at, url, prefer):
    pages, items = 0, []
    while True:
        r = sim.graph("GET", None, at, url=url, headers={"Prefer": prefer})
        assert r.status == 200, r.text
        body = r.json()
        pages += 1
        items += body["value"]
        if "@odata.nextLink" in body:
            assert "$skiptoken=" in body["@odata.nextLink"] and "@odata.deltaLink" not in body
            url = body["@odata.nextLink"]
        else:
            assert "$deltatoken=" in body["@odata.deltaLink"]
            return pages, items, body["@odata.deltaLink"]


def test_delta_paging_then_incremental_changes(sim):
    at = sim.sign_in()["access_token"]
    seeded = sim.ctl("POST", "/mailbox/adele@contoso.com/messages", {"folder": "inbox", "count": 25})
    prefer = 'odata.maxpagesize=10, IdType="ImmutableId"'
    first = (sim.url + "/v1.0/me/mailFolders/inbox/messages/delta?$select=subject,isRead,receivedDateTime"
             "&$orderby=receivedDateTime%20desc")
    pages, items, delta_link = delta_round(sim, at, first, prefer)
    assert pages == 3 and len(items) == 25
    received = [i["receivedDateTime"] for i in items]
    assert received == sorted(received, reverse=True)
    assert set(items[0]) == {"@odata.type", "@odata.etag", "id", "subject", "isRead", "receivedDateTime"}
    assert {i["id"] for i in items} == {m["id"] for m in seeded["messages"]}
    assert items[0]["subject"] == "Message 0025: " + items[0]["subject"].split(": ")[1]

    # Nothing changed: an empty round with a fresh deltaLink.
    pages, empty, delta_link = delta_round(sim, at, delta_link, prefer)
    assert (pages, empty) == (1, [])

    # Changes: read one (via Graph), move one out, delete one, two new arrivals.
    ids = [i["id"] for i in items]
    assert sim.graph("PATCH", f"/me/messages/{ids[0]}", at, {"isRead": True},
                     headers={"Prefer": prefer}).status == 200
    moved = sim.graph("POST", f"/me/messages/{ids[1]}/move", at, {"destinationId": "archive"},
                      headers={"Prefer": prefer})
    assert moved.status == 201 and moved.json()["id"] == ids[1]      # immutable id survives the move
    assert sim.graph("DELETE", f"/me/messages/{ids[2]}", at).status == 204
    assert sim.graph("DELETE", f"/me/messages/{ids[2]}", at).json()["error"]["code"] == "itemNotFound"
    new = sim.ctl("POST", "/mailbox/adele@contoso.com/messages", {"count": 2})["messages"]

    pages, changes, delta_link = delta_round(sim, at, delta_link, prefer)
    by_id = {}
    for c in changes:
        by_id.setdefault(c["id"], []).append(c)
    updated = by_id[ids[0]][0]
    assert updated["isRead"] is True and "subject" not in updated          # id + changed props only
    assert by_id[ids[1]] == [{"@odata.type": "#microsoft.graph.message", "id": ids[1],
                              "@removed": {"reason": "deleted"}}]
    assert by_id[ids[2]][0]["@removed"] == {"reason": "deleted"}
    for m in new:
        assert by_id[m["id"]][0]["subject"] == m["subject"]
    assert len(changes) == 5
    counters = sim.ctl("GET", "/counters")
    assert counters["graph_writes"] == {ids[0]: 1, ids[1]: 1, ids[2]: 1}


def test_rest_ids_change_on_move_without_immutable_preference(sim):
    at = sim.sign_in()["access_token"]
    sim.ctl("POST", "/mailbox/adele@contoso.com/messages", {"count": 1})
    r = sim.graph("GET", "/me/mailFolders/inbox/messages/delta", at).json()
    rest_id = r["value"][0]["id"]
    moved = sim.graph("POST", f"/me/messages/{rest_id}/move", at, {"destinationId": "deleteditems"})
    assert moved.status == 201 and moved.json()["id"] != rest_id
    assert moved.json()["parentFolderId"] != r["value"][0]["parentFolderId"]
    assert sim.graph("GET", f"/me/messages/{rest_id}", at).status == 404


def test_delta_expiry_410_and_sync_state_not_found(sim):
    at = sim.sign_in()["access_token"]
    sim.ctl("POST", "/mailbox/adele@contoso.com/messages", {"count": 3})
    first = sim.url + "/v1.0/me/mailFolders/inbox/messages/delta?$select=subject"
    _, items, delta_link = delta_round(sim, at, first, "odata.maxpagesize=50")
    assert len(items) == 3
    assert sim.ctl("POST", "/delta/expire", {"mode": "gone"})["expired"] >= 1
    r = sim.graph("GET", None, at, url=delta_link)
    assert r.status == 410 and r.json()["error"]["code"] == "resyncRequired"
    location = r.headers["Location"]
    assert "$deltatoken=" in location
    _, items, delta_link = delta_round(sim, at, location, "odata.maxpagesize=50")
    assert len(items) == 3 and set(items[0]) >= {"id", "subject"} and "isRead" not in items[0]

    sim.ctl("POST", "/delta/expire", {"mode": "syncStateNotFound"})
    r = sim.graph("GET", None, at, url=delta_link)
    assert r.status == 400 and r.json()["error"]["code"] == "syncStateNotFound"


def test_delta_replay_scenario(sim):
    at = sim.sign_in()["access_token"]
    sim.ctl("POST", "/mailbox/adele@contoso.com/messages", {"count": 4})
    _, items, delta_link = delta_round(sim, at, sim.url + "/v1.0/me/mailFolders/inbox/messages/delta", "")
    sim.ctl("POST", "/scenarios", {"endpoint": "graph", "action": "replay", "count": 2,
                                   "match": {"path": "/messages/delta"}})
    _, replayed, _ = delta_round(sim, at, delta_link, "")
    assert len(replayed) == 2 and {i["id"] for i in replayed} <= {i["id"] for i in items}


def test_graph_429_injection(sim):
    at = sim.sign_in()["access_token"]
    sim.ctl("POST", "/scenarios", {"endpoint": "graph", "status": 429, "retry_after": 3,
                                   "match": {"path": "/me"}})
    r = sim.graph("GET", "/me", at)
    assert r.status == 429 and r.headers["Retry-After"] == "3"
    assert r.json()["error"]["code"] == "TooManyRequests"
    assert sim.graph("GET", "/me", at).status == 200


def test_concurrency_limit(sim):
    at = sim.sign_in()["access_token"]
    sim.ctl("POST", "/config", {"latency_ms": 800})
    barrier = threading.Barrier(8)
    results = []

    def worker():
        barrier.wait()
        r = sim.graph("GET", "/me", at)
        results.append((r.status, r.headers.get("Retry-After")))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(s for s, _ in results) == [200] * 4 + [429] * 4
    assert all(ra == "1" for s, ra in results if s == 429)
    counters = sim.ctl("GET", "/counters")
    assert counters["concurrency_violations"] == 4 and counters["max_inflight"] == 4


# -- Graph writes: effective-write counters, history, failures -------------------

PREFER_IMM = 'IdType="ImmutableId"'


def mailbox_msg(sim, msg_id, user="adele@contoso.com"):
    return next(m for m in sim.ctl("GET", f"/mailbox/{user}")["messages"] if m["id"] == msg_id)


def test_effective_writes_count_only_changes(sim):
    at = sim.sign_in()["access_token"]
    m0, m1, m2 = sim.ctl("POST", "/mailbox/adele@contoso.com/messages", {"count": 3,
                                                                         "unread_every": 1})["messages"]
    assert not m0["isRead"] and m0["writes"] == []
    h = {"Prefer": PREFER_IMM}
    folders = sim.ctl("GET", "/mailbox/adele@contoso.com")["folders"]

    def ok(r, status):
        assert r.status == status, r.text
        return r

    ok(sim.graph("PATCH", f"/me/messages/{m0['id']}", at, {"isRead": True}, h), 200)          # 1
    ok(sim.graph("PATCH", f"/me/messages/{m0['id']}", at, {"isRead": True}, h), 200)          # repeat
    ok(sim.graph("POST", f"/me/messages/{m1['id']}/move", at, {"destinationId": "archive"}, h), 201)  # 2
    ok(sim.graph("POST", f"/me/messages/{m1['id']}/move", at, {"destinationId": "Archive"}, h), 201)  # repeat
    ok(sim.graph("PATCH", f"/me/messages/{m0['id']}", at,                                      # 3
                 {"isRead": True, "categories": ["Red"]}, h), 200)
    ok(sim.graph("POST", f"/me/messages/{m1['id']}/move", at,                                  # 4
                 {"destinationId": folders["deleteditems"]["id"]}, h), 201)
    ok(sim.graph("DELETE", f"/me/messages/{m2['id']}", at, headers=h), 204)                  # 5
    r = sim.graph("DELETE", f"/me/messages/{m2['id']}", at, headers=h)                        # gone: 404
    assert r.status == 404 and r.json()["error"]["code"] == "itemNotFound"

    c = sim.ctl("GET", "/counters")
    assert c["graph_writes"] == {m0["id"]: 3, m1["id"]: 3, m2["id"]: 1}
    assert c["graph_writes_total"] == 7
    assert c["graph_effective_writes"] == {m0["id"]: 2, m1["id"]: 2, m2["id"]: 1}
    assert c["graph_effective_writes_total"] == 5

    assert mailbox_msg(sim, m0["id"])["writes"] == [
        {"op": "patch", "changes": {"isRead": True}, "seq": 1},
        {"op": "patch", "changes": {"categories": ["Red"]}, "seq": 3}]
    assert mailbox_msg(sim, m1["id"])["writes"] == [{"op": "move", "to": "archive", "seq": 2},
                                                    {"op": "move", "to": "deleteditems", "seq": 4}]
    gone = mailbox_msg(sim, m2["id"])
    assert gone["writes"] == [{"op": "delete", "seq": 5}]
    assert gone["folder"] == "recoverableitemsdeletions"

    # A change made "in Outlook" is no Graph write; after it, the same PATCH changes the message again.
    sim.ctl("POST", f"/mailbox/adele@contoso.com/messages/{m0['id']}", {"isRead": False})
    assert sim.ctl("GET", "/counters")["graph_effective_writes_total"] == 5
    ok(sim.graph("PATCH", f"/me/messages/{m0['id']}", at, {"isRead": True}, h), 200)
    c = sim.ctl("GET", "/counters")
    assert c["graph_effective_writes"][m0["id"]] == 3 and c["graph_writes"][m0["id"]] == 4
    assert mailbox_msg(sim, m0["id"])["writes"][-1] == {"op": "patch", "changes": {"isRead": True},
                                                        "seq": 6}

    sim.ctl("POST", "/reset")
    c = sim.ctl("GET", "/counters")
    assert (c["graph_effective_writes"], c["graph_effective_writes_total"]) == ({}, 0)
    assert (c["graph_writes"], c["graph_writes_total"]) == ({}, 0)


def test_writes_need_mail_readwrite_and_a_valid_token(sim):
    scope = "openid profile offline_access Mail.Read"
    code, verifier, _ = sim.get_code(scope=scope)
    ro = sim.token(grant_type="authorization_code", code=code, code_verifier=verifier,
                   redirect_uri=REDIRECT, scope=scope).json()["access_token"]
    msg = sim.ctl("POST", "/mailbox/adele@contoso.com/messages", {"count": 1})["messages"][0]
    for method, path, body in (("PATCH", f"/me/messages/{msg['id']}", {"isRead": True}),
                               ("POST", f"/me/messages/{msg['id']}/move", {"destinationId": "archive"}),
                               ("DELETE", f"/me/messages/{msg['id']}", None)):
        r = sim.graph(method, path, ro, body)
        assert r.status == 403 and r.json()["error"]["code"] == "ErrorAccessDenied", (method, r.text)
    # An expired token: 401 before anything is looked at.
    rw = sim.sign_in()["access_token"]
    sim.ctl("POST", "/tokens/expire", {"user": "adele@contoso.com"})
    for method, path, body in (("PATCH", f"/me/messages/{msg['id']}", {"isRead": True}),
                               ("POST", f"/me/messages/{msg['id']}/move", {"destinationId": "archive"}),
                               ("DELETE", f"/me/messages/{msg['id']}", None)):
        r = sim.graph(method, path, rw, body)
        assert r.status == 401 and r.json()["error"]["code"] == "InvalidAuthenticationToken"
        assert "expired" in r.json()["error"]["message"] and r.headers["WWW-Authenticate"]
    after = mailbox_msg(sim, msg["id"])
    assert (after["folder"], after["isRead"], after["writes"]) == ("inbox", False, [])
    assert sim.ctl("GET", "/counters")["graph_writes_total"] == 0


def test_writes_to_unknown_ids_are_404(sim):
    at = sim.sign_in()["access_token"]
    sim.ctl("POST", "/mailbox/adele@contoso.com/messages", {"count": 1})
    bogus = "AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0AnosuchmessageAAA="
    for method, path, body in (("PATCH", f"/me/messages/{bogus}", {"isRead": True}),
                               ("POST", f"/me/messages/{bogus}/move", {"destinationId": "archive"}),
                               ("DELETE", f"/me/messages/{bogus}", None)):
        r = sim.graph(method, path, at, body)
        assert r.status == 404 and r.json()["error"]["code"] == "itemNotFound", (method, r.text)
    c = sim.ctl("GET", "/counters")
    assert c["graph_writes_total"] == 0 and c["graph_effective_writes_total"] == 0


def test_move_by_well_known_name_or_folder_id(sim):
    at = sim.sign_in()["access_token"]
    msgs = sim.ctl("POST", "/mailbox/adele@contoso.com/messages", {"count": 3})["messages"]
    folders = sim.ctl("GET", "/mailbox/adele@contoso.com")["folders"]
    h = {"Prefer": PREFER_IMM}
    for msg, dest, name in ((msgs[0], "deleteditems", "deleteditems"),
                            (msgs[1], "ARCHIVE", "archive"),
                            (msgs[2], folders["junkemail"]["id"], "junkemail")):
        r = sim.graph("POST", f"/me/messages/{msg['id']}/move", at, {"destinationId": dest}, h)
        assert r.status == 201, r.text
        body = r.json()
        assert body["id"] == msg["id"]                       # immutable id survives the move
        assert body["parentFolderId"] == folders[name]["id"] and body["subject"] == msg["subject"]
        assert 'IdType="ImmutableId"' in r.headers["Preference-Applied"]
        after = mailbox_msg(sim, msg["id"])
        assert after["folder"] == name and after["rest_id"] != msg["rest_id"]
    r = sim.graph("POST", f"/me/messages/{msgs[0]['id']}/move", at, {"destinationId": "nosuchfolder"}, h)
    assert r.status == 404 and r.json()["error"]["code"] == "itemNotFound"


# -- Graph scenarios: Retry-After, hang, hang_after --------------------------------

def test_injected_throttling_carries_retry_after(sim):
    at = sim.sign_in()["access_token"]
    sim.ctl("POST", "/config", {"throttle_retry_after": 5})
    sim.ctl("POST", "/scenarios", {"scenarios": [
        {"endpoint": "graph", "status": 503, "match": {"path": "/me"}},
        {"endpoint": "graph", "status": 429, "match": {"path": "/me"}},
        {"endpoint": "graph", "status": 429, "retry_after": None, "match": {"path": "/me"}},
        {"endpoint": "graph", "status": 500, "match": {"path": "/me"}}]})
    r = sim.graph("GET", "/me", at)
    assert r.status == 503 and r.headers["Retry-After"] == "5"
    assert r.json()["error"]["code"] == "serviceNotAvailable"
    r = sim.graph("GET", "/me", at)
    assert r.status == 429 and r.headers["Retry-After"] == "5"
    assert r.json()["error"]["code"] == "TooManyRequests"
    r = sim.graph("GET", "/me", at)
    assert r.status == 429 and "Retry-After" not in r.headers        # explicit null: backoff path
    r = sim.graph("GET", "/me", at)
    assert r.status == 500 and "Retry-After" not in r.headers
    assert sim.graph("GET", "/me", at).status == 200
    assert sim.ctl("GET", "/counters")["throttled"] == 2


def timed_out(method, url, token, body, timeout):
    with pytest.raises((socket.timeout, TimeoutError, urllib.error.URLError)):
        call(method, url, js=body, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)


def test_hang_before_a_write_delays_it(sim):
    at = sim.sign_in()["access_token"]
    msg = sim.ctl("POST", "/mailbox/adele@contoso.com/messages", {"count": 1})["messages"][0]
    sim.ctl("POST", "/scenarios", {"endpoint": "graph", "hang": 1.0, "match": {"method": "PATCH"}})
    timed_out("PATCH", f"{sim.url}/v1.0/me/messages/{msg['id']}", at, {"isRead": True}, 0.3)
    assert mailbox_msg(sim, msg["id"])["isRead"] is False         # not applied while hanging
    end = time.time() + 5
    while not mailbox_msg(sim, msg["id"])["isRead"] and time.time() < end:
        time.sleep(0.05)
    assert mailbox_msg(sim, msg["id"])["isRead"] is True           # then applied: no error given
    assert sim.ctl("GET", "/counters")["graph_effective_writes_total"] == 1


def test_hang_after_applies_the_write_then_answers_late(sim):
    at = sim.sign_in()["access_token"]
    m0, m1 = sim.ctl("POST", "/mailbox/adele@contoso.com/messages", {"count": 2})["messages"]
    # The write is applied, the answer never comes in time: a crash before the caller's commit.
    sim.ctl("POST", "/scenarios", {"endpoint": "graph", "hang_after": 1.5, "match": {"method": "PATCH"}})
    started = time.time()
    timed_out("PATCH", f"{sim.url}/v1.0/me/messages/{m0['id']}", at, {"isRead": True}, 0.4)
    assert time.time() - started < 1.4
    assert mailbox_msg(sim, m0["id"])["isRead"] is True
    assert sim.ctl("GET", "/counters")["graph_effective_writes"] == {m0["id"]: 1}
    # The retry (same idempotent call) is accepted but changes nothing.
    assert sim.graph("PATCH", f"/me/messages/{m0['id']}", at, {"isRead": True}).status == 200
    c = sim.ctl("GET", "/counters")
    assert c["graph_writes"] == {m0["id"]: 2} and c["graph_effective_writes"] == {m0["id"]: 1}

    # hang_after + status: the move happened, yet the caller sees a 504 (late).
    sim.ctl("POST", "/scenarios", {"endpoint": "graph", "hang_after": 0.3, "status": 504,
                                   "match": {"path": "/move"}})
    started = time.time()
    r = sim.graph("POST", f"/me/messages/{m1['id']}/move", at, {"destinationId": "archive"},
                  {"Prefer": PREFER_IMM})
    assert r.status == 504 and time.time() - started >= 0.3
    assert mailbox_msg(sim, m1["id"])["folder"] == "archive"
    r = sim.graph("POST", f"/me/messages/{m1['id']}/move", at, {"destinationId": "archive"},
                  {"Prefer": PREFER_IMM})
    assert r.status == 201 and r.json()["id"] == m1["id"]
    c = sim.ctl("GET", "/counters")
    assert c["graph_writes"][m1["id"]] == 2 and c["graph_effective_writes"][m1["id"]] == 1
    assert mailbox_msg(sim, m1["id"])["writes"] == [{"op": "move", "to": "archive", "seq": 2}]


# -- bulk accounts ------------------------------------------------------------------

def test_bulk_accounts_are_signed_in_accounts(sim):
    app = {"client_id": sim.client_id}
    made = sim.ctl("POST", "/bulk/accounts", dict(app, count=3, prefix="bk", domain="contoso.com",
                                                   scopes=SCOPE, messages=4))["accounts"]
    assert [a["upn"] for a in made] == ["bk00000@contoso.com", "bk00001@contoso.com",
                                        "bk00002@contoso.com"]
    # Scopes exactly as a code grant for the same scopes reports them.
    assert {a["scope"] for a in made} == {sim.sign_in()["scope"]}
    users = {u["upn"]: u for u in sim.ctl("GET", "/state")["users"]}
    for a in made:
        assert re.fullmatch(GUID, a["oid"]) and users[a["upn"]]["oid"] == a["oid"]
        assert users[a["upn"]]["tenant_id"] == sim.ctl("GET", "/state")["default"]["tenant_id"]
        assert a["expires_in"] == 3600 and a["refresh_token"] and a["access_token"]
        me = sim.graph("GET", "/me", a["access_token"]).json()
        assert (me["id"], me["userPrincipalName"]) == (a["oid"], a["upn"])
        _, items, _ = delta_round(sim, a["access_token"],
                                  sim.url + "/v1.0/me/mailFolders/inbox/messages/delta", "")
        assert len(items) == 4
        r = sim.token(grant_type="refresh_token", refresh_token=a["refresh_token"], scope=SCOPE)
        assert r.status == 200, r.text
        assert r.json()["scope"] == a["scope"] and r.json()["refresh_token"] != a["refresh_token"]
        assert sim.graph("PATCH", f"/me/messages/{items[0]['id']}", r.json()["access_token"],
                         {"isRead": True}).status == 200
    # Again with the same names: the same users, new tokens, no more messages.
    again = sim.ctl("POST", "/bulk/accounts", dict(app, count=4, prefix="bk", messages=4))["accounts"]
    assert [a["oid"] for a in again[:3]] == [a["oid"] for a in made]
    assert again[0]["access_token"] != made[0]["access_token"]
    assert sim.ctl("GET", "/mailbox/bk00000@contoso.com")["folders"]["inbox"]["count"] == 4
    assert sim.ctl("GET", "/mailbox/bk00003@contoso.com")["folders"]["inbox"]["count"] == 4
    # Tokens of another app's client are refused: a bulk account is bound to its app.
    r = call("POST", f"{sim.url}/common/oauth2/v2.0/token",
             form={"grant_type": "refresh_token", "refresh_token": made[0]["refresh_token"],
                   "client_id": "5f3c2a1b-8d7e-4f6a-9b0c-1d2e3f4a5b6c",
                   "client_secret": sim.ctl("GET", "/state")["default"]["client_secret"]})
    assert_aad_error(r, 400, "invalid_grant", 70000)
    c = sim.ctl("GET", "/counters")
    # 1 sign-in + 3 bulk + 3 refreshes + 4 bulk; only the real token calls are grants.
    assert c["access_tokens_issued"] == 11
    assert c["token_grants"] == {"authorization_code": 1, "refresh_token": 3}
    r = call("POST", sim.url + "/_sim/bulk/accounts", js={"client_id": "00000000-0000-0000-0000-00000000dead"})
    assert r.status == 404
    r = call("POST", sim.url + "/_sim/bulk/accounts", js=dict(app, scopes="openid https://nosuch.example/x"))
    assert r.status == 400


def test_bulk_accounts_ten_thousand(sim):
    started = time.time()
    made = sim.ctl("POST", "/bulk/accounts", {"client_id": sim.client_id, "count": 10000,
                                              "prefix": "load", "scopes": SCOPE})["accounts"]
    assert time.time() - started < 30
    assert len({a["upn"] for a in made}) == 10000 and made[-1]["upn"] == "load09999@contoso.com"
    assert sim.graph("GET", "/me", made[-1]["access_token"]).json()["userPrincipalName"] == \
        "load09999@contoso.com"
    assert sim.ctl("GET", "/counters")["refresh_tokens_valid"] == 10000


# -- delta: large rounds, cached serialisation, keep-alive ---------------------------

DELTA_SELECT = ("internetMessageId,conversationId,subject,from,toRecipients,receivedDateTime,isRead,"
                "hasAttachments,importance,bodyPreview,body,webLink,parentFolderId")


class KeepAlive:
    """One HTTP/1.1 connection for a whole delta round, as libcurl keeps it."""

    def __init__(self, url, token):
        import http.client
        self.conn = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=30)
        self.token = token
        self.sockets = set()

    def get(self, url, prefer='odata.maxpagesize=100, IdType="ImmutableId"'):
        parts = urlsplit(url)
        self.conn.request("GET", parts.path + ("?" + parts.query if parts.query else ""),
                          headers={"Authorization": f"Bearer {self.token}", "Prefer": prefer})
        r = self.conn.getresponse()
        body = r.read()
        assert r.status == 200, body[:300]
        assert (r.getheader("Connection") or "").lower() != "close"
        self.sockets.add(id(self.conn.sock))
        return json.loads(body)

    def round(self, url):
        items, pages = [], 0
        while True:
            body = self.get(url)
            pages += 1
            items += body["value"]
            if "@odata.deltaLink" in body:
                return items, pages, body["@odata.deltaLink"]
            url = body["@odata.nextLink"]


def test_large_delta_round_over_one_connection(sim):
    at = sim.sign_in()["access_token"]
    started = time.time()
    seeded = sim.ctl("POST", "/mailbox/adele@contoso.com/messages", {"count": 5000})["messages"]
    assert time.time() - started < 20
    ka = KeepAlive(sim.url, at)
    first = (f"{sim.url}/v1.0/me/mailFolders/inbox/messages/delta?$select={DELTA_SELECT}"
             "&$orderby=receivedDateTime%20desc")
    started = time.time()
    items, pages, delta_link = ka.round(first)
    took = time.time() - started
    assert pages == 50 and len(items) == 5000
    assert len(ka.sockets) == 1                                  # keep-alive held for 50 pages
    assert len(items) / took > 10000, f"{len(items) / took:.0f} entries/s"   # ~80k/s here
    assert {i["id"] for i in items} == {m["id"] for m in seeded}
    received = [i["receivedDateTime"] for i in items]
    assert received == sorted(received, reverse=True)
    wanted = {"@odata.type", "@odata.etag", "id"} | set(DELTA_SELECT.split(","))
    assert all(set(i) == wanted for i in items)
    newest = items[0]
    assert newest["subject"] == seeded[-1]["subject"] and newest["body"]["contentType"] == "html"
    assert newest["bodyPreview"].startswith("Hello, This is simulated message")
    assert newest["from"]["emailAddress"]["address"] and newest["toRecipients"][0]["emailAddress"][
        "address"] == "adele@contoso.com"
    assert newest["webLink"].startswith("https://outlook.office365.com/owa/?ItemID=")
    assert "=" not in newest["webLink"].split("ItemID=")[1].split("&")[0]

    # Idle rounds are cheap (no per-call stall, no scan of the 5,000 messages).
    started = time.time()
    for _ in range(200):
        idle, pages, delta_link = ka.round(delta_link)
        assert (idle, pages) == ([], 1)
    assert time.time() - started < 4, f"200 idle rounds took {time.time() - started:.1f}s"
    assert len(ka.sockets) == 1
    # ... and still see a change after them.
    assert sim.graph("PATCH", f"/me/messages/{newest['id']}", at, {"isRead": not newest["isRead"]},
                     {"Prefer": PREFER_IMM}).status == 200
    changes, _, delta_link = ka.round(delta_link)
    assert [(c["id"], c["isRead"]) for c in changes] == [(newest["id"], not newest["isRead"])]


def test_delta_entries_follow_changes(sim):
    """Serialised entries are reused across rounds: they must never show an older version."""
    at = sim.sign_in()["access_token"]
    msgs = sim.ctl("POST", "/mailbox/adele@contoso.com/messages", {"count": 3})["messages"]
    ka = KeepAlive(sim.url, at)
    first = f"{sim.url}/v1.0/me/mailFolders/inbox/messages/delta?$select={DELTA_SELECT}"
    before = {i["id"]: i for i in ka.round(first)[0]}
    sim.ctl("POST", f"/mailbox/adele@contoso.com/messages/{msgs[0]['id']}",
            {"subject": "Renamed in Outlook", "isRead": True})
    moved = sim.graph("POST", f"/me/messages/{msgs[1]['id']}/move", at, {"destinationId": "archive"},
                      {"Prefer": PREFER_IMM}).json()
    after = {i["id"]: i for i in ka.round(first)[0]}          # a fresh initial round
    assert set(after) == {msgs[0]["id"], msgs[2]["id"]}
    changed = after[msgs[0]["id"]]
    assert (changed["subject"], changed["isRead"]) == ("Renamed in Outlook", True)
    assert changed["@odata.etag"] != before[msgs[0]["id"]]["@odata.etag"]
    assert after[msgs[2]["id"]] == before[msgs[2]["id"]]
    archive = f"{sim.url}/v1.0/me/mailFolders/archive/messages/delta?$select={DELTA_SELECT}"
    (entry,) = ka.round(archive)[0]
    assert entry["id"] == msgs[1]["id"] and entry["parentFolderId"] == moved["parentFolderId"]
    assert entry["parentFolderId"] != before[msgs[1]["id"]]["parentFolderId"]
    assert entry["webLink"] != before[msgs[1]["id"]]["webLink"]
    assert entry["@odata.etag"] == moved["@odata.etag"]
    # Text bodies and Mail.ReadBasic are rendered as such from the same mailbox.
    r = sim.graph("GET", None, at, url=first, headers={"Prefer": 'outlook.body-content-type="text"'})
    bodies = [i["body"] for i in r.json()["value"]]
    assert bodies and all(b["contentType"] == "text" and "<" not in b["content"] for b in bodies)


# -- identity: /me, unverified claims ("nOAuth") -----------------------------------------

def sign_in_scoped(sim, scope, user="adele@contoso.com"):
    """A code grant for `scope` -> the token response."""
    code, verifier, _ = sim.get_code(user, scope=scope)
    r = sim.token(grant_type="authorization_code", code=code, code_verifier=verifier,
                  redirect_uri=REDIRECT, scope=scope)
    assert r.status == 200, r.text
    return r.json()


def claims_of(id_token):
    return json.loads(b64url_decode(id_token.split(".")[1]))


def test_me_select_and_a_user_without_mail(sim):
    user = sim.ctl("POST", "/users", {"upn": "nomail@contoso.com", "mail": None, "name": "No Mail"})
    assert user["mail"] is None
    t = sim.sign_in("nomail@contoso.com")
    oid = claims_of(t["id_token"])["oid"]
    r = sim.graph("GET", "/me?$select=id,displayName,mail,userPrincipalName", t["access_token"])
    assert r.status == 200
    me = r.json()
    assert {k: v for k, v in me.items() if k != "@odata.context"} == {
        "id": oid, "displayName": "No Mail", "mail": None, "userPrincipalName": "nomail@contoso.com"}
    assert "email" not in claims_of(t["id_token"])          # nothing to claim
    full = sim.graph("GET", "/me", t["access_token"]).json()
    assert full["id"] == oid and full["mail"] is None and full["surname"] == "Mail"
    # /users/{upn} and /users/{id} are the same user for that user's token.
    for who in ("nomail@contoso.com", oid):
        assert sim.graph("GET", f"/users/{who}?$select=id", t["access_token"]).json()["id"] == oid


def test_id_token_claims_another_tenants_address_while_me_tells_the_truth(sim):
    """The "nOAuth" set-up: a user of another tenant whose unverified email and
    preferred_username claim someone else's address."""
    fabrikam = sim.ctl("POST", "/tenants", {"name": "Fabrikam", "domains": ["fabrikam.example"]})
    evil = sim.ctl("POST", "/users", {"tenant_id": fabrikam["id"], "upn": "mallory@fabrikam.example",
                                      "name": "Mallory", "email_claim": "adele@contoso.com",
                                      "preferred_username_claim": "adele@contoso.com"})
    adele = next(u for u in sim.ctl("GET", "/state")["users"] if u["upn"] == "adele@contoso.com")
    t = sim.sign_in("mallory@fabrikam.example")
    c = claims_of(t["id_token"])
    assert c["email"] == "adele@contoso.com" and c["preferred_username"] == "adele@contoso.com"
    assert c["tid"] == fabrikam["id"] and c["oid"] == evil["oid"] != adele["oid"]
    assert c["iss"] == f"{sim.url}/{fabrikam['id']}/v2.0"
    me = sim.graph("GET", "/me?$select=id,mail,userPrincipalName", t["access_token"]).json()
    assert (me["id"], me["mail"], me["userPrincipalName"]) == (
        evil["oid"], "mallory@fabrikam.example", "mallory@fabrikam.example")
    # Adele's mailbox stays out of reach of that token.
    r = sim.graph("GET", "/users/adele@contoso.com/mailFolders/inbox/messages", t["access_token"])
    assert r.status == 404 and r.json()["error"]["code"] == "ErrorInvalidUser"


# -- hostile mail ----------------------------------------------------------------------

HOSTILE = "nul\u0000 ctl\u0001\u001f\u007f lone\ud800 low\udfff sep\u2028 bom\ufeff \"q\" \\b"


def test_hostile_characters_are_served_as_json_escapes(sim):
    at = sim.sign_in()["access_token"]
    sim.ctl("POST", "/mailbox/adele@contoso.com/messages", {"messages": [
        {"subject": "s" + HOSTILE, "body": {"contentType": "text", "content": HOSTILE},
         "from": "x\u0000@evil.example"}]})
    url = sim.url + "/v1.0/me/mailFolders/inbox/messages/delta?$select=subject,body,from,bodyPreview"
    r = sim.graph("GET", None, at, url=url)
    assert r.status == 200
    raw = r.body
    # Valid JSON text, ASCII only: NUL, control characters and lone surrogates as \u escapes.
    assert max(raw) < 0x80
    for esc in (rb"\u0000", rb"\u0001", rb"\u001f", rb"\ud800", rb"\udfff", rb"\u2028"):
        assert esc in raw, esc
    (entry,) = json.loads(raw)["value"]
    assert entry["subject"] == "s" + HOSTILE and entry["body"]["content"] == HOSTILE
    assert entry["from"]["emailAddress"]["address"] == "x\u0000@evil.example"
    got = sim.graph("GET", f"/me/messages/{entry['id']}?$select=body", at).json()
    assert got["body"]["content"] == HOSTILE


def test_message_over_32_mib_is_served_whole(sim):
    at = sim.sign_in()["access_token"]
    size = 33 << 20
    started = time.time()
    made = sim.ctl("POST", "/mailbox/adele@contoso.com/messages", {"messages": [
        {"subject": "small before"}, {"subject": "huge", "body_bytes": size}, {"subject": "small after"}]})
    assert time.time() - started < 5
    ka = KeepAlive(sim.url, at)
    first = f"{sim.url}/v1.0/me/mailFolders/inbox/messages/delta?$select=subject,body,bodyPreview"
    parts = urlsplit(first)
    ka.conn.request("GET", parts.path + "?" + parts.query,
                    headers={"Authorization": f"Bearer {at}", "Prefer": "odata.maxpagesize=10"})
    r = ka.conn.getresponse()
    raw = r.read()
    assert r.status == 200 and len(raw) > 32 << 20
    page = json.loads(raw)
    assert [e["subject"] for e in page["value"]] == ["small before", "huge", "small after"]
    huge = page["value"][1]
    assert len(huge["body"]["content"]) == size and huge["body"]["content"].startswith("<html><body><p>Lorem")
    assert len(huge["bodyPreview"]) == 255
    assert made["messages"][1]["subject"] == "huge"


# -- sending: drafts, extended-property markers, send, delivery log ------------------------

SEND_SCOPE = "openid profile email offline_access Mail.ReadWrite Mail.Send"
MARKER_ID = "String {66f5a359-4659-4830-9070-00047ec6ac6e} Name MsoOutboxId"


def marker_filter(value, pid=MARKER_ID):
    return ("$filter=" + quote(f"singleValueExtendedProperties/Any(ep: ep/id eq '{pid}' and "
                               f"ep/value eq '{value}')", safe=""))


def folder_ids(sim, user="adele@contoso.com"):
    return {k: v["id"] for k, v in sim.ctl("GET", f"/mailbox/{user}")["folders"].items()}


def draft_body(marker, **extra):
    body = {"subject": "Quarterly numbers", "importance": "High",
            "body": {"contentType": "HTML", "content": "<p>See <b>attached</b></p>"},
            "toRecipients": [{"emailAddress": {"address": "megan@contoso.com"}}],
            "ccRecipients": [{"emailAddress": {"name": "Lee", "address": "lee.gu@fabrikam.com"}}],
            "bccRecipients": [{"emailAddress": {"address": "audit@contoso.com"}}],
            "internetMessageHeaders": [{"name": "x-mso-ticket", "value": "T-42"}],
            "singleValueExtendedProperties": [{"id": MARKER_ID, "value": marker}]}
    body.update(extra)
    return body


def test_draft_marker_send_and_delivery_log(sim):
    at = sign_in_scoped(sim, SEND_SCOPE)["access_token"]
    h = {"Prefer": PREFER_IMM}
    folders = folder_ids(sim)
    drafts_delta = sim.url + "/v1.0/me/mailFolders/drafts/messages/delta?$select=subject"
    sent_delta = sim.url + "/v1.0/me/mailFolders/sentitems/messages/delta?$select=subject,isDraft"
    _, _, drafts_link = delta_round(sim, at, drafts_delta, PREFER_IMM)
    _, _, sent_link = delta_round(sim, at, sent_delta, PREFER_IMM)

    r = sim.graph("POST", "/me/messages", at, draft_body("m-001"), h)
    assert r.status == 201, r.text
    d = r.json()
    assert d["isDraft"] is True and d["parentFolderId"] == folders["drafts"]
    assert d["importance"] == "high" and d["from"] is None
    assert re.fullmatch(r"<[^@>]+@[^>]+>", d["internetMessageId"])
    assert d["body"]["contentType"] == "html" and "<b>attached</b>" in d["body"]["content"]
    assert d["body"]["content"].startswith("<html>") and d["bodyPreview"] == "See attached"
    assert d["toRecipients"] == [{"emailAddress": {"name": "Megan Bowen", "address": "megan@contoso.com"}}]
    assert "singleValueExtendedProperties" not in d          # only with $expand
    got = sim.graph("GET", f"/me/messages/{d['id']}?$select=subject&$expand="
                    + quote(f"singleValueExtendedProperties($filter=id eq '{MARKER_ID}')"), at, headers=h).json()
    assert got["singleValueExtendedProperties"] == [{"id": MARKER_ID, "value": "m-001"}]
    hdrs = sim.graph("GET", f"/me/messages/{d['id']}?$select=internetMessageHeaders", at, headers=h).json()
    assert hdrs["internetMessageHeaders"] == [{"name": "x-mso-ticket", "value": "T-42"}]

    r = sim.graph("PATCH", f"/me/messages/{d['id']}", at, {"subject": "Quarterly numbers (final)"}, h)
    assert r.status == 200 and r.json()["subject"] == "Quarterly numbers (final)"
    found = sim.graph("GET", "/me/mailFolders/drafts/messages?" + marker_filter("m-001"), at, headers=h).json()
    assert [m["id"] for m in found["value"]] == [d["id"]]
    assert sim.graph("GET", "/me/mailFolders/drafts/messages?" + marker_filter("m-002"), at).json()["value"] == []

    r = sim.graph("POST", f"/me/messages/{d['id']}/send", at, headers=h)
    assert r.status == 202 and r.body == b""
    sent = sim.graph("GET", f"/me/messages/{d['id']}", at, headers=h).json()      # same immutable id
    assert sent["parentFolderId"] == folders["sentitems"] and sent["isDraft"] is False
    assert sent["from"]["emailAddress"]["address"] == "adele@contoso.com"
    assert sent["internetMessageId"] == d["internetMessageId"]
    # Sent once: a second send finds no draft.
    r = sim.graph("POST", f"/me/messages/{d['id']}/send", at, headers=h)
    assert r.status == 404 and r.json()["error"]["code"] == "itemNotFound"
    assert sim.graph("GET", "/me/mailFolders/drafts/messages?" + marker_filter("m-001"), at).json()["value"] == []
    in_sent = sim.graph("GET", "/me/mailFolders/sentitems/messages?" + marker_filter("m-001"), at,
                        headers=h).json()["value"]
    assert [m["id"] for m in in_sent] == [d["id"]]

    log = sim.ctl("GET", "/deliveries?marker=m-001")
    assert log["count"] == 1 and log["by_marker"] == {"m-001": 1}
    (dl,) = log["deliveries"]
    assert dl["via"] == "send" and dl["mailbox"] == "adele@contoso.com" and dl["message_id"] == d["id"]
    assert dl["internetMessageId"] == d["internetMessageId"] and dl["subject"] == "Quarterly numbers (final)"
    assert (dl["to"], dl["cc"], dl["bcc"], dl["recipients"]) == (
        ["megan@contoso.com"], ["lee.gu@fabrikam.com"], ["audit@contoso.com"], 3)
    assert dl["markers"] == {MARKER_ID: "m-001"} and dl["attachments"] == []
    assert dl["headers"] == [{"name": "x-mso-ticket", "value": "T-42"}]
    # Synced folders see it: gone from Drafts, new in Sent Items.
    _, changes, _ = delta_round(sim, at, drafts_link, PREFER_IMM)
    assert changes == [{"@odata.type": "#microsoft.graph.message", "id": d["id"],
                        "@removed": {"reason": "deleted"}}]
    _, changes, _ = delta_round(sim, at, sent_link, PREFER_IMM)
    assert [(c["id"], c["isDraft"]) for c in changes] == [(d["id"], False)]
    assert [w["op"] for w in mailbox_msg(sim, d["id"])["writes"]] == ["patch", "send"]
    assert sim.ctl("GET", "/counters")["sends"] == 1


def test_send_refusals(sim):
    at = sign_in_scoped(sim, SEND_SCOPE)["access_token"]
    r = sim.graph("POST", "/me/messages", at, draft_body("x", internetMessageHeaders=[
        {"name": "In-Reply-To", "value": "<a@b>"}]))
    err = r.json()["error"]
    assert r.status == 400 and err["code"] == "InvalidInternetMessageHeader"
    assert err["message"] == "The internet message header name 'In-Reply-To' should start with 'x-' or 'X-'."
    assert set(err["innerError"]) == {"request-id", "date", "client-request-id"}
    r = sim.graph("POST", "/me/messages", at, draft_body("x", singleValueExtendedProperties=[
        {"id": "not an id", "value": "v"}]))
    assert r.status == 400 and r.json()["error"]["code"] == "ErrorInvalidProperty"
    # No recipients; too many recipients (501 > 500): refused, nothing delivered.
    d = sim.graph("POST", "/me/messages", at, {"subject": "nobody"}).json()
    r = sim.graph("POST", f"/me/messages/{d['id']}/send", at)
    assert r.status == 400 and r.json()["error"]["code"] == "ErrorInvalidRecipients"
    many = [{"emailAddress": {"address": f"r{i}@example.com"}} for i in range(501)]
    d = sim.graph("POST", "/me/messages", at, {"subject": "crowd", "toRecipients": many}).json()
    r = sim.graph("POST", f"/me/messages/{d['id']}/send", at)
    assert r.status == 400 and r.json()["error"]["code"] == "ErrorTooManyRecipients"
    d = sim.graph("POST", "/me/messages", at, {"subject": "crowd", "toRecipients": many[:500]}).json()
    assert sim.graph("POST", f"/me/messages/{d['id']}/send", at).status == 202
    r = sim.graph("POST", "/me/sendMail", at, {"message": {"subject": "crowd", "toRecipients": many}})
    assert r.status == 400 and r.json()["error"]["code"] == "ErrorTooManyRecipients"
    assert sim.ctl("GET", "/deliveries")["count"] == 1
    # Without Mail.Send: 403 ErrorAccessDenied, nothing sent; without Mail.ReadWrite: no drafts.
    rw = sim.sign_in()["access_token"]
    d = sim.graph("POST", "/me/messages", rw, draft_body("y")).json()
    r = sim.graph("POST", f"/me/messages/{d['id']}/send", rw)
    assert r.status == 403 and r.json()["error"]["code"] == "ErrorAccessDenied"
    r = sim.graph("POST", "/me/sendMail", rw, {"message": draft_body("y")})
    assert r.status == 403 and r.json()["error"]["code"] == "ErrorAccessDenied"
    send_only = sign_in_scoped(sim, "openid offline_access Mail.Send")["access_token"]
    r = sim.graph("POST", "/me/messages", send_only, draft_body("z"))
    assert r.status == 403 and r.json()["error"]["code"] == "ErrorAccessDenied"
    assert sim.graph("POST", "/me/sendMail", send_only, {"message": draft_body("z")}).status == 202
    assert sim.ctl("GET", "/deliveries")["count"] == 2
    # Body and attachments over the message size limit (150 MB; 1 MB here).
    sim.ctl("POST", "/config", {"max_message_size": 1 << 20})
    d = sim.graph("POST", "/me/messages", at, draft_body("big")).json()
    r = sim.graph("POST", f"/me/messages/{d['id']}/attachments/createUploadSession", at, {
        "AttachmentItem": {"attachmentType": "file", "name": "a.bin", "size": 3 << 20}})
    assert r.status == 400 and r.json()["error"]["code"] == "ErrorMessageSizeExceeded"
    half = base64.b64encode(bytes(600 << 10)).decode()
    att = {"@odata.type": "#microsoft.graph.fileAttachment", "name": "half.bin", "contentBytes": half}
    assert sim.graph("POST", f"/me/messages/{d['id']}/attachments", at, att).status == 201
    r = sim.graph("POST", f"/me/messages/{d['id']}/attachments", at, dict(att, name="other.bin"))
    assert r.status == 400 and r.json()["error"]["code"] == "ErrorMessageSizeExceeded"
    r = sim.graph("POST", "/me/sendMail", at, {"message": draft_body("big2", attachments=[att, att])})
    assert r.status == 400 and r.json()["error"]["code"] == "ErrorMessageSizeExceeded"
    assert sim.ctl("GET", "/deliveries")["count"] == 2


def test_sendmail_json_and_mime(sim):
    at = sign_in_scoped(sim, SEND_SCOPE)["access_token"]
    pdf = b"%PDF-1.4 " + bytes(range(256)) * 8
    msg = draft_body("sm-1", attachments=[{"@odata.type": "#microsoft.graph.fileAttachment",
                                           "name": "report.pdf", "contentType": "application/pdf",
                                           "contentBytes": base64.b64encode(pdf).decode()}])
    r = sim.graph("POST", "/me/sendMail", at, {"message": msg, "saveToSentItems": False})
    assert r.status == 202 and r.body == b""
    (dl,) = sim.ctl("GET", "/deliveries?marker=sm-1")["deliveries"]
    assert dl["via"] == "sendMail" and dl["message_id"] is None
    assert [(a["name"], a["size"], a["sha256"]) for a in dl["attachments"]] == [
        ("report.pdf", len(pdf), hashlib.sha256(pdf).hexdigest())]
    assert sim.ctl("GET", "/mailbox/adele@contoso.com")["folders"]["sentitems"]["count"] == 0
    # Saved (the default): in Sent Items, findable by its marker.
    assert sim.graph("POST", "/me/sendMail", at, {"message": draft_body("sm-2")}).status == 202
    found = sim.graph("GET", "/me/mailFolders/sentitems/messages?" + marker_filter("sm-2"), at).json()["value"]
    assert len(found) == 1 and found[0]["isDraft"] is False
    # MIME: base64 of the whole message, Content-Type text/plain.
    mime = (b"From: adele@contoso.com\r\nTo: Megan <megan@contoso.com>\r\nSubject: MIME hello\r\n"
            b"X-Mso-Ticket: T-7\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHi\r\n")
    r = call("POST", sim.url + "/v1.0/me/sendMail", body=base64.b64encode(mime),
             headers={"Authorization": f"Bearer {at}", "Content-Type": "text/plain"})
    assert r.status == 202, r.text
    last = sim.ctl("GET", "/deliveries")["deliveries"][-1]
    assert (last["subject"], last["to"], last["headers"]) == (
        "MIME hello", ["megan@contoso.com"], [{"name": "X-Mso-Ticket", "value": "T-7"}])
    r = call("POST", sim.url + "/v1.0/me/sendMail", body=b"not base64!",
             headers={"Authorization": f"Bearer {at}", "Content-Type": "text/plain"})
    assert r.status == 400 and r.json()["error"] == {**r.json()["error"], "code": "ErrorMimeContentInvalidBase64String",
                                                     "message": "Invalid base64 string for MIME content."}
    assert sim.ctl("GET", "/deliveries")["count"] == 3


def test_create_reply_and_reply_all(sim):
    at = sign_in_scoped(sim, SEND_SCOPE)["access_token"]
    (orig,) = sim.ctl("POST", "/mailbox/adele@contoso.com/messages", {"messages": [
        {"subject": "Budget", "from": "lee.gu@fabrikam.com",
         "to": ["adele@contoso.com", "megan@contoso.com"], "cc": ["nestor@northwind.example"],
         "body": "<html><body><p>Numbers?</p></body></html>"}]})["messages"]
    o = sim.graph("GET", f"/me/messages/{orig['id']}", at, headers={"Prefer": PREFER_IMM}).json()
    h = {"Prefer": PREFER_IMM}
    r = sim.graph("POST", f"/me/messages/{orig['id']}/createReply", at, {"comment": "Here."}, h)
    assert r.status == 201, r.text
    rep = r.json()
    assert rep["isDraft"] is True and rep["subject"] == "RE: Budget"
    assert [x["emailAddress"]["address"] for x in rep["toRecipients"]] == ["lee.gu@fabrikam.com"]
    assert rep["ccRecipients"] == [] and rep["conversationId"] == o["conversationId"]
    assert "Here." in rep["body"]["content"] and "Numbers?" in rep["body"]["content"]
    r = sim.graph("POST", f"/me/messages/{orig['id']}/createReplyAll", at, {
        "message": {"singleValueExtendedProperties": [{"id": MARKER_ID, "value": "ra-1"}]}}, h)
    ra = r.json()
    assert r.status == 201 and ra["subject"] == "RE: Budget"
    assert [x["emailAddress"]["address"] for x in ra["toRecipients"]] == ["lee.gu@fabrikam.com",
                                                                         "megan@contoso.com"]
    assert [x["emailAddress"]["address"] for x in ra["ccRecipients"]] == ["nestor@northwind.example"]
    assert sim.graph("POST", f"/me/messages/{ra['id']}/send", at, headers=h).status == 202
    (dl,) = sim.ctl("GET", "/deliveries?marker=ra-1")["deliveries"]
    assert dl["in_reply_to"] == o["internetMessageId"] and dl["conversationId"] == o["conversationId"]
    assert sim.graph("POST", "/me/messages/AAkALgAAnosuchAAA=/createReply", at).status == 404


# -- attachments of drafts: POST, upload sessions --------------------------------------------

def upload(url, data, start, total, headers=None):
    h = {"Content-Type": "application/octet-stream",
         "Content-Range": f"bytes {start}-{start + len(data) - 1}/{total}"}
    h.update(headers or {})
    return call("PUT", url, body=data, headers=h)


def test_attachments_and_upload_session_then_send(sim):
    at = sign_in_scoped(sim, SEND_SCOPE)["access_token"]
    h = {"Prefer": PREFER_IMM}
    d = sim.graph("POST", "/me/messages", at, draft_body("up-1", body={
        "contentType": "html", "content": '<p>logo: <img src="cid:logo@sim"></p>'}), h).json()
    png = b"\x89PNG\r\n\x1a\n" + secrets.token_bytes(3000)
    r = sim.graph("POST", f"/me/messages/{d['id']}/attachments", at, {
        "@odata.type": "#microsoft.graph.fileAttachment", "name": "logo.png", "contentType": "image/png",
        "isInline": True, "contentId": "logo@sim", "contentBytes": base64.b64encode(png).decode()}, h)
    assert r.status == 201, r.text
    logo = r.json()
    assert (logo["@odata.type"], logo["name"], logo["size"], logo["isInline"], logo["contentId"]) == (
        "#microsoft.graph.fileAttachment", "logo.png", len(png), True, "logo@sim")
    assert base64.b64decode(logo["contentBytes"]) == png
    # Only an inline attachment so far: hasAttachments stays false.
    assert sim.graph("GET", f"/me/messages/{d['id']}?$select=hasAttachments", at, headers=h).json()[
        "hasAttachments"] is False
    # A request body over 4 MB is refused before anything happens.
    big = base64.b64encode(secrets.token_bytes(3 << 20)).decode()
    r = sim.graph("POST", f"/me/messages/{d['id']}/attachments", at, {
        "@odata.type": "#microsoft.graph.fileAttachment", "name": "big.bin", "contentBytes": big}, h)
    assert r.status == 413 and r.json()["error"]["code"] == "RequestEntityTooLarge"

    # 3 MB .. 150 MB: an upload session, PUT in order, each fragment at most 4 MB.
    r = sim.graph("POST", f"/me/messages/{d['id']}/attachments/createUploadSession", at,
                  {"AttachmentItem": {"attachmentType": "file", "name": "small.bin", "size": 1000}}, h)
    assert r.status == 400 and r.json()["error"]["code"] == "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize"
    data = secrets.token_bytes(9 * 1024 * 1024 + 12345)
    r = sim.graph("POST", f"/me/messages/{d['id']}/attachments/createUploadSession", at,
                  {"AttachmentItem": {"attachmentType": "file", "name": "data.bin", "size": len(data),
                                      "contentType": "application/x-sim"}}, h)
    assert r.status == 201, r.text
    sess = r.json()
    assert sess["nextExpectedRanges"] == ["0-"] and "authtoken=" in sess["uploadUrl"]
    url = sess["uploadUrl"]
    assert url.startswith(sim.url + "/api/v2.0/Users('")
    r = upload(url, data[:1 << 20], 0, len(data), {"Authorization": f"Bearer {at}"})
    assert r.status == 401                                   # pre-authenticated: no bearer token
    r = upload(url, data[:(4 << 20) + 1], 0, len(data))
    assert r.status == 413                                   # fragment over 4 MB
    r = upload(url, data[:2 << 20], 0, len(data))
    assert r.status == 200 and r.json()["nextExpectedRanges"] == [str(2 << 20)]
    r = upload(url, data[2 << 20:3 << 20], 2 << 20, len(data) + 1)
    assert r.status == 400                                   # another total
    r = upload(url, data[:1 << 20], 0, len(data))             # a repeat: out of order
    assert r.status == 416 and r.json()["error"]["code"] == "ErrorInvalidRange"
    assert call("GET", url).json()["nextExpectedRanges"] == [str(2 << 20)]
    pos = 2 << 20
    while pos < len(data):
        chunk = data[pos:pos + (4 << 20)]
        r = upload(url, chunk, pos, len(data))
        pos += len(chunk)
        assert r.status == (201 if pos == len(data) else 200), r.text
    assert r.body == b"" and "/Attachments('" in r.headers["Location"] and "Content-Type" not in r.headers
    att_id = r.headers["Location"].rsplit("('", 1)[1].rstrip("')")
    assert upload(url, data[:10], 0, len(data)).status == 404          # the session is gone
    url2 = sim.graph("POST", f"/me/messages/{d['id']}/attachments/createUploadSession", at, {
        "AttachmentItem": {"attachmentType": "file", "name": "late.bin", "size": 3 << 20}}).json()["uploadUrl"]
    sim.ctl("POST", "/clock", {"advance": 7201})                           # past expirationDateTime
    assert upload(url2, data[:10], 0, 3 << 20).status == 401
    sim.ctl("POST", "/clock", {"offset": 0})
    r = sim.graph("GET", f"/me/messages/{d['id']}/attachments?$select=name,size,isInline", at, headers=h)
    listed = r.json()["value"]
    assert [(a["name"], a["size"], a["isInline"]) for a in listed] == [
        ("logo.png", len(png), True), ("data.bin", len(data), False)]
    assert all("contentBytes" not in a for a in listed)
    r = sim.graph("GET", f"/me/messages/{d['id']}/attachments/{att_id}/$value", at, headers=h)
    assert r.status == 200 and r.body == data and r.headers["Content-Type"] == "application/x-sim"
    assert sim.graph("GET", f"/me/messages/{d['id']}?$select=hasAttachments", at, headers=h).json()[
        "hasAttachments"] is True
    assert sim.graph("POST", f"/me/messages/{d['id']}/send", at, headers=h).status == 202
    (dl,) = sim.ctl("GET", "/deliveries?marker=up-1")["deliveries"]
    assert [(a["name"], a["size"], a["sha256"], a["isInline"], a["contentId"]) for a in dl["attachments"]] == [
        ("logo.png", len(png), hashlib.sha256(png).hexdigest(), True, "logo@sim"),
        ("data.bin", len(data), hashlib.sha256(data).hexdigest(), False, None)]
    assert sim.ctl("GET", "/counters")["uploads_completed"] == 1


def test_upload_fragments_in_multiples_when_configured(sim):
    at = sign_in_scoped(sim, SEND_SCOPE)["access_token"]
    sim.ctl("POST", "/config", {"upload_chunk_multiple": 327680})
    d = sim.graph("POST", "/me/messages", at, draft_body("mult")).json()
    size = 4 << 20
    url = sim.graph("POST", f"/me/messages/{d['id']}/attachments/createUploadSession", at, {
        "AttachmentItem": {"attachmentType": "file", "name": "f.bin", "size": size}}).json()["uploadUrl"]
    data = secrets.token_bytes(size)
    assert upload(url, data[:1 << 20], 0, size).status == 400         # 1 MiB is no multiple of 320 KiB
    assert upload(url, data[:327680 * 3], 0, size).status == 200
    assert upload(url, data[327680 * 3:], 327680 * 3, size).status == 201   # the last may be any size


def test_send_faults_leave_one_delivery(sim):
    """hang_after / drop_after on a send: it happened, the caller never learned it; the retry
    finds no draft (404) and the marker finds the sent message: still one delivery."""
    at = sign_in_scoped(sim, SEND_SCOPE)["access_token"]
    h = {"Prefer": PREFER_IMM}
    d1 = sim.graph("POST", "/me/messages", at, draft_body("f-1"), h).json()
    sim.ctl("POST", "/scenarios", {"endpoint": "graph", "hang_after": 0.2, "status": 504,
                                   "match": {"path": "/send", "method": "POST"}})
    r = sim.graph("POST", f"/me/messages/{d1['id']}/send", at, headers=h)
    assert r.status == 504
    assert sim.ctl("GET", "/deliveries?marker=f-1")["count"] == 1
    r = sim.graph("POST", f"/me/messages/{d1['id']}/send", at, headers=h)
    assert r.status == 404
    found = sim.graph("GET", "/me/mailFolders/sentitems/messages?" + marker_filter("f-1"), at, headers=h)
    assert [m["id"] for m in found.json()["value"]] == [d1["id"]]

    # drop_after: applied, then the connection is closed without any answer.
    import http.client
    d2 = sim.graph("POST", "/me/messages", at, draft_body("f-2"), h).json()
    sim.ctl("POST", "/scenarios", {"endpoint": "graph", "drop_after": True, "match": {"path": "/send"}})
    conn = http.client.HTTPConnection("127.0.0.1", urlsplit(sim.url).port, timeout=5)
    conn.request("POST", f"/v1.0/me/messages/{d2['id']}/send", body=b"",
                 headers={"Authorization": f"Bearer {at}", "Prefer": PREFER_IMM})
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        conn.getresponse()
    assert sim.ctl("GET", "/deliveries?marker=f-2")["count"] == 1
    entry = [e for e in sim.ctl("GET", "/log")["requests"] if e["path"].endswith("/send")][-1]
    assert entry["dropped"] is True and entry["status"] == 0

    # 429 / 503 before the send: not applied; the retry sends once.
    sim.ctl("POST", "/scenarios", {"scenarios": [
        {"endpoint": "graph", "status": 429, "retry_after": 2, "match": {"path": "/sendMail"}},
        {"endpoint": "graph", "status": 503, "match": {"path": "/sendMail"}}]})
    r = sim.graph("POST", "/me/sendMail", at, {"message": draft_body("f-3")})
    assert r.status == 429 and r.headers["Retry-After"] == "2"
    r = sim.graph("POST", "/me/sendMail", at, {"message": draft_body("f-3")})
    assert r.status == 503 and r.headers["Retry-After"] == "1"
    assert sim.ctl("GET", "/deliveries?marker=f-3")["count"] == 0
    assert sim.graph("POST", "/me/sendMail", at, {"message": draft_body("f-3")}).status == 202
    assert sim.ctl("GET", "/deliveries")["by_marker"] == {"f-1": 1, "f-2": 1, "f-3": 1}
    # drop: the connection is cut before the request is handled: nothing sent.
    d5 = sim.graph("POST", "/me/messages", at, draft_body("f-5"), h).json()
    sim.ctl("POST", "/scenarios", {"endpoint": "graph", "drop": True, "match": {"path": "/send"}})
    conn = http.client.HTTPConnection("127.0.0.1", urlsplit(sim.url).port, timeout=5)
    conn.request("POST", f"/v1.0/me/messages/{d5['id']}/send", body=b"", headers={"Authorization": f"Bearer {at}"})
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        conn.getresponse()
    assert sim.ctl("GET", "/deliveries?marker=f-5")["count"] == 0
    assert sim.graph("POST", f"/me/messages/{d5['id']}/send", at, headers=h).status == 202
    # A fault on an upload URL works the same way (path AttachmentSessions).
    d4 = sim.graph("POST", "/me/messages", at, draft_body("f-4")).json()
    url = sim.graph("POST", f"/me/messages/{d4['id']}/attachments/createUploadSession", at, {
        "AttachmentItem": {"attachmentType": "file", "name": "f.bin", "size": 3 << 20}}).json()["uploadUrl"]
    sim.ctl("POST", "/scenarios", {"endpoint": "graph", "status": 503, "match": {"path": "AttachmentSessions"}})
    data = secrets.token_bytes(3 << 20)
    assert upload(url, data, 0, len(data)).status == 503
    assert upload(url, data, 0, len(data)).status == 201


# -- attachments of received mail ------------------------------------------------------------

def seed_with_attachments(sim, user="adele@contoso.com"):
    pdf = b"%PDF-1.7\n" + bytes(range(256)) * 40
    made = sim.ctl("POST", f"/mailbox/{user}/messages", {"messages": [
        {"subject": "Contract", "from": "lee.gu@fabrikam.com",
         "body": '<html><body><p>Signed.</p><img src="cid:sig@lee"></body></html>',
         "attachments": [
             {"kind": "file", "name": "contract.pdf", "contentType": "application/pdf",
              "content_base64": base64.b64encode(pdf).decode()},
             {"kind": "file", "name": "sig.png", "contentType": "image/png", "isInline": True,
              "contentId": "sig@lee", "size": 5000, "seed": "sig"},
             {"kind": "item", "name": "Fwd: original", "item": {
                 "subject": "Original offer", "from": "nestor@northwind.example",
                 "toRecipients": [{"emailAddress": {"name": "Lee", "address": "lee.gu@fabrikam.com"}}],
                 "body": "<p>Offer inside</p>"}},
             {"kind": "reference", "name": "Budget.xlsx",
              "sourceUrl": "https://contoso.sharepoint.com/Budget.xlsx", "providerType": "oneDriveBusiness"}]},
        {"subject": "Only a logo", "body": '<p><img src="cid:logo"></p>', "attachments": [
            {"kind": "file", "name": "logo.png", "isInline": True, "contentId": "logo", "size": 100}]}]})
    return made["messages"], pdf


def test_received_attachments_of_three_kinds(sim):
    at = sim.sign_in()["access_token"]
    h = {"Prefer": PREFER_IMM}
    (msg, logo_only), pdf = seed_with_attachments(sim)
    got = sim.graph("GET", f"/me/messages/{msg['id']}?$select=hasAttachments,body", at, headers=h).json()
    assert got["hasAttachments"] is True and 'src="cid:sig@lee"' in got["body"]["content"]
    assert sim.graph("GET", f"/me/messages/{logo_only['id']}?$select=hasAttachments", at,
                     headers=h).json()["hasAttachments"] is False      # inline only
    detail = sim.ctl("GET", f"/mailbox/adele@contoso.com/messages/{msg['id']}")
    by_name = {a["name"]: a for a in detail["attachments"]}
    assert by_name["contract.pdf"]["sha256"] == hashlib.sha256(pdf).hexdigest()
    assert by_name["Budget.xlsx"]["sourceUrl"] == "https://contoso.sharepoint.com/Budget.xlsx"
    assert by_name["Budget.xlsx"]["providerType"] == "oneDriveBusiness"

    r = sim.graph("GET", f"/me/messages/{msg['id']}/attachments", at, headers=h)
    assert r.status == 200 and int(r.headers["Content-Length"]) == len(r.body)
    listed = r.json()["value"]
    assert [a["@odata.type"] for a in listed] == ["#microsoft.graph.fileAttachment"] * 2 + [
        "#microsoft.graph.itemAttachment", "#microsoft.graph.referenceAttachment"]
    f, inline, item, ref = listed
    # File attachments carry contentBytes by default; items and references never do.
    assert base64.b64decode(f["contentBytes"]) == pdf and f["size"] == len(pdf)
    assert f["contentType"] == "application/pdf" and f["isInline"] is False and f["contentId"] is None
    assert inline["isInline"] is True and inline["contentId"] == "sig@lee"
    assert hashlib.sha256(base64.b64decode(inline["contentBytes"])).hexdigest() == by_name["sig.png"]["sha256"]
    assert "contentBytes" not in item and item["contentType"] is None
    assert "contentBytes" not in ref and "sourceUrl" not in ref          # beta-only in Graph
    sel = sim.graph("GET", f"/me/messages/{msg['id']}/attachments?$select=name,size", at, headers=h).json()
    assert all(set(a) == {"@odata.type", "@odata.mediaContentType", "id", "name", "size"} or
               set(a) == {"@odata.type", "id", "name", "size"} for a in sel["value"])
    one = sim.graph("GET", f"/me/messages/{msg['id']}/attachments/{f['id']}", at, headers=h).json()
    assert base64.b64decode(one["contentBytes"]) == pdf and one["@odata.context"].endswith("/$entity")
    raw = sim.graph("GET", f"/me/messages/{msg['id']}/attachments/{f['id']}/$value", at, headers=h)
    assert raw.body == pdf and raw.headers["Content-Type"] == "application/pdf"
    mime = sim.graph("GET", f"/me/messages/{msg['id']}/attachments/{item['id']}/$value", at, headers=h)
    assert mime.status == 200 and mime.headers["Content-Type"] == "message/rfc822"
    import email
    parsed = email.message_from_bytes(mime.body)
    assert parsed["Subject"] == "Original offer" and "nestor@northwind.example" in parsed["From"]
    assert item["size"] == len(mime.body)
    expanded = sim.graph("GET", f"/me/messages/{msg['id']}/attachments/{item['id']}"
                         "?$expand=microsoft.graph.itemattachment/item", at, headers=h).json()
    assert expanded["item"]["subject"] == "Original offer"
    r = sim.graph("GET", f"/me/messages/{msg['id']}/attachments/{ref['id']}/$value", at, headers=h)
    assert r.status == 405
    r = sim.graph("GET", f"/me/messages/{msg['id']}/attachments/AAMkAGnosuchAAA=", at, headers=h)
    assert r.status == 404 and r.json()["error"]["code"] == "ErrorItemNotFound"
    basic = sign_in_scoped(sim, "openid offline_access Mail.ReadBasic")["access_token"]
    assert sim.graph("GET", f"/me/messages/{msg['id']}/attachments", basic, headers=h).status == 403


def test_reference_link_on_beta_only(sim):
    """A reference attachment's link (sourceUrl) is beta-only in Graph: /beta serves the same
    resources, /users/{x} and scenarios included, and only there shows it."""
    at = sim.sign_in()["access_token"]
    h = {"Prefer": PREFER_IMM}
    (msg, _), _ = seed_with_attachments(sim)
    listed = sim.graph("GET", f"/me/messages/{msg['id']}/attachments", at, headers=h).json()["value"]
    ref = next(a for a in listed if a["@odata.type"].endswith("referenceAttachment"))
    path = f"/me/messages/{msg['id']}/attachments/{ref['id']}"
    assert "sourceUrl" not in sim.graph("GET", path, at, headers=h).json()
    beta = call("GET", f"{sim.url}/beta{path}", headers=dict(h, Authorization=f"Bearer {at}"))
    assert beta.status == 200, beta.text
    got = beta.json()
    assert got["sourceUrl"] == "https://contoso.sharepoint.com/Budget.xlsx"
    assert got["providerType"] == "oneDriveBusiness" and got["isFolder"] is False
    assert beta.headers.get("request-id")
    users = call("GET", f"{sim.url}/beta/users/adele@contoso.com/messages/{msg['id']}/attachments",
                 headers=dict(h, Authorization=f"Bearer {at}"))
    assert any(a.get("sourceUrl") for a in users.json()["value"])
    # Files look the same on beta; the log keeps the path as requested.
    f = next(a for a in listed if a["name"] == "contract.pdf")
    raw = call("GET", f"{sim.url}/beta/me/messages/{msg['id']}/attachments/{f['id']}/$value",
               headers={"Authorization": f"Bearer {at}"})
    assert raw.status == 200 and raw.headers["Content-Type"] == "application/pdf"
    assert any(e["path"].startswith("/beta/") for e in sim.ctl("GET", "/log")["requests"])
    sim.ctl("POST", "/scenarios", {"endpoint": "graph", "status": 503, "times": 1,
                                   "match": {"path": "/beta/"}})
    assert call("GET", f"{sim.url}/beta{path}",
                headers={"Authorization": f"Bearer {at}"}).status == 503


def test_attachment_edits_in_outlook_moves_deletes_and_faults(sim):
    at = sim.sign_in()["access_token"]
    h = {"Prefer": PREFER_IMM}
    (msg, _), _ = seed_with_attachments(sim)
    first = f"{sim.url}/v1.0/me/mailFolders/inbox/messages/delta?$select=hasAttachments"
    _, _, link = delta_round(sim, at, first, PREFER_IMM)
    detail = sim.ctl("GET", f"/mailbox/adele@contoso.com/messages/{msg['id']}")
    contract = next(a for a in detail["attachments"] if a["name"] == "contract.pdf")
    item = next(a for a in detail["attachments"] if a["kind"] == "item")
    # Removed "in Outlook": gone from the list, the message changed (delta sees it).
    for att in (contract, item):
        call("DELETE", f"{sim.url}/_sim/mailbox/adele@contoso.com/messages/{msg['id']}/attachments/{att['id']}")
    _, changes, link = delta_round(sim, at, link, PREFER_IMM)
    assert [c["id"] for c in changes] == [msg["id"]]
    names = [a["name"] for a in sim.graph("GET", f"/me/messages/{msg['id']}/attachments?$select=name",
                                          at, headers=h).json()["value"]]
    assert names == ["sig.png", "Budget.xlsx"]
    # Now only an inline one and a reference: still "has attachments" (the reference is no inline part).
    assert sim.graph("GET", f"/me/messages/{msg['id']}?$select=hasAttachments", at, headers=h).json()[
        "hasAttachments"] is True
    r = sim.graph("GET", f"/me/messages/{msg['id']}/attachments/{contract['id']}/$value", at, headers=h)
    assert r.status == 404
    # Moved: reachable by its new rest id, and by the immutable one.
    sim.ctl("POST", f"/mailbox/adele@contoso.com/messages/{msg['id']}", {"move_to": "archive"})
    rest = mailbox_msg(sim, msg["id"])["rest_id"]
    assert sim.graph("GET", f"/me/messages/{rest}/attachments?$select=name", at).status == 200
    # Throttled and failing reads, as any Graph call.
    sim.ctl("POST", "/scenarios", {"scenarios": [
        {"endpoint": "graph", "status": 429, "retry_after": 4, "match": {"path": "/attachments"}},
        {"endpoint": "graph", "status": 503, "match": {"path": "/$value"}}]})
    r = sim.graph("GET", f"/me/messages/{msg['id']}/attachments", at, headers=h)
    assert r.status == 429 and r.headers["Retry-After"] == "4"
    sig = next(a for a in detail["attachments"] if a["name"] == "sig.png")
    r = sim.graph("GET", f"/me/messages/{msg['id']}/attachments/{sig['id']}/$value", at, headers=h)
    assert r.status == 503
    r = sim.graph("GET", f"/me/messages/{msg['id']}/attachments/{sig['id']}/$value", at, headers=h)
    assert hashlib.sha256(r.body).hexdigest() == sig["sha256"] and len(r.body) == 5000
    # A draft being written: an attachment removed in Outlook is gone for Graph too.
    d = sim.graph("POST", "/me/messages", at, {"subject": "draft", "attachments": [
        {"@odata.type": "#microsoft.graph.fileAttachment", "name": "a.txt", "contentBytes": "YQ=="},
        {"@odata.type": "#microsoft.graph.fileAttachment", "name": "b.txt", "contentBytes": "Yg=="}]}, h).json()
    assert d["hasAttachments"] is True
    a_id = next(a["id"] for a in sim.ctl("GET", f"/mailbox/adele@contoso.com/messages/{d['id']}")["attachments"]
                if a["name"] == "a.txt")
    call("DELETE", f"{sim.url}/_sim/mailbox/adele@contoso.com/messages/{d['id']}/attachments/{a_id}")
    left = sim.graph("GET", f"/me/messages/{d['id']}/attachments", at, headers=h).json()["value"]
    assert [(a["name"], base64.b64decode(a["contentBytes"])) for a in left] == [("b.txt", b"b")]
    # Deleted "in Outlook": 404 for the message and its attachments.
    call("DELETE", f"{sim.url}/_sim/mailbox/adele@contoso.com/messages/{msg['id']}")
    r = sim.graph("GET", f"/me/messages/{msg['id']}/attachments", at, headers=h)
    assert r.status == 404 and r.json()["error"]["code"] == "itemNotFound"


def vm_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def test_twenty_attachments_of_20_mb_are_streamed():
    """Generated from seeds, hashed and served chunk by chunk: the simulator's memory does not
    grow by the 400 MB it serves (a process of its own, so its peak is this test's)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SIM), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        proc.stdout.readline()
        s = Sim(f"http://127.0.0.1:{port}")
        acc = s.ctl("POST", "/bulk/accounts", {"count": 1, "prefix": "att"})["accounts"][0]
        size, n = 20 << 20, 20
        started = time.time()
        (msg,) = s.ctl("POST", f"/mailbox/{acc['upn']}/messages", {"messages": [
            {"subject": "Twenty", "attachments": [{"kind": "file", "name": f"part{i:02d}.bin", "size": size,
                                                   "seed": f"s{i}"} for i in range(n)]}]})["messages"]
        assert time.time() - started < 2                       # no bytes made while seeding
        before = vm_kib(proc.pid, "VmRSS")
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        auth = {"Authorization": f"Bearer {acc['access_token']}", "Prefer": PREFER_IMM}
        # The whole list with contentBytes (about 560 MB of JSON), read and checked as a stream.
        conn.request("GET", f"/v1.0/me/messages/{msg['id']}/attachments", headers=auth)
        r = conn.getresponse()
        total, head = int(r.getheader("Content-Length")), r.read(200)
        assert total > n * size * 4 // 3 and head.startswith(b'{"@odata.context"')
        got = len(head)
        while True:
            chunk = r.read(1 << 20)
            if not chunk:
                break
            got += len(chunk)
        assert got == total
        # Each file's raw bytes, hashed as they arrive, match the control API's sha256.
        detail = s.ctl("GET", f"/mailbox/{acc['upn']}/messages/{msg['id']}")
        for att in detail["attachments"][:4]:
            conn.request("GET", f"/v1.0/me/messages/{msg['id']}/attachments/{att['id']}/$value", headers=auth)
            r = conn.getresponse()
            h = hashlib.sha256()
            while True:
                chunk = r.read(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
            assert h.hexdigest() == att["sha256"] and att["size"] == size
        grown = vm_kib(proc.pid, "VmHWM") - before
        assert grown < 64 * 1024, f"peak RSS grew by {grown} KiB"
        assert s.ctl("GET", "/counters")["attachment_bytes_served"] == total + 4 * size
    finally:
        proc.terminate()
        proc.wait(10)


# -- app-only: client credentials, certificates, application permissions ----------------------

TENANT = "b3a8f1e2-5c47-4d1a-9e36-2f0c8d7a6b51"
GRAPH_DEFAULT = "https://graph.microsoft.com/.default"
EXO_DEFAULT = "https://outlook.office365.com/.default"


@pytest.fixture(scope="module")
def cert_keys():
    """Two key pairs with self-signed certificates (PEM), made once per module."""
    from datetime import datetime, timedelta, timezone
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID
    out = []
    for cn in ("mso-app-1", "mso-app-2"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        now = datetime.now(timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
                .not_valid_after(now + timedelta(days=365)).sign(key, hashes.SHA256()))
        der = cert.public_bytes(serialization.Encoding.DER)
        out.append({"key": key, "pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
                    "x5t": b64url(hashlib.sha1(der).digest()), "x5t#S256": b64url(hashlib.sha256(der).digest())})
    return out


def assertion(key, client_id, aud, alg="RS256", thumb=None, **claims):
    """A client assertion as MSAL makes it (private_key_jwt)."""
    header = {"alg": alg, "typ": "JWT"}
    header.update(thumb or {})
    now = int(time.time())
    body = {"aud": aud, "iss": client_id, "sub": client_id, "jti": str(secrets.token_hex(16)),
            "nbf": now, "iat": now, "exp": now + 600}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    signing = (b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(body).encode())).encode()
    pad = (padding.PKCS1v15() if alg == "RS256" else
           padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32))
    return signing.decode() + "." + b64url(key.sign(signing, pad, hashes.SHA256()))


def app_token(sim, client_id, secret=None, tenant=TENANT, scope=GRAPH_DEFAULT, **form):
    form.setdefault("client_id", client_id)
    if secret:
        form["client_secret"] = secret
    return call("POST", f"{sim.url}/{tenant}/oauth2/v2.0/token",
                form=dict(form, grant_type="client_credentials", scope=scope))


def daemon_app(sim, **extra):
    app = sim.ctl("POST", "/apps", dict({"display_name": "mail daemon", "sign_in_audience": "AzureADMultipleOrgs",
                                         "secrets": [{"value": "daemon~secret"}]}, **extra))
    return app["client_id"]


def test_client_credentials_with_secret_roles_and_scope_rules(sim):
    cid = daemon_app(sim)
    sim.ctl("POST", f"/apps/{cid}/app_roles", {"resource": "graph", "roles": ["mail.read", "Mail.Send"]})
    sim.ctl("POST", "/mailbox/adele@contoso.com/messages", {"count": 3})
    r = app_token(sim, cid, "daemon~secret")
    assert r.status == 200, r.text
    t = r.json()
    assert set(t) == {"token_type", "expires_in", "ext_expires_in", "access_token"}   # no RT, no ID token
    assert t["expires_in"] == 3600
    info = sim.ctl("POST", "/introspect", {"token": t["access_token"]})
    assert (info["kind"], info["roles"], info["aud"], info["tid"], info["active"]) == (
        "app", ["Mail.Read", "Mail.Send"], "https://graph.microsoft.com", TENANT, True)
    at = t["access_token"]
    # App-only: /users/{id|upn}/... only.
    r = sim.graph("GET", "/me", at)
    assert r.status == 400 and r.json()["error"]["message"] == \
        "/me request is only valid with delegated authentication flow."
    _, items, delta_link = delta_round(sim, at, sim.url + "/v1.0/users/adele@contoso.com/mailFolders/inbox/"
                                       "messages/delta?$select=subject", "odata.maxpagesize=2")
    assert len(items) == 3 and "/v1.0/users/adele@contoso.com/mailFolders(" in delta_link
    r = sim.graph("GET", "/users/nobody@contoso.com/messages", at)
    assert r.status == 404 and r.json()["error"]["code"] == "ErrorInvalidUser"
    assert r.json()["error"]["message"] == "The requested user 'nobody@contoso.com' is invalid."
    r = sim.graph("PATCH", f"/users/adele@contoso.com/messages/{items[0]['id']}", at, {"isRead": True})
    assert r.status == 403 and r.json()["error"]["code"] == "ErrorAccessDenied"      # Mail.Read only
    r = sim.graph("POST", "/users/megan@contoso.com/sendMail", at, {"message": draft_body("app-1")})
    assert r.status == 202
    assert sim.ctl("GET", "/deliveries?marker=app-1")["deliveries"][0]["mailbox"] == "megan@contoso.com"

    # Scope and tenant rules of the grant.
    assert_aad_error(app_token(sim, cid, "daemon~secret", scope="https://graph.microsoft.com/Mail.Read"),
                     400, "invalid_scope", 1002012)
    assert_aad_error(app_token(sim, cid, "daemon~secret", scope=GRAPH_DEFAULT + " offline_access"),
                     400, "invalid_scope", 70011)
    assert_aad_error(app_token(sim, cid, "daemon~secret", scope="https://nosuch.example/.default"),
                     400, "invalid_resource", 500011)
    for seg in ("common", "consumers", "organizations"):
        assert_aad_error(app_token(sim, cid, "daemon~secret", tenant=seg), 400, "invalid_request", 9001023)
    assert app_token(sim, cid, "daemon~secret", tenant="contoso.com").status == 200     # a domain is fine
    assert_aad_error(app_token(sim, cid, "wrong"), 401, "invalid_client", 7000215)
    assert_aad_error(app_token(sim, "00000000-0000-0000-0000-0000000000aa", "x"), 400,
                     "unauthorized_client", 700016)
    sim.ctl("POST", f"/apps/{cid}/secrets", {"value": "old~one", "expires_at": "2020-01-01"})
    assert_aad_error(app_token(sim, cid, "old~one"), 401, "invalid_client", 7000222)
    # Exchange Online: its own resource and permissions; a Graph call with it is refused.
    sim.ctl("POST", f"/apps/{cid}/app_roles", {"resource": "outlook", "roles": ["IMAP.AccessAsApp"]})
    exo = app_token(sim, cid, "daemon~secret", scope=EXO_DEFAULT).json()["access_token"]
    info = sim.ctl("POST", "/introspect", {"token": exo})
    assert (info["aud"], info["roles"]) == ("https://outlook.office365.com", ["IMAP.AccessAsApp"])
    assert sim.graph("GET", "/users/adele@contoso.com/messages", exo).status == 401
    c = sim.ctl("GET", "/counters")
    assert c["token_grants_by_client"][cid] == {"client_credentials": 3}
    assert c["token_requests_by_client"][cid]["client_credentials"] == 11       # 3 + 8 refused
    assert c["app_tokens"][cid] == {TENANT: 3}
    assert c["token_grants"]["client_credentials"] == 3


def test_app_only_needs_consent_in_each_tenant(sim):
    fabrikam = sim.ctl("POST", "/tenants", {"name": "Fabrikam", "domains": ["fabrikam.example"]})
    sim.ctl("POST", "/users", {"tenant_id": fabrikam["id"], "upn": "ops@fabrikam.example"})
    cid = daemon_app(sim)
    # No admin consent in Fabrikam yet: the app is not in that directory.
    assert_aad_error(app_token(sim, cid, "daemon~secret", tenant=fabrikam["id"]), 400,
                     "unauthorized_client", 700016)
    sim.ctl("POST", f"/apps/{cid}/app_roles", {"tenant_id": fabrikam["id"], "roles": []})
    t = app_token(sim, cid, "daemon~secret", tenant=fabrikam["id"]).json()["access_token"]
    r = sim.graph("GET", "/users/ops@fabrikam.example/messages", t)
    assert r.status == 403 and r.json()["error"]["code"] == "accessDenied"  # consented, no permission
    assert r.json()["error"]["message"] == "Either scp or roles claim need to be present in the token."
    sim.ctl("POST", f"/apps/{cid}/app_roles", {"tenant_id": "fabrikam.example", "roles": ["Mail.ReadWrite"]})
    t = app_token(sim, cid, "daemon~secret", tenant="fabrikam.example").json()["access_token"]
    assert sim.graph("GET", "/users/ops@fabrikam.example/messages", t).status == 200
    r = sim.graph("GET", "/users/adele@contoso.com/messages", t)          # another tenant's mailbox
    assert r.status == 404 and r.json()["error"]["code"] == "ErrorInvalidUser"
    # A single-tenant app cannot get tokens elsewhere at all.
    single = daemon_app(sim, sign_in_audience="AzureADMyOrg")
    assert_aad_error(app_token(sim, single, "daemon~secret", tenant=fabrikam["id"]), 400,
                     "unauthorized_client", 700016)
    c = sim.ctl("GET", "/counters")
    assert c["app_tokens"][cid] == {fabrikam["id"]: 2}


def test_application_access_policy(sim):
    cid = daemon_app(sim)
    sim.ctl("POST", f"/apps/{cid}/app_roles", {"roles": ["Mail.Read"]})
    shared = sim.ctl("POST", "/mailboxes", {"address": "support@contoso.com", "display_name": "Support",
                                            "messages": 2})
    at = app_token(sim, cid, "daemon~secret").json()["access_token"]
    assert sim.graph("GET", "/users/adele@contoso.com/messages", at).status == 200
    pol = sim.ctl("POST", "/access_policies", {"client_id": cid, "mailboxes": ["support@contoso.com"],
                                               "mode": "RestrictAccess"})
    r = sim.graph("GET", "/users/support@contoso.com/messages", at)
    assert r.status == 200 and len(r.json()["value"]) == 2
    assert sim.graph("GET", f"/users/{shared['oid']}/messages", at).status == 200
    for who in ("adele@contoso.com", "megan@contoso.com"):
        r = sim.graph("GET", f"/users/{who}/mailFolders/inbox/messages/delta", at)
        assert r.status == 403
        assert r.json()["error"]["code"] == "ErrorAccessDenied"
        assert r.json()["error"]["message"] == "Access to OData is disabled."
    # Delegated tokens are not subject to application access policies.
    assert sim.graph("GET", "/me/messages", sim.sign_in()["access_token"]).status == 200
    call("DELETE", f"{sim.url}/_sim/access_policies/{pol['id']}")
    sim.ctl("POST", "/access_policies", {"client_id": cid, "mailboxes": ["adele@contoso.com"], "mode": "DenyAccess"})
    assert sim.graph("GET", "/users/adele@contoso.com/messages", at).status == 403
    assert sim.graph("GET", "/users/support@contoso.com/messages", at).status == 200
    call("DELETE", f"{sim.url}/_sim/access_policies")
    assert sim.graph("GET", "/users/adele@contoso.com/messages", at).status == 200


def test_certificate_client_assertions(sim, cert_keys):
    k1, k2 = cert_keys
    cid = daemon_app(sim)
    sim.ctl("POST", f"/apps/{cid}/app_roles", {"roles": ["Mail.Read"]})
    cert = sim.ctl("POST", f"/apps/{cid}/certificates", {"pem": k1["pem"]})
    assert cert["x5t#S256"] == k1["x5t#S256"] and cert["x5t"] == k1["x5t"]
    aud = f"{sim.url}/{TENANT}/oauth2/v2.0/token"

    def try_with(a, tenant=TENANT):
        return app_token(sim, cid, tenant=tenant, client_assertion_type=JWT_BEARER, client_assertion=a)

    s256 = {"x5t#S256": k1["x5t#S256"]}
    r = try_with(assertion(k1["key"], cid, aud, "PS256", s256))
    assert r.status == 200, r.text
    assert sim.graph("GET", "/users/adele@contoso.com/messages", r.json()["access_token"]).status == 200
    assert try_with(assertion(k1["key"], cid, aud, "RS256", {"x5t": k1["x5t"]})).status == 200   # legacy x5t
    assert [e.get("client_auth") for e in sim.ctl("GET", "/log")["requests"] if e["kind"] == "token"] == \
        ["private_key_jwt"] * 2
    # The same jti twice: a replay.
    a = assertion(k1["key"], cid, aud, "PS256", s256)
    assert try_with(a).status == 200
    assert_aad_error(try_with(a), 401, "invalid_client", 50027)
    # Claims and keys that must be refused.
    now = int(time.time())
    cases = [
        (assertion(k1["key"], cid, aud + "/x", "PS256", s256), 700023),                  # audience
        (assertion(k1["key"], cid, f"{sim.url}/common/oauth2/v2.0/token", "PS256", s256), 700023),
        (assertion(k1["key"], cid, aud, "PS256", s256, iss="someone-else", sub="someone-else"), 700021),
        (assertion(k1["key"], cid, aud, "PS256", s256, sub="someone-else"), 50048),
        (assertion(k1["key"], cid, aud, "PS256", s256, exp=now - 3600, nbf=now - 4000), 700024),
        (assertion(k1["key"], cid, aud, "PS256", s256, nbf=now + 3600, exp=now + 4000), 700024),
        (assertion(k1["key"], cid, aud, "PS256", s256, jti=None), 50027),
        (assertion(k2["key"], cid, aud, "PS256", {"x5t#S256": k2["x5t#S256"]}), 700027),   # not registered
        (assertion(k2["key"], cid, aud, "PS256", s256), 7000274),                          # wrong key
        (assertion(k1["key"], cid, aud, "RS256", {}), 700027),                             # no thumbprint
        ("not.a.jwt", 50027),
    ]
    for a, code in cases:
        assert_aad_error(try_with(a), 401, "invalid_client", code)
    r = app_token(sim, cid, tenant=TENANT, client_assertion_type="urn:other", client_assertion="x.y.z")
    assert_aad_error(r, 400, "invalid_request", 9002313)
    # Expired registration, then removed: the key no longer authenticates.
    sim.ctl("POST", f"/apps/{cid}/certificates", {"pem": k2["pem"], "expires_at": "2021-01-01"})
    body = assert_aad_error(try_with(assertion(k2["key"], cid, aud, "PS256", {"x5t#S256": k2["x5t#S256"]})),
                            401, "invalid_client", 700027)
    assert "expired" in body["error_description"]
    call("DELETE", f"{sim.url}/_sim/apps/{cid}/certificates/{cert['id']}")
    assert_aad_error(try_with(assertion(k1["key"], cid, aud, "PS256", s256)), 401, "invalid_client", 700027)


def test_certificate_authenticates_code_and_refresh_grants(sim, cert_keys):
    k1 = cert_keys[0]
    sim.ctl("POST", f"/apps/{sim.client_id}/certificates", {"pem": k1["pem"]})
    aud = f"{sim.url}/common/oauth2/v2.0/token"
    code, verifier, _ = sim.get_code()
    r = sim.token(auth="none", grant_type="authorization_code", code=code, code_verifier=verifier,
                  redirect_uri=REDIRECT, scope=SCOPE, client_assertion_type=JWT_BEARER,
                  client_assertion=assertion(k1["key"], sim.client_id, aud, "PS256", {"x5t#S256": k1["x5t#S256"]}))
    assert r.status == 200, r.text
    rt = r.json()["refresh_token"]
    r = sim.token(auth="none", grant_type="refresh_token", refresh_token=rt, client_assertion_type=JWT_BEARER,
                  client_assertion=assertion(k1["key"], sim.client_id, aud, "RS256", {"x5t": k1["x5t"]}))
    assert r.status == 200 and r.json()["refresh_token"] != rt
    # Both a secret and an assertion: refused.
    r = sim.token(grant_type="refresh_token", refresh_token=rt, client_assertion_type=JWT_BEARER,
                  client_assertion=assertion(k1["key"], sim.client_id, aud, "PS256", {"x5t#S256": k1["x5t#S256"]}))
    assert_aad_error(r, 400, "invalid_request", 9002313)


JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


# -- shared mailboxes, delegated ------------------------------------------------------------

SHARED_SCOPE = ("openid profile offline_access Mail.ReadWrite Mail.Send Mail.Read.Shared "
                "Mail.ReadWrite.Shared Mail.Send.Shared")


def test_delegated_shared_mailbox_needs_full_access_and_shared_scopes(sim):
    shared = sim.ctl("POST", "/mailboxes", {"address": "sales@contoso.com", "display_name": "Sales",
                                            "messages": 3})
    assert shared["kind"] == "shared"
    adele = sign_in_scoped(sim, SHARED_SCOPE)["access_token"]
    plain = sim.sign_in()["access_token"]                             # Mail.ReadWrite only
    url = "/users/sales@contoso.com/mailFolders/inbox/messages"
    r = sim.graph("GET", url, adele)
    assert r.status == 403 and r.json()["error"]["code"] == "ErrorAccessDenied"     # no FullAccess yet
    sim.ctl("POST", "/mailbox/sales@contoso.com/permissions", {"user": "adele@contoso.com", "rights": "FullAccess"})
    r = sim.graph("GET", url, adele)
    assert r.status == 200 and len(r.json()["value"]) == 3
    assert sim.graph("GET", url, plain).status == 403                 # FullAccess, but no .Shared scope
    megan = sign_in_scoped(sim, SHARED_SCOPE, "megan@contoso.com")["access_token"]
    assert sim.graph("GET", url, megan).status == 403                 # .Shared scope, no FullAccess
    mid = r.json()["value"][0]["id"]
    assert sim.graph("PATCH", f"/users/sales@contoso.com/messages/{mid}", adele, {"isRead": True}).status == 200
    # Sending as the shared mailbox needs SendAs as well.
    r = sim.graph("POST", "/users/sales@contoso.com/sendMail", adele, {"message": draft_body("sh-1")})
    assert r.status == 403 and r.json()["error"]["code"] == "ErrorSendAsDenied"
    sim.ctl("POST", "/mailbox/sales@contoso.com/permissions", {"user": "adele@contoso.com", "rights": ["SendAs"]})
    assert sim.graph("POST", "/users/sales@contoso.com/sendMail", adele, {"message": draft_body("sh-1")}).status == 202
    (dl,) = sim.ctl("GET", "/deliveries?marker=sh-1")["deliveries"]
    assert (dl["mailbox"], dl["sender"]) == ("sales@contoso.com", "sales@contoso.com")
    assert sim.ctl("GET", "/mailbox/sales@contoso.com")["folders"]["sentitems"]["count"] == 1
    # A shared mailbox has no person: nobody signs in as it.
    sim.ctl("POST", "/config", {"auto_approve": True})
    challenge = b64url(hashlib.sha256(b"v" * 43).digest())
    r = call("GET", sim.authorize_url(login_hint="sales@contoso.com", code_challenge=challenge,
                                      code_challenge_method="S256"))
    assert r.status == 400 and "AADSTS50020" in r.text
    call("DELETE", f"{sim.url}/_sim/mailbox/sales@contoso.com/permissions/adele@contoso.com")
    assert sim.graph("GET", url, adele).status == 403


def test_ten_thousand_shared_mailboxes_for_an_app(sim):
    cid = daemon_app(sim)
    sim.ctl("POST", f"/apps/{cid}/app_roles", {"roles": ["Mail.ReadWrite"]})
    started = time.time()
    made = sim.ctl("POST", "/bulk/mailboxes", {"count": 10000, "prefix": "box"})["mailboxes"]
    assert time.time() - started < 10
    assert len({m["oid"] for m in made}) == 10000 and made[-1]["address"] == "box09999@contoso.com"
    at = app_token(sim, cid, "daemon~secret").json()["access_token"]
    for m in (made[0], made[5000], made[-1]):
        r = sim.graph("GET", f"/users/{m['address']}/mailFolders/inbox", at)
        assert r.status == 200 and r.json()["totalItemCount"] == 0
    again = sim.ctl("POST", "/bulk/mailboxes", {"count": 2, "prefix": "box"})["mailboxes"]
    assert [m["oid"] for m in again] == [m["oid"] for m in made[:2]]


# -- introspection and the XOAUTH2 check (IMAP/SMTP are not simulated) ---------------------------

def xoauth2(sim, protocol, user, token):
    sasl = base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()
    return sim.ctl("POST", "/xoauth2", {"protocol": protocol, "sasl": sasl})


def test_introspect_and_xoauth2(sim):
    code, verifier, _ = sim.get_code(scope=SCOPE + " https://outlook.office.com/IMAP.AccessAsUser.All")
    t = sim.redeem(code, verifier).json()
    r = sim.token(grant_type="refresh_token", refresh_token=t["refresh_token"],
                  scope="https://outlook.office.com/IMAP.AccessAsUser.All offline_access")
    imap = r.json()["access_token"]
    info = sim.ctl("POST", "/introspect", {"token": imap})
    adele = next(u for u in sim.ctl("GET", "/state")["users"] if u["upn"] == "adele@contoso.com")
    assert (info["kind"], info["aud"], info["upn"], info["oid"], info["client_id"]) == (
        "delegated", "https://outlook.office.com", "adele@contoso.com", adele["oid"], sim.client_id)
    assert info["scp"] == "IMAP.AccessAsUser.All"
    assert sim.ctl("POST", "/introspect", {"token": "nope"}) == {"active": False, "reason": "unknown token"}
    ok = xoauth2(sim, "imap", "adele@contoso.com", imap)
    assert ok == {"ok": True, "user": "adele@contoso.com", "response": "OK AUTHENTICATE completed."}
    no = xoauth2(sim, "smtp", "adele@contoso.com", imap)
    assert no["ok"] is False and no["response"] == "535 5.7.3 Authentication unsuccessful"
    assert "SMTP.Send" in no["reason"]
    no = xoauth2(sim, "imap", "adele@contoso.com", t["access_token"])              # a Graph token
    assert no["ok"] is False and "audience" in no["reason"]
    no = xoauth2(sim, "imap", "megan@contoso.com", imap)                           # someone else's box
    assert no["ok"] is False and "FullAccess" in no["reason"]
    bad = sim.ctl("POST", "/xoauth2", {"protocol": "imap", "sasl": base64.b64encode(b"user=x").decode()})
    assert bad["ok"] is False and "malformed" in bad["reason"]
    # App-only IMAP: IMAP.AccessAsApp and FullAccess for the app's service principal.
    cid = daemon_app(sim)
    sim.ctl("POST", f"/apps/{cid}/app_roles", {"resource": "outlook", "roles": ["IMAP.AccessAsApp"]})
    app_imap = app_token(sim, cid, "daemon~secret", scope=EXO_DEFAULT).json()["access_token"]
    no = xoauth2(sim, "imap", "adele@contoso.com", app_imap)
    assert no["ok"] is False and "service principal" in no["reason"]
    sim.ctl("POST", "/mailbox/adele@contoso.com/permissions", {"user": cid, "rights": "FullAccess"})
    assert xoauth2(sim, "imap", "adele@contoso.com", app_imap)["ok"] is True
    assert xoauth2(sim, "pop", "adele@contoso.com", app_imap)["response"].startswith("-ERR")
    sim.ctl("POST", "/tokens/expire", {})
    assert xoauth2(sim, "imap", "adele@contoso.com", app_imap)["ok"] is False
    assert sim.ctl("GET", "/counters")["xoauth2"] == {"imap": 7, "smtp": 1, "pop": 1}


def test_state_file_keeps_credentials_permissions_policies_and_attachment_bytes(tmp_path, cert_keys):
    state = tmp_path / "sim.json"

    def start():
        port = free_port()
        proc = subprocess.Popen([sys.executable, str(SIM), "--port", str(port), "--state-file", str(state)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        proc.stdout.readline()
        return proc, Sim(f"http://127.0.0.1:{port}")

    proc, s = start()
    try:
        k1 = cert_keys[0]
        cid = daemon_app(s)
        s.ctl("POST", f"/apps/{cid}/certificates", {"pem": k1["pem"]})
        s.ctl("POST", f"/apps/{cid}/app_roles", {"roles": ["Mail.Read"]})
        s.ctl("POST", "/mailboxes", {"address": "desk@contoso.com"})
        s.ctl("POST", "/mailbox/desk@contoso.com/permissions", {"user": "megan@contoso.com", "rights": "FullAccess"})
        s.ctl("POST", "/access_policies", {"client_id": cid, "mailboxes": ["desk@contoso.com"]})
        blob = secrets.token_bytes(2 << 20)                          # over 1 MiB: kept in a file
        (msg,) = s.ctl("POST", "/mailbox/desk@contoso.com/messages", {"messages": [{"subject": "kept", "attachments": [
            {"kind": "file", "name": "blob.bin", "content_base64": base64.b64encode(blob).decode()}]}]})["messages"]
    finally:
        proc.terminate()
        proc.wait(10)
    proc, s = start()
    try:
        aud = f"{s.url}/{TENANT}/oauth2/v2.0/token"
        r = app_token(s, cid, client_assertion_type=JWT_BEARER,
                      client_assertion=assertion(k1["key"], cid, aud, "PS256", {"x5t#S256": k1["x5t#S256"]}))
        assert r.status == 200, r.text
        at = r.json()["access_token"]
        att = s.ctl("GET", f"/mailbox/desk@contoso.com/messages/{msg['id']}")["attachments"][0]
        raw = s.graph("GET", f"/users/desk@contoso.com/messages/{msg['id']}/attachments/{att['id']}/$value", at)
        assert raw.status == 200 and raw.body == blob
        assert s.graph("GET", "/users/megan@contoso.com/messages", at).status == 403      # the policy
        perms = s.ctl("GET", "/mailbox/desk@contoso.com/permissions")["permissions"]
        assert list(perms.values()) == [["FullAccess"]]
    finally:
        proc.terminate()
        proc.wait(10)
