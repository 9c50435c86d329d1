"""Mirroring mail: the job's Graph delta sync against the simulator, with a real
httpd, on SQLite and PostgreSQL. Every test ends by comparing the mirror with
the simulator's mailbox, message by message."""
import os
import signal
import time

import pytest

from conftest import sim_call, token_leaks
from test_job import ADMIN, admin_post, get_json
from test_nodes import alive, pg_schema, poll, second_node  # noqa: F401 (fixture)
from test_signin import ADELE, MEGAN, SECRET, Setup

MSG_COLS = "graph_id, folder, subject, is_read, removed, received_at"


class Env:
    def __init__(self, s):
        self.s = s
        self.sim = s.sim
        self.h = s.h

    def connect(self, mailbox, company=None):
        params = {"mailbox": mailbox, "return_to": "/a"}
        if company:
            params["company"] = company
        _, _, r3 = self.s.sign_in(**params)
        assert r3 is not None and r3.query().get("msoauth") == "connected", (
            r3.location if r3 else None, self.h.log()[-3000:])
        return int(r3.query()["account"])

    def rows(self, sql, cols):
        return self.s.rows(sql, cols)

    def mirror(self, acc, visible_only=True):
        where = f"account_id = {int(acc)}" + (" AND removed = 0" if visible_only else "")
        return self.rows(f"SELECT {MSG_COLS} FROM msoauth_messages WHERE {where}", MSG_COLS)

    def count(self, acc):
        (r,) = self.rows(f"SELECT COUNT(*) FROM msoauth_messages WHERE account_id = {int(acc)} "
                         "AND removed = 0", "n")
        return int(r["n"])

    def mailbox(self, user):
        return sim_call(self.sim, "GET", f"/_sim/mailbox/{user}")

    def seed(self, user, count, folder="inbox", **kw):
        return sim_call(self.sim, "POST", f"/_sim/mailbox/{user}/messages",
                        dict({"folder": folder, "count": count}, **kw))["messages"]

    def account(self, acc):
        status, body = get_json(self.s, f"/microsoft_outlook/admin/accounts/{acc}")
        assert status == 200, body
        return body

    def sync_now(self, acc):
        status, body = admin_post(self.s, f"/microsoft_outlook/admin/accounts/{acc}/sync")
        assert status == 202 and body["sync"] == "scheduled", body
        return body

    def delta_requests(self):
        return [e for e in sim_call(self.sim, "GET", "/_sim/log")["requests"]
                if "/messages/delta" in e["path"]]

    def assert_converged(self, acc, user, folders=("inbox",), timeout=60):
        """The visible mirror is exactly the mailbox's mirrored folders: same ids,
        folders, subjects and read flags; no row twice."""
        def expected():
            return {m["id"]: m for m in self.mailbox(user)["messages"] if m["folder"] in folders}

        def same():
            want = expected()
            rows = self.mirror(acc)
            got = {r["graph_id"]: r for r in rows}
            if len(rows) != len(got) or set(got) != set(want):
                return False
            return all(got[i]["folder"] == want[i]["folder"]
                       and got[i]["subject"] == want[i]["subject"]
                       and int(got[i]["is_read"]) == int(bool(want[i]["isRead"]))
                       for i in want)

        try:
            poll("the mirror to match the mailbox", same, timeout=timeout, every=0.5)
        except AssertionError:
            want = expected()
            got = {r["graph_id"]: r for r in self.mirror(acc)}
            raise AssertionError(
                f"mirror {len(got)} rows vs mailbox {len(want)}; missing "
                f"{len(set(want) - set(got))}, extra {len(set(got) - set(want))}; "
                f"account {self.account(acc)}\n{self.h.log()[-3000:]}")
        return expected()


def make_env(httpd, simulator, db, pg=None, extra=""):
    s = Setup(httpd, simulator, db=db, pg_params=pg,
              extra=ADMIN + "MSOAuthSyncInterval 10\n" + extra)
    s.wait_schema()
    return Env(s)


@pytest.fixture(params=["sqlite3", "pgsql"])
def env(request, httpd, simulator):
    if request.param == "pgsql":
        params, _ = request.getfixturevalue("pg_schema")
        e = make_env(httpd, simulator, "pgsql", params)
    else:
        e = make_env(httpd, simulator, "sqlite3")
    yield e
    log = httpd.log()
    assert not token_leaks(log, SECRET)


# --- the initial round ------------------------------------------------------------------

