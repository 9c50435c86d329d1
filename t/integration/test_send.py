"""Sending mail: the application queues rows in msoauth_outbox (and
msoauth_outbox_attachments), the job sends them through Graph as the mailbox,
exactly once. A real httpd, the simulator (whose delivery log counts every
accepted send per marker), SQLite and PostgreSQL."""
import hashlib
import json
import os
import subprocess
import time

import pytest

from conftest import IS_ROOT, RUN_USER, psql, sim_call, token_leaks
from test_nodes import pg_schema, poll, second_node  # noqa: F401 (fixture)
from test_signin import ADELE, MEGAN, SECRET
from test_sync import Env, kill_everything, make_env

OB_COLS = ("id, state, attempts, reason, last_error, internet_message_id, sent_at, marker, "
           "phase, draft_id, created_at, updated_at")
CUSTOMER = ("chris@fabrikam.com", "Chris Customer")


def sql_text(s):
    return "NULL" if s is None else "'" + str(s).replace("'", "''") + "'"


class Outbox(Env):
    def script(self, sql):
        """Runs a script through stdin (attachments make long statements)."""
        if self.s.db == "pgsql":
            r = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.s.pg,
                                "-f", "-"], input=sql.encode(), capture_output=True)
        else:
            cmd = ["sqlite3", "-batch", "-cmd", ".timeout 10000",
                   str(self.h.root / "data" / "msoauth.db")]
            if IS_ROOT:
                cmd = ["runuser", "-u", RUN_USER, "--"] + cmd
            r = subprocess.run(cmd, input=sql.encode(), capture_output=True)
        assert r.returncode == 0, r.stderr.decode(errors="replace")[:2000]

    def blob(self, data):
        if self.s.db == "pgsql":
            return f"'\\x{data.hex()}'::bytea"
        return f"X'{data.hex()}'"

    def queue(self, acc, to=None, subject="Hello", body="Hi there", body_type=None, cc=None,
              bcc=None, reply_to=None, attachments=(), raw=None):
        """One row (and its attachments) in one transaction, as an application
        would insert them; to/cc/bcc: lists of addresses or (address, name)."""
        def rcpt(lst):
            if lst is None:
                return None
            if isinstance(lst, str):
                return lst          # given as JSON text (or garbage) on purpose
            return json.dumps([{"address": a, "name": None} if isinstance(a, str)
                               else {"address": a[0], "name": a[1]} for a in lst])
        cols = {"account_id": str(int(acc)), "to_json": sql_text(rcpt(to)),
                "cc_json": sql_text(rcpt(cc)), "bcc_json": sql_text(rcpt(bcc)),
                "subject": sql_text(subject), "body": sql_text(body),
                "reply_to_graph_id": sql_text(reply_to)}
        if body_type is not None:
            cols["body_type"] = sql_text(body_type)
        cols.update(raw or {})
        row = f"(SELECT MAX(id) FROM msoauth_outbox WHERE account_id = {int(acc)})"
        lines = ["BEGIN;", f"INSERT INTO msoauth_outbox ({', '.join(cols)}) VALUES "
                           f"({', '.join(cols.values())});"]
        for a in attachments:
            lines.append("INSERT INTO msoauth_outbox_attachments (outbox_id, name, content_type, "
                         "content, is_inline, content_id) VALUES "
                         f"({row}, {sql_text(a.get('name'))}, {sql_text(a.get('content_type'))}, "
                         f"{self.blob(a['content'])}, {1 if a.get('is_inline') else 0}, "
                         f"{sql_text(a.get('content_id'))});")
        lines.append("COMMIT;")
        self.script("\n".join(lines) + "\n")
        (r,) = self.rows(f"SELECT MAX(id) FROM msoauth_outbox WHERE account_id = {int(acc)}",
                         "id")
        return int(r["id"])

    def row(self, oid):
        (r,) = self.rows(f"SELECT {OB_COLS} FROM msoauth_outbox WHERE id = {int(oid)}", OB_COLS)
        return r

    def wait_state(self, oid, states=("sent", "failed"), timeout=30):
        return poll(f"outgoing mail {oid} to finish",
                    lambda: (lambda r: r if r["state"] in states else None)(self.row(oid)),
                    timeout=timeout, every=0.2)

    def deliveries(self, **q):
        qs = "&".join(f"{k}={v}" for k, v in q.items())
        return sim_call(self.sim, "GET", "/_sim/deliveries" + (f"?{qs}" if qs else ""))

    def delivered_once(self, oid):
        """The row is sent and its marker was delivered exactly once."""
        r = self.row(oid)
        assert r["state"] == "sent", r
        d = self.deliveries(marker=r["marker"])
        assert d["count"] == 1, d
        return r, d["deliveries"][0]

    def counters(self):
        return sim_call(self.sim, "GET", "/_sim/counters")

    def log(self):
        return sim_call(self.sim, "GET", "/_sim/log")["requests"]

    def scenario(self, **sc):
        sim_call(self.sim, "POST", "/_sim/scenarios", sc)

    def drafts(self, user):
        return [m for m in self.mailbox(user)["messages"] if m["folder"] == "drafts"]


