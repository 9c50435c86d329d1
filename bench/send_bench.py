#!/usr/bin/python3
"""Sending throughput: queued msoauth_outbox rows sent through Graph by the real
module (httpd + background job) against the simulator answering every Graph call
after --latency-ms, next to the same sends from a plain client and next to the
ideal the per-mailbox limit sets, in the same run.

    python3 bench/send_bench.py [--db sqlite3|pgsql] [--messages 1000]
                                [--mailboxes 100] [--latency-ms 50] [--rounds 3]

--mailboxes accounts with a pro grant (Mail.ReadWrite, Mail.Send) are connected by
inserting their rows with sealed tokens, as the module seals them. Per round,
--messages rows (one recipient, a subject, a short text body; spread evenly over
the mailboxes) are inserted in one transaction and timed from the commit until
none is queued (polled every 20 ms). A message takes two Graph calls (the draft
with its marker, then its send). Reported: messages per second next to

- the plain client: the same messages on another set of mailboxes, each made as
  a draft with a marker and sent (the same two calls), by a Python client with 4
  threads per mailbox (persistent connections), timed the same way;
- the ideal: mailboxes x 4 in flight (Outlook's limit per app and mailbox) / (2
  calls x latency), e.g. 100 x 4 / 0.1 s = 4,000/s;

and httpd's CPU time per message sent (the module's job: database, JSON, HTTP),
with the simulator's delivery log checked: every row's marker delivered exactly
once. Loopback only; every wait is bounded. MSO_BENCH_KEEP=1 keeps the work
directory.
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

SCOPES = ("openid profile email offline_access https://graph.microsoft.com/Mail.ReadWrite "
          "https://graph.microsoft.com/Mail.Send")
MARKER = "String {4959df50-ab1e-42e5-b03d-ae7b7693af59} Name msoauth-outbox-marker"


def job_constant(name):
    """A #define of mod_msoauth_job.c, so the printed cap follows the code."""
    m = re.search(r"#define %s (\d+)" % name, (REPO / "mod_msoauth_job.c").read_text())
    return int(m.group(1))


GRAPH_IN_FLIGHT = job_constant("GRAPH_IN_FLIGHT")


def plan(n_accounts, n_messages, rnd):
    """(account index, subject, recipient) spread evenly over the mailboxes."""
    per = n_messages // n_accounts
    return [(i, f"round {rnd} message {j} of mailbox {i}", f"customer{i}.{j}@fabrikam.com")
            for i in range(n_accounts) for j in range(per)]


# --- the module ------------------------------------------------------------------------------

def run_module(store, sess, ids, todo):
    lines = ["BEGIN;"]
    for i, subject, to in todo:
        lines.append("INSERT INTO msoauth_outbox (account_id, to_json, subject, body) VALUES "
                     f"({ids[i]}, {q(json.dumps([{'address': to, 'name': 'Customer'}]))}, "
                     f"{q(subject)}, {q('Dear customer, ' + subject + '.')});")
    lines.append("COMMIT;")
    first = sess.value("SELECT COALESCE(MAX(id), 0) FROM msoauth_outbox")
    t_insert = time.time()
    store.bulk("\n".join(lines) + "\n")
    t0 = time.time()                    # committed
    end = t0 + 180
    left = len(todo)
    while time.time() < end:
        left = sess.value("SELECT COUNT(*) FROM msoauth_outbox WHERE state = 'queued'")
        if left == 0:
            break
        time.sleep(0.02)
    dt = time.time() - t0
    states = dict((r[0], int(r[1])) for r in sess.rows(
        f"SELECT state, COUNT(*) FROM msoauth_outbox WHERE id > {first} GROUP BY state"))
    markers = [r[0] for r in sess.rows(f"SELECT marker FROM msoauth_outbox WHERE id > {first}")]
    attempts = sess.value(f"SELECT SUM(attempts) FROM msoauth_outbox WHERE id > {first}")
    return {"seconds": dt, "t0": t0, "insert_s": t0 - t_insert, "left": left,
            "states": states, "markers": markers, "attempts": attempts}


# --- the plain client ----------------------------------------------------------------------

