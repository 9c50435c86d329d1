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
from urllib.parse import parse_qs, urlencode, urlsplit

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
    """Token-endpoint error body exactly as reference 4.1 shapes it."""
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
