"""Write-back: the app queues rows in msoauth_actions, the job applies them to
Outlook through Graph exactly once, and the mirror follows. A real httpd, the
simulator (which counts every write, and every write that changed something),
SQLite and PostgreSQL."""
import time

import pytest

from conftest import psql, sim_call, token_leaks
from test_nodes import pg_schema, poll, second_node  # noqa: F401 (fixture)
from test_signin import ADELE, MEGAN, SECRET
from test_sync import Env, kill_everything, make_env

ACT_COLS = "id, graph_id, action, destination, state, attempts, last_error, reason"


class Actions(Env):
    def execute(self, sql):
        if self.s.db == "pgsql":
            psql(self.s.pg, sql)
        else:
            from test_database import SQLiteDB
            SQLiteDB(self.h.root / "data" / "msoauth.db").query(sql)

    def queue(self, acc, graph_id, action, destination=None):
        dest = f"'{destination}'" if destination else "NULL"
        self.execute("INSERT INTO msoauth_actions (account_id, graph_id, action, destination) "
                     f"VALUES ({int(acc)}, '{graph_id}', '{action}', {dest})")
        (r,) = self.rows(f"SELECT MAX(id) FROM msoauth_actions WHERE account_id = {int(acc)}",
                         "id")
        return int(r["id"])

    def action(self, action_id):
        (r,) = self.rows(f"SELECT {ACT_COLS} FROM msoauth_actions WHERE id = {int(action_id)}",
                         ACT_COLS)
        return r

    def wait_state(self, action_id, states=("done", "failed"), timeout=30):
        return poll(f"action {action_id} to finish",
                    lambda: (lambda r: r if r["state"] in states else None)(
                        self.action(action_id)), timeout=timeout, every=0.2)

    def message(self, user, graph_id):
        return next(m for m in self.mailbox(user)["messages"] if m["id"] == graph_id)

    def row(self, acc, graph_id):
        (r,) = self.rows(f"SELECT folder, is_read, removed FROM msoauth_messages WHERE "
                         f"account_id = {int(acc)} AND graph_id = '{graph_id}'",
                         "folder, is_read, removed")
        return r

    def counters(self):
        return sim_call(self.sim, "GET", "/_sim/counters")


def setup_env(httpd, simulator, db, pg=None, folders="inbox deleteditems"):
    e = make_env(httpd, simulator, db, pg, extra=f"MSOAuthSyncFolders {folders}\n"
                                                 "MSOAuthEdition pro\n")
    return Actions(e.s)


def connected(env, user=ADELE[0], count=12, company=None):
    env.seed(user, count, unread_every=1)       # all unread
    acc = env.connect(user, company=company)
    box = env.assert_converged(acc, user, folders=("inbox", "deleteditems"))
    return acc, sorted(box)


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


def test_each_action_changes_outlook_and_the_mirror(env):
    acc, ids = connected(env)
    t0 = time.time()
    read = env.queue(acc, ids[0], "mark_read")
    done = env.wait_state(read)
    # Picked up at once, not at the next sync interval (10 s).
    assert done["state"] == "done" and time.time() - t0 < 5, done
    assert env.message(ADELE[0], ids[0])["isRead"] is True
    assert env.row(acc, ids[0])["is_read"] == "1"

    unread = env.queue(acc, ids[0], "mark_unread")
    assert env.wait_state(unread)["state"] == "done"
    assert env.message(ADELE[0], ids[0])["isRead"] is False
    assert env.row(acc, ids[0])["is_read"] == "0"

    move = env.queue(acc, ids[1], "move", "archive")
    assert env.wait_state(move)["state"] == "done"
    assert env.message(ADELE[0], ids[1])["folder"] == "archive"
    r = env.row(acc, ids[1])
    assert r["folder"] == "archive" and r["removed"] == "1"     # archive is not mirrored

    delete = env.queue(acc, ids[2], "delete")
    assert env.wait_state(delete)["state"] == "done"
    # Outlook's Delete: into Deleted Items, which this mirror also holds.
    assert env.message(ADELE[0], ids[2])["folder"] == "deleteditems"
    r = env.row(acc, ids[2])
    assert r["folder"] == "deleteditems" and r["removed"] == "0"

    c = env.counters()
    for i in ids[:3]:
        assert c["graph_effective_writes"].get(i) == (2 if i == ids[0] else 1), c
    # The next sync agrees with what the write-back put in the mirror.
    env.sync_now(acc)
    env.assert_converged(acc, ADELE[0], folders=("inbox", "deleteditems"))