def run_client(sim, accounts, todo, threads_per_mailbox=4):
    """The same two calls per message from Python: 4 threads per mailbox, each
    with its own keep-alive connection, each taking every 4th message."""
    by_box = {}
    for i, subject, to in todo:
        by_box.setdefault(i, []).append((subject, to))
    errors, markers = [], []
    lock = threading.Lock()

    def call(c, tok, method, path, body):
        c.request(method, path, body=json.dumps(body) if body is not None else b"",
                  headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/json",
                           "Prefer": 'IdType="ImmutableId"'})
        r = c.getresponse()
        data = r.read()
        return r.status, data

    def worker(i, share):
        tok = accounts[i]["access_token"]
        c = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=60)
        for subject, to in share:
            marker = secrets.token_hex(16)
            st, data = call(c, tok, "POST", "/v1.0/me/messages", {
                "subject": subject, "body": {"contentType": "text",
                                             "content": "Dear customer, " + subject + "."},
                "toRecipients": [{"emailAddress": {"address": to, "name": "Customer"}}],
                "singleValueExtendedProperties": [{"id": MARKER, "value": marker}]})
            if st != 201:
                errors.append(st)
                continue
            st, _ = call(c, tok, "POST", f"/v1.0/me/messages/{json.loads(data)['id']}/send",
                         None)
            if st != 202:
                errors.append(st)
            with lock:
                markers.append(marker)
        c.close()

    ths = []
    for i, items in by_box.items():
        for k in range(threads_per_mailbox):
            ths.append(threading.Thread(target=worker, args=(i, items[k::threads_per_mailbox])))
    t0 = time.time()
    for t in ths:
        t.start()
    for t in ths:
        t.join(180)
    return {"seconds": time.time() - t0, "errors": errors, "threads": len(ths),
            "markers": markers}


