"""Keeping connections alive: the background job's refreshes, the token
handler and the admin handler, with a real httpd and the simulator."""
import base64
import json
import re
import time
import urllib.parse
import urllib.request

import pytest

from conftest import Browser, sim_call, token_leaks
from test_signin import ADELE, MEGAN, SECRET, Setup

ADMIN = """
<Location /microsoft_outlook/token>
  SetHandler msoauth-token
  Require local
</Location>
<Location /microsoft_outlook/admin>
  SetHandler msoauth-admin
  Require local
</Location>
"""


def connect(s, mailbox):
    _, _, r3 = s.sign_in(mailbox=mailbox, return_to="/a")
    assert r3.query()["msoauth"] == "connected", r3.location
    return int(r3.query()["account"])


def get_json(s, path, headers=None, method="GET"):
    r = Browser().request(s.h.url + path, method=method, data=b"" if method == "POST" else None,
                          headers=dict({"Accept": "application/json"}, **(headers or {})))
    assert r.headers["Content-Type"].startswith("application/json"), r.text
    assert SECRET not in r.text
    return r.status, json.loads(r.text)


def admin_post(s, path, headers=None, browser=None):
    """An admin action as the status page's form posts it: the session cookie
    the page set and the page's form token (no API key); JSON answers."""
    b = browser or Browser()
    page = b.get(s.h.url + "/microsoft_outlook/admin/", headers={"Accept": "text/html"})
    assert page.status == 200, page.text
    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    r = b.request(s.h.url + path, method="POST",
                  data=urllib.parse.urlencode({"csrf": token}).encode(),
                  headers=dict({"Content-Type": "application/x-www-form-urlencoded",
                                "Accept": "application/json", "Origin": s.h.url},
                               **(headers or {})))
    assert r.headers["Content-Type"].startswith("application/json"), r.text
    return r.status, json.loads(r.text)


def account(s, account_id):
    return next(a for a in s.accounts() if int(a["id"]) == account_id)


def wait_for(what, pred, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def graph_me(sim, token):
    req = urllib.request.Request(sim.url + "/v1.0/me", headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def job(httpd, simulator):
    s = Setup(httpd, simulator,
              extra=ADMIN + "MSOAuthScope https://outlook.office.com/IMAP.AccessAsUser.All\n")
    s.wait_schema()
    yield s
    # Whatever happened, no token or secret reached the error log (the
    # simulator's access tokens start with EwA, its refresh tokens with 0.AX).
    log = httpd.log()
    assert not token_leaks(log, SECRET)


def reseal(key_hex, blob, aad_from, aad_to):
    """The token in blob sealed again for aad_to, as lib/mso_crypto seals."""
    import secrets
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    aead = AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                       info=b"mso-token-v1").derive(bytes.fromhex(key_hex)))
    raw = base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))
    header, nonce, ct = raw[:5], raw[5:17], raw[17:]
    plain = aead.decrypt(nonce, ct, header + b"\x01" + aad_from.encode())
    nonce = secrets.token_bytes(12)
    ct = aead.encrypt(nonce, plain, header + b"\x01" + aad_to.encode())
    return base64.urlsafe_b64encode(header + nonce + ct).decode().rstrip("=")


def test_tokens_from_before_the_upgrade_are_bound_at_start(job):
    """Tokens a version 3 build stored (sealed for company and mailbox) are
    sealed again for their account when httpd starts, and keep working."""
    sim_call(job.sim, "POST", "/_sim/config", {"access_token_lifetime": 120})
    acc = connect(job, ADELE[0])
    job.h.stop()
    bound = f"{job.client_id.lower()}:{acc}"
    for kind, t in job.tokens(acc).items():
        legacy = reseal(job.key_hex, t["sealed"], f"token:v2:{kind}:{bound}",
                        f"token:{kind}:default:{ADELE[0]}")
        job.rows(f"UPDATE msoauth_tokens SET sealed = '{legacy}', binding = 1 "
                 f"WHERE account_id = {acc} AND kind = '{kind}'", "x")
    job.rows(f"UPDATE msoauth_accounts SET client_id = NULL WHERE id = {acc}", "x")
    job.h.start()
    wait_for("the tokens bound to the account", lambda: job.rows(
        f"SELECT COUNT(*) FROM msoauth_tokens WHERE account_id = {acc} AND binding = 2",
        "n")[0]["n"] == "2")
    assert "stored tokens were sealed again for their account" in job.h.log()
    assert job.rows(f"SELECT client_id FROM msoauth_accounts WHERE id = {acc}",
                    "c")[0]["c"] == job.client_id.lower()
    # Every token request refreshes (2-minute tokens): the rebound refresh token is used.
    status, body = get_json(job, f"/microsoft_outlook/token?account={acc}")
    assert status == 200, body
    assert graph_me(job.sim, body["access_token"])["userPrincipalName"] == ADELE[0]
    assert account(job, acc)["state"] == "connected"