def setup_env(httpd, simulator, db, pg=None, extra="MSOAuthEdition pro\n"):
    return Outbox(make_env(httpd, simulator, db, pg, extra=extra).s)


def connected(env, user=ADELE[0]):
    acc = env.connect(user)
    poll("the first sync", lambda: env.account(acc)["sync"]["phase"] == "idle", timeout=30)
    return acc


@pytest.fixture(params=["sqlite3", "pgsql"])
def env(request, httpd, simulator):
    if request.param == "pgsql":
        params, _ = request.getfixturevalue("pg_schema")
        e = setup_env(httpd, simulator, "pgsql", params)
    else:
        e = setup_env(httpd, simulator, "sqlite3")
    yield e
    log = httpd.log()
    assert not token_leaks(log, SECRET)


# --- sending --------------------------------------------------------------------------------

def test_send_text_and_html_to_named_recipients(env):
    acc = connected(env)
    t0 = time.time()
    a = env.queue(acc, to=[("chris@fabrikam.com", "Chris Customer"), "dana@fabrikam.com"],
                  cc=[("erin@fabrikam.com", "Erin")], bcc=["audit@contoso.com"],
                  subject="Your quote", body="Dear Chris,\nthe quote is attached.")
    b = env.queue(acc, to=["chris@fabrikam.com"], subject="HTML", body_type="html",
                  body="<p>Hello <b>Chris</b></p>")
    r = env.wait_state(a)
    # Picked up at once, not at the next sync interval (10 s).
    assert r["state"] == "sent" and time.time() - t0 < 6, r
    r, d = env.delivered_once(a)
    assert d["via"] == "send" and d["mailbox"] == ADELE[0] and d["sender"] == ADELE[0]
    assert d["to"] == ["chris@fabrikam.com", "dana@fabrikam.com"], d
    assert d["cc"] == ["erin@fabrikam.com"] and d["bcc"] == ["audit@contoso.com"]
    assert d["subject"] == "Your quote"
    assert r["internet_message_id"] == d["internetMessageId"] and r["internet_message_id"]
    assert int(r["sent_at"]) >= int(r["created_at"]) and r["attempts"] == "1"
    assert r["reason"] == "" and r["last_error"] == ""
    # Saved to Sent Items under the draft's (immutable) id, not a draft any more.
    m = sim_call(env.sim, "GET", f"/_sim/mailbox/{ADELE[0]}/messages/{d['message_id']}")
    assert m["folder"] == "sentitems" and m["isDraft"] is False
    assert m["toRecipients"][0]["emailAddress"] == {"name": "Chris Customer",
                                                    "address": "chris@fabrikam.com"}
    assert m["body"]["contentType"] == "text" and "the quote is attached" in m["body"]["content"]
    assert r["draft_id"] == d["message_id"]
    r2, d2 = env.delivered_once(env.wait_state(b)["id"])
    m2 = sim_call(env.sim, "GET", f"/_sim/mailbox/{ADELE[0]}/messages/{d2['message_id']}")
    assert m2["body"]["contentType"] == "html" and "<b>Chris</b>" in m2["body"]["content"]
    # One draft and one send per message, and no draft left behind.
    c = env.counters()
    assert c["drafts_created"] == 2 and c["sends"] == 2
    assert not env.drafts(ADELE[0])
    assert c["concurrency_violations"] == 0


