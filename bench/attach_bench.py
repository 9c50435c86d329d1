#!/usr/bin/python3
"""Attachments in the mirror through the real module (httpd + background job +
Graph simulator + database), each figure next to a reference measured in the
same run on the same machine.

    python3 bench/attach_bench.py [--db sqlite3|pgsql|both] [--messages 10000]
                                  [--every 3] [--size 1048576] [--newest-runs 3]
                                  [--limit 10485760]

One mailbox of --messages messages, every --every-th carrying one file
attachment of --size bytes (bytes the simulator generates, each different),
connected through the real sign-in (connect -> simulator authorize ->
confirm), on each database:

a) Newest first: seconds from sending the confirm request until the 50
   newest messages (by receivedDateTime) are rows of msoauth_messages, polled
   every 20 ms, while the job also has every attachment to list and
   download. Goal: < 2 s. Run 1 is followed by b); runs 2.. delete the
   account (and its rows) and connect again.
b) Attachment ingest: bytes stored per second into msoauth_attachments, from
   the first stored attachment until all are (sizes summed every 0.2 s), and
   connect -> all stored. Reference, right after, same bytes: a plain
   download of every attachment's $value from the simulator by a Python
   client (http.client keep-alive, bodies read and dropped), with 4
   connections (what the module may use on one mailbox) and with 1. ratio =
   module / the faster reference; goal >= 0.7. For diagnosis, the database's
   own rate for the same bytes (bench/attach_ceiling.c, httpd idle): a plain
   prepared INSERT per attachment, one transaction each, into a table of
   msoauth_attachments' shape, and the module's storage path alone
   (mso_attach_store_content, fence and UPDATE of a pending row).
c) The job's memory: the peak resident set (VmHWM) of httpd's children, one
   of which runs the job, before connecting and after b).

Loopback only; every wait is bounded. With --db pgsql a private cluster is
started with t/pgcluster.sh. MSO_BENCH_KEEP=1 keeps the work directory.
"""
import argparse
import http.client
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "t" / "integration"))
sys.path.insert(0, str(REPO / "bench"))
from conftest import IS_ROOT, MODULE, RUN_USER, Browser, Httpd  # noqa: E402
from mirror_common import (CpuMeter, PgStore, Session, Sim, SqliteStore,  # noqa: E402
                           bulk_accounts, delete_accounts, module_conf, sim_setup,
                           wait_schema)


BUILD = MODULE.parent.parent


def build_ceiling(tmp):
    exe = tmp / "attach_ceiling"
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "apr-1", "apr-util-1", "libcurl",
                            "jansson", "libcrypto"], capture_output=True, text=True,
                           check=True).stdout.split()
    cmd = ["cc", "-O2", "-I", str(REPO / "lib"), "-I", str(BUILD),
           str(REPO / "bench" / "attach_ceiling.c"), str(BUILD / ".libs" / "libmso.a")] + flags \
        + ["-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"cannot build bench/attach_ceiling.c:\n{' '.join(cmd)}\n{r.stderr}")
    exe.chmod(0o755)
    return exe


def run_ceiling(exe, drv, params, count, size, mode):
    cmd = [str(exe), drv, params, str(count), str(size), mode]
    if drv == "sqlite3" and IS_ROOT:
        cmd = ["runuser", "-u", RUN_USER, "--"] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def peak_rss_mb(h):
    """The largest VmHWM among httpd's children, in MiB."""
    peak = 0
    for pid in h.children():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) // 1024)
        except OSError:
            pass
    return peak


def seed_mailbox(sim, upn, n, every, size):
    """n messages, newest last, every `every`-th with one generated file of size
    bytes; returns the simulator's view, newest first."""
    t0 = time.time()
    for start in range(0, n, 500):
        msgs = []
        for i in range(start, min(n, start + 500)):
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(1767225600 + i * 600))
            m = {"subject": f"Ticket {i:05d}", "receivedDateTime": when,
                 "body": f"<p>Customer message {i}</p>"}
            if i % every == 0:
                m["attachments"] = [{"kind": "file", "name": f"screenshot-{i:05d}.png",
                                     "contentType": "image/png", "size": size,
                                     "seed": f"bench-{i}"}]
            msgs.append(m)
        sim.call("POST", f"/_sim/mailbox/{upn}/messages", {"folder": "inbox", "messages": msgs})
    box = sim.call("GET", f"/_sim/mailbox/{upn}")["messages"]
    box.sort(key=lambda m: m["receivedDateTime"], reverse=True)
    print(f"seeded {n} messages ({sum(1 for m in box if m.get('attachments'))} with "
          f"attachments) in {time.time() - t0:.1f}s", flush=True)
    return box