def test_newest_first_then_history_converges_exactly(env):
    seeded = env.seed(ADELE[0], 5000, unread_every=3)
    assert len(seeded) == 5000
    newest_first = [m["id"] for m in sorted(env.mailbox(ADELE[0])["messages"],
                                            key=lambda m: m["receivedDateTime"], reverse=True)]
    # Slow pages, so the round can be watched while it runs.
    sim_call(env.sim, "POST", "/_sim/config", {"latency_ms": 60})
    acc = env.connect(ADELE[0])
    first = poll("the first page", lambda: env.mirror(acc), timeout=20, every=0.05)
    # Whatever has landed so far is exactly the newest messages: newest first.
    got = {r["graph_id"] for r in first}
    assert got == set(newest_first[:len(got)]), len(got)
    assert len(got) < 5000
    # The newest 50 are queryable from the first page on.
    assert set(newest_first[:50]) <= got
    phase = env.account(acc)["sync"]["phase"]
    assert phase in ("initial", "backfill"), phase
    sim_call(env.sim, "POST", "/_sim/config", {"latency_ms": 0})
    env.assert_converged(acc, ADELE[0], timeout=120)
    assert env.count(acc) == 5000
    a = poll("the account to be idle", lambda: (lambda a: a if a["sync"]["phase"] == "idle"
                                                else None)(env.account(acc)), timeout=20)
    assert a["messages"] == 5000 and a["last_sync_at"] > 0 and a["sync"]["last_error"] is None
    # Every page was asked for once: no skiptoken twice.
    skips = [e["query"] for e in env.delta_requests() if "skiptoken" in e["query"]]
    assert len(skips) == len(set(skips)) and len(skips) >= 49
    # Immutable ids and a page size cap on every request.
    for e in env.delta_requests():
        assert 'IdType="ImmutableId"' in (e.get("prefer") or ""), e
        assert "odata.maxpagesize=100" in (e.get("prefer") or ""), e
    # Fields of the mirror rows, spot-checked against Graph's representation.
    (r,) = env.rows(f"SELECT subject, from_address, to_json, body_type, body, web_link, "
                    f"has_attachments, importance, internet_message_id FROM msoauth_messages "
                    f"WHERE account_id = {acc} AND graph_id = '{newest_first[0]}'",
                    "subject, from_address, to_json, body_type, body, web_link, att, imp, imid")
    assert r["subject"] and "@" in r["from_address"] and ADELE[0] in r["to_json"]
    assert r["body_type"] == "html" and "<p>" in r["body"] and r["web_link"].startswith("https://")


def test_changes_in_outlook_arrive(env):
    env.seed(ADELE[0], 120)
    acc = env.connect(ADELE[0])
    box = env.assert_converged(acc, ADELE[0])
    ids = sorted(box)
    # In Outlook: two new messages, one read, one unread, one deleted, one
    # moved out of the mirrored folder.
    env.seed(ADELE[0], 2, subject_prefix="Fresh")
    sim_call(env.sim, "POST", f"/_sim/mailbox/{ADELE[0]}/messages/{ids[0]}", {"isRead": True})
    sim_call(env.sim, "POST", f"/_sim/mailbox/{ADELE[0]}/messages/{ids[1]}", {"isRead": False})
    sim_call(env.sim, "DELETE", f"/_sim/mailbox/{ADELE[0]}/messages/{ids[2]}")
    sim_call(env.sim, "POST", f"/_sim/mailbox/{ADELE[0]}/messages/{ids[3]}",
             {"move_to": "archive"})
    before = len(env.delta_requests())
    env.sync_now(acc)
    env.assert_converged(acc, ADELE[0], timeout=30)
    rows = {r["graph_id"]: r for r in env.mirror(acc, visible_only=False)}
    assert rows[ids[2]]["removed"] == "1" and rows[ids[3]]["removed"] == "1"
    assert int(rows[ids[0]]["is_read"]) == 1 and int(rows[ids[1]]["is_read"]) == 0
    # An incremental round: from the stored deltaLink, not a full one.
    later = env.delta_requests()[before:]
    assert later and all("deltatoken" in e["query"] or "skiptoken" in e["query"] for e in later)
    # Nothing happens without being asked: the interval (10 s) brings the next round.
    env.seed(ADELE[0], 1, subject_prefix="Scheduled")
    env.assert_converged(acc, ADELE[0], timeout=30)


def test_replays_and_partial_updates_are_harmless(httpd, simulator):
    env = make_env(httpd, simulator, "sqlite3")
    env.seed(ADELE[0], 30)
    acc = env.connect(ADELE[0])
    env.assert_converged(acc, ADELE[0])
    # The next round repeats the 5 newest messages (Graph may do that).
    sim_call(env.sim, "POST", "/_sim/scenarios", {"endpoint": "graph", "action": "replay",
                                                  "count": 5, "match": {"path": "delta"}})
    ids = sorted(env.mailbox(ADELE[0])["messages"], key=lambda m: m["id"])
    sim_call(env.sim, "POST", f"/_sim/mailbox/{ADELE[0]}/messages/{ids[5]['id']}",
             {"isRead": not ids[5]["isRead"]})
    env.sync_now(acc)
    env.assert_converged(acc, ADELE[0])
    assert env.count(acc) == 30
    (r,) = env.rows(f"SELECT subject FROM msoauth_messages WHERE account_id = {acc} AND "
                    f"graph_id = '{ids[5]['id']}'", "subject")
    assert r["subject"] == ids[5]["subject"]     # a partial update kept the rest


