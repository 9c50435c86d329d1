#!/usr/bin/python3
"""Write-back throughput: queued msoauth_actions applied to Outlook by the real
module (httpd + background job) against the Graph simulator answering every
Graph call after --latency-ms, next to the ideal the per-mailbox limit sets and
next to what the simulator itself serves to a plain client, in the same run.

    python3 bench/actions_bench.py [--db sqlite3|pgsql] [--actions 1000]
                                   [--mailboxes 100] [--latency-ms 50] [--rounds 3]

--mailboxes accounts with a pro grant (Mail.ReadWrite) are connected by
inserting their rows with sealed tokens, as the module seals them, and their
initial sync is let finish (40 messages each, every second one unread). Then,
per round, --actions actions (mark_read on unread messages, mark_unread on read
ones, move to archive; mixed, a different message each) are inserted in one
transaction, spread evenly over the mailboxes, and timed from the commit until
no action is queued (polled every 20 ms). Reported: actions per second next to

- the ideal: mailboxes x 4 in flight (Outlook's limit per app and mailbox)
  / latency, e.g. 100 x 4 / 0.05 s = 8,000/s;
- the simulator's own capacity: the same number of writes of the same kinds
  on another set of mailboxes, issued by a Python client with 4 threads per
  mailbox (persistent connections), timed the same way;

and checks that every action was applied exactly once: per message, the
simulator's graph_writes (accepted write calls) and graph_effective_writes
(calls that changed something) are both 1, and the mailbox shows the result.
Loopback only; every wait is bounded. MSO_BENCH_KEEP=1 keeps the work directory.
"""
import argparse
import http.client
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "t" / "integration"))
sys.path.insert(0, str(REPO / "bench"))
from conftest import MODULE, Httpd  # noqa: E402
from mirror_common import (CpuMeter, PgStore, Sealer, Session, Sim, SqliteStore,  # noqa: E402
                           bulk_accounts, insert_accounts, module_conf, q, sim_setup,
                           wait_for, wait_schema)
from refresh_bench import peak_overlap  # noqa: E402

SCOPES = "openid profile email offline_access https://graph.microsoft.com/Mail.ReadWrite"
PER_MAILBOX = 40            # messages seeded in each inbox
KINDS = ("mark_read", "mark_unread", "move")
def job_constant(name):
    """A #define of mod_msoauth_job.c, so the printed cap follows the code."""
    m = re.search(r"#define %s (\d+)" % name, (REPO / "mod_msoauth_job.c").read_text())
    return int(m.group(1))


GRAPH_IN_FLIGHT, GRAPH_PER_HOST = job_constant("GRAPH_IN_FLIGHT"), job_constant("GRAPH_PER_HOST")


def seed_mailboxes(sim, accounts):
    """PER_MAILBOX messages per inbox, every second one unread; -> {oid: [messages]}."""
    out = {}
    for a in accounts:
        out[a["oid"]] = sim.call("POST", f"/_sim/mailbox/{a['oid']}/messages",
                                 {"folder": "inbox", "count": PER_MAILBOX,
                                  "unread_every": 2})["messages"]
    return out


def plan(accounts, boxes, n_actions, rnd, rounds):
    """n_actions (account index, message, action) spread evenly over the mailboxes,
    a different message each, kinds mixed; each round takes its own messages."""
    per = n_actions // len(accounts)
    if per * rounds > PER_MAILBOX:
        raise SystemExit(f"{per} actions x {rounds} rounds per mailbox need more than "
                         f"{PER_MAILBOX} messages each")
    todo = []
    for i, a in enumerate(accounts):
        msgs = boxes[a["oid"]][rnd * per:(rnd + 1) * per]
        for j, m in enumerate(msgs):
            kind = KINDS[(i + j) % 3]
            if kind != "move":
                # Each write must change something: read only unread ones, and back.
                kind = "mark_unread" if m["isRead"] else "mark_read"
            todo.append((i, m, kind))
    return todo


def expected(m, kind):
    if kind == "move":
        return m["isRead"], "archive"
    return kind == "mark_read", "inbox"


# --- the module ------------------------------------------------------------------------------