def test_reply_stays_in_the_thread(env):
    orig = env.seed(ADELE[0], 1, subject_prefix="Question", **{})[0]
    sim_call(env.sim, "POST", f"/_sim/mailbox/{ADELE[0]}/messages/{orig['id']}",
             {"from": {"emailAddress": {"address": CUSTOMER[0], "name": CUSTOMER[1]}}})
    acc = connected(env)
    full = sim_call(env.sim, "GET", f"/_sim/mailbox/{ADELE[0]}/messages/{orig['id']}")
    # No recipients, subject or body of its own: Outlook's reply to the sender.
    a = env.queue(acc, to=None, subject=None, body=None, reply_to=orig["id"])
    # Its own body and recipients, in the same thread.
    b = env.queue(acc, to=[CUSTOMER, ("boss@fabrikam.com", "Boss")], subject=None,
                  body="<p>Answered, see below.</p>", body_type="html", reply_to=orig["id"])
    ra, da = env.delivered_once(env.wait_state(a)["id"])
    rb, db = env.delivered_once(env.wait_state(b)["id"])
    for d in (da, db):
        assert d["conversationId"] == full["conversationId"], d
        assert d["in_reply_to"] == full["internetMessageId"], d
        assert d["subject"] == "RE: " + full["subject"], d
    assert da["to"] == [CUSTOMER[0]] and db["to"] == [CUSTOMER[0], "boss@fabrikam.com"]
    mb = sim_call(env.sim, "GET", f"/_sim/mailbox/{ADELE[0]}/messages/{db['message_id']}")
    assert "Answered, see below." in mb["body"]["content"]
    ma = sim_call(env.sim, "GET", f"/_sim/mailbox/{ADELE[0]}/messages/{da['message_id']}")
    assert full["subject"] in ma["body"]["content"]        # Outlook's quote kept
    # Replies to one message go one after the other, in queue order.
    assert da["seq"] < db["seq"]


def test_reply_to_a_message_that_is_gone(httpd, simulator):
    env = setup_env(httpd, simulator, "sqlite3")
    orig = env.seed(ADELE[0], 1)[0]
    acc = connected(env)
    sim_call(env.sim, "DELETE", f"/_sim/mailbox/{ADELE[0]}/messages/{orig['id']}")
    a = env.queue(acc, to=None, body="late answer", reply_to=orig["id"])
    after = env.queue(acc, to=[CUSTOMER[0]], body="next")
    r = env.wait_state(a)
    assert r["state"] == "failed" and r["reason"] == "not_found", r
    assert "no longer exists" in r["last_error"]
    assert env.wait_state(after)["state"] == "sent"
    assert env.deliveries()["count"] == 1


def graph_writes(env):
    """Graph calls that write (token requests are not Graph's)."""
    return [e for e in env.log() if e["method"] in ("POST", "PUT", "PATCH", "DELETE")
            and (e["path"].startswith("/v1.0/") or "/api/v2.0/" in e["path"])]


def att(name, content, content_type="application/octet-stream", is_inline=False, cid=None):
    return {"name": name, "content": content, "content_type": content_type,
            "is_inline": is_inline, "content_id": cid}