def test_short_tokens_are_refreshed_and_rotation_is_kept(job):
    sim_call(job.sim, "POST", "/_sim/config", {"access_token_lifetime": 12,
                                               "strict_rotation": True})
    acc = connect(job, ADELE[0])
    first = account(job, acc)
    # Several token lifetimes pass; the job refreshes ahead of each expiry.
    wait_for("three refreshes", lambda: sim_call(job.sim, "GET", "/_sim/counters")
             .get("token_grants", {}).get("refresh_token", 0) >= 3, timeout=60)
    a = account(job, acc)
    assert a["state"] == "connected" and int(a["access_expires_at"]) > int(first["access_expires_at"])
    # With strict rotation only the newest refresh token works: the module
    # stored it, so a fresh token can still be had.
    status, body = get_json(job, f"/microsoft_outlook/token?account={acc}")
    assert status == 200, body
    assert body["expires_at"] - time.time() >= 0
    assert graph_me(job.sim, body["access_token"])["userPrincipalName"] == ADELE[0]
    assert "refresh_token" not in body


def test_graceful_restart_keeps_accounts_connected(job):
    sim_call(job.sim, "POST", "/_sim/config", {"access_token_lifetime": 10,
                                               "strict_rotation": True})
    acc = connect(job, ADELE[0])
    for _ in range(3):
        job.h.graceful()
        time.sleep(4)
    wait_for("a refresh after the restarts", lambda: sim_call(job.sim, "GET", "/_sim/counters")
             .get("token_grants", {}).get("refresh_token", 0) >= 2, timeout=40)
    status, body = get_json(job, f"/microsoft_outlook/token?account={acc}")
    assert status == 200, body
    assert account(job, acc)["state"] == "connected"


def test_dead_refresh_token_means_reconnect_required(job):
    # Tokens of 2 minutes: every token request refreshes (5 minutes are promised).
    sim_call(job.sim, "POST", "/_sim/config", {"access_token_lifetime": 120})
    acc = connect(job, ADELE[0])
    sim_call(job.sim, "POST", "/_sim/revoke", {"user": ADELE[0], "code": 700082,
                                               "access_tokens": True})
    # The token handler refreshes and learns the grant is dead.
    status, body = get_json(job, f"/microsoft_outlook/token?account={acc}")
    assert status == 409, body
    assert body["state"] == "reconnect_required" and body["reason"] == "reconnect_required"
    assert body["aadsts"] == 700082 and "Reconnect" in body["fix"]
    a = account(job, acc)
    assert a["state"] == "reconnect_required"
    # A reconnect brings it back, same account.
    assert connect(job, ADELE[0]) == acc
    assert account(job, acc)["state"] == "connected"


def test_server_errors_do_not_disconnect(job):
    """A storm of 503/429/500 from the token endpoint: every request fails
    softly, the account stays connected and recovers by itself."""
    sim_call(job.sim, "POST", "/_sim/config", {"access_token_lifetime": 120})
    acc = connect(job, ADELE[0])
    storm = [{"status": 503, "retry_after": 1}, {"status": 429, "retry_after": 1},
             {"status": 500}, {"error": "temporarily_unavailable", "status": 400}]
    for sc in storm:
        sim_call(job.sim, "POST", "/_sim/scenarios", dict(sc, endpoint="token", times=1,
                                                          match={"grant_type": "refresh_token"}))
    for _ in storm:
        status, body = get_json(job, f"/microsoft_outlook/token?account={acc}")
        assert status == 503 and body["reason"] == "token_endpoint_unreachable", body
        a = account(job, acc)
        assert a["state"] == "connected"
    _, info = get_json(job, f"/microsoft_outlook/admin/accounts/{acc}")
    assert info["state"] == "connected" and info["error_runs"] == len(storm), info
    assert info["reason"] == "token_endpoint_unreachable" and info["fix"]
    status, body = get_json(job, f"/microsoft_outlook/token?account={acc}")
    assert status == 200, body
    _, info = get_json(job, f"/microsoft_outlook/admin/accounts/{acc}")
    assert info["error_runs"] == 0 and info["last_error"] is None and info["reason"] is None