def run_module(store, sess, ids, accounts, todo):
    lines = ["BEGIN;"]
    for i, m, kind in todo:
        lines.append("INSERT INTO msoauth_actions (account_id, graph_id, action, destination) "
                     f"VALUES ({ids[i]}, {q(m['id'])}, {q(kind)}, "
                     f"{q('archive') if kind == 'move' else 'NULL'});")
    lines.append("COMMIT;")
    t_insert = time.time()
    store.bulk("\n".join(lines) + "\n")
    t0 = time.time()                    # committed
    end = t0 + 120
    left = len(todo)
    while time.time() < end:
        left = sess.value("SELECT COUNT(*) FROM msoauth_actions WHERE state = 'queued'")
        if left == 0:
            break
        time.sleep(0.02)
    dt = time.time() - t0
    states = dict((r[0], int(r[1])) for r in sess.rows(
        "SELECT state, COUNT(*) FROM msoauth_actions GROUP BY state"))
    return {"seconds": dt, "t0": t0, "insert_s": t0 - t_insert, "left": left, "states": states}


# --- the simulator alone -----------------------------------------------------------------------

def run_client(sim, accounts, todo, threads_per_mailbox=4):
    """The same writes from Python: 4 threads per mailbox, each with its own
    keep-alive connection, each taking every 4th write of its mailbox."""
    by_box = {}
    for i, m, kind in todo:
        by_box.setdefault(i, []).append((m, kind))
    errors = []

    def worker(i, share):
        tok = accounts[i]["access_token"]
        c = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=60)
        for m, kind in share:
            path = f"/v1.0/me/messages/{m['id']}"
            if kind == "move":
                method, path, body = "POST", path + "/move", {"destinationId": "archive"}
            else:
                method, body = "PATCH", {"isRead": kind == "mark_read"}
            c.request(method, path, body=json.dumps(body),
                      headers={"Authorization": f"Bearer {tok}",
                               "Content-Type": "application/json",
                               "Prefer": 'IdType="ImmutableId"'})
            r = c.getresponse()
            r.read()
            if r.status >= 300:
                errors.append(r.status)
        c.close()

    ths = []
    for i, items in by_box.items():
        for k in range(threads_per_mailbox):
            ths.append(threading.Thread(target=worker, args=(i, items[k::threads_per_mailbox])))
    t0 = time.time()
    for t in ths:
        t.start()
    for t in ths:
        t.join(120)
    return {"seconds": time.time() - t0, "errors": errors, "threads": len(ths)}


# --- checks -------------------------------------------------------------------------------------

