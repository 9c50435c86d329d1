"""Mailboxes nobody signs in to: app-only companies (client credentials, by
secret and by certificate), certificate credentials for delegated sign-ins,
and shared mailboxes opened with a person's Full Access. A real httpd with the
module against the simulator, on SQLite and PostgreSQL."""
import datetime
import json
import secrets
import time

import pytest

from conftest import Browser, psql, sim_call, token_leaks
from test_database import SQLiteDB
from test_config import make_cert
from test_job import ADMIN, get_json
from test_nodes import pg_schema, poll  # noqa: F401 (fixture)
from test_signin import ADELE, MEGAN, SECRET, TENANT, Setup
from test_sync import Env
from test_send import Outbox

SUPPORT, INFO = "support@contoso.com", "info@contoso.com"
API_KEY = secrets.token_hex(32)


def company(name="helpdesk", mailboxes=(SUPPORT, INFO), extra=""):
    return (f"<MSOAuthCompany {name}>\n  MSOAuthAppOnly on\n  MSOAuthTenant {TENANT}\n"
            f"  MSOAuthMailbox {' '.join(mailboxes)}\n{extra}</MSOAuthCompany>\n")


def prepare(roles=("Mail.ReadWrite", "Mail.Send"),
            outlook=("IMAP.AccessAsApp", "SMTP.SendAsApp"), mailboxes=(SUPPORT, INFO),
            messages=7, cert=None, policy=None, full_access=None):
    """The tenant as an administrator left it before httpd starts."""
    def prep(s):
        cid = s.client_id
        sim_call(s.sim, "POST", f"/_sim/apps/{cid}/app_roles",
                 {"resource": "graph", "roles": list(roles)})
        sim_call(s.sim, "POST", f"/_sim/apps/{cid}/app_roles",
                 {"resource": "outlook", "roles": list(outlook)})
        for m in mailboxes:
            sim_call(s.sim, "POST", "/_sim/mailboxes", {"address": m, "messages": messages})
            # The app's Exchange service principal may open it over IMAP/SMTP.
            sim_call(s.sim, "POST", f"/_sim/mailbox/{m}/permissions",
                     {"user": cid, "rights": ["FullAccess", "SendAs"]})
        for m, user in (full_access or {}).items():
            sim_call(s.sim, "POST", f"/_sim/mailbox/{m}/permissions",
                     {"user": user, "rights": "FullAccess"})
        if cert:
            s.sim_cert = sim_call(s.sim, "POST", f"/_sim/apps/{cid}/certificates",
                                  {"pem": cert.read_text()})
        if policy:
            sim_call(s.sim, "POST", "/_sim/access_policies", dict(policy, client_id=cid))
    return prep


class AppEnv(Env):
    """Env with the API key on the admin calls."""

    def account(self, acc):
        status, body = api(self, f"/microsoft_outlook/admin/accounts/{acc}")
        assert status == 200, body
        return body

    def sync_now(self, acc):
        status, body = api(self, f"/microsoft_outlook/admin/accounts/{acc}/sync", "POST")
        assert status == 202 and body["sync"] == "scheduled", body
        return body


def start(httpd, simulator, db="sqlite3", pg=None, extra="", main_extra="", **prep):
    httpd.file("api.key", API_KEY + "\n")
    s = Setup(httpd, simulator, db=db, pg_params=pg, main_extra=main_extra,
              extra=ADMIN + "MSOAuthSyncInterval 10\nMSOAuthAPIKeyFile api.key\n" + extra,
              prepare=prepare(**prep))
    s.wait_schema()
    return AppEnv(s)


KEY = {"Authorization": "Bearer " + API_KEY}


def api(e, path, method="GET", body=None, headers=None):
    h = dict(KEY, Accept="application/json", **(headers or {}))
    data = None
    if method == "POST":
        data = json.dumps(body).encode() if body is not None else b""
        h.setdefault("Content-Type", "application/json")
    r = Browser().request(e.h.url + path, method=method, data=data, headers=h)
    return r.status, (json.loads(r.text) if r.text.strip().startswith(("{", "[")) else r.text)


