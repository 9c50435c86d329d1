"""Attachments in the mirror: the job lists every mirrored message's
attachments and stores their bytes within MSOAuthAttachmentMaxBytes, the
msoauth-attachment handler serves them (from the table, or from Graph on
demand), on SQLite and PostgreSQL, against the simulator. Bytes are compared
with the simulator's by SHA-256."""
import hashlib
import http.client
import json
import os
import signal
import subprocess
import time
import urllib.parse

import pytest

from conftest import IS_ROOT, RUN_USER, SANITIZE, psql, sim_call, token_leaks
from test_hostile import peak_rss_mb
from test_nodes import alive, pg_schema, poll  # noqa: F401 (fixture)
from test_signin import ADELE, SECRET
from test_sync import make_env

MB = 1024 * 1024
ATTACH = """
<Location /microsoft_outlook/attachment>
  SetHandler msoauth-attachment
  Require local
</Location>
"""


def attach_env(request, httpd, simulator, db, cap=None, extra=""):
    conf = ATTACH + extra + (f"MSOAuthAttachmentMaxBytes {cap}\n" if cap is not None else "")
    if db == "pgsql":
        params, _ = request.getfixturevalue("pg_schema")
        return make_env(httpd, simulator, "pgsql", params, extra=conf)
    return make_env(httpd, simulator, "sqlite3", extra=conf)


@pytest.fixture(params=["sqlite3", "pgsql"])
def db(request):
    return request.param


def no_secrets(env):
    log = env.h.log()
    assert not token_leaks(log, SECRET)


# --- reading the table ----------------------------------------------------------------------

SQLITE_DUMP = """
import hashlib, json, sqlite3, sys
c = sqlite3.connect(sys.argv[1], timeout=30)
out = []
for r in c.execute("SELECT graph_id, attachment_id, name, content_type, size, is_inline, "
                   "content_id, kind, state, content, fetched_at FROM msoauth_attachments "
                   "WHERE account_id = ?", (int(sys.argv[2]),)):
    d = dict(zip(["graph_id", "attachment_id", "name", "content_type", "size", "is_inline",
                  "content_id", "kind", "state", "content", "fetched_at"], r))
    b = d.pop("content")
    d["sha256"] = hashlib.sha256(b).hexdigest() if b is not None else None
    d["length"] = len(b) if b is not None else None
    out.append(d)
print(json.dumps(out))
"""


def stored_rows(env, acc):
    """Every attachment row of the account, content as sha256 and length."""
    if env.s.db == "pgsql":
        out = psql(env.s.pg, "SELECT COALESCE(json_agg(json_build_object("
                   "'graph_id', graph_id, 'attachment_id', attachment_id, 'name', name, "
                   "'content_type', content_type, 'size', size, 'is_inline', is_inline, "
                   "'content_id', content_id, 'kind', kind, 'state', state, 'fetched_at', "
                   "fetched_at, 'sha256', CASE WHEN content IS NULL THEN NULL ELSE "
                   "encode(sha256(content), 'hex') END, 'length', octet_length(content))), "
                   f"'[]') FROM msoauth_attachments WHERE account_id = {int(acc)}")
        return json.loads(out)
    cmd = ["/usr/bin/python3", "-c", SQLITE_DUMP, str(env.h.root / "data" / "msoauth.db"),
           str(int(acc))]
    if IS_ROOT:
        cmd = ["runuser", "-u", RUN_USER, "--"] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def sha(data):
    return hashlib.sha256(data).hexdigest()


def expected(env, user, folders=("inbox",)):
    """The simulator's attachments of the mirrored folders: {(message, id): attachment}."""
    want = {}
    for m in env.mailbox(user)["messages"]:
        if m["folder"] not in folders or not m.get("attachments"):
            continue
        detail = sim_call(env.sim, "GET", f"/_sim/mailbox/{user}/messages/{m['id']}")
        for a in detail["attachments"]:
            if a["kind"] == "reference":
                a["sha256"] = sha(a["sourceUrl"].encode())
            want[(m["id"], a["id"])] = a
    return want