def test_attachments_inline_regular_and_large(env):
    acc = connected(env)
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(2000)
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\x00\xff"
    big = os.urandom(5 * 1024 * 1024 + 123)           # over 3 MB: an upload session
    a = env.queue(acc, to=[CUSTOMER], subject="Quote with logo", body_type="html",
                  body='<p>Logo: <img src="cid:logo@erp"></p>',
                  attachments=[att("logo.png", png, "image/png", True, "logo@erp"),
                               att("quote.pdf", pdf, "application/pdf"),
                               att("data.bin", big)])
    r = env.wait_state(a, timeout=60)
    r, d = env.delivered_once(a)
    got = {x["name"]: x for x in d["attachments"]}
    assert set(got) == {"logo.png", "quote.pdf", "data.bin"}, got
    for name, data in (("logo.png", png), ("quote.pdf", pdf), ("data.bin", big)):
        assert got[name]["sha256"] == hashlib.sha256(data).hexdigest(), name
        assert got[name]["size"] == len(data)
    assert got["logo.png"]["isInline"] is True and got["logo.png"]["contentId"] == "logo@erp"
    assert got["logo.png"]["contentType"] == "image/png"
    assert got["quote.pdf"]["isInline"] is False and got["data.bin"]["isInline"] is False
    c = env.counters()
    assert c["uploads_completed"] == 1 and c["upload_bytes"] == len(big)
    # The big one went up in fragments of at most 4 MB, without the token.
    puts = [e for e in env.log() if e["method"] == "PUT"]
    assert len(puts) == 2, puts
    posts = [e for e in env.log() if e["method"] == "POST" and e["path"].endswith("/attachments")]
    assert len(posts) == 2
    (s,) = env.rows(f"SELECT COUNT(*) FROM msoauth_outbox_attachments WHERE outbox_id = {a} "
                    "AND phase = 'added' AND graph_id IS NOT NULL", "n")
    assert s["n"] == "3"


def test_a_long_upload_goes_on_across_passes(httpd, simulator):
    env = setup_env(httpd, simulator, "sqlite3")
    acc = connected(env)
    big = os.urandom(20 * 1024 * 1024)
    # Slow fragments: the upload outlasts a pass (1.5 s of new requests).
    sim_call(env.sim, "POST", "/_sim/config", {"latency_ms": 400})
    a = env.queue(acc, to=[CUSTOMER], attachments=[att("video.mp4", big, "video/mp4")])
    env.wait_state(a, timeout=90)
    _, d = env.delivered_once(a)
    assert [x["sha256"] for x in d["attachments"]] == [hashlib.sha256(big).hexdigest()]
    # One session, each byte sent once: the next pass went on where it stopped.
    log = env.log()
    assert len([e for e in log if e["path"].endswith("/createUploadSession")]) == 1
    puts = [e for e in log if e["method"] == "PUT"]
    assert len(puts) == 6 and env.counters()["upload_bytes"] == len(big), puts
    sim_call(env.sim, "POST", "/_sim/config", {"latency_ms": 0})


def test_checks_before_microsoft(env):
    acc = connected(env)
    before = len(graph_writes(env))
    cases = {
        "no recipient": dict(to=[]),
        "to_json is not a JSON array": dict(to="not json"),
        "recipient 2 has the address": dict(to=["a@b.com", "nobody"]),
        "501 recipients": dict(to=[f"r{i}@x.com" for i in range(300)],
                               cc=[f"c{i}@x.com" for i in range(201)]),
        "body_type must be text or html": dict(to=["a@b.com"], body_type="rtf"),
        "path separator": dict(to=["a@b.com"], attachments=[att("../etc/passwd", b"x")]),
        "content_type": dict(to=["a@b.com"], attachments=[att("a.txt", b"x", "text")]),
        "angle brackets": dict(to=["a@b.com"], attachments=[att("a.png", b"x", "image/png",
                                                                 True, "<logo>")]),
        "has no name": dict(to=["a@b.com"], attachments=[att(None, b"x")]),
        "reply_to_graph_id": dict(to=["a@b.com"], reply_to="not an id!"),
    }
    ids = {k: env.queue(acc, subject=k, **v) for k, v in cases.items()}
    ok = env.queue(acc, to=["a@b.com"], subject="fine")
    for want, oid in ids.items():
        r = env.wait_state(oid)
        assert r["state"] == "failed" and r["reason"] == "bad_request", (want, r)
        assert want in r["last_error"], (want, r["last_error"])
        assert r["attempts"] == "0" and not r["marker"]
    assert env.wait_state(ok)["state"] == "sent"
    # Nothing of the refused rows reached Graph: one draft and one send in all.
    writes = graph_writes(env)[before:]
    assert len(writes) == 2, writes
    assert env.deliveries()["count"] == 1