def test_token_endpoint_timeout_does_not_disconnect(job):
    """Microsoft's token endpoint hangs: the call gives up after 30 s, the
    account stays connected and the next call works."""
    sim_call(job.sim, "POST", "/_sim/config", {"access_token_lifetime": 120})
    acc = connect(job, ADELE[0])
    sim_call(job.sim, "POST", "/_sim/scenarios", {"endpoint": "token", "hang": 40, "times": 1,
                                                  "match": {"grant_type": "refresh_token"}})
    t0 = time.time()
    status, body = get_json(job, f"/microsoft_outlook/token?account={acc}")
    took = time.time() - t0
    assert status == 503 and body["reason"] == "token_endpoint_unreachable", body
    assert 10 < took < 35, took          # stall or total timeout, never more than 30 s + slack
    assert account(job, acc)["state"] == "connected"
    status, body = get_json(job, f"/microsoft_outlook/token?account={acc}")
    assert status == 200, body


def test_token_handler_imap_gives_xoauth2(job):
    acc = connect(job, ADELE[0])
    status, body = get_json(job, f"/microsoft_outlook/token?account={acc}&resource=imap")
    assert status == 200, body
    raw = base64.b64decode(body["xoauth2"]).decode()
    assert raw == f"user={ADELE[0]}\x01auth=Bearer {body['access_token']}\x01\x01"
    assert "IMAP.AccessAsUser.All" in body["scope"]
    status, graph = get_json(job, f"/microsoft_outlook/token?account={acc}")
    assert graph["access_token"] != body["access_token"]      # one resource per token
    assert graph_me(job.sim, graph["access_token"])["id"] == ADELE[1]


def test_token_handler_input(job):
    acc = connect(job, ADELE[0])
    assert get_json(job, "/microsoft_outlook/token?account=abc")[0] == 400
    assert get_json(job, "/microsoft_outlook/token?account=999")[0] == 404
    assert get_json(job, f"/microsoft_outlook/token?account={acc}&resource=pop")[0] == 400
    r = Browser().get(job.h.url + f"/microsoft_outlook/token?account={acc}")
    assert r.headers["Cache-Control"] == "no-store"


def test_admin_status_test_and_disconnect(job):
    sim_call(job.sim, "POST", "/_sim/mailbox/" + ADELE[0] + "/messages",
             {"folder": "inbox", "count": 7})
    acc = connect(job, ADELE[0])
    status, m = get_json(job, "/microsoft_outlook/admin/")
    assert status == 200
    comp = {c["name"]: c for c in m["companies"]}
    assert comp["default"]["client_id"] == job.client_id and comp["default"]["secret_set"]
    assert comp["default"]["redirect_uri"] == job.redirect_uri
    (a,) = [x for x in m["accounts"] if x["id"] == acc]
    assert a["mailbox"] == ADELE[0] and a["state"] == "connected"
    html = Browser().get(job.h.url + "/microsoft_outlook/admin/", headers={"Accept": "text/html"})
    assert html.status == 200 and ADELE[0] in html.text and job.redirect_uri in html.text
    assert SECRET not in html.text

    status, t = admin_post(job, f"/microsoft_outlook/admin/accounts/{acc}/test")
    assert status == 200 and t["ok"] is True and t["inbox_total"] >= 7, t

    status, x = admin_post(job, f"/microsoft_outlook/admin/accounts/{acc}/disconnect",
                           headers={"Origin": "https://evil.example"})
    assert status == 403
    # neither the API key nor a form of the page
    status, x = get_json(job, f"/microsoft_outlook/admin/accounts/{acc}/disconnect",
                         method="POST", headers={"Origin": job.h.url})
    assert status == 403 and x["reason"] == "forbidden", x
    assert account(job, acc)["state"] == "connected"

    status, x = admin_post(job, f"/microsoft_outlook/admin/accounts/{acc}/disconnect")
    assert status == 200 and x["state"] == "disconnected"
    assert account(job, acc)["state"] == "disconnected"
    assert job.tokens(acc) == {}
    status, body = get_json(job, f"/microsoft_outlook/token?account={acc}")
    assert status == 409 and body["state"] == "disconnected"


def test_admin_get_refuses_post_without_action(job):
    r = Browser().request(job.h.url + "/microsoft_outlook/admin/", method="POST", data=b"")
    assert r.status == 405