def assert_attachments_converged(env, acc, user, cap, folders=("inbox",), timeout=60):
    """Rows are exactly the mailbox's attachments: same ids, kinds, names,
    inline flags and content ids; the bytes of those within cap stored and
    equal, those above it not stored. No row twice."""
    want = expected(env, user, folders)
    problems = []

    def same():
        rows = stored_rows(env, acc)
        got = {(r["graph_id"], r["attachment_id"]): r for r in rows}
        problems[:] = []
        if len(rows) != len(got):
            problems.append("a row twice")
        if set(got) != set(want):
            problems.append(f"ids: missing {len(set(want) - set(got))}, extra "
                            f"{len(set(got) - set(want))}")
            return False
        for k, a in want.items():
            r = got[k]
            fits = a["kind"] == "reference" or a["size"] <= cap
            if (r["kind"], r["name"], bool(int(r["is_inline"])), r["content_id"]) != (
                    a["kind"], a["name"], a["isInline"], a["contentId"]):
                problems.append(f"{a['name']}: {r}")
            elif cap > 0 and fits:
                if r["state"] != "stored" or r["sha256"] != a["sha256"]:
                    problems.append(f"{a['name']}: {r['state']}")
            elif r["state"] != "large" or r["sha256"] is not None:
                problems.append(f"{a['name']} above the limit: {r['state']}")
        return not problems

    try:
        poll("the attachments to match the mailbox", same, timeout=timeout, every=0.5)
    except AssertionError:
        raise AssertionError(f"{problems[:5]}; account {env.account(acc)}\n{env.h.log()[-3000:]}")
    return want


# --- the handler ----------------------------------------------------------------------------

def fetch(env, acc, message, attachment, headers=None, method="GET"):
    """GET the handler with http.client, so the raw headers can be checked."""
    q = urllib.parse.urlencode({"account": acc, "message": message, "attachment": attachment})
    conn = http.client.HTTPConnection("127.0.0.1", env.h.port, timeout=120)
    conn.request(method, f"/microsoft_outlook/attachment?{q}", headers=headers or {})
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r, body


def body_json(r, body):
    assert r.getheader("Content-Type").startswith("application/json"), r.getheaders()
    return json.loads(body)


def seed(env, user, messages, folder="inbox"):
    return sim_call(env.sim, "POST", f"/_sim/mailbox/{user}/messages",
                    {"folder": folder, "messages": messages})["messages"]


def att_requests(env):
    return [e for e in sim_call(env.sim, "GET", "/_sim/log")["requests"]
            if "/attachments" in e["path"]]


PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"


def mixed(user_seed="mix"):
    """Messages with the three kinds, inline parts (one message has only
    inline ones: Graph's hasAttachments is false), an empty file, one above a
    1 MiB limit."""
    import base64
    return [
        {"subject": "Contract", "receivedDateTime": "2026-03-01T10:00:00Z",
         "body": '<p>Signed, see <img src="cid:sig@lee"></p>', "attachments": [
             {"kind": "file", "name": "contract.pdf", "contentType": "application/pdf",
              "content_base64": base64.b64encode(PDF).decode()},
             {"kind": "file", "name": "sig.png", "contentType": "image/png", "isInline": True,
              "contentId": "sig@lee", "size": 2000, "seed": user_seed + "sig"},
             {"kind": "item", "name": "Fwd: offer", "item": {
                 "subject": "Original offer", "from": "nestor@northwind.example",
                 "body": "<p>Offer inside</p>"}},
             {"kind": "reference", "name": "Budget.xlsx",
              "sourceUrl": "https://contoso.sharepoint.com/sites/x/Budget.xlsx"}]},
        {"subject": "Logo only", "receivedDateTime": "2026-03-01T11:00:00Z",
         "body": '<p><img src="cid:logo"></p>', "attachments": [
             {"kind": "file", "name": "logo.png", "contentType": "image/png", "isInline": True,
              "contentId": "logo", "size": 5000, "seed": user_seed + "logo"}]},
        {"subject": "Logs", "receivedDateTime": "2026-03-01T09:00:00Z", "body": "see logs",
         "attachments": [
             {"kind": "file", "name": "big.log", "contentType": "text/plain",
              "size": 2 * MB, "seed": user_seed + "big"},
             {"kind": "file", "name": "medium.bin", "contentType": "application/octet-stream",
              "size": 700000, "seed": user_seed + "medium"},
             {"kind": "file", "name": "empty.txt", "contentType": "text/plain",
              "content_text": ""}]},
    ]