def test_graph_refusals_give_reasons_and_leave_no_draft(httpd, simulator):
    env = setup_env(httpd, simulator, "sqlite3")
    acc = connected(env)
    # The tenant takes smaller messages than Graph's 150 MB.
    sim_call(env.sim, "POST", "/_sim/config", {"max_message_size": 1024 * 1024})
    big = env.queue(acc, to=[CUSTOMER], attachments=[att("big.bin", os.urandom(1500000))])
    r = env.wait_state(big)
    assert r["state"] == "failed" and r["reason"] == "bad_request", r
    assert "ErrorMessageSizeExceeded" in r["last_error"], r
    # Graph refuses the send itself: the draft is removed again.
    env.scenario(endpoint="graph", status=400, code="ErrorInvalidRecipients",
                 message="At least one recipient isn't valid.", times=1,
                 match={"path": "/send"})
    bad = env.queue(acc, to=["x@nowhere.invalid"])
    r = env.wait_state(bad)
    assert r["state"] == "failed" and r["reason"] == "bad_request", r
    assert "ErrorInvalidRecipients" in r["last_error"]
    poll("the drafts to be gone", lambda: not env.drafts(ADELE[0]), timeout=10)
    assert env.deliveries()["count"] == 0


def test_basic_edition_sends_nothing(httpd, simulator):
    env = setup_env(httpd, simulator, "sqlite3", extra="")      # default company: basic
    acc = connected(env)
    a = env.queue(acc, to=[CUSTOMER], subject="from basic")
    b = env.queue(acc, to=[CUSTOMER], attachments=[att("a.txt", b"x", "text/plain")])
    for x in (a, b):
        r = env.wait_state(x)
        assert r["state"] == "failed" and r["reason"] == "send_not_permitted", r
        assert "Mail.Send" in r["last_error"] and "MSOAuthEdition pro" in r["last_error"]
    assert env.deliveries()["count"] == 0
    assert not graph_writes(env)
    a = env.account(acc)["outbox"]
    assert a["failed"] == 2 and a["queued"] == 0
    assert a["last_failure"]["reason"] == "send_not_permitted" and a["last_failure"]["fix"]


def test_grant_without_mail_send_and_graph_refusing_to_send(httpd, simulator):
    env = setup_env(httpd, simulator, "sqlite3")
    acc = connected(env)
    # A pro grant from before Mail.Send was asked for: nothing goes to Graph.
    (s,) = env.rows(f"SELECT scopes FROM msoauth_accounts WHERE id = {acc}", "scopes")
    assert "Mail.Send" in s["scopes"]
    env.script(f"UPDATE msoauth_accounts SET scopes = "
               f"{sql_text(s['scopes'].replace('Mail.Send', ''))} WHERE id = {acc};")
    a = env.queue(acc, to=[CUSTOMER])
    r = env.wait_state(a)
    assert r["state"] == "failed" and r["reason"] == "send_not_permitted", r
    assert not graph_writes(env)
    env.script(f"UPDATE msoauth_accounts SET scopes = {sql_text(s['scopes'])} WHERE id = {acc};")
    # Graph says no (the consent was revoked meanwhile): the same reason.
    env.scenario(endpoint="graph", status=403, code="ErrorAccessDenied",
                 message="Access is denied.", times=1, match={"path": "/send"})
    b = env.queue(acc, to=[CUSTOMER])
    r = env.wait_state(b)
    assert r["state"] == "failed" and r["reason"] == "send_not_permitted", r
    assert "403" in r["last_error"]
    poll("the draft to be gone", lambda: not env.drafts(ADELE[0]), timeout=10)
    assert env.deliveries()["count"] == 0