def verify(sim, markers):
    """Each marker delivered exactly once."""
    by = sim.call("GET", "/_sim/deliveries")["by_marker"]
    return {"once": sum(1 for m in markers if by.get(m) == 1),
            "twice": sum(1 for m in markers if by.get(m, 0) > 1),
            "missing": sum(1 for m in markers if not by.get(m))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", choices=["sqlite3", "pgsql"], default="sqlite3")
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--mailboxes", type=int, default=100)
    ap.add_argument("--latency-ms", type=float, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not MODULE.exists():
        raise SystemExit(f"{MODULE} is missing: build first (sh scripts/build.sh build/release)")
    lat = args.latency_ms / 1000

    tmp = Path(tempfile.mkdtemp(prefix="msoauth-send-bench."))
    os.chmod(tmp, 0o755)
    sim = h = store = sess = None
    try:
        sim = Sim(tmp, 0)
        sim_setup(sim)
        mod_accts = bulk_accounts(sim, "snd", args.mailboxes, 0, scopes=SCOPES)
        cli_accts = bulk_accounts(sim, "cli", args.mailboxes, 0, scopes=SCOPES)

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
        print(f"{len(ids)} mailboxes connected; latency {args.latency_ms:g} ms from now on",
              flush=True)
        sim.call("POST", "/_sim/config", {"latency_ms": args.latency_ms})
        time.sleep(1.5)

        mod_runs, cli_runs = [], []
        for rnd in range(args.rounds):
            order = ("module", "client") if rnd % 2 == 0 else ("client", "module")
            for who in order:
                sim.call("DELETE", "/_sim/log")
                if who == "module":
                    todo = plan(len(mod_accts), args.messages, rnd)
                    cpu = CpuMeter(h, sim, store).start()
                    r = run_module(store, sess, ids, todo)
                    r["cpu"] = cpu.stop()
                else:
                    todo = plan(len(cli_accts), args.messages, rnd)
                    cpu = CpuMeter(h, sim, store).start()
                    r = run_client(sim, cli_accts, todo)
                    r["cpu"] = cpu.stop()
                log = sim.call("GET", "/_sim/log")["requests"]
                calls = [e for e in log if e["kind"].startswith("graph_")]
                r["calls"] = len(calls)
                r["peak"] = peak_overlap(calls)
                r["kinds"] = {}
                for e in calls:
                    r["kinds"][e["kind"]] = r["kinds"].get(e["kind"], 0) + 1
                if who == "module" and calls:
                    first = min(e["t"] for e in calls)
                    last = max(e["t"] + e["ms"] / 1000 for e in calls)
                    r["pickup"] = first - r["t0"]
                    r["send"] = last - first
                    r["tail"] = r["t0"] + r["seconds"] - last
                r["verify"] = verify(sim, r["markers"])
                r["n"] = len(todo)
                (mod_runs if who == "module" else cli_runs).append(r)
                extra = (f"states {r['states']}" if who == "module"
                         else f"{len(r['errors'])} errors")
                print(f"  round {rnd + 1} {who}: {len(todo)} messages in {r['seconds']:.2f}s = "
                      f"{len(todo) / r['seconds']:.0f}/s ({extra}, peak {r['peak']} calls in "
                      f"flight, httpd CPU {r['cpu']['httpd']:.2f}s)", flush=True)
                sim.call("DELETE", "/_sim/deliveries")

        # --- the report ---
        ideal = args.mailboxes * 4 / (2 * lat)
        cap = GRAPH_IN_FLIGHT / (2 * lat)
        mod_rates = sorted(r["n"] / r["seconds"] for r in mod_runs)
        cli_rates = sorted(r["n"] / r["seconds"] for r in cli_runs)
        med_mod, med_cli = mod_rates[len(mod_rates) // 2], cli_rates[len(cli_rates) // 2]
        cpu_ms = sorted(1000 * r["cpu"]["httpd"] / r["n"] for r in mod_runs)
        print(f"\nsend benchmark: {args.messages} messages over {args.mailboxes} mailboxes, "
              f"{args.db}, simulator latency {args.latency_ms:g} ms per Graph call (2 calls a "
              f"message), {os.cpu_count()} cores, {args.rounds} rounds")
        print(f"{'':56}{'median':>10}{'min':>10}{'max':>10}")
        print(f"{'module: messages/s, insert -> none queued':56}{med_mod:10.0f}"
              f"{mod_rates[0]:10.0f}{mod_rates[-1]:10.0f}")
        print(f"{'plain client: messages/s, Python 4 thr/mailbox':56}{med_cli:10.0f}"
              f"{cli_rates[0]:10.0f}{cli_rates[-1]:10.0f}")
        print(f"{'ideal: mailboxes x 4 / (2 x latency)':56}{ideal:10.0f}")
        label = f"module cap: {GRAPH_IN_FLIGHT} in flight / (2 x latency)"
        print(f"{label:56}{cap:10.0f}")
        print(f"{'httpd CPU per message sent, ms':56}{cpu_ms[len(cpu_ms) // 2]:10.3f}"
              f"{cpu_ms[0]:10.3f}{cpu_ms[-1]:10.3f}")
        print(f"module / plain client = {med_mod / med_cli:.3f}   module / ideal = "
              f"{med_mod / ideal:.3f}   plain client / ideal = {med_cli / ideal:.3f}")
        print("\nper round (module): insert committed -> first Graph call (pickup), first call"
              " -> last answered (send), -> all rows sent (tail)")
        print(f"{'':10}{'seconds':>9}{'msgs/s':>9}{'pickup s':>10}{'send s':>8}{'tail s':>8}"
              f"{'calls':>7}{'peak':>6}{'httpd s':>9}{'sim s':>7}{'pg s':>6}{'other s':>9}")
        for k, r in enumerate(mod_runs):
            c = r["cpu"]
            print(f"  round {k + 1:<2}{r['seconds']:9.2f}{r['n'] / r['seconds']:9.0f}"
                  f"{r.get('pickup', 0):10.2f}{r.get('send', 0):8.2f}{r.get('tail', 0):8.2f}"
                  f"{r['calls']:7}{r['peak']:6}{c['httpd']:9.2f}{c['sim']:7.2f}{c['pg']:6.2f}"
                  f"{c['other']:9.2f}")
        print("per round (plain client)")
        for k, r in enumerate(cli_runs):
            c = r["cpu"]
            print(f"  round {k + 1:<2}{r['seconds']:9.2f}{r['n'] / r['seconds']:9.0f}"
                  f"{'':26}{r['calls']:7}{r['peak']:6}{c['httpd']:9.2f}{c['sim']:7.2f}"
                  f"{c['pg']:6.2f}{c['other']:9.2f}  errors {len(r['errors'])}")
        print("\nexactly once: every row's marker in the simulator's delivery log")
        for k, r in enumerate(mod_runs):
            v = r["verify"]
            ok = v["once"] == r["n"] and r["states"].get("sent", 0) == r["n"]
            print(f"  round {k + 1}: {r['n']} rows, sent {r['states'].get('sent', 0)}, failed "
                  f"{r['states'].get('failed', 0)}, queued {r['states'].get('queued', 0)}; "
                  f"delivered once {v['once']}, more than once {v['twice']}, not delivered "
                  f"{v['missing']}; attempts {r['attempts']}; Graph calls {r['kinds']} -> "
                  f"{'OK' if ok else 'NOT EXACTLY ONCE'}")
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