# --- tests ----------------------------------------------------------------------------------

def test_mixed_mailbox_converges_exactly(request, httpd, simulator, db):
    env = attach_env(request, httpd, simulator, db, cap=MB)
    env.seed(ADELE[0], 30)
    made = seed(env, ADELE[0], mixed())
    acc = env.connect(ADELE[0])
    env.assert_converged(acc, ADELE[0])
    want = assert_attachments_converged(env, acc, ADELE[0], MB)
    assert len(want) == 8
    rows = {r["attachment_id"]: r for r in stored_rows(env, acc)}
    # Inline parts carry their content id, so cid: URLs of the body resolve.
    (logo_msg,) = [m for m in made if m["subject"] == "Logo only"]
    logo = [r for r in rows.values() if r["graph_id"] == logo_msg["id"]]
    assert len(logo) == 1 and logo[0]["content_id"] == "logo" and int(logo[0]["is_inline"])
    (h,) = env.rows(f"SELECT has_attachments FROM msoauth_messages WHERE graph_id = "
                    f"'{logo_msg['id']}'", "h")
    assert h["h"] == "0"            # Graph does not count inline parts
    for r in rows.values():
        assert int(r["fetched_at"] or 0) > 0 if r["state"] == "stored" else True
    # Every stored attachment is served from the table, byte for byte; the one
    # above the limit from Graph, and it stays unstored.
    for (mid, aid), a in want.items():
        resp, body = fetch(env, acc, mid, aid)
        assert resp.status == 200, body[:300]
        assert sha(body) == a["sha256"], a["name"]
        assert resp.getheader("X-Content-Type-Options") == "nosniff"
        assert resp.getheader("Content-Disposition").startswith("attachment; filename=")
        src = resp.getheader("X-MSOAuth-Source")
        assert src == ("graph" if a["name"] == "big.log" else "stored"), (a["name"], src)
        ctype = resp.getheader("Content-Type")
        assert ctype == {"item": "message/rfc822",
                         "reference": "text/uri-list; charset=utf-8"}.get(a["kind"],
                                                                         a["contentType"]), ctype
        if src == "stored":
            assert int(resp.getheader("Content-Length")) == len(body)
    assert rows[[k for k, a in want.items() if a["name"] == "big.log"][0][1]]["state"] == "large"
    assert stored_rows(env, acc) and all(r["sha256"] is None for r in stored_rows(env, acc)
                                         if r["name"] == "big.log")
    # The list is asked for without the bytes; bytes as raw $value, links from beta.
    reqs = att_requests(env)
    lists = [e for e in reqs if e["path"].endswith("/attachments")]
    assert lists and all("contentBytes" not in urllib.parse.unquote(e["query"])
                         and "$select" in urllib.parse.unquote(e["query"]) for e in lists)
    assert any(e["path"].endswith("/$value") for e in reqs)
    assert any(e["path"].startswith("/beta/") for e in reqs)
    assert not any(e["path"].endswith("/$value") and e["status"] != 200 for e in reqs)
    c = sim_call(env.sim, "GET", "/_sim/counters")
    assert c["concurrency_violations"] == 0 and c["max_inflight"] <= 4
    # The status page counts them.
    a = env.account(acc)
    assert a["attachments"]["count"] == 8 and a["attachments"]["stored"] == 7
    assert a["attachments"]["large"] == 1 and a["attachments"]["pending"] == 0
    assert a["attachments"]["bytes"] > 700000
    # Unknown account, message or attachment: 404 with the reason.
    some_mid, some_aid = next(iter(want))
    for args, reason in (((99999, some_mid, some_aid), "account_not_found"),
                         ((acc, "AAMkNoSuchMessage", some_aid), "message_not_found"),
                         ((acc, some_mid, "AAMkNoSuchAttachment"), "attachment_not_found")):
        resp, body = fetch(env, *args)
        assert resp.status == 404 and body_json(resp, body)["reason"] == reason, body
    resp, body = fetch(env, acc, "../x", some_aid)
    assert resp.status == 400 and body_json(resp, body)["reason"] == "bad_request"
    no_secrets(env)


