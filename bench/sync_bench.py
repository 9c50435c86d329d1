#!/usr/bin/python3
"""The mail mirror's speed through the real module (httpd + background job +
Graph simulator + database), each figure next to a reference measured in the
same run on the same machine.

    python3 bench/sync_bench.py [--db sqlite3|pgsql|both] [--messages 100000]
                                [--mailboxes 4] [--idle 1000,10000]
                                [--newest-messages 100000] [--newest-runs 3]

a) Ingest: --mailboxes simulator accounts holding --messages messages between
   them are connected by inserting their account rows with sealed tokens (as
   the module seals them), due at once; the job mirrors them. Rate = messages /
   (last row - first row), polled every 0.1 s; also connect -> converged.
   References, same run:
   - parse ceiling: bench/ceiling.c parses delta pages saved from the
     simulator (fetched with the module's URL and Prefer headers) with lib's
     mso_graph_parse_page, entries/s on one core (and jansson alone);
   - insert ceiling: the same rows into a table of msoauth_messages' shape in
     the same database, httpd stopped: prepared one-row INSERTs with a
     transaction per 100 rows, and prepared 100-row INSERTs; the faster is
     "the ceiling";
   - for diagnosis: the module's storage path alone (lib's
     mso_mirror_apply_page on the same pages, no HTTP), the module's SQL shape
     (two 50-row upserts per transaction) prepared and, on PostgreSQL, unnamed
     (sent with its SQL every time, as the module ran it before it prepared
     named statements), the simulator's own serving rate (a Python
     client fetching the mailboxes at once), and from the simulator's log how
     much of the window had a page in flight (the job's pauses between passes).
   ratio = ingest / min(parse ceiling, insert ceiling); the goal: >= 0.7.
b) Newest first: a mailbox of --newest-messages messages is connected through
   the real sign-in (connect -> simulator authorize -> confirm); seconds from
   sending the confirm request until the 50 newest messages (by
   receivedDateTime) are rows of msoauth_messages, polled every 20 ms;
   --newest-runs times (the account is deleted in between). Goal: < 2 s.
c) Idle incremental cycle: 1,000 then 10,000 mailboxes (--idle) of 5 messages
   each, initial sync done; then every one made due at once (sync_due_at = 0)
   and timed until each has last_sync_at >= the start; httpd CPU seconds and
   delta requests per second. Goal: 10,000 in under a minute.

Loopback only; every wait is bounded. With --db pgsql a private cluster is
started with t/pgcluster.sh. MSO_BENCH_KEEP=1 keeps the work directory.
"""
import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import http.client
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "t" / "integration"))
sys.path.insert(0, str(REPO / "bench"))
from conftest import IS_ROOT, MODULE, RUN_USER, Browser, Httpd  # noqa: E402
from mirror_common import (CpuMeter, PgStore, Sealer, Session, Sim, SqliteStore,  # noqa: E402
                           bulk_accounts, delete_accounts, insert_accounts, module_conf,
                           sim_setup, wait_for, wait_schema)

BUILD = MODULE.parent.parent
SELECT = ("internetMessageId,conversationId,subject,from,toRecipients,receivedDateTime,isRead,"
          "hasAttachments,importance,bodyPreview,body,webLink")      # lib/mso_graph.h


# --- references -----------------------------------------------------------------------------

