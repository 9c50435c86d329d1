"""Shared by bench/sync_bench.py and bench/actions_bench.py: a real httpd with
the built module on SQLite or PostgreSQL, accounts connected without the
browser (simulator bulk accounts; refresh and access tokens sealed as the
module seals them and inserted with the account row), a persistent SQL
session for polling, and CPU meters read from /proc.

Builds on bench/refresh_bench.py (Sim, Sealer, SqliteStore, PgStore)."""
import os
import subprocess
import threading
import time
from pathlib import Path

from refresh_bench import (CLIENT_ID, COMPANY, REDIRECT, SECRET, TENANT, PgStore,  # noqa: F401
                           Sealer, Sim, SqliteStore, q)
from conftest import IS_ROOT, RUN_USER, Httpd  # noqa: F401

TICK = os.sysconf("SC_CLK_TCK")


# --- the simulator --------------------------------------------------------------------

def sim_setup(sim):
    """The app the module is configured with, and auto-approved sign-ins."""
    sim.call("POST", "/_sim/apps", {
        "client_id": CLIENT_ID, "display_name": "ERP", "secrets": [{"value": SECRET}],
        "redirect_uris": [REDIRECT], "sign_in_audience": "AzureADandPersonalMicrosoftAccount",
        "home_tenant": TENANT})
    sim.call("POST", "/_sim/config", {"auto_approve": True})


def bulk_accounts(sim, prefix, count, messages, scopes=None, chunk=2000):
    """Simulator users {prefix}{i:05d}@contoso.com signed in to the app, each inbox
    seeded with `messages` messages; returns the simulator's account records."""
    out = []
    for start in range(0, count, chunk):
        body = {"client_id": CLIENT_ID, "count": min(chunk, count - start), "start": start,
                "prefix": prefix, "messages": messages}
        if scopes:
            body["scopes"] = scopes
        out += sim.call("POST", "/_sim/bulk/accounts", body)["accounts"]
    return out


# --- the database -----------------------------------------------------------------------

class Session:
    """One long-lived sqlite3 / psql process: a query costs a round trip, not a
    process start (polling every 20 ms stays cheap). As the httpd user for SQLite,
    so no file of the database ever belongs to root."""

    def __init__(self, store, errlog):
        if isinstance(store, PgStore):
            cmd = ["psql", "-X", "-A", "-t", "-q", "-d", store.params]
            self.marker_cmd = "\\echo __END__"
        else:
            cmd = ["sqlite3", "-batch", "-cmd", ".timeout 30000", str(store.path)]
            if IS_ROOT:
                cmd = ["runuser", "-u", RUN_USER, "--"] + cmd
            self.marker_cmd = ".print __END__"
        self.err = open(errlog, "a")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, bufsize=1)
        self.lock = threading.Lock()

    def rows(self, sql):
        with self.lock:
            self.proc.stdin.write(sql.strip().rstrip(";") + ";\n" + self.marker_cmd + "\n")
            self.proc.stdin.flush()
            out = []
            while True:
                line = self.proc.stdout.readline()
                if line == "":
                    raise RuntimeError("the SQL session ended")
                line = line.rstrip("\n")
                if line == "__END__":
                    return [ln.split("|") for ln in out]
                out.append(line)

    def value(self, sql, default=0):
        r = self.rows(sql)
        if not r or r[0][0] == "":
            return default
        return int(r[0][0])

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        self.err.close()


def insert_accounts(db, sealer, sim_url, accounts, first_id, now, sync_due_at=None,
                    state="connected", work_owner=None):
    """Account rows, sealed refresh and Graph access tokens, in one transaction:
    connected, access token good for most of an hour, refresh not due for a day,
    sync due at sync_due_at (NULL: at once). Returns the ids."""
    lines = ["BEGIN;"]
    ids = []
    for k, a in enumerate(accounts):
        i = first_id + k
        ids.append(i)
        mailbox = a["upn"].lower()
        lines.append(
            "INSERT INTO msoauth_accounts (id, company, client_id, mailbox, display_name, "
            "tenant_id, object_id, scopes, state, authority, access_expires_at, connected_by, "
            "created_at, updated_at, refresh_due_at, error_runs, sync_due_at, work_owner, "
            "work_until) VALUES (" + ", ".join(q(v) for v in (
                i, COMPANY, CLIENT_ID.lower(), mailbox, a["name"], TENANT, a["oid"], a["scope"],
                state, f"{sim_url}/common", now + 3000, "bench", now, now, now + 86400, 0,
                sync_due_at, work_owner, now + 86400 if work_owner else None)) + ");")
        lines.append(
            "INSERT INTO msoauth_tokens (account_id, kind, sealed, expires_at, updated_at, "
            f"binding) VALUES ({i}, 'refresh', "
            f"{q(sealer.seal_token(i, 'refresh', a['refresh_token']))}, NULL, {now}, 2);")
        lines.append(
            "INSERT INTO msoauth_tokens (account_id, kind, sealed, expires_at, updated_at, "
            f"binding) VALUES ({i}, 'graph', {q(sealer.seal_token(i, 'graph', a['access_token']))}, "
            f"{now + 3000}, {now}, 2);")
    if isinstance(db, PgStore):
        # Explicit ids leave the identity sequence behind: the module's own inserts
        # (a sign-in) would collide with them.
        lines.append("SELECT setval(pg_get_serial_sequence('msoauth_accounts', 'id'), "
                     "(SELECT MAX(id) FROM msoauth_accounts));")
    lines.append("COMMIT;")
    db.bulk("\n".join(lines) + "\n")
    return ids