def test_inline_cid_parts_resolve(request, httpd, simulator, db):
    """An app renders an HTML body: each cid: URL names a row by content_id,
    whose bytes the handler serves."""
    import re
    env = attach_env(request, httpd, simulator, db)
    (msg,) = seed(env, ADELE[0], [
        {"subject": "Newsletter", "body": '<p><img src="cid:header@n"> text <img src="CID:f2"></p>'
                                          '<p><img src=cid:f3></p>',
         "attachments": [
             {"kind": "file", "name": "header.jpg", "contentType": "image/jpeg", "isInline": True,
              "contentId": "header@n", "size": 40000, "seed": "h"},
             {"kind": "file", "name": "f2.gif", "contentType": "image/gif", "isInline": True,
              "contentId": "f2", "size": 300, "seed": "f2"},
             {"kind": "file", "name": "f3.png", "contentType": "image/png", "isInline": True,
              "contentId": "f3", "size": 301, "seed": "f3"}]}])
    acc = env.connect(ADELE[0])
    want = assert_attachments_converged(env, acc, ADELE[0], 10 * MB)
    (row,) = env.rows(f"SELECT body FROM msoauth_messages WHERE graph_id = '{msg['id']}'", "body")
    by_cid = {r["content_id"]: r for r in stored_rows(env, acc)}
    cids = re.findall(r'src="?cid:([^" >]+)', row["body"], re.I)
    assert sorted(cids) == ["f2", "f3", "header@n"]
    for cid in cids:
        r = by_cid[cid]
        resp, body = fetch(env, acc, msg["id"], r["attachment_id"])
        assert resp.status == 200 and sha(body) == want[(msg["id"], r["attachment_id"])]["sha256"]
        assert resp.getheader("Content-Type").startswith("image/")


def test_limit_metadata_only_then_on_demand(request, httpd, simulator, db):
    """MSOAuthAttachmentMaxBytes 0: descriptions only, nothing downloaded by
    the job; the handler fetches from Graph and does not keep it."""
    env = attach_env(request, httpd, simulator, db, cap=0)
    (msg,) = seed(env, ADELE[0], [
        {"subject": "Specs", "body": "x", "attachments": [
            {"kind": "file", "name": "spec.pdf", "contentType": "application/pdf",
             "size": 300000, "seed": "spec"},
            {"kind": "reference", "name": "Plan", "sourceUrl": "https://contoso.sharepoint.com/p"}]}])
    acc = env.connect(ADELE[0])
    want = assert_attachments_converged(env, acc, ADELE[0], 0)
    time.sleep(2)
    assert not [e for e in att_requests(env) if not e["path"].endswith("/attachments")]
    for (mid, aid), a in want.items():
        for _ in range(2):
            resp, body = fetch(env, acc, mid, aid)
            assert resp.status == 200 and sha(body) == a["sha256"]
            assert resp.getheader("X-MSOAuth-Source") == "graph"
    assert all(r["state"] == "large" and r["sha256"] is None for r in stored_rows(env, acc))