def app_accounts(e, company_name="helpdesk", n=2):
    # httpd answers on its port before its children have created the tables
    e.s.wait_schema()

    def ready():
        rows = e.rows(f"SELECT id, mailbox, kind, state FROM msoauth_accounts WHERE company = "
                      f"'{company_name}' ORDER BY mailbox", "id, mailbox, kind, state")
        return rows if len(rows) >= n else None
    rows = poll("the app accounts", ready, timeout=15)
    assert all(r["kind"] == "app" and r["state"] == "connected" for r in rows), rows
    return {r["mailbox"]: int(r["id"]) for r in rows}


def counters(e):
    return sim_call(e.sim, "GET", "/_sim/counters")


def token_requests(e):
    return [r for r in sim_call(e.sim, "GET", "/_sim/log")["requests"] if r["kind"] == "token"]


def admin_company(e, name="helpdesk"):
    status, m = api(e, "/microsoft_outlook/admin/")
    assert status == 200, m
    return next(c for c in m["companies"] if c["name"] == name)


def account_of(e, acc):
    status, a = api(e, f"/microsoft_outlook/admin/accounts/{acc}")
    assert status == 200, a
    return a


def execute(e, sql):
    if e.s.db == "pgsql":
        psql(e.s.pg, sql)
    else:
        SQLiteDB(e.h.root / "data" / "msoauth.db").query(sql)


def queue(e, acc, graph_id, action="mark_read"):
    execute(e, f"INSERT INTO msoauth_actions (account_id, graph_id, action) VALUES "
               f"({acc}, '{graph_id}', '{action}')")


def action_state(e, acc):
    rows = e.rows(f"SELECT state, reason FROM msoauth_actions WHERE account_id = {acc}",
                  "state, reason")
    return rows[0] if rows else None


def xoauth2(e, protocol, sasl):
    return sim_call(e.sim, "POST", "/_sim/xoauth2", {"protocol": protocol, "sasl": sasl})


def no_secrets(e):
    log = e.h.log()
    assert not token_leaks(log, SECRET, API_KEY)


@pytest.fixture(params=["sqlite3", "pgsql"])
def db(request):
    if request.param == "pgsql":
        params, _ = request.getfixturevalue("pg_schema")
        return "pgsql", params
    return "sqlite3", None


# --- app-only by secret: mirror, write-back, token handler ---------------------------------