def verify(sim, accounts, todo):
    """Each message written once, effectively once, and showing the result."""
    c = sim.call("GET", "/_sim/counters")
    writes, eff = c["graph_writes"], c["graph_effective_writes"]
    wrong_calls = [m["id"] for _, m, _ in todo if writes.get(m["id"], 0) != 1]
    wrong_eff = [m["id"] for _, m, _ in todo if eff.get(m["id"], 0) != 1]
    now = {}
    for i in sorted({i for i, _, _ in todo}):
        for m in sim.call("GET", f"/_sim/mailbox/{accounts[i]['oid']}")["messages"]:
            now[m["id"]] = m
    wrong_state = [m["id"] for _, m, kind in todo
                   if (now.get(m["id"], {}).get("isRead"), now.get(m["id"], {}).get("folder"))
                   != expected(m, kind)]
    return {"calls": sum(writes.get(m["id"], 0) for _, m, _ in todo),
            "effective": sum(eff.get(m["id"], 0) for _, m, _ in todo),
            "wrong_calls": len(wrong_calls), "wrong_effective": len(wrong_eff),
            "wrong_state": len(wrong_state), "violations": c["concurrency_violations"],
            "throttled": c["throttled"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", choices=["sqlite3", "pgsql"], default="sqlite3")
    ap.add_argument("--actions", type=int, default=1000)
    ap.add_argument("--mailboxes", type=int, default=100)
    ap.add_argument("--latency-ms", type=float, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not MODULE.exists():
        raise SystemExit(f"{MODULE} is missing: build first (sh scripts/build.sh build/release)")
    lat = args.latency_ms / 1000

    tmp = Path(tempfile.mkdtemp(prefix="msoauth-actions-bench."))
    os.chmod(tmp, 0o755)
    sim = h = store = sess = None
    try:
        sim = Sim(tmp, 0)
        sim_setup(sim)
        mod_accts = bulk_accounts(sim, "act", args.mailboxes, 0, scopes=SCOPES)
        cli_accts = bulk_accounts(sim, "cli", args.mailboxes, 0, scopes=SCOPES)
        mod_boxes = seed_mailboxes(sim, mod_accts)
        cli_boxes = seed_mailboxes(sim, cli_accts)

        h = Httpd(tmp, "bench")
        key_hex = secrets.token_hex(32)
        h.file("keys/k1.hex", key_hex)
        store = PgStore(None, tmp) if args.db == "pgsql" \
            else SqliteStore(h.root / "data" / "msoauth.db")
        drv, params = store.dbd()
        h.start(module_conf(drv, params, sim.url,
                            "MSOAuthEdition pro\nMSOAuthSyncInterval 86400"))
        sess = Session(store, tmp / "session.err")
        wait_schema(sess)
        ids = insert_accounts(store, Sealer(key_hex), sim.url, mod_accts, 1, int(time.time()))
        wait_for("the initial syncs", lambda: sess.value(
            "SELECT COUNT(*) FROM msoauth_accounts WHERE sync_phase = 'idle'") >= len(ids),
            120, every=0.2)
        n_rows = sess.value("SELECT COUNT(*) FROM msoauth_messages")
        print(f"{len(ids)} mailboxes connected and mirrored ({n_rows} messages); "
              f"latency {args.latency_ms:g} ms from now on", flush=True)
        sim.call("POST", "/_sim/config", {"latency_ms": args.latency_ms})
        time.sleep(1.5)

        mod_runs, cli_runs = [], []
        for rnd in range(args.rounds):
            # Alternating order, so neither always runs first.
            order = ("module", "client") if rnd % 2 == 0 else ("client", "module")
            for who in order:
                if who == "module":
                    todo = plan(mod_accts, mod_boxes, args.actions, rnd, args.rounds)
                    sim.call("DELETE", "/_sim/log")
                    cpu = CpuMeter(h, sim, store).start()
                    r = run_module(store, sess, ids, mod_accts, todo)
                    r["cpu"] = cpu.stop()
                    log = sim.call("GET", "/_sim/log")["requests"]
                    writes = [e for e in log if e["kind"] in ("graph_patch", "graph_move")]
                    r["peak"] = peak_overlap(writes)
                    if writes:
                        first = min(e["t"] for e in writes)
                        last = max(e["t"] + e["ms"] / 1000 for e in writes)
                        r["pickup"] = first - r["t0"]
                        r["apply"] = last - first
                        r["tail"] = r["t0"] + r["seconds"] - last
                    r["other_graph"] = len([e for e in log if e["kind"].startswith("graph_")
                                            and e not in writes])
                    r["verify"] = verify(sim, mod_accts, todo)
                    r["n"] = len(todo)
                    mod_runs.append(r)
                    print(f"  round {rnd + 1} module: {len(todo)} actions in "
                          f"{r['seconds']:.2f}s = {len(todo) / r['seconds']:.0f}/s "
                          f"(states {r['states']}, peak {r['peak']} writes in flight)",
                          flush=True)
                else:
                    todo = plan(cli_accts, cli_boxes, args.actions, rnd, args.rounds)
                    sim.call("DELETE", "/_sim/log")
                    r = run_client(sim, cli_accts, todo)
                    log = sim.call("GET", "/_sim/log")["requests"]
                    r["peak"] = peak_overlap([e for e in log if e["kind"] in
                                              ("graph_patch", "graph_move")])
                    r["verify"] = verify(sim, cli_accts, todo)
                    r["n"] = len(todo)
                    cli_runs.append(r)
                    print(f"  round {rnd + 1} client: {len(todo)} writes in "
                          f"{r['seconds']:.2f}s = {len(todo) / r['seconds']:.0f}/s "
                          f"({len(r['errors'])} errors, peak {r['peak']} in flight)", flush=True)

        # --- the report ---
        ideal = args.mailboxes * 4 / lat
        cap = min(GRAPH_IN_FLIGHT, GRAPH_PER_HOST) / lat
        mod_rates = sorted(r["n"] / r["seconds"] for r in mod_runs)
        cli_rates = sorted(r["n"] / r["seconds"] for r in cli_runs)
        med_mod, med_cli = mod_rates[len(mod_rates) // 2], cli_rates[len(cli_rates) // 2]
        print(f"\nactions benchmark: {args.actions} actions (mark_read, mark_unread, move mixed) "
              f"over {args.mailboxes} mailboxes, {args.db}, simulator latency "
              f"{args.latency_ms:g} ms per Graph call, {os.cpu_count()} cores, "
              f"{args.rounds} rounds")
        print(f"{'':52}{'median':>10}{'min':>10}{'max':>10}")
        print(f"{'module: actions/s, insert -> none queued':52}{med_mod:10.0f}"
              f"{mod_rates[0]:10.0f}{mod_rates[-1]:10.0f}")
        print(f"{'simulator alone: writes/s, Python 4 thr/mailbox':52}{med_cli:10.0f}"
              f"{cli_rates[0]:10.0f}{cli_rates[-1]:10.0f}")
        print(f"{'ideal: mailboxes x 4 / latency':52}{ideal:10.0f}")
        label = f"module cap: min({GRAPH_IN_FLIGHT} in flight, {GRAPH_PER_HOST} per host) / latency"
        print(f"{label:52}{cap:10.0f}")
        print(f"module / ideal = {med_mod / ideal:.3f}   module / simulator alone = "
              f"{med_mod / med_cli:.3f}   simulator alone / ideal = {med_cli / ideal:.3f}")
        print("\nper round (module): insert committed -> first write at the simulator (pickup),"
              " first write sent -> last answered (apply), -> all rows done (tail)")
        print(f"{'':10}{'seconds':>9}{'actions/s':>11}{'pickup s':>10}{'apply s':>9}"
              f"{'rate in apply':>15}{'tail s':>8}{'peak in flight':>16}{'httpd CPU s':>13}"
              f"{'other calls':>13}")
        for k, r in enumerate(mod_runs):
            print(f"  round {k + 1:<2}{r['seconds']:9.2f}{r['n'] / r['seconds']:11.0f}"
                  f"{r.get('pickup', 0):10.2f}{r.get('apply', 0):9.2f}"
                  f"{r['n'] / max(r.get('apply', 0), 1e-9):15.0f}{r.get('tail', 0):8.2f}"
                  f"{r['peak']:16}{r['cpu']['httpd']:13.2f}{r['other_graph']:13}")
        print("per round (simulator alone)        seconds    writes/s  peak in flight  errors")
        for k, r in enumerate(cli_runs):
            print(f"  round {k + 1:<29}{r['seconds']:8.2f}{r['n'] / r['seconds']:11.0f}"
                  f"{r['peak']:16}{len(r['errors']):8}")
        print("\nexactly once (module rounds): per message, write calls and effective writes")
        for k, r in enumerate(mod_runs):
            v = r["verify"]
            ok = (v["wrong_calls"] == 0 and v["wrong_effective"] == 0 and v["wrong_state"] == 0
                  and r["states"].get("done", 0) >= r["n"] * (k + 1))
            print(f"  round {k + 1}: {r['n']} actions, done {r['states'].get('done', 0)} "
                  f"(cumulative), failed {r['states'].get('failed', 0)}, queued "
                  f"{r['states'].get('queued', 0)}; graph_writes {v['calls']}, "
                  f"graph_effective_writes {v['effective']}; messages with writes != 1: "
                  f"{v['wrong_calls']}, effective != 1: {v['wrong_effective']}, wrong state in "
                  f"Outlook: {v['wrong_state']} -> {'OK' if ok else 'NOT EXACTLY ONCE'}")
        c = sim.call("GET", "/_sim/counters")
        print(f"simulator: concurrency_violations {c['concurrency_violations']}, throttled "
              f"{c['throttled']}, max in flight per mailbox {c['max_inflight']}")
        errs = [ln for ln in h.log().splitlines() if re.search(r"\[msoauth:(error|warn)\]", ln)]
        if errs:
            print(f"module warnings/errors: {len(errs)}; last: {errs[-1][:300]}")
    finally:
        if sess:
            sess.close()
        if h:
            h.stop()
        if sim:
            sim.stop()
        if store:
            store.close()
        if os.environ.get("MSO_BENCH_KEEP"):
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
