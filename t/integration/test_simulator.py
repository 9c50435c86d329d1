"""Tests for the Microsoft simulator (t/sim/mssim.py), over HTTP with urllib only."""
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