def test_on_demand_fetch_is_stored_within_the_limit(request, httpd, simulator, db):
    """Bytes the job could not get (Graph refused them then) are fetched on
    demand, stored, and then served from the table."""
    env = attach_env(request, httpd, simulator, db)
    sim_call(env.sim, "POST", "/_sim/scenarios", {"endpoint": "graph", "status": 404,
                                                  "code": "ErrorItemNotFound", "times": -1,
                                                  "match": {"path": "$value"}})
    (msg,) = seed(env, ADELE[0], [{"subject": "One", "body": "x", "attachments": [
        {"kind": "file", "name": "one.bin", "size": 123457, "seed": "one"}]}])
    acc = env.connect(ADELE[0])
    poll("the refused download", lambda: [r for r in stored_rows(env, acc)
                                          if r["state"] == "failed"], timeout=30)
    resp, body = fetch(env, acc, msg["id"], stored_rows(env, acc)[0]["attachment_id"])
    assert resp.status == 404 and body_json(resp, body)["reason"] == "attachment_not_found"
    sim_call(env.sim, "DELETE", "/_sim/scenarios")
    want = expected(env, ADELE[0])
    (key, a), = want.items()
    resp, body = fetch(env, acc, *key)
    assert resp.status == 200 and sha(body) == a["sha256"]
    assert resp.getheader("X-MSOAuth-Source") == "graph"
    (r,) = stored_rows(env, acc)
    assert r["state"] == "stored" and r["sha256"] == a["sha256"]
    resp, body = fetch(env, acc, *key)
    assert resp.getheader("X-MSOAuth-Source") == "stored" and sha(body) == a["sha256"]


HOSTILE = [
    ("../../etc/passwd", "text/plain", 'filename="passwd"'),
    ('a"b\r\nX-Evil: 1.txt', "text/html\r\nSet-Cookie: evil=1", 'filename="a_b  X-Evil_ 1.txt"'),
    ("C:\\Users\\x\\report.exe", "application/x-msdownload", 'filename="report.exe"'),
    ("R\u00e9sum\u00e9 \u20ac.pdf", "Application/PDF", "filename*=UTF-8''R%C3%A9sum%C3%A9%20%E2%82%AC.pdf"),
    ("invoice\u202efdp.exe", "image/svg+xml", 'filename="invoicefdp.exe"'),
    ("..", "text/html; charset=utf-8", 'filename="attachment"'),
]


def test_handler_headers_and_hostile_names(request, httpd, simulator, db):
    key = "k" * 64
    httpd.file("api.key", key + "\n")
    env = attach_env(request, httpd, simulator, db, extra="MSOAuthAPIKeyFile api.key\n")
    seed(env, ADELE[0], [{"subject": "Hostile", "body": "x", "attachments": [
        {"kind": "file", "name": n, "contentType": ct, "content_text": f"body {i}"}
        for i, (n, ct, _) in enumerate(HOSTILE)]}])
    acc = env.connect(ADELE[0])
    bearer = {"Authorization": f"Bearer {key}"}
    want = None

    def ready():
        rows = stored_rows(env, acc)
        return rows if len(rows) == len(HOSTILE) and all(r["state"] == "stored" for r in rows) \
            else None
    rows = poll("the hostile attachments", ready, timeout=60)
    by_sha = {r["sha256"]: r for r in rows}
    for i, (name, ctype, disposition) in enumerate(HOSTILE):
        r = by_sha[sha(f"body {i}".encode())]
        # Stored as Graph named it, controls made spaces: cleaned when served.
        assert r["name"] == "".join(" " if ord(ch) < 0x20 else ch for ch in name)
        resp, body = fetch(env, acc, r["graph_id"], r["attachment_id"], headers=bearer)
        assert resp.status == 200 and body == f"body {i}".encode(), (name, body)
        raw = "\n".join(f"{k}: {v}" for k, v in resp.getheaders())
        assert "X-Evil" not in raw.replace("X-Evil_", "") and "Set-Cookie" not in raw, raw
        cd = resp.getheader("Content-Disposition")
        assert cd.startswith("attachment; filename=\"") and "filename*=UTF-8''" in cd, cd
        assert disposition in cd, (name, cd)
        assert "/" not in cd.split("filename*=")[1] and "\\" not in cd, cd
        quoted = cd.split('"')[1]
        assert all(0x20 <= ord(ch) < 0x7f for ch in quoted), cd
        ct = resp.getheader("Content-Type")
        assert ct == {"text/plain": "text/plain", "application/x-msdownload":
                      "application/x-msdownload", "Application/PDF": "application/pdf",
                      "image/svg+xml": "image/svg+xml",
                      "text/html; charset=utf-8": "text/html"}.get(ctype,
                                                                    "application/octet-stream"), ct
        assert resp.getheader("X-Content-Type-Options") == "nosniff"
        assert "sandbox" in resp.getheader("Content-Security-Policy")
        assert "no-store" in resp.getheader("Cache-Control")
    # Guarded like the token handler: the key, no proxy.
    r0 = rows[0]
    resp, body = fetch(env, acc, r0["graph_id"], r0["attachment_id"])
    assert resp.status == 401 and body_json(resp, body)["reason"] == "forbidden"
    resp, body = fetch(env, acc, r0["graph_id"], r0["attachment_id"],
                       headers=dict(bearer, **{"X-Forwarded-For": "203.0.113.9"}))
    assert resp.status == 403 and body_json(resp, body)["reason"] == "forbidden"
    resp, body = fetch(env, acc, r0["graph_id"], r0["attachment_id"], headers=bearer,
                       method="POST")
    assert resp.status == 405
    resp, body = fetch(env, acc, r0["graph_id"], r0["attachment_id"], headers=bearer,
                       method="HEAD")
    assert resp.status == 200 and body == b"" and resp.getheader("Content-Length")
    assert want is None
    no_secrets(env)


