"""Several nodes and crashes: two httpd instances sharing one PostgreSQL
database share the background job's work without ever redeeming a refresh
token twice, and a job child killed (or gracefully restarted) in the middle of
a refresh loses nothing."""
import copy
import os
import re
import secrets
import signal
import subprocess
import time

import pytest

from conftest import Browser, psql, sim_call
from test_job import ADMIN, get_json, graph_me
from test_signin import SECRET, TENANT, Setup

JOB_LINE = re.compile(r"job started in pid (\d+) \(lease owner ([^)\s]+)\)")
REFRESHED = re.compile(r"MSO201: job: account (\d+) \([^)]*\) refreshed")


# --- helpers ----------------------------------------------------------------------

def poll(what, pred, timeout=20.0, every=0.1):
    """pred() until it is truthy (returned), at most timeout seconds."""
    end = time.time() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.time() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def jobs(h):
    """[(pid, lease owner)] of every job start in the node's error log, oldest first."""
    return [(int(m.group(1)), m.group(2)) for m in JOB_LINE.finditer(h.log())]


def refreshed(h):
    """Account ids of the job's successful refreshes on this node, one per refresh."""
    return [int(m.group(1)) for m in REFRESHED.finditer(h.log())]


def counters(sim):
    return sim_call(sim, "GET", "/_sim/counters")