def test_order_per_message_is_kept(env):
    acc, ids = connected(env)
    # Queued together; applied in this order for the same message.
    a1 = env.queue(acc, ids[0], "mark_read")
    a2 = env.queue(acc, ids[0], "move", "archive")
    a3 = env.queue(acc, ids[0], "mark_unread")
    others = [env.queue(acc, i, "mark_read") for i in ids[1:9]]
    for a in [a1, a2, a3] + others:
        assert env.wait_state(a)["state"] == "done"
    writes = env.message(ADELE[0], ids[0])["writes"]
    ops = [(w["op"], w.get("changes", {}).get("isRead"), w.get("to")) for w in writes]
    assert [o[0] for o in ops] == ["patch", "move", "patch"], writes
    assert ops[0][1] is True and ops[2][1] is False
    m = env.message(ADELE[0], ids[0])
    assert m["folder"] == "archive" and m["isRead"] is False
    c = env.counters()
    assert c["concurrency_violations"] == 0 and c["max_inflight"] <= 4


def test_basic_edition_fails_read_only_without_calling_graph(httpd, simulator):
    env = Actions(make_env(httpd, simulator, "sqlite3").s)      # default company: basic
    env.seed(ADELE[0], 5)
    acc = env.connect(ADELE[0])
    box = env.assert_converged(acc, ADELE[0])
    ids = sorted(box)
    before = env.counters()["graph_writes_total"]
    a = env.queue(acc, ids[0], "mark_read")
    b = env.queue(acc, ids[1], "delete")
    for x in (a, b):
        r = env.wait_state(x)
        assert r["state"] == "failed" and r["reason"] == "read_only", r
        assert "MSOAuthEdition pro" in r["last_error"] and "connect" in r["last_error"]
    assert env.counters()["graph_writes_total"] == before
    assert not [e for e in sim_call(env.sim, "GET", "/_sim/log")["requests"]
                if e["method"] in ("PATCH", "DELETE") or e["path"].endswith("/move")]
    status, model = env.account(acc), None
    assert status["actions"]["failed"] == 2 and status["actions"]["queued"] == 0


def test_forbidden_and_missing_messages_fail_clearly_and_do_not_block(httpd, simulator):
    env = setup_env(httpd, simulator, "sqlite3")
    acc, ids = connected(env)
    sim_call(env.sim, "POST", "/_sim/scenarios", {"endpoint": "graph", "status": 403,
                                                  "code": "ErrorAccessDenied", "times": 1,
                                                  "match": {"method": "PATCH"}})
    denied = env.queue(acc, ids[0], "mark_read")
    r = env.wait_state(denied)
    assert r["state"] == "failed" and r["reason"] == "read_only" and "403" in r["last_error"]
    sim_call(env.sim, "DELETE", f"/_sim/mailbox/{ADELE[0]}/messages/{ids[1]}")
    gone = env.queue(acc, ids[1], "mark_read")
    after = env.queue(acc, ids[2], "mark_read")
    r = env.wait_state(gone)
    assert r["state"] == "failed" and r["reason"] == "not_found", r
    assert "no longer exists" in r["last_error"]
    assert env.wait_state(after)["state"] == "done"
    bad = env.queue(acc, "not an id!", "mark_read")
    r = env.wait_state(bad)
    assert r["state"] == "failed" and r["reason"] == "bad_request"
    nodest = env.queue(acc, ids[3], "move")
    r = env.wait_state(nodest)
    assert r["state"] == "failed" and r["reason"] == "bad_request" and "destination" in r["last_error"]


def test_outage_then_recovery_applies_once(env):
    acc, ids = connected(env)
    sim_call(env.sim, "POST", "/_sim/scenarios", {"endpoint": "graph", "status": 503,
                                                  "times": -1, "match": {"path": "/messages/"}})
    a = env.queue(acc, ids[0], "move", "archive")
    b = env.queue(acc, ids[1], "mark_read")
    poll("an attempt", lambda: int(env.action(a)["attempts"]) >= 1, timeout=15)
    time.sleep(2)
    for x in (a, b):
        r = env.action(x)
        assert r["state"] == "queued" and r["last_error"], r
    acct = env.account(acc)
    assert acct["actions"]["queued"] == 2 and acct["actions"]["oldest_queued_age"] >= 2
    assert acct["sync"]["last_error"]
    sim_call(env.sim, "DELETE", "/_sim/scenarios")
    env.sync_now(acc)           # drops the backoff: Graph is back
    for x in (a, b):
        assert env.wait_state(x, timeout=40)["state"] == "done"
    c = env.counters()
    assert c["graph_effective_writes"].get(ids[0]) == 1
    assert c["graph_effective_writes"].get(ids[1]) == 1
    assert env.message(ADELE[0], ids[0])["folder"] == "archive"