def plain_download(sim, token, urls, conns):
    """Every URL's body, read and dropped, over `conns` keep-alive connections:
    bytes per second."""
    todo = list(urls)
    lock = threading.Lock()
    total = [0]

    def worker():
        c = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=120)
        while True:
            with lock:
                if not todo:
                    break
                url = todo.pop()
            c.request("GET", url, headers={"Authorization": f"Bearer {token}",
                                           "Prefer": 'IdType="ImmutableId"'})
            r = c.getresponse()
            n = 0
            while True:
                chunk = r.read(1 << 20)
                if not chunk:
                    break
                n += len(chunk)
            if r.status != 200:
                raise SystemExit(f"plain download: {r.status}")
            with lock:
                total[0] += n
        c.close()
    t0 = time.time()
    ths = [threading.Thread(target=worker) for _ in range(conns)]
    for t in ths:
        t.start()
    for t in ths:
        t.join(1200)
    return total[0] / (time.time() - t0), total[0]


def connect(h, mailbox):
    """The real sign-in; returns (account id, t0 = when confirm was sent, confirm seconds)."""
    b = Browser()
    r1 = b.get(f"{h.url}/microsoft_outlook/connect?mailbox={mailbox}&return_to=/done")
    r2 = b.get(r1.location) if r1.status == 302 else None
    if not r2 or r2.status != 302:
        raise SystemExit(f"sign-in for {mailbox}: {r1.status} {r2.status if r2 else ''} "
                         f"{h.log()[-2000:]}")
    t0 = time.time()
    r3 = b.get(r2.location)
    t_confirmed = time.time() - t0
    if r3.status != 302 or "msoauth=connected" not in (r3.location or ""):
        raise SystemExit(f"confirm: {r3.status} {r3.location} {h.log()[-2000:]}")
    return int(r3.location.split("account=")[1].split("&")[0]), t0, t_confirmed


