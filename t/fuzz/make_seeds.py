#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into t/fuzz/corpus/<target>/.

Run from anywhere: python3 t/fuzz/make_seeds.py. The seeds are committed; this
script says how each was made. The sealed cookie and the signed ID token are
made here independently of lib/ (python3-cryptography), from the fixed keys
in fuzz_keys.h, so they also pin the formats down: the cookie opens and the
token verifies in the harnesses only if lib/ and this script agree.
Inputs are laid out as each harness reads them (see the harness comments):
NUL separates C-string fields; a leading byte picks a mode.
"""
import base64, hashlib, json, os, re, shutil, struct, sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
NOW = 1700000000
TID = "6731de76-14a6-49ae-97bc-6eba6914391e"
CLIENT = "11111111-2222-3333-4444-555555555555"
NONCE = "n0nce-AbC_123xyz"

keys_h = open(os.path.join(HERE, "fuzz_keys.h")).read()
FLOW_KEY = re.search(r'#define FUZZ_FLOW_KEY "([^"]*)"', keys_h).group(1).encode()
KID = re.search(r'#define FUZZ_KID "([^"]*)"', keys_h).group(1)
PEM = "\n".join(l for l in re.findall(r'^\s*"([^"]*)\\n"', keys_h, re.M)) + "\n"
RSA = serialization.load_pem_private_key(PEM.encode(), None)


def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def hkdf(key, info, n):
    return HKDF(hashes.SHA256(), n, None, info).derive(key)


def seal_state(plain, state, nonce=b"\x07" * 12):
    """mso_seal(MSO_PURPOSE_STATE, "flow:" + state): version kid nonce ct tag."""
    kid = hkdf(FLOW_KEY, b"mso-kid-v1", 4)
    k = hkdf(FLOW_KEY, b"mso-state-v1", 32)
    head = bytes([1]) + kid
    aad = head + bytes([2]) + b"flow:" + state.encode()
    return b64u(head + nonce + AESGCM(k).encrypt(nonce, plain, aad))


def sign(header, payload):
    h = b64u(json.dumps(header, separators=(",", ":")).encode())
    p = b64u(json.dumps(payload, separators=(",", ":")).encode())
    sig = RSA.sign(f"{h}.{p}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{h}.{p}.{b64u(sig)}"


seeds = {}


def add(target, name, data):
    if isinstance(data, str):
        data = data.encode()
    seeds.setdefault(target, {})[name] = data


# ---------------------------------------------------------------- flow cookie
STATE = "xY9_k2LmQ0aBcDeFgHiJkLmNoPqRsTuVwXyZ012345-"
flow = {"v": 1, "s": STATE, "n": "nOnCe" + "A" * 38, "pv": "v" * 64, "c": "default",
        "m": "alice@contoso.com", "rt": "/mail/settings?tab=1", "u": "alice",
        "iat": NOW - 60, "exp": NOW + 540}
cookie = seal_state(json.dumps(flow, separators=(",", ":")).encode(), STATE)
add("flow_cookie_open", "open-valid", b"\x00" + STATE.encode() + b"\x00" + cookie.encode())
old = dict(flow, iat=NOW - 900, exp=NOW - 300)
add("flow_cookie_open", "open-expired", b"\x00" + STATE.encode() + b"\x00"
    + seal_state(json.dumps(old).encode(), STATE).encode())
add("flow_cookie_open", "open-wrong-state", b"\x00" + STATE[:-1].encode() + b"A\x00"
    + cookie.encode())
add("flow_cookie_open", "open-tampered", b"\x00" + STATE.encode() + b"\x00"
    + cookie[:40].encode() + (b"B" if cookie[40] != "B" else b"C") + cookie[41:].encode())
add("flow_cookie_open", "open-garbage", b"\x00" + STATE.encode() + b"\x00not-a-cookie")
add("flow_cookie_open", "open-padded", b"\x00" + STATE.encode() + b"\x00" + cookie.encode() + b"==")
add("flow_cookie_open", "roundtrip-full", b"\x01default\x00alice@contoso.com\x00/mail/inbox"
    b"\x00CONTOSO\\alice\x00" + STATE.encode() + b"\x00\x10")
add("flow_cookie_open", "roundtrip-minimal", b"\x01acme\x00\x00\x00\x00\x00\x00")
add("flow_cookie_open", "roundtrip-utf8", "\x01acme\x00j\u00fcrgen@m\u00fcller.de\x00/mail/"
    "\u00fcber\x00J\u00fcrgen\x00\x00\x90")
add("flow_cookie_open", "payload-valid", b"\x02" + STATE.encode() + b"\x00"
    + json.dumps(flow).encode())
add("flow_cookie_open", "payload-huge-times", b"\x02" + STATE.encode() + b"\x00"
    + json.dumps(dict(flow, iat=-9223372036854775807, exp=9223372036854775807)).encode())
add("flow_cookie_open", "payload-version-2", b"\x02" + STATE.encode() + b"\x00"
    + json.dumps(dict(flow, v=2)).encode())
add("flow_cookie_open", "payload-types", b"\x02" + STATE.encode() + b"\x00"
    + b'{"v":1,"s":"' + STATE.encode() + b'","n":1,"pv":[],"c":null,"iat":1.5,"exp":"x"}')

# Reproducers of findings (named repro-*): before the fix, a mailbox that is not
# UTF-8 was left out of the sealed flow and the flow still opened as valid.
add("flow_cookie_open", "repro-seal-drops-non-utf8-mailbox",
    b"\x01acme\x00\xe9@example.com\x00\x00\x00\x00\x00")
add("flow_cookie_open", "repro-seal-drops-non-utf8-company", b"\n\xf3")

# ------------------------------------------------------------- cookie header
def b36(n):
    s = ""
    while True:
        s = "0123456789abcdefghijklmnopqrstuvwxyz"[n % 36] + s
        n //= 36
        if not n:
            return s


def cname(created, state):
    return f"msoauth_flow_{b36(created)}_{state[:16]}"


hdr = "; ".join([f"{cname(NOW - 700 + i * 100, 'S%015d' % i)}=v{i}" for i in range(7)])
add("flow_cookie_header", "seven-flows", f"_ga=GA1.2.3; {hdr}; PHPSESSID=abc\x00S000000000000004xyz\x00\x80")
add("flow_cookie_header", "one-flow", f"{cname(NOW - 30, STATE)}={cookie}\x00{STATE}\x00\x80")
add("flow_cookie_header", "none", "a=b; c=d\x00" + STATE + "\x00\x80")
add("flow_cookie_header", "leading-zeros", f"msoauth_flow_000{b36(NOW)}_{STATE[:16]}=x\x00{STATE}\x00\x80")
add("flow_cookie_header", "long-time", f"msoauth_flow_zzzzzzzzzzzz_{STATE[:16]}=x, msoauth_flow_0_{STATE[:16]}=y\x00{STATE}\x00\x00")
add("flow_cookie_header", "empty", "\x00\x00")
add("flow_cookie_header", "comma-sep", f"{cname(NOW, STATE)}=a,{cname(NOW - 1, STATE)}=b;;  ,\x00{STATE}\x00\xff")

# --------------------------------------------------------------------- query
for i, q in enumerate([
        "company=acme&mailbox=alice%40contoso.com&return_to=%2Fmail%2Fsettings",
        "code=0.AXEA_example-code&state=" + STATE + "&session_state=5f2e1c9a-1b2c-4d3e-8f9a-0b1c2d3e4f5a",
        "error=access_denied&error_description=AADSTS65004%3A+User+declined+to+consent+to+access+the+app.%0D%0ATrace+ID%3A+1b2c&state=" + STATE,
        "a=1&a=2", "a=%zz", "a=%00", "=x&&b", "return_to=//evil.example", "return_to=/\\evil",
        "return_to=/ok/path?x=1", "mailbox=a@b", "mailbox=bob@example.com", "a+b=c+d%2B",
        "%E9t%E9=%C3%A9", "/mail/settings", "someone@example.com", "x" * 100,
]):
    add("query", f"q{i:02d}", q)

# ----------------------------------------------------------------------- jwt
HDR = {"typ": "JWT", "alg": "RS256", "kid": KID}
CLAIMS = {"aud": CLIENT, "iss": f"https://login.microsoftonline.com/{TID}/v2.0",
          "iat": NOW - 1000, "nbf": NOW - 1000, "exp": NOW + 3600, "name": "Alice Example",
          "nonce": NONCE, "oid": "00000000-0000-0000-66f3-3332eca7ea81",
          "preferred_username": "alice@contoso.com", "email": "alice@contoso.com",
          "rh": "0.AXEA", "sub": "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ", "tid": TID,
          "uti": "AbCdEf", "ver": "2.0"}
add("jwt", "raw-valid", "\x00" + sign(HDR, CLAIMS))
add("jwt", "raw-valid-single-tenant", "\x02" + sign(HDR, CLAIMS))
add("jwt", "raw-expired", "\x04" + sign(HDR, dict(CLAIMS, exp=NOW - 400)))
add("jwt", "raw-kid2", "\x00" + sign(dict(HDR, kid="fuzz-kid-2"), CLAIMS))
add("jwt", "raw-unknown-kid", "\x00" + sign(dict(HDR, kid="nokey"), CLAIMS))
add("jwt", "raw-alg-none", "\x00" + b64u(b'{"alg":"none","kid":"' + KID.encode() + b'"}') + "."
    + b64u(json.dumps(CLAIMS).encode()) + ".c2ln")
add("jwt", "raw-two-parts", "\x00eyJhbGciOiJSUzI1NiJ9.e30")
for i, (k, v) in enumerate([("aud", [CLIENT]), ("aud", [CLIENT, "x"]), ("nonce", "other"), ("tid", "not-a-guid"),
             ("iss", "https://login.microsoftonline.com/common/v2.0"), ("exp", 1.7e9 + 0.5),
             ("nbf", NOW + 10000), ("iat", "x"), ("email", 5)]):
    add("jwt", f"signed-{i:02d}-{k}", b"\x01" + json.dumps(HDR).encode() + b"\x00"
        + json.dumps(dict(CLAIMS, **{k: v})).encode())
add("jwt", "signed-valid", b"\x01" + json.dumps(HDR).encode() + b"\x00" + json.dumps(CLAIMS).encode())
add("jwt", "signed-crit", b"\x01" + json.dumps(dict(HDR, crit=["b64"])).encode() + b"\x00"
    + json.dumps(CLAIMS).encode())
add("jwt", "signed-typ", b"\x01" + json.dumps(dict(HDR, typ="at+jwt")).encode() + b"\x00"
    + json.dumps(CLAIMS).encode())
add("jwt", "signed-no-exp", b"\x01" + json.dumps(HDR).encode() + b"\x00"
    + json.dumps({k: v for k, v in CLAIMS.items() if k != "exp"}).encode())

# ---------------------------------------------------------------------- jwks
pub = RSA.public_key().public_numbers()
n = b64u(pub.n.to_bytes(256, "big"))
e = b64u(pub.e.to_bytes(3, "big"))
ms_key = {"kty": "RSA", "use": "sig", "kid": KID, "x5t": KID, "n": n, "e": e,
          "x5c": ["MIIC/TCCAeWgAwIBAgIIUd7j/OIahkYwDQYJKoZIhvcNAQELBQAw"],
          "cloud_instance_name": "microsoftonline.com",
          "issuer": "https://login.microsoftonline.com/{tenantid}/v2.0"}
add("jwks", "microsoft", json.dumps({"keys": [ms_key, dict(ms_key, kid="other", n=n[:-4] + "AAAB")]}))
add("jwks", "e-is-1", json.dumps({"keys": [dict(ms_key, e="AQ")]}))
add("jwks", "small-n", json.dumps({"keys": [dict(ms_key, n=b64u(b"\xc5" * 64))]}))
add("jwks", "even-n", json.dumps({"keys": [dict(ms_key, n=n[:-1] + "A")]}))
add("jwks", "padded", json.dumps({"keys": [dict(ms_key, n=n + "==")]}))
add("jwks", "leading-zero", json.dumps({"keys": [dict(ms_key, n=b64u(b"\x00" + pub.n.to_bytes(256, "big")))]}))
add("jwks", "ec-and-enc", json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA",
                                                 "kid": "ec"}, dict(ms_key, use="enc"),
                                                dict(ms_key, alg="RS512"), ms_key]}))
add("jwks", "wrong-types", '{"keys":[1,"x",null,{"kty":"RSA","kid":5,"n":"AQAB","e":"AQAB"},'
    '{"kty":"RSA","kid":"k","n":[],"e":"AQAB"}]}')
add("jwks", "no-keys", '{"key":[]}')
add("jwks", "not-json", 'keys: [')

# ------------------------------------------------------------- token answers
def answer(status, body, headers="", refresh=0, failed=0):
    if not isinstance(body, bytes):
        body = json.dumps(body).encode() if not isinstance(body, str) else body.encode()
    return bytes([refresh]) + struct.pack(">H", status) + bytes([failed]) + headers.encode() \
        + b"\x00" + body


H_JSON = ("HTTP/1.1 200 OK\r\nCache-Control: no-store, no-cache\r\nContent-Type: application/json;"
          " charset=utf-8\r\nx-ms-request-id: 6c1a8f4e-2b3d-4e5f-8a9b-0c1d2e3f4a5b\r\n\r\n")
ok = {"token_type": "Bearer", "scope": "openid profile email https://graph.microsoft.com/Mail.Read",
      "expires_in": 4430, "ext_expires_in": 4430, "access_token": "eyJ0eXAiOiJKV1QiLCJub25jZSI6.x.y",
      "refresh_token": "0.AXEA-refresh", "id_token": sign(HDR, CLAIMS)}
add("token_answer", "ok", answer(200, ok, H_JSON))
add("token_answer", "ok-refresh", answer(200, dict(ok, id_token=None), H_JSON, refresh=1))
TRACE = "\r\nTrace ID: 0b7a1c2d-3e4f-5a6b-7c8d-9e0f1a2b3c00\r\nCorrelation ID: " \
        "5f2e1c9a-1b2c-4d3e-8f9a-0b1c2d3e4f5a\r\nTimestamp: 2023-11-14 22:13:20Z"
for code, err, text, status in [
        (50011, "invalid_request", "The redirect URI 'https://erp.example.com/x' specified in the request does not match the redirect URIs configured for the application", 400),
        (7000215, "invalid_client", "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID", 401),
        (7000222, "invalid_client", "The provided client secret keys for app '1111' are expired.", 401),
        (700016, "unauthorized_client", "Application with identifier '1111' was not found in the directory 'contoso'.", 400),
        (50194, "invalid_request", "Application '1111' is not configured as a multi-tenant application.", 400),
        (70008, "invalid_grant", "The provided authorization code or refresh token has expired due to inactivity.", 400),
        (54005, "invalid_grant", "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an existing refresh token.", 400),
        (65001, "invalid_grant", "The user or administrator has not consented to use the application with ID '1111'.", 400),
        (90094, "invalid_grant", "The grant requires admin permission.", 400),
        (9002313, "invalid_request", "Invalid request. Request is malformed or invalid.", 400)]:
    body = {"error": err, "error_description": f"AADSTS{code}: {text}{TRACE}",
            "error_codes": [code], "timestamp": "2023-11-14 22:13:20Z",
            "trace_id": "0b7a1c2d-3e4f-5a6b-7c8d-9e0f1a2b3c00",
            "correlation_id": "5f2e1c9a-1b2c-4d3e-8f9a-0b1c2d3e4f5a",
            "error_uri": "https://login.microsoftonline.com/error?code=%d" % code}
    add("token_answer", f"aadsts{code}", answer(status, body, H_JSON.replace("200 OK", f"{status} Bad"), refresh=code % 2))
add("token_answer", "no-codes", answer(400, {"error": "invalid_scope", "error_description": "AADSTS70011: The provided value for the input parameter 'scope' is not valid."}))
add("token_answer", "429", answer(429, "", "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 30\r\n\r\n", refresh=1))
add("token_answer", "503-date", answer(503, "<html>busy</html>", "Retry-After: Wed, 21 Oct 2015 07:28:00 GMT\r\n"))
add("token_answer", "503-far", answer(503, "", "Retry-After: 99999999999999999999\r\n"))
add("token_answer", "html-200", answer(200, "<html><body>Sign in</body></html>"))
add("token_answer", "transport", answer(0, "", "", failed=1))
add("token_answer", "missing-expiry", answer(200, {"access_token": "x", "token_type": "bearer"}))
add("token_answer", "100-continue", answer(200, ok, "HTTP/1.1 100 Continue\r\nRetry-After: 5\r\n\r\n" + H_JSON))

# --------------------------------------------------------------- Graph pages
G = "https://graph.microsoft.com/v1.0"
msg = {"@odata.etag": 'W/"CQAAABYAAAB"', "id": "AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0AOCt_lVnZwUS-mNqMy5B0AgAAAIgKBAAA",
       "receivedDateTime": "2023-11-14T22:10:00Z", "hasAttachments": False,
       "internetMessageId": "<CH0PR01MB7178@CH0PR01MB7178.prod.outlook.com>",
       "subject": "Quarterly report", "bodyPreview": "Hi team, please find", "importance": "normal",
       "conversationId": "AAQkAGI2TG93AAA=", "isRead": False,
       "webLink": "https://outlook.office365.com/owa/?ItemID=AAkALg&exvsurl=1&viewmodel=ReadMessageItem",
       "body": {"contentType": "html", "content": "<html><body><p>Hi team</p></body></html>"},
       "from": {"emailAddress": {"name": "Megan Bowen", "address": "MeganB@contoso.com"}},
       "toRecipients": [{"emailAddress": {"name": "Alex Wilber", "address": "AlexW@contoso.com"}},
                        {"emailAddress": {"address": "team@contoso.com"}}]}
page = {"@odata.context": f"{G}/$metadata#Collection(message)", "value": [msg],
        "@odata.nextLink": f"{G}/me/mailFolders/inbox/messages/delta?$skiptoken=ZtcG9vbF9pZD0"}
add("graph_page", "next", b"\x00" + json.dumps(page).encode())
add("graph_page", "delta", b"\x00" + json.dumps({"value": [
    {"id": "AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0AOCt_lVnZwUS-mNqMy5B0AgAAAIgKBAAB", "isRead": True},
    {"@odata.type": "#microsoft.graph.message", "id": "AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0AOCt_lVnZwUS-mNqMy5B0AgAAAIgKBAAC",
     "@removed": {"reason": "deleted"}},
    {"id": "bad id with spaces"}, 5, {"subject": "no id"}],
    "@odata.deltaLink": f"{G}/me/mailFolders/inbox/messages/delta?$deltatoken=LztZwWjo5IivWBhyxw5rA"}).encode())
add("graph_page", "usgov", b"\x01" + json.dumps(dict(page, **{"@odata.nextLink": "https://graph.microsoft.us/v1.0/me/x"})).encode())
add("graph_page", "sim", b"\x04" + json.dumps(dict(page, **{"@odata.nextLink": "http://127.0.0.1:8081/graph/v1.0/me/x?a=b"})).encode())
add("graph_page", "foreign-link", b"\x00" + json.dumps(dict(page, **{"@odata.nextLink": "https://graph.microsoft.com.evil.example/v1.0/x"})).encode())
add("graph_page", "userinfo-link", b"\x00" + json.dumps(dict(page, **{"@odata.nextLink": "https://graph.microsoft.com/v1.0@evil.example/x"})).encode())
add("graph_page", "no-link", b"\x00" + json.dumps({"value": [msg]}).encode())
add("graph_page", "offset-times", b"\x00" + json.dumps(dict(page, value=[
    dict(msg, receivedDateTime=t) for t in ["2023-11-14T23:10:00.1234567+01:00", "1969-12-31T23:59:59Z",
                                            "0000-01-01T00:00:00Z", "9999-12-31T23:59:60-23:59",
                                            "2023-02-31 10:00:00Z", "2023-11-14T22:10:00"]])).encode())
add("graph_page", "odd-types", b"\x00" + json.dumps(dict(page, value=[
    dict(msg, isRead="yes", hasAttachments=None, subject=5, toRecipients={"x": 1},
         **{"from": [], "body": "text"})])).encode())
add("graph_page", "time-only", b"\x00" + b"2023-11-14T22:10:00Z")
add("graph_page", "truncated", b"\x00" + json.dumps(page).encode()[:300])

# --------------------------------------------------------------- Graph errors
def gerr(status, code, message, headers="", inner=None, failed=0):
    body = {"error": {"code": code, "message": message,
                      "innerError": inner or {"date": "2023-11-14T22:13:20",
                                              "request-id": "9b0c1d2e-3f4a-5b6c-7d8e-9f0a1b2c3d4e",
                                              "client-request-id": "9b0c1d2e-3f4a-5b6c-7d8e-9f0a1b2c3d4f"}}}
    return struct.pack(">H", status) + bytes([failed]) + headers.encode() + b"\x00" + json.dumps(body).encode()


RH = "request-id: 9b0c1d2e-3f4a-5b6c-7d8e-9f0a1b2c3d4e\r\nclient-request-id: 1\r\n"
add("graph_error", "429", gerr(429, "ApplicationThrottled", "Application is over its MailboxConcurrency limit.", RH + "Retry-After: 38\r\n"))
add("graph_error", "503-date", gerr(503, "ServiceUnavailable", "Service unavailable", "Retry-After: Tue, 14 Nov 2023 22:14:20 GMT\r\n"))
add("graph_error", "410", gerr(410, "SyncStateNotFound", "The sync state generation is not found.", RH + f"Location: {G}/me/mailFolders/inbox/messages/delta\r\n"))
add("graph_error", "410-evil", gerr(410, "resyncRequired", "Resync", f"Location: https://evil.example{G[27:]}/x\r\n"))
add("graph_error", "400-resync", gerr(400, "BadRequest", "x", "", {"code": "syncStateNotFound", "innerError": {"code": "resyncRequired", "request-id": "r"}}))
add("graph_error", "401", gerr(401, "InvalidAuthenticationToken", "Access token has expired or is not yet valid.", RH))
add("graph_error", "403", gerr(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again."))
add("graph_error", "404", gerr(404, "ErrorItemNotFound", "The specified object was not found in the store."))
add("graph_error", "500", gerr(500, "generalException", "General Exception while processing", RH))
add("graph_error", "ctl-text", gerr(400, "Bad\r\nCode", "line1\nline2\ttab\x7f" + "é" * 200))
add("graph_error", "200", struct.pack(">H", 200) + b"\x00" + RH.encode() + b"\x00" + b'{"value":[]}')
add("graph_error", "transport", struct.pack(">H", 0) + b"\x01\x00")
add("graph_error", "folded", struct.pack(">H", 503) + b"\x00" + b"Retry-After:\r\n  120\r\nRetry-After: 7 \r\n\x00not json")

# ---------------------------------------------------------------- key files
KEY = bytes(range(32))
add("key_file", "hex", KEY.hex() + "\n")
add("key_file", "hex-upper-crlf", "  " + KEY.hex().upper() + "\r\n")
add("key_file", "base64", base64.b64encode(KEY).decode() + "\n")
add("key_file", "base64url", b64u(KEY))
add("key_file", "raw", KEY)
add("key_file", "raw-newline", KEY[:31] + b"\n")
add("key_file", "hex-short", KEY.hex()[:62] + "\n")
add("key_file", "base64-16", base64.b64encode(KEY[:16]).decode())
add("key_file", "blank", " \n\t\n")
add("key_file", "empty", b"")
add("key_file", "binary", b"\x00\x01\xff" * 20)
add("key_file", "pem", "-----BEGIN PRIVATE KEY-----\nMIIEvQ\n-----END PRIVATE KEY-----\n")
add("key_file", "secret-id", "6731de76-14a6-49ae-97bc-6eba6914391e\n")

# ------------------------------------------------------------ config values
CHECKS = ["guid", "company", "cloud", "edition", "tenant", "base_url", "service_url",
          "graph_url", "redirect_path", "date", "folder", "scope", "interval", "loopback", "trim"]
for check, values in {
        "guid": ["6731de76-14a6-49ae-97bc-6eba6914391e", "6731DE76-14A6-49AE-97BC-6EBA6914391E",
                 "6731de76-14a6-49ae-97bc-6eba6914391", "{6731de76-14a6-49ae-97bc-6eba6914391e}"],
        "company": ["acme", "default", "a" * 65, "acme corp", "ac/me"],
        "cloud": ["global", "USGov", "usgov-dod", "china", "germany"],
        "edition": ["basic", "PRO", "enterprise"],
        "tenant": ["common", "organizations", "consumers", "contoso.onmicrosoft.com",
                   "6731de76-14a6-49ae-97bc-6eba6914391e", "contoso", "-bad.example.com", "a..b"],
        "base_url": ["https://erp.example.com", "https://erp.example.com:8443", "http://127.0.0.1:8080",
                     "http://localhost", "http://[::1]:8080", "http://erp.example.com",
                     "https://erp.example.com/", "https://user@erp.example.com", "https://erp.example.com?x",
                     "erp.example.com", "https://erp.example.com/app", "https://[::0]",
                     "https://0"],
        "service_url": ["https://login.microsoftonline.com", "http://127.0.0.1:8081/login",
                        "https://login.microsoftonline.com/"],
        "graph_url": ["https://graph.microsoft.com", "https://graph.microsoft.com/v1.0",
                      "http://127.0.0.1:8081/graph", "https://graph.microsoft.com/beta"],
        "redirect_path": ["/microsoft_outlook/confirm", "//evil", "/a/../b", "/a?b", "/a b", "/" + "x" * 201],
        "date": ["2027-11-30", "2028-02-29", "2027-02-29", "2027-13-01", "1969-12-31", "27-11-30",
                 "2027-1-300", "2027-11-3x"],
        "folder": ["inbox", "Inbox", "deleteditems", "recoverableitemsdeletions", "notafolder"],
        "scope": ["Mail.Send", "https://outlook.office.com/IMAP.AccessAsUser.All", ".default",
                  "a b", ""],
        "interval": ["10", "86400", "9", "86401", "60s", "-5", "0x20"],
        "loopback": ["127.0.0.1", "localhost", "::1", "[::1]", "127.255.255.255", "127.1",
                     "128.0.0.1", "127.0.0.1.example.com"],
        "trim": ["  x  ", "\t\n", "", "a b"]}.items():
    for i, v in enumerate(values):
        add("config_values", f"{check}-{i}", bytes([CHECKS.index(check)]) + v.encode())

# Reproducer: sscanf's %d took a sign or a space in a 127.x address.
add("config_values", "repro-loopback-signed-octet", bytes([CHECKS.index("loopback")]) + b"127.-0.2.1")

# Reproducer: a Graph root with a non-ASCII byte passed the URL check, and
# every link under it was then refused.
add("config_values", "repro-graph-root-non-ascii", bytes([CHECKS.index("graph_url")])
    + b"https://gra\xff\xff\xff\xff\xff\xff\xffeta")

# Reproducer: sscanf's %2d skipped a tab inside a date.
add("config_values", "repro-date-with-tab", bytes([CHECKS.index("date")]) + b"2027-02-\t9")

# ---------------------------------------------------------------------- json
for i, j in enumerate([
        json.dumps(ok), json.dumps(page)[:2000], '{"a":1,"a":2}', '[1,2,3]', '"scalar"',
        '{"deep":' * 70 + '1' + '}' * 70, '[' * 63 + ']' * 63, '{"n":1e400}',
        '{"n":-9223372036854775808,"m":9223372036854775807,"r":1.5e-300,"t":true,"f":false,"z":null}',
        '{"s":"\\u0000"}', '{"s":"\\ud800"}', '{"s":"\xc3\x28"}', '{} trailing', '',
        '{"obj":{"arr":[{"x":"y"}],"str":"v","int":5,"real":5.0,"bool":true}}']):
    add("json", f"j{i:02d}", j)

# -------------------------------------------------------------------- b64url
for i, s in enumerate(["", "QQ", "QUI", "QUJD", "QUJDRA==", "QUJDRA=", "QR", "Q", "-_-_",
                       "+/+/", "QUJD\nRA", cookie[:64], b64u(bytes(range(256)))]):
    add("b64url", f"b{i:02d}", s)

# -------------------------------------------------------------------- write
for target, files in seeds.items():
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    for name_, data in files.items():
        fname = name_ if name_.startswith("repro-") else "seed-" + name_
        with open(os.path.join(d, fname), "wb") as f:
            f.write(data)
print("\n".join(f"{t}: {len(f)} seeds" for t, f in sorted(seeds.items())))