def rt_grants(sim):
    return counters(sim).get("token_grants", {}).get("refresh_token", 0)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def connected_to(pid, port):
    """True when process pid has an established TCP connection to 127.0.0.1:port."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True).stdout
    return f"pid={pid}," in out


@pytest.fixture
def pg_schema(httpd, pg_params):
    """A private schema in the shared PostgreSQL database (search_path through
    libpq's options), so concurrent test runs never see each other's rows. The
    nodes are stopped before the schema is dropped."""
    name = "t_nodes_" + secrets.token_hex(4)
    psql(pg_params, f"CREATE SCHEMA {name}")
    params = f"{pg_params} options='-csearch_path={name}'"
    nodes = [httpd]
    yield params, nodes
    for h in nodes:
        h.stop()
    psql(pg_params, f"DROP SCHEMA {name} CASCADE")


def sql(s, statement):
    return psql(s.pg, statement)


def row(s, account_id):
    cols = ("id, state, access_expires_at, refresh_due_at, last_refresh_at, lease_owner, "
            "lease_until, error_runs, reason, last_error")
    (r,) = s.rows(f"SELECT {cols} FROM msoauth_accounts WHERE id = {int(account_id)}", cols)
    return r


def num(v):
    return int(v) if v not in (None, "") else None


def connect(s, mailbox):
    _, _, r3 = s.sign_in(mailbox=mailbox, return_to="/a")
    assert r3 is not None and r3.query().get("msoauth") == "connected", (
        r3.location if r3 else None, s.h.log()[-3000:])
    return int(r3.query()["account"])


def second_node(s, nodes, name="node2"):
    """Another httpd with the same configuration: same client id and secret,
    same key material (its own copy of the key file), same database."""
    h2 = s.h.make_another(name)
    nodes.append(h2)
    h2.file("keys/k1.hex", s.key_hex)
    s2 = copy.copy(s)
    s2.h = h2
    s2.redirect_uri = f"{h2.url}/microsoft_outlook/confirm"
    s2.browser = Browser()
    # Both confirm URLs registered (the simulator ignores a loopback port anyway).
    sim_call(s.sim, "POST", "/_sim/apps", {
        "client_id": s.client_id, "display_name": "ERP", "secrets": [{"value": SECRET}],
        "redirect_uris": [s.redirect_uri, s2.redirect_uri],
        "sign_in_audience": "AzureADandPersonalMicrosoftAccount", "home_tenant": TENANT})
    h2.start(s.h.body)
    return s2


# --- a) two nodes, one database -------------------------------------------------------

def test_two_nodes_share_the_work(httpd, simulator, pg_schema):
    params, nodes = pg_schema
    s1 = Setup(httpd, simulator, db="pgsql", pg_params=params, extra=ADMIN)
    s1.wait_schema()
    s2 = second_node(s1, nodes)
    poll("the job on node 1", lambda: jobs(s1.h), timeout=15)
    poll("the job on node 2", lambda: jobs(s2.h), timeout=15)
    owners = {s1.h: {o for _, o in jobs(s1.h)}, s2.h: {o for _, o in jobs(s2.h)}}

    # Access tokens of 20 s: every account is refreshed every ~15 s. Strict
    # rotation: a refresh token redeemed a second time fails with AADSTS70000.
    sim_call(simulator, "POST", "/_sim/config", {"access_token_lifetime": 20,
                                                 "strict_rotation": True})
    mailboxes = [f"user{i:02d}@contoso.com" for i in range(20)]
    for m in mailboxes:
        sim_call(simulator, "POST", "/_sim/users", {"tenant_id": TENANT, "upn": m,
                                                    "name": m.split("@")[0].title()})
    ids = [connect(s1 if i % 2 == 0 else s2, m) for i, m in enumerate(mailboxes)]
    assert len(set(ids)) == 20
    # Token calls that take a while: leases are held long enough to be seen,
    # and a node busy with a batch leaves newly due accounts to the other.
    sim_call(simulator, "POST", "/_sim/config", {"latency_ms": 200})

    started = time.time()
    seen_owners = set()
    while time.time() - started < 48:
        out = sql(s1, "SELECT lease_owner FROM msoauth_accounts WHERE lease_owner IS NOT NULL")
        seen_owners.update(l for l in out.splitlines() if l)
        bad = sql(s1, "SELECT id, state, reason FROM msoauth_accounts "
                      "WHERE state <> 'connected' OR error_runs > 0")
        assert not bad, f"{bad}\n--- node1 ---\n{s1.h.log()[-3000:]}\n--- node2 ---\n" \
                        f"{s2.h.log()[-3000:]}"
        time.sleep(0.3)

    # Freeze: nothing is due any more; wait for the refreshes under way.
    frozen = int(time.time())
    sql(s1, f"UPDATE msoauth_accounts SET refresh_due_at = {frozen + 3600}")
    poll("the last leases to be released", lambda: sql(
        s1, "SELECT COUNT(*) FROM msoauth_accounts WHERE lease_owner IS NOT NULL") == "0",
        timeout=20, every=0.2)

    c = counters(simulator)
    n1, n2 = refreshed(s1.h), refreshed(s2.h)
    print(f"\nrefreshes: node1 {len(n1)}, node2 {len(n2)}, simulator "
          f"{c['token_grants'].get('refresh_token')}; lease owners seen {len(seen_owners)}")
    # No refresh token was redeemed twice (strict rotation would have said
    # AADSTS70000), no error at all, nobody has to reconnect.
    if c["aad_errors"]:
        failed = [e for e in sim_call(simulator, "GET", "/_sim/log")["requests"]
                  if (e.get("status") or 200) >= 400]
        raise AssertionError(f"{c['aad_errors']}\nfailed requests: {failed}\n--- node1 ---\n"
                             f"{s1.h.log()[-4000:]}\n--- node2 ---\n{s2.h.log()[-4000:]}")
    log = sim_call(simulator, "GET", "/_sim/log")["requests"]
    rt_calls = [e for e in log if e.get("grant_type") == "refresh_token"]
    assert rt_calls and all(e["status"] == 200 for e in rt_calls), \
        [e for e in rt_calls if e["status"] != 200]
    # Every redemption the simulator answered was stored by exactly one node.
    assert c["token_grants"]["refresh_token"] == len(n1) + len(n2) == len(rt_calls)
    # Both nodes worked, and only they held leases.
    assert n1 and n2, (len(n1), len(n2))
    assert seen_owners <= owners[s1.h] | owners[s2.h], (seen_owners, owners)
    # Every account was refreshed (most several times) and is fine.
    per_account = {i: (n1 + n2).count(i) for i in ids}
    assert min(per_account.values()) >= 2, per_account
    cols = "id, state, access_expires_at, last_refresh_at, error_runs, reason, last_error"
    rows = s1.rows(f"SELECT {cols} FROM msoauth_accounts ORDER BY id", cols)
    assert len(rows) == 20
    for r in rows:
        assert r["state"] == "connected", r
        assert num(r["access_expires_at"]) > frozen, r      # never let a token lapse
        assert num(r["last_refresh_at"]) >= started, r
        assert num(r["error_runs"]) == 0 and not r["reason"] and not r["last_error"], r
    for h in (s1.h, s2.h):
        assert "reconnect_required" not in h.log() and "AADSTS" not in h.log()


# --- b) and c): the job's child dies or restarts mid-refresh -------------------------

def interrupted_refresh(httpd, simulator, pg_schema, interrupt):
    """One account whose refresh is in flight (the simulator answers after 3 s)
    when interrupt(h, job_pid) hits the job's child; then it is refreshed
    again, stays connected, and hands out a working token."""
    params, _ = pg_schema
    s = Setup(httpd, simulator, db="pgsql", pg_params=params, extra=ADMIN)
    s.wait_schema()
    # Default (non-strict) rotation, as Microsoft does: a redeemed refresh
    # token keeps working after a newer one was issued. This is what makes a
    # lost answer harmless: the simulator rotated the token for a request
    # whose answer never reached the module, and the module's stored (older)
    # token must still be accepted by the next refresh.
    acc = connect(s, "adele@contoso.com")
    (pid, owner), = poll("the job", lambda: jobs(s.h), timeout=15)
    before = row(s, acc)
    assert before["state"] == "connected" and before["last_refresh_at"] in ("", None)
    assert rt_grants(simulator) == 0

    sim_call(simulator, "POST", "/_sim/config", {"latency_ms": 3000})
    sql(s, f"UPDATE msoauth_accounts SET refresh_due_at = {int(time.time())} WHERE id = {acc}")
    poll("the job to claim the account", lambda: row(s, acc)["lease_owner"] == owner,
         timeout=10)
    poll("the job's token call", lambda: connected_to(pid, simulator.port), timeout=5, every=0.05)
    time.sleep(0.8)
    assert rt_grants(simulator) == 0 and alive(pid)          # still in flight
    n_jobs = len(jobs(s.h))

    interrupt(s.h, pid)

    # A new job takes over (another child, or the new generation's).
    poll("a new job", lambda: len(jobs(s.h)) > n_jobs, timeout=20)
    new_pid, new_owner = jobs(s.h)[-1]
    assert new_owner != owner
    # The simulator answered the interrupted call: it rotated the refresh token.
    poll("the interrupted redemption at the simulator", lambda: rt_grants(simulator) >= 1,
         timeout=10)
    sim_call(simulator, "POST", "/_sim/config", {"latency_ms": 0})
    # Either the old child finished and stored its refresh (graceful), or the
    # account's lease is still held by the dead owner: let it run out now
    # instead of in 90 s.
    poll("the old job to finish or die", lambda: not alive(pid)
         or not row(s, acc)["lease_owner"], timeout=15)
    r = row(s, acc)
    if r["lease_owner"] == owner and not r["last_refresh_at"]:
        assert num(r["lease_until"]) > time.time()              # not yet run out by itself
        sql(s, f"UPDATE msoauth_accounts SET lease_until = {int(time.time()) - 1} "
               f"WHERE id = {acc}")
        path = "lease expired"
        poll("the refresh by the new job", lambda: row(s, acc)["last_refresh_at"] not in
             ("", None), timeout=15)
        assert rt_grants(simulator) == 2
        assert f"account {acc} (adele@contoso.com) refreshed" in s.h.log()
    elif not alive(pid) and (r["last_refresh_at"] in ("", None)
                             or f"process {pid} of this node died holding leases" in s.h.log()):
        # The new job saw that the lease's owner, a process of this host, is
        # dead, and released the lease at once instead of waiting 90 s (it may
        # have refreshed the account already by the time the row was read).
        path = "dead owner released"
        assert f"process {pid} of this node died holding leases" in s.h.log()
        poll("the refresh by the new job", lambda: row(s, acc)["last_refresh_at"] not in
             ("", None), timeout=15)
        assert rt_grants(simulator) == 2
    else:
        path = "old child finished"
        assert r["last_refresh_at"] not in ("", None), r
        assert rt_grants(simulator) == 1
    print(f"\nafter the interruption: {path}")

    a = row(s, acc)
    assert a["state"] == "connected", a
    assert not a["lease_owner"], a
    assert num(a["error_runs"]) == 0 and not a["reason"] and not a["last_error"], a
    assert num(a["access_expires_at"]) > time.time() + 3000, a
    assert num(a["refresh_due_at"]) > time.time() + 60, a      # not due again right away

    grants = rt_grants(simulator)
    status, body = get_json(s, f"/microsoft_outlook/token?account={acc}")
    assert status == 200, body
    assert body["expires_at"] > time.time() + 3000
    assert graph_me(simulator, body["access_token"])["userPrincipalName"] == "adele@contoso.com"
    assert rt_grants(simulator) == grants                      # the stored token was used
    c = counters(simulator)
    assert c["aad_errors"] == {}, c["aad_errors"]
    assert "reconnect_required" not in s.h.log()
    return path, pid, s.h.log()


def test_kill9_during_refresh_loses_nothing(httpd, simulator, pg_schema):
    def kill9(h, pid):
        os.kill(pid, signal.SIGKILL)
        poll("the child to die", lambda: not alive(pid), timeout=10)

    path, _, _ = interrupted_refresh(httpd, simulator, pg_schema, kill9)
    assert path in ("lease expired", "dead owner released")


def test_graceful_restart_during_refresh(httpd, simulator, pg_schema):
    path, pid, log = interrupted_refresh(httpd, simulator, pg_schema,
                                         lambda h, pid: h.graceful())
    # A graceful restart is an ordinary event: the old job's child must leave
    # cleanly (finishing its refresh, or at least not crashing), never abort.
    assert f"child pid {pid} exit signal" not in log and "Assertion" not in log, \
        "the job's child did not exit cleanly on a graceful restart:\n" + "\n".join(
            l for l in log.splitlines() if str(pid) in l or "Assertion" in l)