class Bench:
    def __init__(self, args, tmp, sim, acct, box, ceiling):
        self.args, self.tmp, self.sim, self.acct, self.box = args, tmp, sim, acct, box
        self.ceiling = ceiling
        self.with_att = [m for m in box if m.get("attachments")]
        self.total_bytes = sum(a["size"] for m in self.with_att for a in m["attachments"])
        self.total_atts = sum(len(m["attachments"]) for m in self.with_att)

    def run(self, driver):
        res = {}
        h = Httpd(self.tmp, f"httpd-{driver}")
        h.file("keys/k1.hex", secrets.token_hex(32))
        store = PgStore(None, self.tmp) if driver == "pgsql" \
            else SqliteStore(h.root / "data" / "msoauth.db")
        drv, params = store.dbd()
        sess = None
        try:
            h.start(module_conf(drv, params, self.sim.url, "MSOAuthSyncInterval 86400\n"
                                f"MSOAuthAttachmentMaxBytes {self.args.limit}"))
            sess = Session(store, self.tmp / f"session-{driver}.err")
            wait_schema(sess)
            time.sleep(1.5)                 # the job's first ticks, nothing to do
            res["rss_before"] = peak_rss_mb(h)
            res["newest"] = []
            res["ingest"] = self.first_run(h, store, sess, res)
            res["rss_peak"] = peak_rss_mb(h)
            res["plain4"], res["plain_bytes"] = plain_download(
                self.sim, self.acct["access_token"], self.value_urls(), 4)
            res["plain1"], _ = plain_download(self.sim, self.acct["access_token"],
                                              self.value_urls(), 1)
            print(f"  plain download of the same bytes: {res['plain4'] / 1e6:.0f} MB/s with 4 "
                  f"connections, {res['plain1'] / 1e6:.0f} MB/s with 1", flush=True)
            n = min(self.total_atts, 300)
            res["db_plain"] = run_ceiling(self.ceiling, drv, params, n, self.args.size,
                                          "plain")["bytes_per_s"]
            res["db_store"] = run_ceiling(self.ceiling, drv, params, n, self.args.size,
                                          "store")["bytes_per_s"]
            print(f"  the database alone, {n} x {self.args.size} bytes: plain INSERT "
                  f"{res['db_plain'] / 1e6:.0f} MB/s, the module's storage path "
                  f"{res['db_store'] / 1e6:.0f} MB/s", flush=True)
            for run in range(1, self.args.newest_runs):
                delete_accounts(store, f"mailbox = '{self.acct['upn'].lower()}'")
                time.sleep(1.5)
                res["newest"].append(self.newest(h, sess, run)[0])
            delete_accounts(store, f"mailbox = '{self.acct['upn'].lower()}'")
            res["errors"] = [ln for ln in h.log().splitlines()
                             if "[msoauth:error]" in ln or "[msoauth:warn]" in ln][-5:]
        finally:
            if sess:
                sess.close()
            h.stop()
            store.close()
        return res

    def value_urls(self):
        return [f"/v1.0/me/messages/{m['id']}/attachments/{a['id']}/$value"
                for m in self.with_att for a in m["attachments"]]

    def newest(self, h, sess, run):
        newest = [m["id"] for m in self.box[:50]]
        in_list = ",".join(f"'{i}'" for i in newest)
        acc, t0, t_confirmed = connect(h, self.acct["upn"].lower())
        got, t_done = 0, None
        while time.time() < t0 + 60:
            got = sess.value("SELECT COUNT(*) FROM msoauth_messages WHERE "
                             f"account_id = {acc} AND graph_id IN ({in_list})")
            if got >= len(newest):
                t_done = time.time() - t0
                break
            time.sleep(0.02)
        rows = sess.value(f"SELECT COUNT(*) FROM msoauth_messages WHERE account_id = {acc}")
        stored = sess.value(f"SELECT COUNT(*) FROM msoauth_attachments WHERE account_id = {acc} "
                            "AND state = 'stored'")
        print(f"  run {run + 1}: confirm answered in {t_confirmed:.3f}s, newest 50 queryable "
              f"after {t_done if t_done is not None else float('nan'):.3f}s ({rows} message "
              f"rows, {stored} attachments stored by then)", flush=True)
        return {"confirm_s": t_confirmed, "newest50_s": t_done, "rows_then": rows,
                "stored_then": stored}, acc, t0

    def first_run(self, h, store, sess, res):
        cpu = CpuMeter(h, self.sim, store).start()
        first, acc, t0 = self.newest(h, sess, 0)
        res["newest"].append(first)
        t_first = t_last = None
        n = nbytes = 0
        last_print = time.time()
        end = t0 + self.args.timeout
        samples = []
        while time.time() < end:
            r = sess.rows(f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM msoauth_attachments "
                          f"WHERE account_id = {acc} AND state = 'stored'")
            n, nbytes = int(r[0][0] or 0), int(r[0][1] or 0)
            now = time.time()
            samples.append((now, nbytes))
            if n and t_first is None:
                t_first = now
            if n >= self.total_atts:
                t_last = now
                break
            if now - last_print > 10:
                last_print = now
                print(f"    {now - t0:6.1f}s: {n}/{self.total_atts} attachments, "
                      f"{nbytes / 1e6:.0f} MB", flush=True)
            time.sleep(0.2)
        c = cpu.stop()
        if t_last is None:
            print(f"WARNING: only {n}/{self.total_atts} attachments after "
                  f"{self.args.timeout:.0f}s")
            t_last = time.time()
        # The rate from the first stored byte: the first sample with bytes.
        start = next(((t, b) for t, b in samples if b), (t_first or t0, 0))
        rate = (nbytes - start[1]) / max(t_last - start[0], 1e-9)
        bad = sess.value(f"SELECT COUNT(*) FROM msoauth_attachments WHERE account_id = {acc} "
                         "AND (state <> 'stored' OR length(content) <> size)"
                         if isinstance(store, SqliteStore) else
                         f"SELECT COUNT(*) FROM msoauth_attachments WHERE account_id = {acc} "
                         "AND (state <> 'stored' OR octet_length(content) <> size)")
        print(f"  ingest: {n} attachments, {nbytes / 1e6:.0f} MB stored, {rate / 1e6:.0f} MB/s "
              f"from the first stored, all stored {t_last - t0:.1f}s after confirm; "
              f"{bad} rows not stored whole; httpd CPU {c['httpd']:.1f}s", flush=True)
        return {"count": n, "bytes": nbytes, "rate": rate, "all_s": t_last - t0,
                "rate_connect": nbytes / max(t_last - t0, 1e-9), "bad": bad, "cpu": c}