def interrupted_write(env, interrupt, action, dest=None):
    acc, ids = connected(env)
    # Graph applies the write, then takes 4 s to answer: the process goes
    # away in between, with the outcome unknown to the database.
    sim_call(env.sim, "POST", "/_sim/scenarios", {"endpoint": "graph", "hang_after": 4,
                                                  "times": 1,
                                                  "match": {"path": ids[0]}})
    a = env.queue(acc, ids[0], action, dest)
    poll("the write to reach Graph", lambda: env.counters()["graph_writes"].get(ids[0]),
         timeout=15, every=0.05)
    interrupt(env)
    r = env.wait_state(a, timeout=60)
    assert r["state"] == "done", r
    c = env.counters()
    assert c["graph_effective_writes"].get(ids[0]) == 1, c["graph_effective_writes"]
    # Not even repeated: the retry looked at the message first.
    assert c["graph_writes"].get(ids[0]) == 1, c["graph_writes"]
    return acc, ids


def test_kill_9_between_graph_call_and_commit(env):
    acc, ids = interrupted_write(env, kill_everything, "move", "archive")
    assert env.message(ADELE[0], ids[0])["folder"] == "archive"
    assert env.row(acc, ids[0])["folder"] == "archive"


def test_kill_9_during_mark_read(httpd, simulator):
    env = setup_env(httpd, simulator, "sqlite3")
    acc, ids = interrupted_write(env, kill_everything, "mark_read")
    assert env.row(acc, ids[0])["is_read"] == "1"


def test_graceful_restart_while_actions_run(env):
    interrupted_write(env, lambda e: e.h.graceful(), "delete")


def test_two_nodes_apply_each_action_once(httpd, simulator, pg_schema):
    params, nodes = pg_schema
    env = setup_env(httpd, simulator, "pgsql", params)
    s2 = second_node(env.s, nodes)
    env2 = Actions(s2)
    a, aids = connected(env, ADELE[0], count=60)
    m, mids = connected(env2, MEGAN[0], count=60)
    sim_call(env.sim, "POST", "/_sim/config", {"latency_ms": 30})
    queued = []
    for acc, ids in ((a, aids), (m, mids)):
        for i, g in enumerate(ids):
            queued.append(env.queue(acc, g, "mark_read" if i % 3 else "move",
                                    None if i % 3 else "archive"))
    poll("every action", lambda: env.rows("SELECT COUNT(*) FROM msoauth_actions WHERE "
                                          "state = 'queued'", "n")[0]["n"] == "0",
         timeout=90, every=0.5)
    states = env.rows("SELECT state, COUNT(*) FROM msoauth_actions GROUP BY state", "state, n")
    assert states == [{"state": "done", "n": "120"}], states
    c = env.counters()
    for g in aids + mids:
        assert c["graph_effective_writes"].get(g) == 1, g
        assert c["graph_writes"].get(g) == 1, g
    assert c["concurrency_violations"] == 0


def test_throttled_actions_wait_for_retry_after(httpd, simulator):
    env = setup_env(httpd, simulator, "sqlite3")
    acc, ids = connected(env)
    sim_call(env.sim, "POST", "/_sim/scenarios", {"endpoint": "graph", "status": 429,
                                                  "retry_after": 4, "times": 1,
                                                  "match": {"method": "PATCH"}})
    t0 = time.time()
    a = env.queue(acc, ids[0], "mark_read")
    poll("the 429", lambda: [e for e in sim_call(env.sim, "GET", "/_sim/log")["requests"]
                             if e["status"] == 429], timeout=10, every=0.1)
    r = env.action(a)
    assert r["state"] == "queued" and "429" in (r["last_error"] or ""), r
    assert env.account(acc)["sync"]["phase"] == "throttled"
    done = env.wait_state(a, timeout=30)
    assert done["state"] == "done" and time.time() - t0 >= 4
    patches = [e for e in sim_call(env.sim, "GET", "/_sim/log")["requests"]
               if e["method"] == "PATCH"]
    assert [e["status"] for e in patches] == [429, 200], patches
    assert patches[1]["t"] - patches[0]["t"] >= 4 - 0.5
    assert env.counters()["graph_effective_writes"].get(ids[0]) == 1