def test_rows_follow_their_message_and_outlook_edits(request, httpd, simulator, db):
    """A draft edited in Outlook (an attachment removed, one added), a message
    deleted, one moved out of the mirror and one moved between mirrored
    folders: the rows converge to exactly the mirrored folders' attachments."""
    env = attach_env(request, httpd, simulator, db, extra="MSOAuthSyncFolders inbox archive\n")
    made = seed(env, ADELE[0], [
        {"subject": f"M{i}", "body": "x", "attachments": [
            {"kind": "file", "name": f"m{i}-{k}.txt", "content_text": f"{i}/{k}"}
            for k in range(3)]} for i in range(5)])
    acc = env.connect(ADELE[0])
    assert_attachments_converged(env, acc, ADELE[0], 10 * MB, folders=("inbox", "archive"))
    ids = {m["subject"]: m["id"] for m in made}
    draft = sim_call(env.sim, "GET", f"/_sim/mailbox/{ADELE[0]}/messages/{ids['M0']}")
    sim_call(env.sim, "DELETE", f"/_sim/mailbox/{ADELE[0]}/messages/{ids['M0']}/attachments/"
             f"{draft['attachments'][1]['id']}")
    sim_call(env.sim, "POST", f"/_sim/mailbox/{ADELE[0]}/messages/{ids['M0']}/attachments",
             {"kind": "file", "name": "added later.txt", "content_text": "new"})
    # All attachments removed: hasAttachments false, the rows must still go.
    bare = sim_call(env.sim, "GET", f"/_sim/mailbox/{ADELE[0]}/messages/{ids['M4']}")
    for a in bare["attachments"]:
        sim_call(env.sim, "DELETE", f"/_sim/mailbox/{ADELE[0]}/messages/{ids['M4']}/attachments/"
                 f"{a['id']}")
    sim_call(env.sim, "DELETE", f"/_sim/mailbox/{ADELE[0]}/messages/{ids['M1']}")
    sim_call(env.sim, "POST", f"/_sim/mailbox/{ADELE[0]}/messages/{ids['M2']}",
             {"move_to": "junkemail"})
    sim_call(env.sim, "POST", f"/_sim/mailbox/{ADELE[0]}/messages/{ids['M3']}",
             {"move_to": "archive"})
    kept = {r["attachment_id"]: r["sha256"] for r in stored_rows(env, acc)
            if r["graph_id"] == ids["M3"]}
    env.sync_now(acc)
    env.assert_converged(acc, ADELE[0], folders=("inbox", "archive"))
    assert_attachments_converged(env, acc, ADELE[0], 10 * MB, folders=("inbox", "archive"))
    rows = stored_rows(env, acc)
    assert not [r for r in rows if r["graph_id"] in (ids["M1"], ids["M2"], ids["M4"])]
    assert {r["attachment_id"]: r["sha256"] for r in rows if r["graph_id"] == ids["M3"]} == kept
    assert sorted(r["name"] for r in rows if r["graph_id"] == ids["M0"]) == [
        "added later.txt", "m0-0.txt", "m0-2.txt"]