def test_throttled_sends_wait_for_retry_after(httpd, simulator):
    env = setup_env(httpd, simulator, "sqlite3")
    acc = connected(env)
    env.scenario(endpoint="graph", status=429, retry_after=4, times=1,
                 match={"path": "/send"})
    t0 = time.time()
    a = env.queue(acc, to=[CUSTOMER])
    poll("the 429", lambda: [e for e in env.log() if e["status"] == 429], timeout=10, every=0.1)
    r = env.row(a)
    assert r["state"] == "queued" and "429" in r["last_error"], r
    assert env.account(acc)["sync"]["phase"] == "throttled"
    r = env.wait_state(a, timeout=30)
    assert r["state"] == "sent" and time.time() - t0 >= 4
    sends = [e for e in env.log() if e["path"].endswith("/send")]
    assert [e["status"] for e in sends] == [429, 202], sends
    assert sends[1]["t"] - sends[0]["t"] >= 4 - 0.5
    env.delivered_once(a)
    c = env.counters()
    assert c["drafts_created"] == 1 and c["concurrency_violations"] == 0


def test_outage_then_recovery_sends_each_once(env):
    acc = connected(env)
    env.scenario(endpoint="graph", status=503, times=-1, match={"path": "/messages"})
    ids = [env.queue(acc, to=[CUSTOMER], subject=f"during outage {i}") for i in range(3)]
    poll("an attempt", lambda: env.row(ids[0])["last_error"], timeout=15)
    time.sleep(2)
    for x in ids:
        r = env.row(x)
        assert r["state"] == "queued", r
    acct = env.account(acc)
    assert acct["outbox"]["queued"] == 3 and acct["outbox"]["oldest_queued_age"] >= 2
    sim_call(env.sim, "DELETE", "/_sim/scenarios")
    env.sync_now(acc)           # drops the backoff: Graph is back
    for x in ids:
        assert env.wait_state(x, timeout=60)["state"] == "sent"
        env.delivered_once(x)
    assert not env.drafts(ADELE[0])


# --- exactly once: crashes, restarts and cuts at the worst moment ------------------------------

def interrupted(env, path, interrupt, method="POST", seen=None, **fault):
    """Graph carries out the first matching call, then the answer is lost
    (the process goes away meanwhile, or the connection is cut): the row must
    end sent, delivered exactly once, with no draft left over."""
    acc = connected(env)
    env.scenario(endpoint="graph", times=1, match={"path": path, "method": method}, **fault)
    a = env.queue(acc, to=[CUSTOMER], subject="worst moment",
                  attachments=[att("a.txt", b"attached once", "text/plain")])
    poll("the call to reach Graph", seen or (lambda: env.counters()["sends"]), timeout=20,
         every=0.05)
    if interrupt:
        interrupt(env)
    r = env.wait_state(a, timeout=90)
    assert r["state"] == "sent", r
    r, d = env.delivered_once(a)
    assert [x["name"] for x in d["attachments"]] == ["a.txt"], d["attachments"]
    c = env.counters()
    assert c["sends"] == 1 and c["drafts_created"] == 1, c
    assert not env.drafts(ADELE[0])
    return r, c


def module_sends(env):
    """The module's send calls: curl repeats a POST on its own (same
    client-request-id) when a reused connection closes without an answer."""
    return {e["client_request_id"] for e in env.log() if e["path"].endswith("/send")}


def test_kill_9_after_graph_sent_before_commit(env):
    interrupted(env, "/send", kill_everything, hang_after=5)
    # Not sent again: the look at the draft found it sent.
    assert len(module_sends(env)) == 1


def test_kill_9_after_the_draft_was_made(env):
    interrupted(env, "/v1.0/me/messages", kill_everything, hang_after=5,
                seen=lambda: env.counters()["drafts_created"])
    # The draft was found by its marker, not made again.


def test_graceful_restart_while_sending(env):
    interrupted(env, "/send", lambda e: e.h.graceful(), hang_after=3)