# --- resync, throttling, auth -----------------------------------------------------------

@pytest.mark.parametrize("mode", ["gone", "syncStateNotFound"])
def test_expired_delta_token_restarts_and_converges(httpd, simulator, mode):
    env = make_env(httpd, simulator, "sqlite3")
    env.seed(ADELE[0], 250)
    acc = env.connect(ADELE[0])
    box = env.assert_converged(acc, ADELE[0])
    ids = sorted(box)
    # Changes the mirror can only learn from a full round: a purge while the
    # delta token is dead, and new mail.
    sim_call(env.sim, "POST", "/_sim/delta/expire", {"user": ADELE[0], "mode": mode})
    for i in ids[:7]:
        sim_call(env.sim, "DELETE", f"/_sim/mailbox/{ADELE[0]}/messages/{i}")
    sim_call(env.sim, "POST", "/_sim/delta/expire", {"user": ADELE[0], "mode": mode})
    env.seed(ADELE[0], 3, subject_prefix="After")
    env.sync_now(acc)
    env.assert_converged(acc, ADELE[0], timeout=40)
    (f,) = env.rows(f"SELECT resyncs, phase FROM msoauth_sync_folders WHERE account_id = {acc}",
                    "resyncs, phase")
    assert int(f["resyncs"]) >= 1 and f["phase"] == "idle"
    gone = env.rows(f"SELECT graph_id FROM msoauth_messages WHERE account_id = {acc} "
                    "AND removed = 1", "graph_id")
    assert {r["graph_id"] for r in gone} >= set(ids[:7])
    assert "starts a full sync again" in env.h.log()


def test_throttling_waits_for_retry_after_and_others_go_on(env):
    env.seed(ADELE[0], 400)
    env.seed(MEGAN[0], 400)
    # Adele's mailbox answers its first delta request with 429, Retry-After: 6.
    sim_call(env.sim, "POST", "/_sim/scenarios", {"endpoint": "graph", "status": 429,
                                                  "retry_after": 6, "times": 1,
                                                  "match": {"path": "delta",
                                                            "user": ADELE[0]}})
    a = env.connect(ADELE[0])
    m = env.connect(MEGAN[0])
    t429 = poll("the 429", lambda: next((e["t"] for e in env.delta_requests()
                                         if e["status"] == 429), None), timeout=10, every=0.05)
    # Adele's mailbox shows it waits (the job records that when the pass ends, a
    # moment after the 429 went out), for the 6 seconds it was told ...
    poll("Adele's mailbox shown as throttled",
         lambda: env.account(a)["sync"]["phase"] == "throttled",
         timeout=max(0.5, t429 + 5 - time.time()), every=0.05)
    # ... while Megan's mailbox syncs.
    env.assert_converged(m, MEGAN[0], timeout=40)
    while time.time() < t429 + 5.5:
        assert env.count(a) == 0, "Adele's mailbox was asked again before Retry-After"
        time.sleep(0.2)
    env.assert_converged(a, ADELE[0], timeout=60)
    assert len([e for e in env.delta_requests() if e["status"] == 429]) == 1
    c = sim_call(env.sim, "GET", "/_sim/counters")
    assert c["concurrency_violations"] == 0 and c["max_inflight"] <= 4


def test_throttled_phase_is_shown(httpd, simulator):
    env = make_env(httpd, simulator, "sqlite3")
    env.seed(ADELE[0], 20)
    sim_call(env.sim, "POST", "/_sim/scenarios", {"endpoint": "graph", "status": 503,
                                                  "retry_after": 30, "times": 1,
                                                  "match": {"path": "delta"}})
    acc = env.connect(ADELE[0])
    a = poll("the throttled phase", lambda: (lambda a: a if a["sync"]["phase"] == "throttled"
                                             else None)(env.account(acc)), timeout=15)
    assert a["sync"]["retry_at"] >= time.time() + 20 and "503" in a["sync"]["last_error"]
    # "Sync now" does not jump the queue Microsoft asked for.
    env.sync_now(acc)
    time.sleep(3)
    assert env.count(acc) == 0
    status, page = 200, env.s.browser.get(f"{env.h.url}/microsoft_outlook/admin")
    assert page.status == 200 and "throttled" in page.text