def report(args, results, total_bytes, total_atts):
    cols = list(results)
    w = 14

    def row(label, vals, fmt="{:.0f}"):
        print(f"{label:62}" + "".join(f"{'-':>{w}}" if v is None else f"{fmt.format(v):>{w}}"
                                      for v in vals))

    print(f"\nattachment benchmark: {args.messages} messages, {total_atts} with a "
          f"{args.size}-byte attachment ({total_bytes / 1e6:.0f} MB), limit {args.limit}, "
          f"{os.cpu_count()} cores, one httpd (mpm_event)")
    print(f"{'':62}" + "".join(f"{c:>{w}}" for c in cols))
    print("a) newest first")
    for i in range(args.newest_runs):
        row(f"  run {i + 1}: newest 50 queryable after confirm (s)",
            [results[c]["newest"][i]["newest50_s"] if i < len(results[c]["newest"]) else None
             for c in cols], "{:.3f}")
    print("b) attachment bytes into the database")
    row("module, first stored -> all stored (MB/s)",
        [results[c]["ingest"]["rate"] / 1e6 for c in cols], "{:.1f}")
    row("module, confirm -> all stored (MB/s)",
        [results[c]["ingest"]["rate_connect"] / 1e6 for c in cols], "{:.1f}")
    row("  all stored after confirm (s)", [results[c]["ingest"]["all_s"] for c in cols], "{:.1f}")
    row("  httpd CPU during it (s)", [results[c]["ingest"]["cpu"]["httpd"] for c in cols],
        "{:.1f}")
    row("reference: plain download, 4 connections (MB/s)",
        [results[c]["plain4"] / 1e6 for c in cols], "{:.1f}")
    row("reference: plain download, 1 connection (MB/s)",
        [results[c]["plain1"] / 1e6 for c in cols], "{:.1f}")
    row("ratio module / faster reference (goal >= 0.7)",
        [results[c]["ingest"]["rate"] / max(results[c]["plain4"], results[c]["plain1"])
         for c in cols], "{:.2f}")
    row("  the database alone: plain INSERT, a transaction each (MB/s)",
        [results[c]["db_plain"] / 1e6 for c in cols], "{:.1f}")
    row("  the database alone: the module's storage path (MB/s)",
        [results[c]["db_store"] / 1e6 for c in cols], "{:.1f}")
    row("  ratio module / plain INSERT",
        [results[c]["ingest"]["rate"] / results[c]["db_plain"] for c in cols], "{:.2f}")
    print("c) memory")
    row("httpd children's peak RSS before connecting (MiB)",
        [results[c]["rss_before"] for c in cols])
    row("httpd children's peak RSS after the ingest (MiB)", [results[c]["rss_peak"] for c in cols])
    for c in cols:
        if results[c]["ingest"]["bad"] or results[c]["errors"]:
            print(f"{c}: {results[c]['ingest']['bad']} rows not stored whole; log: "
                  f"{results[c]['errors']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", choices=["sqlite3", "pgsql", "both"], default="both")
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--size", type=int, default=1 << 20)
    ap.add_argument("--limit", type=int, default=10 << 20)
    ap.add_argument("--newest-runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    dbs = ["sqlite3", "pgsql"] if args.db == "both" else [args.db]
    if not MODULE.exists():
        raise SystemExit(f"{MODULE} is missing: build first (sh scripts/build.sh build/release)")
    tmp = Path(tempfile.mkdtemp(prefix="msoauth-attach-bench."))
    os.chmod(tmp, 0o755)
    sim = None
    t_start = time.time()
    try:
        sim = Sim(tmp, 0)
        sim_setup(sim)
        (acct,) = bulk_accounts(sim, "attach", 1, 0)
        box = seed_mailbox(sim, acct["upn"], args.messages, args.every, args.size)
        ceiling = build_ceiling(tmp)
        results = {}
        for db in dbs:
            print(f"--- {db}", flush=True)
            b = Bench(args, tmp, sim, acct, box, ceiling)
            results[db] = b.run(db)
        report(args, results, b.total_bytes, b.total_atts)
        print(f"\n(total run time {time.time() - t_start:.0f}s)")
    finally:
        if sim:
            sim.stop()
        if os.environ.get("MSO_BENCH_KEEP"):
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