@pytest.mark.parametrize("how", ["kill_9", "graceful"])
def test_interrupted_in_the_middle_of_a_batch(env, how):
    """Many rows of one mailbox in flight (steps written in groups, rows
    marked ahead of their create calls, sent rows not yet written as sent)
    when the processes go away: every row ends sent, each marker delivered
    exactly once, each row's draft made and sent once."""
    acc = connected(env)
    sim_call(env.sim, "POST", "/_sim/config", {"latency_ms": 150})
    n = 40
    lines = ["BEGIN;"] + [
        "INSERT INTO msoauth_outbox (account_id, to_json, subject, body) VALUES "
        f"({acc}, '[{{\"address\":\"c{i}@fabrikam.com\"}}]', 'batch {i}', 'b{i}');"
        for i in range(n)] + ["COMMIT;"]
    env.script("\n".join(lines) + "\n")
    poll("some deliveries", lambda: env.deliveries()["count"] >= 6, timeout=30, every=0.05)
    at_cut = env.deliveries()["count"]
    if how == "kill_9":
        kill_everything(env)
    else:
        env.h.graceful()
    assert at_cut < n, "all sent before the interruption: the test proves nothing"
    poll("every row sent", lambda: env.rows(
        f"SELECT COUNT(*) FROM msoauth_outbox WHERE account_id = {acc} AND state = 'queued'",
        "n")[0]["n"] == "0", timeout=120, every=0.5)
    rows = env.rows(f"SELECT state, marker, attempts FROM msoauth_outbox WHERE account_id = "
                    f"{acc}", "state, marker, attempts")
    assert len(rows) == n and all(r["state"] == "sent" for r in rows), rows
    d = env.deliveries()
    assert d["count"] == n, d["count"]
    assert all(d["by_marker"].get(r["marker"]) == 1 for r in rows), d["by_marker"]
    c = env.counters()
    assert c["sends"] == n and c["drafts_created"] == n, c
    assert c["concurrency_violations"] == 0
    assert not env.drafts(ADELE[0])
    sim_call(env.sim, "POST", "/_sim/config", {"latency_ms": 0})


@pytest.mark.parametrize("fault", [{"drop_after": True}, {"hang_after": 0.3, "status": 504}],
                         ids=["cut", "504"])
def test_answer_lost_after_send(httpd, simulator, fault):
    env = setup_env(httpd, simulator, "sqlite3")
    r, _ = interrupted(env, "/send", None, **fault)
    assert int(r["attempts"]) == 1
    assert len(module_sends(env)) == 1


def test_answer_lost_after_create_and_attach(httpd, simulator):
    env = setup_env(httpd, simulator, "sqlite3")
    interrupted(env, "/v1.0/me/messages", None, drop_after=True,
                seen=lambda: env.counters()["drafts_created"])
    # The attachment's answer lost too: found in the draft's list, not added twice.
    env2 = env
    env2.scenario(endpoint="graph", times=1, drop_after=True,
                  match={"path": "/attachments", "method": "POST"})
    acc = int(env2.rows("SELECT MAX(account_id) FROM msoauth_outbox", "a")[0]["a"])
    b = env2.queue(acc, to=[CUSTOMER], attachments=[att("b.txt", b"once", "text/plain"),
                                                    att("b.txt", b"same name", "text/plain")])
    env2.wait_state(b, timeout=60)
    _, d = env2.delivered_once(b)
    assert sorted(x["sha256"] for x in d["attachments"]) == sorted(
        hashlib.sha256(x).hexdigest() for x in (b"once", b"same name")), d["attachments"]


def test_answer_lost_after_the_last_upload_fragment(httpd, simulator):
    env = setup_env(httpd, simulator, "sqlite3")
    acc = connected(env)
    big = os.urandom(4 * 1024 * 1024)
    env.scenario(endpoint="graph", times=1, drop_after=True,
                 match={"path": "AttachmentSessions", "method": "PUT"})
    # The first fragment's answer is lost: the upload starts again.
    a = env.queue(acc, to=[CUSTOMER], attachments=[att("big.bin", big)])
    env.wait_state(a, timeout=90)
    _, d = env.delivered_once(a)
    assert [x["sha256"] for x in d["attachments"]] == [hashlib.sha256(big).hexdigest()]
    # ... and the last one's: the attachment is found on the draft.
    env.scenario(endpoint="graph", times=1, drop_after=True,
                 match={"path": "AttachmentSessions", "method": "PUT"})
    sim_call(env.sim, "POST", "/_sim/scenarios", {"endpoint": "graph", "times": 1,
                                                  "match": {"path": "AttachmentSessions",
                                                            "method": "PUT"}})
    b = env.queue(acc, to=[CUSTOMER], attachments=[att("big2.bin", big)])
    env.wait_state(b, timeout=90)
    _, d = env.delivered_once(b)
    assert [x["name"] for x in d["attachments"]] == ["big2.bin"]