def test_app_only_company_by_secret(httpd, simulator, db):
    """Two shared mailboxes of an app-only company: created from MSOAuthMailbox,
    mirrored and written back through /users/{address} with one application
    token, whose IMAP/SMTP sibling opens the mailbox over XOAUTH2."""
    e = start(httpd, simulator, db=db[0], pg=db[1], extra=company(extra="  MSOAuthEdition pro\n"))
    accs = app_accounts(e)
    for box in (SUPPORT, INFO):
        e.assert_converged(accs[box], box)
    # Write-back with the company's token (Mail.ReadWrite role).
    target = e.mailbox(SUPPORT)["messages"][0]
    assert not target["isRead"]
    queue(e, accs[SUPPORT], target["id"])
    assert poll("the action", lambda: (action_state(e, accs[SUPPORT]) or {}).get("state") == "done",
                timeout=20)
    assert next(m for m in e.mailbox(SUPPORT)["messages"] if m["id"] == target["id"])["isRead"]
    assert counters(e)["graph_effective_writes"][target["id"]] == 1
    # Every Graph call for these mailboxes went to /users/{address}, never /me.
    graph = [r for r in sim_call(e.sim, "GET", "/_sim/log")["requests"]
             if r["path"].startswith("/v1.0/")]
    assert graph and all(r["path"].startswith("/v1.0/users/") for r in graph), \
        {r["path"] for r in graph if not r["path"].startswith("/v1.0/users/")}
    # The token handler: the company's Graph token for the mailbox...
    status, t = api(e, f"/microsoft_outlook/token?account={accs[SUPPORT]}")
    assert status == 200 and t["mailbox"] == SUPPORT, t
    info = sim_call(e.sim, "POST", "/_sim/introspect", {"token": t["access_token"]})
    assert (info["kind"], info["aud"], info["tid"]) == ("app", "https://graph.microsoft.com", TENANT)
    assert set(info["roles"]) == {"Mail.ReadWrite", "Mail.Send"}
    # ...and Exchange Online's for IMAP and SMTP, with the XOAUTH2 string of the mailbox.
    status, imap = api(e, f"/microsoft_outlook/token?account={accs[INFO]}&resource=imap")
    assert status == 200, imap
    info = sim_call(e.sim, "POST", "/_sim/introspect", {"token": imap["access_token"]})
    assert (info["kind"], info["aud"]) == ("app", "https://outlook.office365.com")
    assert xoauth2(e, "imap", imap["xoauth2"]) == {
        "ok": True, "user": INFO, "response": "OK AUTHENTICATE completed."}
    status, smtp = api(e, f"/microsoft_outlook/token?account={accs[INFO]}&resource=smtp")
    assert status == 200 and smtp["access_token"] == imap["access_token"]      # cached
    assert xoauth2(e, "smtp", smtp["xoauth2"])["ok"] is True
    # One application token per company and resource, however many mailboxes and calls.
    c = counters(e)
    assert c["app_tokens"][e.s.client_id] == {TENANT: 2}, c["app_tokens"]
    assert c["token_grants_by_client"][e.s.client_id] == {"client_credentials": 2}
    # The admin page: the company's token (not the token itself), the accounts' kind.
    co = admin_company(e)
    assert co["app_only"] is True and co["credential"] == "secret" and co["certificate"] is None
    assert co["app_token"]["state"] == "valid" and co["app_token"]["fetches"] == 1
    # The simulator's tokens are opaque: the roles are not read from them.
    assert co["app_token"]["roles"] is None and co["problem"] is None
    assert co["mailboxes_configured"] == 2
    a = account_of(e, accs[SUPPORT])
    assert a["kind"] == "app" and a["shared"] is False and a["sync"]["phase"] == "idle"
    assert "access_token" not in json.dumps(api(e, "/microsoft_outlook/admin/")[1])
    # Admin test of the mailbox: its own inbox, through /users/.
    status, r = api(e, f"/microsoft_outlook/admin/accounts/{accs[INFO]}/test", method="POST")
    assert status == 200 and r["ok"] is True and r["inbox_total"] == 7, r
    no_secrets(e)


def test_app_only_company_sends(httpd, simulator):
    """An outbox row of an app account is sent through /users/{address} with the
    company's application token (Mail.Send role): exactly one delivery, from
    that mailbox, by the company's app; nobody signed in."""
    e = start(httpd, simulator, extra=company(extra="  MSOAuthEdition pro\n"))
    accs = app_accounts(e)
    ob = Outbox(e.s)
    oid = ob.queue(accs[SUPPORT], to=[("chris@fabrikam.com", "Chris Customer")],
                   subject="Your ticket", body="We are on it.")
    row = ob.wait_state(oid, timeout=60)
    assert row["state"] == "sent", (row["reason"], row["last_error"])
    _, d = ob.delivered_once(oid)
    assert d["mailbox"].lower() == SUPPORT and d["client_id"] == e.s.client_id, d
    assert d["to"] == ["chris@fabrikam.com"] and d["subject"] == "Your ticket", d
    sends = [r for r in sim_call(e.sim, "GET", "/_sim/log")["requests"]
             if r["path"].endswith("/send")]
    assert sends and all(f"/users/{SUPPORT}/" in r["path"] for r in sends), sends
    assert ob.deliveries(mailbox=INFO)["count"] == 0
    no_secrets(e)