def kill_everything(env):
    pids = [env.h.pid()] + env.h.children()
    for p in pids:
        os.kill(p, signal.SIGKILL)
    poll("httpd to die", lambda: not any(alive(p) for p in pids), timeout=10)
    (env.h.root / "run" / "httpd.pid").unlink(missing_ok=True)
    env.h.start()


def test_kill_9_mid_download_converges_without_duplicates(request, httpd, simulator, db):
    env = attach_env(request, httpd, simulator, db, cap=16 * MB)
    seed(env, ADELE[0], [
        {"subject": f"Scan {i}", "body": "x", "attachments": [
            {"kind": "file", "name": f"scan{i}-{k}.tif", "contentType": "image/tiff",
             "size": 6 * MB, "seed": f"scan{i}-{k}"} for k in range(2)]} for i in range(4)])
    # Downloads hang: some are in flight when everything dies.
    sim_call(env.sim, "POST", "/_sim/scenarios", {"endpoint": "graph", "hang": 4, "times": -1,
                                                  "match": {"path": "$value"}})
    acc = env.connect(ADELE[0])
    poll("downloads in flight", lambda: len(stored_rows(env, acc)) == 8
         and sim_call(env.sim, "GET", "/_sim/counters")["inflight"] > 0, timeout=30, every=0.1)
    assert not [r for r in stored_rows(env, acc) if r["state"] == "stored"]
    kill_everything(env)
    sim_call(env.sim, "DELETE", "/_sim/scenarios")
    assert_attachments_converged(env, acc, ADELE[0], 16 * MB, timeout=90)
    assert len(stored_rows(env, acc)) == 8
    n = env.rows(f"SELECT COUNT(*) FROM msoauth_attachments WHERE account_id = {acc}", "n")
    assert int(n[0]["n"]) == 8


def test_newest_text_first_attachments_behind(request, httpd, simulator):
    """Attachment work only takes the room the delta pages leave: the newest
    messages are queryable first, and no attachment request goes out before
    the first page is in."""
    env = attach_env(request, httpd, simulator, "sqlite3")
    msgs = [{"subject": f"With {i}", "receivedDateTime": f"2026-02-{1 + i % 28:02d}T{i % 24:02d}:00:00Z",
             "body": "x", "attachments": [{"kind": "file", "name": f"f{i}.bin", "size": MB,
                                           "seed": f"nf{i}"}]}
            if i % 3 == 0 else {"subject": f"Plain {i}", "body": "y",
                                "receivedDateTime": f"2026-02-{1 + i % 28:02d}T{i % 24:02d}:00:00Z"}
            for i in range(600)]
    for k in range(0, 600, 200):
        seed(env, ADELE[0], msgs[k:k + 200])
    newest = [m["id"] for m in sorted(env.mailbox(ADELE[0])["messages"],
                                      key=lambda m: m["receivedDateTime"], reverse=True)][:50]
    sim_call(env.sim, "POST", "/_sim/config", {"latency_ms": 30})
    t0 = time.time()
    acc = env.connect(ADELE[0])
    got = poll("the newest 50", lambda: len(env.rows(
        f"SELECT graph_id FROM msoauth_messages WHERE account_id = {acc} AND graph_id IN "
        f"({','.join(repr(i) for i in newest)})", "g")) == 50, timeout=30, every=0.05)
    took = time.time() - t0
    assert got and took < 10, took
    log = sim_call(env.sim, "GET", "/_sim/log")["requests"]
    first_delta = min(e["t"] + e["ms"] / 1000 for e in log if "/messages/delta" in e["path"])
    assert all(e["t"] >= first_delta - 0.05 for e in log if "/attachments" in e["path"])
    sim_call(env.sim, "POST", "/_sim/config", {"latency_ms": 0})
    env.assert_converged(acc, ADELE[0], timeout=120)
    assert_attachments_converged(env, acc, ADELE[0], 10 * MB, timeout=120)