def delete_accounts(db, where):
    """Accounts and everything of theirs (the sqlite3 shell does not enforce the
    foreign keys, so each table is cleared explicitly). The account rows are
    locked first, in the job's order (its page transactions fence on the account
    row, then write messages): the other order deadlocks on PostgreSQL."""
    sub = f"(SELECT id FROM msoauth_accounts WHERE {where})"
    db.bulk("BEGIN;\n"
            f"UPDATE msoauth_accounts SET work_owner = 'bench-delete' WHERE {where};\n"
            f"DELETE FROM msoauth_attachments WHERE account_id IN {sub};\n"
            f"DELETE FROM msoauth_messages WHERE account_id IN {sub};\n"
            f"DELETE FROM msoauth_actions WHERE account_id IN {sub};\n"
            f"DELETE FROM msoauth_sync_folders WHERE account_id IN {sub};\n"
            f"DELETE FROM msoauth_tokens WHERE account_id IN {sub};\n"
            f"DELETE FROM msoauth_accounts WHERE {where};\n"
            "COMMIT;\n")


def module_conf(driver, params, sim_url, extra=""):
    return f"""
LogLevel warn msoauth:info
DBDriver {driver}
DBDParams "{params}"
MSOAuthTokenKeyFile keys/k1.hex
MSOAuthClientID {CLIENT_ID}
MSOAuthClientSecret "{SECRET}"
MSOAuthAuthorityURL {sim_url}
MSOAuthGraphURL {sim_url}
{extra}
<Location /microsoft_outlook/connect>
  SetHandler msoauth-connect
</Location>
<Location /microsoft_outlook/confirm>
  SetHandler msoauth-confirm
</Location>
"""


def wait_for(what, pred, timeout, every=0.2):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_schema(session, timeout=30):
    def ready():
        try:
            return session.rows("SELECT COUNT(*) FROM msoauth_sync_folders") is not None
        except RuntimeError:
            return False
    # A missing table is an error on stderr and no rows: poll for the version row.
    return wait_for("the schema", lambda: ready() and session.rows(
        "SELECT MAX(version) FROM msoauth_schema") not in ([], [[""]]), timeout)


# --- CPU ------------------------------------------------------------------------------------

def proc_cpu(pid, children=True):
    """utime+stime (+ reaped children's) of pid, and of its live children, in seconds."""
    total = 0
    pids = [pid]
    if children:
        pids += [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                text=True).stdout.split()]
    for p in pids:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / TICK


def machine_cpu():
    """(busy, total) seconds of all cores since boot, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = f[3] + f[4]
    return (sum(f) - idle) / TICK, sum(f) / TICK


def pg_postmaster(store):
    if not isinstance(store, PgStore) or not store.cluster:
        return None
    try:
        return int((store.cluster / "data" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class CpuMeter:
    """CPU seconds used between start() and stop() by httpd (parent and children),
    the simulator, the private PostgreSQL cluster, and the whole machine."""

    def __init__(self, h, sim, store):
        self.h, self.sim, self.pg = h, sim, pg_postmaster(store)

    def snap(self):
        from connect_bench import httpd_cpu_seconds
        busy, total = machine_cpu()
        return {"httpd": httpd_cpu_seconds(self.h), "sim": proc_cpu(self.sim.proc.pid, False),
                "pg": proc_cpu(self.pg) if self.pg else 0.0, "busy": busy, "total": total}

    def start(self):
        self.a = self.snap()
        return self

    def stop(self):
        b = self.snap()
        d = {k: b[k] - self.a[k] for k in b}
        d["other"] = max(0.0, d["busy"] - d["httpd"] - d["sim"] - d["pg"])
        return d