def test_two_nodes_send_200_once(httpd, simulator, pg_schema):
    params, nodes = pg_schema
    env = setup_env(httpd, simulator, "pgsql", params)
    env2 = Outbox(second_node(env.s, nodes))
    a = connected(env, ADELE[0])
    m = connected(env2, MEGAN[0])
    sim_call(env.sim, "POST", "/_sim/config", {"latency_ms": 30})
    lines = ["BEGIN;"]
    for acc in (a, m):
        for i in range(100):
            lines.append("INSERT INTO msoauth_outbox (account_id, to_json, subject, body) VALUES "
                         f"({acc}, '[{{\"address\":\"c{i}@fabrikam.com\"}}]', 'm{i}', 'b{i}');")
    lines.append("COMMIT;")
    env.script("\n".join(lines))
    poll("every row sent", lambda: env.rows("SELECT COUNT(*) FROM msoauth_outbox WHERE "
                                            "state = 'queued'", "n")[0]["n"] == "0",
         timeout=120, every=0.5)
    states = env.rows("SELECT state, COUNT(*) FROM msoauth_outbox GROUP BY state", "state, n")
    assert states == [{"state": "sent", "n": "200"}], states
    d = env.deliveries()
    markers = [r["marker"] for r in env.rows("SELECT marker FROM msoauth_outbox", "marker")]
    assert d["count"] == 200 and all(d["by_marker"].get(x) == 1 for x in markers)
    c = env.counters()
    assert c["drafts_created"] == 200 and c["sends"] == 200
    assert c["concurrency_violations"] == 0
    # Both nodes took part (whichever held a mailbox's lease sent its mail).
    owners = {l.split("lease owner ")[1].split(")")[0] for h in nodes for l in h.log().splitlines()
              if "job started in pid" in l}
    assert len(owners) >= 2


# --- status ---------------------------------------------------------------------------------

def test_sent_mail_in_the_mirror_and_on_the_status_page(httpd, simulator):
    env = setup_env(httpd, simulator, "sqlite3",
                    extra="MSOAuthEdition pro\nMSOAuthSyncFolders inbox sentitems\n")
    acc = connected(env)
    a = env.queue(acc, to=[CUSTOMER], subject="Mirrored")
    r, d = env.delivered_once(env.wait_state(a)["id"])
    row = poll("the sent message in the mirror", lambda: env.rows(
        f"SELECT folder, subject, internet_message_id FROM msoauth_messages WHERE account_id = "
        f"{acc} AND graph_id = '{d['message_id']}'", "folder, subject, imid"), timeout=20)
    assert row == [{"folder": "sentitems", "subject": "Mirrored",
                    "imid": r["internet_message_id"]}], row
    # Queued and failed outgoing mail per account, in JSON and on the page.
    env.scenario(endpoint="graph", status=503, times=-1, match={"path": "/messages"})
    env.queue(acc, to=[CUSTOMER], subject="waiting")
    env.queue(acc, to="garbage", subject="broken")
    poll("the failure", lambda: env.account(acc)["outbox"]["failed"] == 1, timeout=15)
    o = env.account(acc)["outbox"]
    assert o["queued"] == 1 and o["sent"] == 1, o
    assert o["last_failure"]["reason"] == "bad_request" and "to_json" in \
        o["last_failure"]["last_error"]
    page = env.s.browser.get(f"{env.h.url}/microsoft_outlook/admin")
    assert "<th>Outbox</th>" in page.text and "1 queued" in page.text
    assert "1 failed (last: bad_request)" in page.text
    sim_call(env.sim, "DELETE", "/_sim/scenarios")