def test_app_only_company_without_the_send_role(httpd, simulator):
    """Without the Mail.Send application permission the row fails with
    send_not_permitted and its fix; nothing reaches Graph's send."""
    e = start(httpd, simulator, extra=company(extra="  MSOAuthEdition pro\n"),
              roles=("Mail.ReadWrite",))
    accs = app_accounts(e)
    ob = Outbox(e.s)
    oid = ob.queue(accs[INFO], to=["dana@fabrikam.com"], subject="No", body="x")
    row = ob.wait_state(oid, timeout=60)
    assert row["state"] == "failed" and row["reason"] == "send_not_permitted", (
        row["reason"], row["last_error"])
    assert ob.deliveries()["count"] == 0
    status, a = api(e, f"/microsoft_outlook/admin/accounts/{accs[INFO]}")
    assert status == 200 and a["outbox"]["failed"] == 1, a
    assert a["outbox"]["last_failure"]["reason"] == "send_not_permitted", a
    assert a["outbox"]["last_failure"]["fix"], a


def test_admin_page_adds_mailboxes(httpd, simulator):
    """POST .../admin/accounts {company, mailbox}: an app-only company's mailbox,
    with the API key and from this site only; an unknown mailbox is
    mailbox_not_found while the others keep working."""
    e = start(httpd, simulator, extra=company(mailboxes=(SUPPORT,)) + f"""
<MSOAuthCompany people>
  MSOAuthTenant {TENANT}
</MSOAuthCompany>
""")
    accs = app_accounts(e, n=1)
    path = "/microsoft_outlook/admin/accounts"
    sim_call(e.sim, "POST", "/_sim/mailboxes", {"address": INFO, "messages": 3})
    status, a = api(e, path, "POST", {"company": "helpdesk", "mailbox": "Info@Contoso.com"})
    assert status == 201 and a["created"] is True and a["kind"] == "app", a
    assert a["mailbox"] == INFO and a["state"] == "connected"
    e.assert_converged(a["id"], INFO)
    status, again = api(e, path, "POST", {"company": "helpdesk", "mailbox": INFO})
    assert status == 200 and again["created"] is False and again["id"] == a["id"], again
    # Refusals: each with its reason, nothing stored.
    status, r = api(e, path, "POST", {"company": "people", "mailbox": "x@contoso.com"})
    assert status == 400 and "not app-only" in r["detail"], r
    status, r = api(e, path, "POST", {"company": "nope", "mailbox": "x@contoso.com"})
    assert status == 404 and r["reason"] == "not_configured", r
    status, r = api(e, path, "POST", {"company": "helpdesk", "mailbox": "not an address"})
    assert status == 400 and r["reason"] == "bad_request", r
    status, r = api(e, path, "POST", {"company": "helpdesk"})
    assert status == 400, r
    status, r = api(e, path, "POST", {"company": "helpdesk", "mailbox": "y@contoso.com"},
                    headers={"Content-Type": "text/plain"})
    assert status == 415, r
    status, r = api(e, path, "POST", {"company": "helpdesk", "mailbox": "y@contoso.com"},
                    headers={"Origin": "https://evil.example"})
    assert status == 403 and r["reason"] == "forbidden", r
    r = Browser().request(e.h.url + path, method="POST", headers={"Content-Type": "application/json"},
                          data=json.dumps({"company": "helpdesk", "mailbox": "y@contoso.com"}).encode())
    assert r.status == 401, r.text
    assert not e.rows("SELECT id FROM msoauth_accounts WHERE mailbox IN ('x@contoso.com', "
                      "'y@contoso.com')", "id")
    # A mailbox that does not exist: its own reason and a long wait; the others go on.
    status, ghost = api(e, path, "POST", {"company": "helpdesk", "mailbox": "nobody@contoso.com"})
    assert status == 201, ghost
    gone = poll("mailbox_not_found", lambda: (lambda a: a if a["reason"] == "mailbox_not_found"
                                              else None)(account_of(e, ghost["id"])), timeout=20)
    assert "Check the address" in gone["fix"] and gone["state"] == "connected"
    assert gone["sync"]["retry_at"] - int(time.time()) > 600
    e.seed(SUPPORT, 2)
    e.sync_now(accs[SUPPORT])
    e.assert_converged(accs[SUPPORT], SUPPORT)
    assert account_of(e, accs[SUPPORT])["reason"] is None
    status, r = api(e, f"/microsoft_outlook/admin/accounts/{ghost['id']}/test", method="POST")
    assert r["ok"] is False and r["reason"] == "mailbox_not_found", r
    no_secrets(e)