def build_ceiling(tmp):
    exe = tmp / "ceiling"
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "apr-1", "apr-util-1", "libcurl",
                            "jansson", "libcrypto"], capture_output=True, text=True,
                           check=True).stdout.split()
    cmd = ["cc", "-O2", "-I", str(REPO / "lib"), "-I", str(BUILD), str(REPO / "bench" / "ceiling.c"),
           str(BUILD / ".libs" / "libmso.a")] + flags + ["-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"cannot build bench/ceiling.c:\n{' '.join(cmd)}\n{r.stderr}")
    exe.chmod(0o755)
    return exe


def run_ceiling(exe, *args, as_run_user=False, timeout=300):
    cmd = [str(exe), *map(str, args)]
    if as_run_user and IS_ROOT:
        cmd = ["runuser", "-u", RUN_USER, "--"] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def fetch_round(sim, token, save_dir=None):
    """One full delta round of the inbox, as the module asks for it. Returns
    (entries, pages, bytes)."""
    c = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=60)
    url = (f"/v1.0/me/mailFolders/inbox/messages/delta?$select={SELECT}"
           "&$orderby=receivedDateTime%20desc")
    n = pages = nbytes = 0
    while url:
        c.request("GET", url, headers={"Authorization": f"Bearer {token}",
                                       "Prefer": 'odata.maxpagesize=100, IdType="ImmutableId"',
                                       "Accept": "application/json"})
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            raise SystemExit(f"delta page: {r.status} {body[:300]!r}")
        if save_dir is not None:
            (save_dir / f"page-{pages:05d}.json").write_bytes(body)
            (save_dir / f"page-{pages:05d}.json").chmod(0o644)
        j = json.loads(body)
        n += len(j["value"])
        pages += 1
        nbytes += len(body)
        link = j.get("@odata.nextLink")
        url = link[len(sim.url):] if link else None
    c.close()
    return n, pages, nbytes


def sim_serving_rate(sim, accounts, save_dir):
    """All mailboxes fetched at once by a Python client (one thread each), the
    first one's pages saved for the ceilings: what the simulator can serve."""
    res = [None] * len(accounts)

    def one(i):
        res[i] = fetch_round(sim, accounts[i]["access_token"], save_dir if i == 0 else None)
    t0 = time.time()
    ths = [threading.Thread(target=one, args=(i,)) for i in range(len(accounts))]
    for t in ths:
        t.start()
    for t in ths:
        t.join(600)
    dt = time.time() - t0
    return sum(r[0] for r in res) / dt, res[0]


# --- the log of the simulator ------------------------------------------------------------------

def busy_profile(entries, t_from, t_to, pause=0.3):
    """Of the window: share of time with at least one delta request in flight at
    the simulator, mean requests in flight, the longest stretch with none, and
    the stretches with none longer than `pause` (the job between its passes)."""
    iv = sorted((e["t"], e["t"] + e["ms"] / 1000.0) for e in entries)
    covered, cur_end, total = 0.0, t_from, 0.0
    gaps = []
    for s, e in iv:
        s, e = max(s, t_from), min(e, t_to)
        if e <= s:
            continue
        total += e - s
        if s > cur_end:
            gaps.append(s - cur_end)
            covered += e - s
            cur_end = e
        elif e > cur_end:
            covered += e - cur_end
            cur_end = e
    gaps.append(t_to - cur_end)
    win = max(t_to - t_from, 1e-9)
    pauses = [g for g in gaps if g > pause]
    return {"busy": covered / win, "inflight": total / win, "gap_max": max(gaps),
            "pauses": len(pauses), "pause_s": sum(pauses), "window": win}


