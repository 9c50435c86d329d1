#!/usr/bin/python3
"""The idle cycle of app-only mailboxes next to delegated ones, in the same
httpd, database and run.

    python3 bench/apponly_bench.py [--db sqlite3|pgsql] [--mailboxes 10000] [--rounds 3]

Two sets of --mailboxes mailboxes with 2 messages each, initial sync done:
  - delegated: simulator accounts signed in to the app (company "default"),
    rows and sealed tokens inserted as sync_bench.py does;
  - app-only: shared mailboxes of an app-only company (MSOAuthAppOnly on,
    company "helpdesk"), rows of kind app inserted as MSOAuthMailbox makes them;
    all worked with the company's one application token.
Then --rounds idle cycles of each set, alternating which goes first: every
mailbox of the set made due at once (sync_due_at = 0) and timed until each has
last_sync_at >= the start; delta requests/s and httpd CPU. The delegated cycle
is the reference. Also counted over the whole run, from the simulator: the
application token requests of the company (goal: at most one per token
lifetime, 3,600 s in the simulator) and the refresh-token grants (none: the
delegated tokens are not due).

Goal: the app-only cycle no slower than the delegated one. Loopback only;
every wait is bounded. MSO_BENCH_KEEP=1 keeps the work directory.
"""
import argparse
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "t" / "integration"))
sys.path.insert(0, str(REPO / "bench"))
from conftest import MODULE, Httpd  # noqa: E402
from mirror_common import (CLIENT_ID, TENANT, CpuMeter, PgStore, Sealer, Session, Sim,  # noqa: E402
                           SqliteStore, bulk_accounts, insert_accounts, module_conf, q,
                           sim_setup, wait_for, wait_schema)

APP_COMPANY = "helpdesk"


def app_conf():
    return (f"MSOAuthSyncInterval 86400\n<MSOAuthCompany {APP_COMPANY}>\n  MSOAuthAppOnly on\n"
            f"  MSOAuthTenant {TENANT}\n  MSOAuthEdition pro\n</MSOAuthCompany>\n")


def insert_app_accounts(store, sim_url, boxes, first_id, now):
    """Rows of kind app, as mso_account_ensure_app makes them: no tokens."""
    lines = ["BEGIN;"]
    for k, b in enumerate(boxes):
        lines.append(
            "INSERT INTO msoauth_accounts (id, company, kind, client_id, mailbox, tenant_id, "
            "state, authority, connected_by, created_at, updated_at, error_runs) VALUES ("
            + ", ".join(q(v) for v in (first_id + k, APP_COMPANY, "app", CLIENT_ID.lower(),
                                       b["address"], TENANT, "connected",
                                       f"{sim_url}/{TENANT}", "bench", now, now, 0)) + ");")
    if isinstance(store, PgStore):
        lines.append("SELECT setval(pg_get_serial_sequence('msoauth_accounts', 'id'), "
                     "(SELECT MAX(id) FROM msoauth_accounts));")
    lines.append("COMMIT;")
    store.bulk("\n".join(lines) + "\n")
    return list(range(first_id, first_id + len(boxes)))