def test_policy_excludes_one_mailbox(httpd, simulator):
    """An Exchange application access policy that lists only support@: info@
    gets access_denied_by_policy with the PowerShell fix, support@ works; once
    the policy allows it, info@ recovers."""
    e = start(httpd, simulator, extra=company(),
              policy={"mailboxes": [SUPPORT], "mode": "RestrictAccess"})
    accs = app_accounts(e)
    e.assert_converged(accs[SUPPORT], SUPPORT)
    denied = poll("access_denied_by_policy", lambda: (
        lambda a: a if a["reason"] == "access_denied_by_policy" else None)(
            account_of(e, accs[INFO])), timeout=20)
    assert "Test-ApplicationAccessPolicy" in denied["fix"]
    assert "Add-DistributionGroupMember" in denied["fix"]
    assert "policy" in denied["sync"]["last_error"]
    assert e.count(accs[INFO]) == 0
    # The company is fine: no company problem for one mailbox's policy.
    assert admin_company(e)["problem"] is None
    sim_call(e.sim, "DELETE", "/_sim/access_policies")
    e.sync_now(accs[INFO])
    e.assert_converged(accs[INFO], INFO)
    assert poll("the reason cleared", lambda: account_of(e, accs[INFO])["reason"] is None)


# --- certificates ----------------------------------------------------------------------------

def test_certificate_for_sign_in_refresh_and_app_tokens(httpd, simulator):
    """MSOAuthClientCertificateFile instead of the secret: the sign-in, the refresh
    and the application token each send a signed client assertion, which the
    simulator verifies (signature, x5t#S256, aud, exp, single-use jti)."""
    cert, key = make_cert(httpd, "app")
    e = start(httpd, simulator, extra=company(), cert=cert,
              main_extra=f"MSOAuthClientCertificateFile {cert} {key}")
    accs = app_accounts(e)
    for box in (SUPPORT, INFO):
        e.assert_converged(accs[box], box)
    # A person signs in to a delegated company of the same app, then a refresh.
    own = e.connect(ADELE[0])
    execute(e, f"UPDATE msoauth_accounts SET refresh_due_at = 0 WHERE id = {own}")
    poll("the refresh", lambda: account_of(e, own)["last_refresh_at"] > 0, timeout=20)
    reqs = token_requests(e)
    grants = {r.get("grant_type") for r in reqs}
    assert {"authorization_code", "refresh_token", "client_credentials"} <= grants, grants
    assert all(r["status"] == 200 for r in reqs), [(r.get("grant_type"), r["status"]) for r in reqs]
    assert {r.get("client_auth") for r in reqs} == {"private_key_jwt"}
    assert {r.get("certificate") for r in reqs} == {e.s.sim_cert["thumbprint"]}
    co = admin_company(e)
    assert co["credential"] == "certificate"
    assert co["certificate"]["thumbprint"].upper() == e.s.sim_cert["thumbprint"].upper()
    assert co["certificate"]["x5t#S256"] == e.s.sim_cert["x5t#S256"]
    assert 360 <= co["certificate"]["days_left"] <= 366 and co["certificate"]["warning"] is None
    assert co["app_token"]["state"] == "valid"
    # The HTML page shows the thumbprint to compare with the portal's.
    page = Browser().request(e.h.url + "/microsoft_outlook/admin/", headers=KEY).text
    assert co["certificate"]["thumbprint"] in page
    no_secrets(e)