def test_unauthorized_refreshes_once_and_retries(httpd, simulator):
    env = make_env(httpd, simulator, "sqlite3")
    env.seed(ADELE[0], 20)
    acc = env.connect(ADELE[0])
    env.assert_converged(acc, ADELE[0])
    grants = sim_call(env.sim, "GET", "/_sim/counters")["token_grants"].get("refresh_token", 0)
    # Microsoft invalidates the access token early; the module still thinks it good.
    sim_call(env.sim, "POST", "/_sim/tokens/expire", {"user": ADELE[0], "kinds": ["access"]})
    env.seed(ADELE[0], 2, subject_prefix="After401")
    env.sync_now(acc)
    env.assert_converged(acc, ADELE[0], timeout=30)
    c = sim_call(env.sim, "GET", "/_sim/counters")
    assert c["token_grants"].get("refresh_token", 0) == grants + 1
    statuses = [e["status"] for e in env.delta_requests()]
    assert 401 in statuses
    a = env.account(acc)
    assert a["state"] == "connected" and a["sync"]["last_error"] is None


def test_admin_page_shows_counts(httpd, simulator):
    env = make_env(httpd, simulator, "sqlite3")
    env.seed(ADELE[0], 42)
    acc = env.connect(ADELE[0])
    env.assert_converged(acc, ADELE[0])
    status, model = get_json(env.s, "/microsoft_outlook/admin")
    (a,) = [x for x in model["accounts"] if x["id"] == acc]
    assert a["messages"] == 42 and a["actions"]["queued"] == 0
    page = env.s.browser.get(f"{env.h.url}/microsoft_outlook/admin")
    assert "<th>Messages</th>" in page.text and "<td>42</td>" in page.text
    status, body = admin_post(env.s, "/microsoft_outlook/admin/accounts/99999/sync")
    assert status == 404


# --- crashes and restarts during the initial round ---------------------------------------

def interrupted(env, interrupt):
    env.seed(ADELE[0], 3000)
    sim_call(env.sim, "POST", "/_sim/config", {"latency_ms": 40})
    acc = env.connect(ADELE[0])
    poll("a third of the history", lambda: env.count(acc) >= 1000, timeout=60, every=0.1)
    interrupt(env)
    sim_call(env.sim, "POST", "/_sim/config", {"latency_ms": 0})
    env.assert_converged(acc, ADELE[0], timeout=120)
    assert env.count(acc) == 3000
    (n,) = env.rows(f"SELECT COUNT(*) FROM msoauth_messages WHERE account_id = {acc}", "n")
    assert int(n["n"]) == 3000           # not a row twice, none left behind
    # A page is fetched again only if it was in flight when the process died.
    skips = [e["query"] for e in env.delta_requests() if "skiptoken" in e["query"]]
    assert len(skips) - len(set(skips)) <= 1, len(skips) - len(set(skips))


def kill_everything(env):
    pids = [env.h.pid()] + env.h.children()
    for p in pids:
        os.kill(p, signal.SIGKILL)
    poll("httpd to die", lambda: not any(alive(p) for p in pids), timeout=10)
    (env.h.root / "run" / "httpd.pid").unlink(missing_ok=True)
    env.h.start()


def test_kill_9_during_initial_round(env):
    interrupted(env, kill_everything)


def test_graceful_restart_during_initial_round(env):
    interrupted(env, lambda e: e.h.graceful())


# --- two nodes ----------------------------------------------------------------------------

def test_two_nodes_mirror_without_duplicates(httpd, simulator, pg_schema):
    params, nodes = pg_schema
    env = make_env(httpd, simulator, "pgsql", params)
    s2 = second_node(env.s, nodes)
    env2 = Env(s2)
    env.seed(ADELE[0], 1500)
    env.seed(MEGAN[0], 1500)
    sim_call(env.sim, "POST", "/_sim/config", {"latency_ms": 20})
    a = env.connect(ADELE[0])
    m = env2.connect(MEGAN[0])
    env.assert_converged(a, ADELE[0], timeout=120)
    env.assert_converged(m, MEGAN[0], timeout=120)
    (n,) = env.rows("SELECT COUNT(*) FROM msoauth_messages", "n")
    assert int(n["n"]) == 3000
    skips = [e["query"] for e in env.delta_requests() if "skiptoken" in e["query"]]
    assert len(skips) == len(set(skips))
    c = sim_call(env.sim, "GET", "/_sim/counters")
    assert c["concurrency_violations"] == 0
    # Both nodes' jobs ran; changes keep arriving whichever node holds the mailbox.
    env.seed(ADELE[0], 5, subject_prefix="Two")
    env.sync_now(a)
    env.assert_converged(a, ADELE[0], timeout=30)