# --- one database --------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, tmp, sim, seeded, ceiling, pages_dir):
        self.args, self.tmp, self.sim, self.seeded = args, tmp, sim, seeded
        self.ceiling, self.pages_dir = ceiling, pages_dir

    def run(self, driver):
        res = {}
        h = Httpd(self.tmp, f"httpd-{driver}")
        key_hex = secrets.token_hex(32)
        h.file("keys/k1.hex", key_hex)
        store = PgStore(None, self.tmp) if driver == "pgsql" \
            else SqliteStore(h.root / "data" / "msoauth.db")
        drv, params = store.dbd()
        sess = None
        try:
            # A sync interval of a day: only the benchmark makes mailboxes due again.
            h.start(module_conf(drv, params, self.sim.url, "MSOAuthSyncInterval 86400"))
            sess = Session(store, self.tmp / f"session-{driver}.err")
            wait_schema(sess)
            sealer = Sealer(key_hex)
            res["ingest"] = self.ingest(h, store, sess, sealer)
            h.stop()
            res["ceilings"] = self.ceilings(store, sess, sealer, drv, params,
                                            res["ingest"]["ids"])
            h.start()
            res["newest"] = self.newest(h, store, sess)
            res["idle"] = self.idle(h, store, sess, sealer)
            res["errors"] = [ln for ln in h.log().splitlines()
                             if "[msoauth:error]" in ln or "[msoauth:warn]" in ln][-5:]
        finally:
            if sess:
                sess.close()
            h.stop()
            store.close()
        return res

    # a) ------------------------------------------------------------------------------------
    def ingest(self, h, store, sess, sealer):
        accts = self.seeded["ingest"]
        total = len(accts) * self.args.per_mailbox
        self.sim.call("DELETE", "/_sim/log")
        time.sleep(1.2)                                  # a job tick with nothing due
        cpu = CpuMeter(h, self.sim, store).start()
        t_insert = time.time()
        ids = insert_accounts(store, sealer, self.sim.url, accts, 1, int(t_insert))
        t_inserted = time.time()
        print(f"  ingest: {len(accts)} accounts connected ({t_inserted - t_insert:.2f}s to "
              f"insert); waiting for {total} rows", flush=True)
        idlist = ",".join(map(str, ids))
        t_first = t_last = None
        n = 0
        end = time.time() + self.args.ingest_timeout
        last_print = time.time()
        while time.time() < end:
            n = sess.value(f"SELECT COUNT(*) FROM msoauth_messages WHERE account_id IN ({idlist})")
            now = time.time()
            if n and t_first is None:
                t_first = now
            if n >= total:
                idle = sess.value("SELECT COUNT(*) FROM msoauth_accounts WHERE "
                                  f"id IN ({idlist}) AND sync_phase = 'idle'")
                if t_last is None:
                    t_last = now
                if idle == len(ids):
                    break
            if now - last_print > 10:
                last_print = now
                print(f"    {now - t_inserted:6.1f}s: {n}/{total} rows", flush=True)
            time.sleep(0.1)
        t_conv = time.time()
        c = cpu.stop()
        if t_last is None:
            print(f"WARNING: only {n}/{total} rows after {self.args.ingest_timeout:.0f}s")
            t_last = t_conv
        got = self.sim.call("GET", "/_sim/log")
        log = got["requests"]
        if got.get("dropped"):
            # The profile below would count the lost start of the window as a pause.
            print(f"WARNING: the simulator's log dropped its {got['dropped']} oldest entries "
                  "(--log-max): the in-flight figures cover only the end of the window")
        delta = [e for e in log if e.get("kind") == "graph_delta"]
        prof = busy_profile(delta, t_first or t_inserted, t_last)
        # Attachment lists (messages with hasAttachments) share the mailboxes'
        # requests with the pages: a stretch without pages may be full of them.
        lists = [e for e in log if e.get("kind") == "graph_attachments"]
        prof_any = busy_profile(delta + lists, t_first or t_inserted, t_last)
        ms = sorted(e["ms"] for e in delta)
        return {"ids": ids, "rows": n, "total": total,
                "rate": n / max(t_last - (t_first or t_inserted), 1e-9),
                "rate_connect": n / max(t_conv - t_inserted, 1e-9),
                "first_s": (t_first or t_inserted) - t_inserted, "last_s": t_last - t_inserted,
                "converged_s": t_conv - t_inserted, "cpu": c, "requests": len(delta),
                "page_ms_median": ms[len(ms) // 2] if ms else 0, "prof": prof,
                "lists": len(lists), "prof_any": prof_any,
                "rate_active": n / max(prof["window"] - prof["pause_s"], 1e-9)}

    # a) references --------------------------------------------------------------------------
    def ceilings(self, store, sess, sealer, drv, params, ingest_ids):
        exe, pages = self.ceiling, self.pages_dir
        ids = ",".join(map(str, ingest_ids))
        out = {}
        modes = ["single", "multi", "upsert50"] + (["upsert50-unnamed"] if drv == "pgsql" else [])
        for mode in modes:
            out[mode] = run_ceiling(exe, "insert", drv, params, pages, ids, mode,
                                    as_run_user=drv == "sqlite3")
        # The module's storage path alone: accounts the job ignores (disconnected),
        # leased to "ceiling" so mso_mirror_apply_page's fence passes.
        accts = self.seeded["ingest"]
        first = 900001
        fake = [dict(x, upn=f"ceiling{i:05d}@contoso.com") for i, x in enumerate(accts)]
        apply_ids = insert_accounts(store, sealer, self.sim.url, fake, first, int(time.time()),
                                    sync_due_at=None, state="disconnected", work_owner="ceiling")
        out["apply"] = run_ceiling(exe, "insert", drv, params, pages,
                                   ",".join(map(str, apply_ids)), "apply",
                                   as_run_user=drv == "sqlite3")
        delete_accounts(store, f"id >= {first}")
        return out

    # b) ------------------------------------------------------------------------------------
    def newest(self, h, store, sess):
        big = self.seeded["newest"][0]
        mailbox = big["upn"].lower()
        box = self.sim.call("GET", f"/_sim/mailbox/{big['oid']}")["messages"]
        box.sort(key=lambda m: m["receivedDateTime"], reverse=True)
        newest = [m["id"] for m in box if m["folder"] == "inbox"][:50]
        in_list = ",".join(f"'{i}'" for i in newest)
        runs = []
        for run in range(self.args.newest_runs):
            delete_accounts(store, f"mailbox = '{mailbox}'")
            time.sleep(1.5)             # let a pass that was syncing it notice and end
            b = Browser()
            r1 = b.get(f"{h.url}/microsoft_outlook/connect?mailbox={mailbox}&return_to=/done")
            r2 = b.get(r1.location) if r1.status == 302 else None
            if not r2 or r2.status != 302:
                raise SystemExit(f"sign-in for {mailbox}: {r1.status} "
                                 f"{r2.status if r2 else ''} {h.log()[-2000:]}")
            t0 = time.time()
            r3 = b.get(r2.location)
            t_confirmed = time.time() - t0
            if r3.status != 302 or "msoauth=connected" not in (r3.location or ""):
                raise SystemExit(f"confirm: {r3.status} {r3.location} {h.log()[-2000:]}")
            acc = int(r3.location.split("account=")[1].split("&")[0])
            got, t_done = 0, None
            end = t0 + 60
            while time.time() < end:
                got = sess.value("SELECT COUNT(*) FROM msoauth_messages WHERE "
                                 f"account_id = {acc} AND graph_id IN ({in_list})")
                if got >= len(newest):
                    t_done = time.time() - t0
                    break
                time.sleep(0.02)
            rows = sess.value(f"SELECT COUNT(*) FROM msoauth_messages WHERE account_id = {acc}")
            runs.append({"confirm_s": t_confirmed, "newest50_s": t_done, "got": got,
                         "rows_then": rows})
            print(f"  newest 50 of {len(box)}: run {run + 1}: confirm answered in "
                  f"{t_confirmed:.3f}s, newest 50 queryable after "
                  f"{t_done if t_done is not None else float('nan'):.3f}s "
                  f"({rows} rows by then)", flush=True)
        delete_accounts(store, f"mailbox = '{mailbox}'")
        return runs

    # c) ------------------------------------------------------------------------------------
    def idle(self, h, store, sess, sealer):
        out = []
        accts = self.seeded["idle"]
        have = 0
        base = 100001
        for n in self.args.idle:
            if n > have:
                t0 = time.time()
                insert_accounts(store, sealer, self.sim.url, accts[have:n], base + have,
                                int(time.time()))
                t_ins = time.time() - t0
                have = n
                where = f"id >= {base} AND id < {base + n}"
                t0 = time.time()
                last = [0, time.time()]

                def synced():
                    k = sess.value(f"SELECT COUNT(*) FROM msoauth_accounts WHERE {where} "
                                   "AND last_sync_at IS NOT NULL AND sync_phase = 'idle'")
                    if time.time() - last[1] > 10:
                        last[1] = time.time()
                        print(f"    initial syncs: {k}/{n} after {time.time() - t0:.0f}s",
                              flush=True)
                    return k >= n
                wait_for(f"{n} initial syncs", synced, self.args.initial_timeout, every=0.5)
                t_init = time.time() - t0
                print(f"  idle: {n} accounts inserted in {t_ins:.1f}s, initial syncs done in "
                      f"{t_init:.1f}s ({n / t_init:.0f} mailboxes/s)", flush=True)
            where = f"id >= {base} AND id < {base + n}"
            # Start on a fresh second: every earlier last_sync_at is then older.
            time.sleep(1.0 - (time.time() % 1.0) + 0.05)
            start_s = int(time.time()) + 1
            time.sleep(start_s - time.time() + 0.01)
            before = self.sim.call("GET", "/_sim/counters")["calls"]
            cpu = CpuMeter(h, self.sim, store).start()
            t0 = time.time()
            store.run(f"UPDATE msoauth_accounts SET sync_due_at = 0 WHERE {where}")
            done = 0
            end = t0 + self.args.idle_timeout
            while time.time() < end:
                done = sess.value(f"SELECT COUNT(*) FROM msoauth_accounts WHERE {where} "
                                  f"AND last_sync_at >= {start_s}")
                if done >= n:
                    break
                time.sleep(0.2)
            dt = time.time() - t0
            c = cpu.stop()
            after = self.sim.call("GET", "/_sim/counters")["calls"]
            reqs = after.get("graph_delta", 0) - before.get("graph_delta", 0)
            errs = sess.value(f"SELECT COUNT(*) FROM msoauth_accounts WHERE {where} "
                              "AND sync_error IS NOT NULL")
            out.append({"n": n, "done": done, "seconds": dt, "requests": reqs, "cpu": c,
                        "errors": errs})
            print(f"  idle cycle over {n}: {done}/{n} in {dt:.1f}s, {reqs} delta requests, "
                  f"httpd CPU {c['httpd']:.1f}s", flush=True)
        return out


# --- the report ----------------------------------------------------------------------------------

def report(args, dbs, results, parse, serve, page_info):
    cols = list(results)
    w = 14

    def row(label, vals, fmt="{:.0f}"):
        cells = []
        for v in vals:
            cells.append(f"{'-':>{w}}" if v is None else
                         f"{v:>{w}}" if isinstance(v, str) else f"{fmt.format(v):>{w}}")
        print(f"{label:66}" + "".join(cells))

    print(f"\nsync benchmark: {args.mailboxes} mailboxes x {args.per_mailbox} messages, "
          f"{os.cpu_count()} cores, one httpd (mpm_event); pages of 100 "
          f"({page_info[1]} pages, {page_info[2] / page_info[1] / 1024:.0f} KiB each on average)")
    print(f"{'':66}" + "".join(f"{c:>{w}}" for c in cols))
    print("a) ingest")
    row("module ingest, first row -> last row (msg/s)", [results[c]["ingest"]["rate"] for c in cols])
    row("module ingest, connect -> converged (msg/s)",
        [results[c]["ingest"]["rate_connect"] for c in cols])
    row("  first row after connect (s)", [results[c]["ingest"]["first_s"] for c in cols], "{:.2f}")
    row("  last row after connect (s)", [results[c]["ingest"]["last_s"] for c in cols], "{:.1f}")
    row("parse ceiling: mso_graph_parse_page, 1 core (entries/s)", [parse["entries_per_s"]] * len(cols))
    row("  jansson json_loadb alone, 1 core (entries/s)", [parse["jansson_entries_per_s"]] * len(cols))
    row("insert ceiling: prepared 1-row INSERT, tx/100 rows (rows/s)",
        [results[c]["ceilings"]["single"]["rows_per_s"] for c in cols])
    row("insert ceiling: prepared 100-row INSERT (rows/s)",
        [results[c]["ceilings"]["multi"]["rows_per_s"] for c in cols])
    ceil = {c: max(results[c]["ceilings"]["single"]["rows_per_s"],
                   results[c]["ceilings"]["multi"]["rows_per_s"]) for c in cols}
    row("insert ceiling (the faster of the two)", [ceil[c] for c in cols])
    ref = {c: min(parse["entries_per_s"], ceil[c]) for c in cols}
    row("reference = min(parse ceiling, insert ceiling)", [ref[c] for c in cols])
    row("RATIO ingest / reference (goal >= 0.7)",
        [results[c]["ingest"]["rate"] / ref[c] for c in cols], "{:.3f}")
    print("  for diagnosis:")
    row("  module storage path alone: mso_mirror_apply_page (rows/s)",
        [results[c]["ceilings"]["apply"]["rows_per_s"] for c in cols])
    row("  module's SQL: 2 x 50-row upsert per tx, prepared (rows/s)",
        [results[c]["ceilings"]["upsert50"]["rows_per_s"] for c in cols])
    row("  ... the same unnamed, SQL sent with every run (rows/s)",
        [results[c]["ceilings"].get("upsert50-unnamed", {}).get("rows_per_s") for c in cols])
    row("  simulator serving, Python client, all mailboxes (msg/s)", [serve] * len(cols))
    row("  delta requests during ingest", [results[c]["ingest"]["requests"] for c in cols])
    row("  median page time at the simulator (ms)",
        [results[c]["ingest"]["page_ms_median"] for c in cols], "{:.1f}")
    row("  share of the window with a page in flight at the simulator",
        [results[c]["ingest"]["prof"]["busy"] for c in cols], "{:.2f}")
    row("  mean pages in flight", [results[c]["ingest"]["prof"]["inflight"] for c in cols],
        "{:.2f}")
    row("  longest stretch with no page in flight (s)",
        [results[c]["ingest"]["prof"]["gap_max"] for c in cols], "{:.2f}")
    row("  stretches > 0.3 s with no page in flight (between passes)",
        [results[c]["ingest"]["prof"]["pauses"] for c in cols])
    row("  ... their total (s) / the window first -> last row (s)",
        ["{:.1f} / {:.1f}".format(results[c]["ingest"]["prof"]["pause_s"],
                                  results[c]["ingest"]["prof"]["window"]) for c in cols])
    row("  ingest rate with those pauses left out (msg/s)",
        [results[c]["ingest"]["rate_active"] for c in cols])
    row("  attachment lists during ingest (messages with hasAttachments)",
        [results[c]["ingest"]["lists"] for c in cols])
    row("  share of the window with a page or a list in flight",
        [results[c]["ingest"]["prof_any"]["busy"] for c in cols], "{:.2f}")
    row("  stretches > 0.3 s with neither in flight",
        [results[c]["ingest"]["prof_any"]["pauses"] for c in cols])
    for k, label in (("httpd", "httpd"), ("sim", "simulator"), ("pg", "postgres"),
                     ("other", "everything else on the machine"),
                     ("busy", "machine busy (both cores)")):
        row(f"  CPU s during ingest: {label}", [results[c]["ingest"]["cpu"][k] for c in cols],
            "{:.1f}")
    row("  machine CPU capacity in that time (s)",
        [results[c]["ingest"]["cpu"]["total"] for c in cols], "{:.1f}")

    print(f"b) newest 50 of a {args.newest_messages}-message mailbox, seconds from the confirm "
          "request (goal < 2 s)")
    for i in range(args.newest_runs):
        row(f"  run {i + 1}: newest 50 queryable (s)",
            [results[c]["newest"][i]["newest50_s"] for c in cols], "{:.3f}")
        row(f"  run {i + 1}: confirm answered (s)",
            [results[c]["newest"][i]["confirm_s"] for c in cols], "{:.3f}")
    print("c) idle incremental cycle (goal: 10,000 in < 60 s)")
    for i, n in enumerate(args.idle):
        row(f"  {n} mailboxes: seconds until all synced",
            [results[c]["idle"][i]["seconds"] for c in cols], "{:.1f}")
        row(f"  {n} mailboxes: synced", [results[c]["idle"][i]["done"] for c in cols])
        row(f"  {n} mailboxes: mailboxes/s",
            [results[c]["idle"][i]["done"] / results[c]["idle"][i]["seconds"] for c in cols])
        row(f"  {n} mailboxes: delta requests/s",
            [results[c]["idle"][i]["requests"] / results[c]["idle"][i]["seconds"] for c in cols])
        row(f"  {n} mailboxes: httpd CPU s",
            [results[c]["idle"][i]["cpu"]["httpd"] for c in cols], "{:.2f}")
        row(f"  {n} mailboxes: httpd CPU ms per mailbox",
            [results[c]["idle"][i]["cpu"]["httpd"] * 1000 / max(1, results[c]["idle"][i]["done"])
             for c in cols], "{:.2f}")
        row(f"  {n} mailboxes: simulator CPU s",
            [results[c]["idle"][i]["cpu"]["sim"] for c in cols], "{:.2f}")
        row(f"  {n} mailboxes: postgres CPU s",
            [results[c]["idle"][i]["cpu"]["pg"] for c in cols], "{:.2f}")
        row(f"  {n} mailboxes: accounts with a sync error",
            [results[c]["idle"][i]["errors"] for c in cols])
    for c in cols:
        if results[c]["errors"]:
            print(f"last module warnings/errors ({c}):")
            for ln in results[c]["errors"]:
                print("  " + ln[:300])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", choices=["sqlite3", "pgsql", "both"], default="both")
    ap.add_argument("--messages", type=int, default=100000)
    ap.add_argument("--mailboxes", type=int, default=4)
    ap.add_argument("--idle", default="1000,10000")
    ap.add_argument("--newest-messages", type=int, default=100000)
    ap.add_argument("--newest-runs", type=int, default=3)
    ap.add_argument("--parse-seconds", type=float, default=3)
    ap.add_argument("--ingest-timeout", type=float, default=240)
    ap.add_argument("--initial-timeout", type=float, default=180)
    ap.add_argument("--idle-timeout", type=float, default=120)
    args = ap.parse_args()
    args.idle = sorted(int(x) for x in args.idle.split(",") if x.strip())
    args.per_mailbox = args.messages // args.mailboxes
    dbs = ["sqlite3", "pgsql"] if args.db == "both" else [args.db]
    if not MODULE.exists():
        raise SystemExit(f"{MODULE} is missing: build first (sh scripts/build.sh build/release)")

    tmp = Path(tempfile.mkdtemp(prefix="msoauth-sync-bench."))
    os.chmod(tmp, 0o755)
    sim = None
    t_start = time.time()
    try:
        sim = Sim(tmp, 0)
        sim_setup(sim)
        t0 = time.time()
        seeded = {
            "ingest": bulk_accounts(sim, "ingest", args.mailboxes, args.per_mailbox, chunk=1),
            "newest": bulk_accounts(sim, "newest", 1, args.newest_messages),
            "idle": bulk_accounts(sim, "idle", max(args.idle or [0]), 5),
        }
        print(f"seeded the simulator in {time.time() - t0:.1f}s: {args.mailboxes} x "
              f"{args.per_mailbox}, 1 x {args.newest_messages}, {max(args.idle or [0])} x 5 "
              "messages", flush=True)
        pages = tmp / "pages"
        pages.mkdir()
        pages.chmod(0o755)
        serve, page_info = sim_serving_rate(sim, seeded["ingest"], pages)
        print(f"simulator serves {serve:.0f} msg/s to a Python client; saved "
              f"{page_info[1]} pages of one mailbox", flush=True)
        ceiling = build_ceiling(tmp)
        parse = run_ceiling(ceiling, "parse", pages, args.parse_seconds)
        print(f"parse ceiling: {parse['entries_per_s']:.0f} entries/s "
              f"({parse['mb_per_s']:.0f} MB/s)", flush=True)
        results = {}
        for db in dbs:
            print(f"--- {db}", flush=True)
            results[db] = Bench(args, tmp, sim, seeded, ceiling, pages).run(db)
        report(args, dbs, results, parse, serve, page_info)
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