def expired_cert(h, name):
    """A certificate and key whose validity ended yesterday."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "msoauth-expired")])
    now = datetime.datetime.now(datetime.timezone.utc)
    c = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
         .public_key(k.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(days=30))
         .not_valid_after(now - datetime.timedelta(days=1)).sign(k, hashes.SHA256()))
    cert = h.file(f"{name}.pem", c.public_bytes(serialization.Encoding.PEM))
    key = h.file(f"{name}.key", k.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.TraditionalOpenSSL,
                                                serialization.NoEncryption()))
    return cert, key


@pytest.mark.parametrize("case", ["invalid", "expired"])
def test_certificate_problems_are_the_companys(httpd, simulator, case):
    """A certificate Microsoft does not know (certificate_invalid) or one past its
    date (certificate_expired, nothing sent): the company shows the problem and
    the fix, its mailboxes wait without calls to Graph, a sign-in says why."""
    if case == "invalid":
        cert, key = make_cert(httpd, "unknown")         # never uploaded
    else:
        cert, key = expired_cert(httpd, "old")
    e = start(httpd, simulator, extra=company(),
              main_extra=f"MSOAuthClientCertificateFile {cert} {key}")
    app_accounts(e)
    reason = f"certificate_{case}"
    co = poll("the company's problem", lambda: (lambda c: c if c["problem"] == reason else None)(
        admin_company(e)), timeout=20)
    assert co["app_token"]["state"] == "failed" and co["app_token"]["reason"] == reason
    assert "Certificates & secrets" in co["problem_fix"]
    if case == "expired":
        assert co["certificate"]["warning"] == "expired" and co["certificate"]["days_left"] < 0
        assert not [r for r in token_requests(e) if r.get("grant_type") == "client_credentials"]
    else:
        assert co["app_token"]["aadsts"] == 700027
    time.sleep(3)
    # No mailbox work without the company's token, and no token request per tick.
    assert not [r for r in sim_call(e.sim, "GET", "/_sim/log")["requests"]
                if r["path"].startswith("/v1.0/")]
    assert len([r for r in token_requests(e) if r.get("grant_type") == "client_credentials"]) <= 1
    # The token handler answers the company's problem without asking Microsoft again.
    acc = app_accounts(e)[SUPPORT]
    before = len(token_requests(e))
    status, r = api(e, f"/microsoft_outlook/token?account={acc}")
    assert status == 503 and r["reason"] == reason, r
    assert len(token_requests(e)) == before
    # A person's sign-in with the same credential says the same.
    r1, r2, r3 = e.s.sign_in(mailbox=ADELE[0], return_to="/a")
    assert r3 is not None and r3.query().get("reason") == reason, (r3.location if r3 else r2.text)
    no_secrets(e)


def test_missing_consent_waits_then_recovers_after_reload(httpd, simulator):
    """No application permission granted: Graph refuses the token itself (403
    "Either scp or roles claim..."), which is the company's admin_consent_required:
    every mailbox waits, a new token is fetched after a backoff (not per tick or
    per mailbox); after the administrator grants it, a reload tries at once."""
    e = start(httpd, simulator, extra=company(), roles=())
    accs = app_accounts(e)
    co = poll("admin_consent_required", lambda: (
        lambda c: c if c["problem"] == "admin_consent_required" else None)(admin_company(e)),
        timeout=20)
    assert "roles claim" in co["app_token"]["last_error"]
    time.sleep(4)
    assert len([r for r in token_requests(e) if r.get("grant_type") == "client_credentials"]) == 1
    # At most one Graph call per mailbox before the company stopped them.
    graph = [r for r in sim_call(e.sim, "GET", "/_sim/log")["requests"]
             if r["path"].startswith("/v1.0/")]
    assert 1 <= len(graph) <= 2 and all(r["status"] == 403 for r in graph)
    sim_call(e.sim, "POST", f"/_sim/apps/{e.s.client_id}/app_roles",
             {"resource": "graph", "roles": ["Mail.Read"]})
    e.h.graceful()
    for box in (SUPPORT, INFO):
        e.assert_converged(accs[box], box, timeout=30)
    co = admin_company(e)
    assert co["problem"] is None and co["app_token"]["state"] == "valid"
    # MSOAuthEdition basic (what the company expects of its opaque token): write-back
    # is refused without a call, with the fix.
    target = e.mailbox(SUPPORT)["messages"][0]
    queue(e, accs[SUPPORT], target["id"])
    st = poll("the action", lambda: (lambda s: s if s and s["state"] == "failed" else None)(
        action_state(e, accs[SUPPORT])), timeout=20)
    assert st["reason"] == "read_only"
    assert counters(e)["graph_writes_total"] == 0


# --- several nodes ---------------------------------------------------------------------------

def test_two_nodes_one_token_fetch_no_mailbox_twice(httpd, simulator, pg_schema):
    """Two nodes on one database and 30 mailboxes: one application token fetch in
    all, and every mailbox's initial round asked for exactly once."""
    params, nodes = pg_schema
    boxes = [f"box{i:05d}@contoso.com" for i in range(30)]

    def prep(s):
        prepare(mailboxes=(), messages=0)(s)
        sim_call(s.sim, "POST", "/_sim/bulk/mailboxes", {"count": 30, "prefix": "box",
                                                          "messages": 3})
    httpd.file("api.key", API_KEY + "\n")
    s = Setup(httpd, simulator, db="pgsql", pg_params=params, prepare=prep,
              extra=ADMIN + "MSOAuthSyncInterval 10\nMSOAuthAPIKeyFile api.key\n"
              + company(mailboxes=boxes))
    h2 = httpd.make_another("node2")
    nodes.append(h2)
    h2.file("keys/k1.hex", s.key_hex)
    h2.file("api.key", API_KEY + "\n")
    h2.start(httpd.body)
    e = AppEnv(s)
    accs = app_accounts(e, n=30)

    def done():
        rows = e.rows("SELECT account_id, COUNT(*) FROM msoauth_messages WHERE removed = 0 "
                      "GROUP BY account_id", "a, n")
        return len(rows) == 30 and all(int(r["n"]) == 3 for r in rows)
    poll("every mailbox mirrored", done, timeout=60, every=0.5)
    c = counters(e)
    assert c["app_tokens"][s.client_id] == {TENANT: 1}, c["app_tokens"]
    assert c["concurrency_violations"] == 0
    first = {}
    for r in sim_call(e.sim, "GET", "/_sim/log")["requests"]:
        if "/messages/delta" in r["path"] and "select" in (r.get("query") or "").lower():
            box = r["path"].split("/users/")[1].split("/")[0].replace("%40", "@")
            first[box] = first.get(box, 0) + 1
    assert first == {b: 1 for b in boxes}, {b: n for b, n in first.items() if n != 1}
    assert set(accs) == set(boxes)
    for h in (httpd, h2):
        assert "job started" in h.log()