def test_twenty_attachments_of_20_mb_within_the_memory_bound(request, httpd, simulator, db):
    """400 MB of attachments in one mailbox, a limit of 25 MiB: all stored, and
    the job's peak RSS stays within its stated bound."""
    env = attach_env(request, httpd, simulator, db, cap=25 * MB)
    seed(env, ADELE[0], [{"subject": f"Big {i}", "body": "x", "attachments": [
        {"kind": "file", "name": f"big{i}.bin", "size": 20 * 1000 * 1000, "seed": f"b{i}"}]}
        for i in range(20)])
    before = peak_rss_mb(env.h)
    acc = env.connect(ADELE[0])
    assert_attachments_converged(env, acc, ADELE[0], 25 * MB, timeout=240)
    peak = peak_rss_mb(env.h)
    # The bound per lane (mod_msoauth_job.c): 48 MiB + 4 x 25 MiB (download
    # budget and two batches, one past the budget, one completing each batch,
    # the driver's copy) over what the child held, and 40 MiB for the code's own.
    bound = before + 48 + 4 * 25 + 40
    if SANITIZE == "asan":
        # ASan keeps freed blocks in its quarantine (256 MiB by default,
        # ASAN_OPTIONS quarantine_size_mb) before it reuses them.
        bound += 256
    print(f"\n{db}: job child peak RSS {peak} MiB (before {before} MiB, bound {bound} MiB)")
    assert peak <= bound, (peak, before)


def test_new_mail_attachments_within_seconds_and_throttling(request, httpd, simulator):
    """A new message's attachments are rows with their bytes seconds after the
    message; a 429 on attachment work makes the whole mailbox wait Retry-After,
    as a 429 on a delta page does, and it converges after."""
    env = attach_env(request, httpd, simulator, "sqlite3")
    env.seed(ADELE[0], 20)
    acc = env.connect(ADELE[0])
    env.assert_converged(acc, ADELE[0])
    (msg,) = seed(env, ADELE[0], [{"subject": "Invoice", "body": "x", "attachments": [
        {"kind": "file", "name": "invoice.pdf", "contentType": "application/pdf",
         "size": 250000, "seed": "inv"}]}])
    env.sync_now(acc)
    t0 = time.time()
    poll("the new message", lambda: env.rows(f"SELECT 1 FROM msoauth_messages WHERE graph_id = "
                                             f"'{msg['id']}'", "x"), timeout=15, every=0.05)
    t_msg = time.time() - t0
    poll("its attachment's bytes", lambda: [r for r in stored_rows(env, acc)
                                            if r["state"] == "stored"], timeout=15, every=0.1)
    t_att = time.time() - t0
    assert t_att - t_msg < 5, (t_msg, t_att)
    assert_attachments_converged(env, acc, ADELE[0], 10 * MB)

    # Throttled on an attachment list: Retry-After 5 for the mailbox.
    sim_call(env.sim, "POST", "/_sim/scenarios", {"endpoint": "graph", "status": 429,
                                                  "retry_after": 5, "times": 1,
                                                  "match": {"path": "/attachments"}})
    seed(env, ADELE[0], [{"subject": "Second", "body": "x", "attachments": [
        {"kind": "file", "name": "second.txt", "content_text": "2"}]}])
    env.sync_now(acc)
    t429 = poll("the 429", lambda: next((e["t"] for e in att_requests(env)
                                         if e["status"] == 429), None), timeout=15, every=0.05)
    a = poll("the throttled phase", lambda: (lambda a: a if a["sync"]["phase"] == "throttled"
                                             else None)(env.account(acc)), timeout=5, every=0.1)
    assert a["sync"]["retry_at"] >= t429 + 4
    while time.time() < t429 + 4.5:
        later = [e for e in sim_call(env.sim, "GET", "/_sim/log")["requests"]
                 if e["t"] > t429 + 0.2 and e["kind"].startswith("graph")]
        assert not later, later
        time.sleep(0.2)
    assert_attachments_converged(env, acc, ADELE[0], 10 * MB, timeout=30)
    c = sim_call(env.sim, "GET", "/_sim/counters")
    assert c["concurrency_violations"] == 0 and c["max_inflight"] <= 4