def cycle(h, sim, store, sess, where, n, timeout):
    time.sleep(1.0 - (time.time() % 1.0) + 0.05)
    start_s = int(time.time()) + 1
    time.sleep(start_s - time.time() + 0.01)
    before = sim.call("GET", "/_sim/counters")["calls"]
    cpu = CpuMeter(h, sim, store).start()
    t0 = time.time()
    store.run(f"UPDATE msoauth_accounts SET sync_due_at = 0 WHERE {where}")
    done = 0
    while time.time() < t0 + timeout:
        done = sess.value(f"SELECT COUNT(*) FROM msoauth_accounts WHERE {where} "
                          f"AND last_sync_at >= {start_s}")
        if done >= n:
            break
        time.sleep(0.2)
    dt = time.time() - t0
    c = cpu.stop()
    after = sim.call("GET", "/_sim/counters")["calls"]
    errs = sess.value(f"SELECT COUNT(*) FROM msoauth_accounts WHERE {where} "
                      "AND sync_error IS NOT NULL")
    return {"done": done, "seconds": dt, "cpu": c, "errors": errs,
            "requests": after.get("graph_delta", 0) - before.get("graph_delta", 0)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", choices=["sqlite3", "pgsql"], default="sqlite3")
    ap.add_argument("--mailboxes", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--initial-timeout", type=float, default=600)
    ap.add_argument("--idle-timeout", type=float, default=180)
    args = ap.parse_args()
    if not MODULE.exists():
        raise SystemExit(f"{MODULE} is missing: build first (sh scripts/build.sh build/release)")
    n = args.mailboxes
    tmp = Path(tempfile.mkdtemp(prefix="msoauth-apponly-bench."))
    os.chmod(tmp, 0o755)
    sim = h = store = sess = None
    t_run = time.time()
    try:
        sim = Sim(tmp, 0)
        sim_setup(sim)
        sim.call("POST", f"/_sim/apps/{CLIENT_ID}/app_roles",
                 {"resource": "graph", "roles": ["Mail.ReadWrite", "Mail.Send"]})
        t0 = time.time()
        deleg = bulk_accounts(sim, "deleg", n, 2)
        boxes = []
        for start in range(0, n, 2000):
            boxes += sim.call("POST", "/_sim/bulk/mailboxes", {
                "count": min(2000, n - start), "start": start, "prefix": "box",
                "messages": 2})["mailboxes"]
        print(f"seeded {n} delegated accounts and {n} shared mailboxes in "
              f"{time.time() - t0:.1f}s", flush=True)
        h = Httpd(tmp, "httpd")
        key_hex = secrets.token_hex(32)
        h.file("keys/k1.hex", key_hex)
        store = PgStore(None, tmp) if args.db == "pgsql" \
            else SqliteStore(h.root / "data" / "msoauth.db")
        drv, params = store.dbd()
        h.start(module_conf(drv, params, sim.url, app_conf()))
        sess = Session(store, tmp / "session.err")
        wait_schema(sess)
        now = int(time.time())
        d_ids = insert_accounts(store, Sealer(key_hex), sim.url, deleg, 100001, now)
        a_ids = insert_app_accounts(store, sim.url, boxes, 300001, now)
        sets = {"delegated": f"id >= {d_ids[0]} AND id <= {d_ids[-1]}",
                "app-only": f"id >= {a_ids[0]} AND id <= {a_ids[-1]}"}
        t0 = time.time()

        def synced():
            k = sess.value("SELECT COUNT(*) FROM msoauth_accounts WHERE last_sync_at IS NOT NULL "
                           "AND sync_phase = 'idle'")
            return k >= 2 * n
        wait_for(f"{2 * n} initial syncs", synced, args.initial_timeout, every=1)
        print(f"initial syncs of {2 * n} mailboxes done in {time.time() - t0:.1f}s", flush=True)
        results = {"delegated": [], "app-only": []}
        for r in range(args.rounds):
            order = ["delegated", "app-only"] if r % 2 == 0 else ["app-only", "delegated"]
            for kind in order:
                res = cycle(h, sim, store, sess, sets[kind], n, args.idle_timeout)
                results[kind].append(res)
                print(f"  round {r + 1} {kind}: {res['done']}/{n} in {res['seconds']:.1f}s, "
                      f"{res['requests']} delta requests, httpd CPU {res['cpu']['httpd']:.1f}s, "
                      f"errors {res['errors']}", flush=True)
        c = sim.call("GET", "/_sim/counters")
        run_s = time.time() - t_run
        app_tokens = sum(c.get("app_tokens", {}).get(CLIENT_ID, {}).values())
        print(f"\nidle cycle of {n} mailboxes, {args.db}, median of {args.rounds} rounds "
              "(delegated = reference, same run):")
        print(f"{'':28}{'delegated':>12}{'app-only':>12}")

        def med(kind, f):
            v = sorted(f(x) for x in results[kind])
            return v[len(v) // 2]
        rows = [("seconds", lambda x: x["seconds"], "{:.1f}"),
                ("mailboxes/s", lambda x: x["done"] / x["seconds"], "{:.0f}"),
                ("delta requests/s", lambda x: x["requests"] / x["seconds"], "{:.0f}"),
                ("httpd CPU s", lambda x: x["cpu"]["httpd"], "{:.2f}"),
                ("httpd CPU ms / mailbox", lambda x: x["cpu"]["httpd"] * 1000 / max(1, x["done"]),
                 "{:.2f}"),
                ("simulator CPU s", lambda x: x["cpu"]["sim"], "{:.2f}"),
                ("rest of machine CPU s", lambda x: x["cpu"]["other"], "{:.2f}"),
                ("mailboxes done", lambda x: x["done"], "{:.0f}"),
                ("sync errors", lambda x: x["errors"], "{:.0f}")]
        for label, f, fmt in rows:
            print(f"{label:28}{fmt.format(med('delegated', f)):>12}"
                  f"{fmt.format(med('app-only', f)):>12}")
        ratio = med("app-only", lambda x: x["seconds"]) / med("delegated", lambda x: x["seconds"])
        print(f"app-only / delegated time: {ratio:.2f} (goal <= 1, within the noise of a "
              "shared machine)")
        print(f"application token requests of company {APP_COMPANY}: {app_tokens} in "
              f"{run_s:.0f}s = {run_s / 3600:.2f} token lifetimes (goal: <= 1 per lifetime); "
              f"client_credentials grants {c['token_grants'].get('client_credentials', 0)}, "
              f"refresh grants {c['token_grants'].get('refresh_token', 0)}")
        errs = [ln for ln in h.log().splitlines() if "[msoauth:error]" in ln][-3:]
        if errs:
            print("errors in the log:\n" + "\n".join(errs))
    finally:
        if sess:
            sess.close()
        if h:
            h.stop()
        if store:
            store.close()
        if sim:
            sim.stop()
        if os.environ.get("MSO_BENCH_KEEP"):
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