# --- shared mailboxes with a person's Full Access --------------------------------------------

TEAM = f"""
<MSOAuthCompany team>
  MSOAuthTenant {TENANT}
  MSOAuthEdition pro
  MSOAuthScope https://graph.microsoft.com/Mail.ReadWrite.Shared
</MSOAuthCompany>
"""


def sign_in_as(e, user_oid, **params):
    s = e.s
    r1 = s.browser.get(s.connect_url(**params))
    assert r1.status == 302, r1.text
    assert "login_hint" not in r1.location          # a shared mailbox signs in as nobody
    r2 = s.browser.get(r1.location)
    assert r2.status == 200 and "Sign in" in r2.text, r2.status
    r2 = s.pick_account(r1.location, r2, user_oid=user_oid)
    assert r2.status == 302, r2.text
    return s.browser.get(r2.location)


def test_shared_mailbox_with_full_access(httpd, simulator, db):
    """A person with Full Access connects support@ (mailbox=) for a company that
    asks for Mail.ReadWrite.Shared: their account on that mailbox, mirrored and
    written back with their token; their own mailbox is another account;
    someone without Full Access is refused."""
    e = start(httpd, simulator, db=db[0], pg=db[1], extra=TEAM, mailboxes=(SUPPORT,),
              full_access={SUPPORT: ADELE[0]})
    r3 = sign_in_as(e, ADELE[1], company="team", mailbox=SUPPORT, return_to="/a")
    assert r3.query().get("msoauth") == "connected", r3.location
    shared = int(r3.query()["account"])
    cols = "kind, shared, mailbox, object_id, tenant_id, company"
    (row,) = e.rows(f"SELECT {cols} FROM msoauth_accounts WHERE id = {shared}", cols)
    assert row == {"kind": "delegated", "shared": "1", "mailbox": SUPPORT,
                   "object_id": ADELE[1], "tenant_id": TENANT, "company": "team"}
    e.assert_converged(shared, SUPPORT)
    target = e.mailbox(SUPPORT)["messages"][0]
    queue(e, shared, target["id"])
    assert poll("the action", lambda: (action_state(e, shared) or {}).get("state") == "done",
                timeout=20)
    assert counters(e)["graph_effective_writes"][target["id"]] == 1
    paths = {r["path"].split("/")[3] for r in sim_call(e.sim, "GET", "/_sim/log")["requests"]
             if "/mailFolders/" in r["path"] or "/messages/" in r["path"]}
    assert paths == {"support%40contoso.com"} or paths == {SUPPORT}, paths
    # Her own mailbox: a second account of the same person.
    r3 = sign_in_as(e, ADELE[1], company="team", mailbox=ADELE[0], return_to="/a")
    own = int(r3.query()["account"])
    assert own != shared
    # Again for support@: the same account, reconnected.
    r3 = sign_in_as(e, ADELE[1], company="team", mailbox=SUPPORT, return_to="/a")
    assert int(r3.query()["account"]) == shared
    # Megan has no Full Access.
    r3 = sign_in_as(e, MEGAN[1], company="team", mailbox=SUPPORT, return_to="/a")
    assert r3.query() == {"msoauth": "error", "reason": "shared_access_denied"}, r3.location
    # With Full Access she still cannot take Adele's account over.
    sim_call(e.sim, "POST", f"/_sim/mailbox/{SUPPORT}/permissions",
             {"user": MEGAN[0], "rights": "FullAccess"})
    r3 = sign_in_as(e, MEGAN[1], company="team", mailbox=SUPPORT, return_to="/a")
    assert r3.query() == {"msoauth": "error", "reason": "mailbox_mismatch"}, r3.location
    # A mailbox that does not exist.
    r3 = sign_in_as(e, ADELE[1], company="team", mailbox="nobody@contoso.com", return_to="/a")
    assert r3.query() == {"msoauth": "error", "reason": "mailbox_not_found"}, r3.location
    status, t = api(e, f"/microsoft_outlook/token?account={shared}")
    assert status == 200 and t["mailbox"] == SUPPORT
    info = sim_call(e.sim, "POST", "/_sim/introspect", {"token": t["access_token"]})
    assert info["kind"] == "delegated" and info["upn"] == ADELE[0]
    a = account_of(e, shared)
    assert a["shared"] is True and a["kind"] == "delegated"
    no_secrets(e)
