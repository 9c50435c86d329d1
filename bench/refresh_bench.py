#!/usr/bin/python3
"""One refresh wave of N accounts through the background job, against the
Microsoft simulator answering every identity call after --latency-ms, then the
msoauth-token handler's requests per second for a cached token next to a
static file of the same httpd (wrk, alternating rounds).

    python3 bench/refresh_bench.py [--accounts 10000] [--latency-ms 50]
                                   [--db sqlite3|pgsql [--pg-params "host=... dbname=..."]]
                                   [--rounds 3] [--seconds 5] [--connections 32]

Accounts are seeded without the browser: one simulator user and one real
authorization-code grant (PKCE) per account, run from Python at the simulator;
the refresh token it issued is sealed as the module seals it (AES-256-GCM under
HKDF-SHA256(master key, "mso-token-v1"), AAD bound to company, mailbox and kind)
and inserted with the account row straight into the database, not due. Then
every account is made due at once and the wave is timed until each has
last_refresh_at >= the start.

With --db pgsql and no --pg-params, a private cluster is started with
t/pgcluster.sh; either way the tables live in a private schema that is dropped
at the end. Loopback only; every wait is bounded.
"""
import argparse
import base64
import hashlib
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
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "t" / "integration"))
sys.path.insert(0, str(REPO / "bench"))
from conftest import IS_ROOT, MODULE, RUN_USER, Httpd, free_port, wait_port  # noqa: E402
from connect_bench import httpd_cpu_seconds, wrk  # noqa: E402

CLIENT_ID = "0c9a7d52-6a0e-4c55-9d0e-3c2b1a0f9e8d"
SECRET = "Sim8Q~bench.secret_value-" + "x" * 12
TENANT = "b3a8f1e2-5c47-4d1a-9e36-2f0c8d7a6b51"
REDIRECT = "http://127.0.0.1/microsoft_outlook/confirm"
SIGNIN_SCOPES = "openid profile email offline_access https://graph.microsoft.com/Mail.Read"
COMPANY = "default"


# --- sealing, as lib/mso_crypto does ------------------------------------------------

class Sealer:
    def __init__(self, key_hex):
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        master = bytes.fromhex(key_hex)
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=b"mso-token-v1").derive(master)
        kid = HKDF(algorithm=hashes.SHA256(), length=4, salt=None,
                   info=b"mso-kid-v1").derive(master)
        self.aead = AESGCM(key)
        self.header = bytes([1]) + kid

    def seal_token(self, account_id, kind, plain):
        """blob = version 1 | kid | nonce | ciphertext+tag, AAD = header | purpose 1 |
        "token:v2:<kind>:<client ID>:<account id>" (binding 2, lib/mso_account.h),
        base64url without padding."""
        nonce = secrets.token_bytes(12)
        aad = self.header + bytes([1]) + \
            f"token:v2:{kind}:{CLIENT_ID.lower()}:{account_id}".encode()
        ct = self.aead.encrypt(nonce, plain.encode(), aad)
        return base64.urlsafe_b64encode(self.header + nonce + ct).decode().rstrip("=")


# --- the simulator --------------------------------------------------------------------

class Sim:
    def __init__(self, workdir, latency_ms):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "sim.log", "w")
        self.proc = subprocess.Popen([sys.executable, str(REPO / "t" / "sim" / "mssim.py"),
                                      "--port", str(self.port), "--latency-ms", str(latency_ms),
                                      "--log-max", "100000"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, proc=self.proc)
        self.local = threading.local()

    def conn(self):
        c = getattr(self.local, "c", None)
        if c is None:
            c = self.local.c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        return c

    def request(self, method, path, body=None, headers=None):
        for attempt in (1, 2):
            c = self.conn()
            try:
                c.request(method, path, body=body, headers=headers or {})
                r = c.getresponse()
                return r.status, dict(r.getheaders()), r.read()
            except (http.client.HTTPException, OSError):
                c.close()
                self.local.c = None
                if attempt == 2:
                    raise

    def call(self, method, path, obj=None):
        body = json.dumps(obj).encode() if obj is not None else None
        status, _, raw = self.request(method, path, body, {"Content-Type": "application/json"})
        if status >= 400:
            raise SystemExit(f"simulator {method} {path}: {status} {raw[:300]!r}")
        return json.loads(raw) if raw else None

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def seed_one(sim, i):
    """A user and a real code grant for it -> account facts with the refresh token."""
    mailbox = f"bench{i:05d}@contoso.com"
    user = sim.call("POST", "/_sim/users", {"tenant_id": TENANT, "upn": mailbox,
                                            "name": f"Bench {i:05d}"})
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()) \
        .decode().rstrip("=")
    q = urllib.parse.urlencode({
        "client_id": CLIENT_ID, "response_type": "code", "redirect_uri": REDIRECT,
        "scope": SIGNIN_SCOPES, "state": secrets.token_urlsafe(32),
        "nonce": secrets.token_urlsafe(32), "code_challenge": challenge,
        "code_challenge_method": "S256", "login_hint": user["oid"]})     # oid: O(1) lookup
    status, headers, body = sim.request("GET", f"/common/oauth2/v2.0/authorize?{q}")
    loc = headers.get("Location") or headers.get("location")
    if status != 302 or not loc:
        raise SystemExit(f"authorize for {mailbox}: {status} {body[:300]!r}")
    code = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(loc).query))["code"]
    form = urllib.parse.urlencode({
        "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
        "code_verifier": verifier, "client_id": CLIENT_ID, "client_secret": SECRET,
        # No openid here: the simulator then signs no ID token (seeding speed).
        "scope": "offline_access https://graph.microsoft.com/Mail.Read"}).encode()
    status, _, body = sim.request("POST", "/common/oauth2/v2.0/token", form,
                                  {"Content-Type": "application/x-www-form-urlencoded"})
    tok = json.loads(body)
    if status != 200 or "refresh_token" not in tok:
        raise SystemExit(f"token for {mailbox}: {status} {body[:300]!r}")
    return {"id": i, "mailbox": mailbox, "name": f"Bench {i:05d}", "oid": user["oid"],
            "rt": tok["refresh_token"], "scope": tok.get("scope", "")}


# --- the database ---------------------------------------------------------------------

def q(v):
    if v is None:
        return "NULL"
    if isinstance(v, int):
        return str(v)
    return "'" + str(v).replace("'", "''") + "'"


class SqliteStore:
    def __init__(self, path):
        self.path = path

    def dbd(self):
        return "sqlite3", str(self.path)

    def run(self, sql, stdin=False):
        cmd = ["sqlite3", "-batch", "-cmd", ".timeout 30000", str(self.path)]
        if not stdin:
            cmd.append(sql)
        if IS_ROOT:
            cmd = ["runuser", "-u", RUN_USER, "--"] + cmd
        r = subprocess.run(cmd, input=sql if stdin else None, capture_output=True, text=True,
                           timeout=600)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        return r.stdout.strip()

    def bulk(self, sql):
        return self.run(sql, stdin=True)

    def close(self):
        pass


class PgStore:
    def __init__(self, params, workdir):
        self.cluster = None
        if not params:
            self.cluster = workdir / "pgcluster"
            r = subprocess.run(["sh", str(REPO / "t" / "pgcluster.sh"), "start",
                                str(self.cluster), str(free_port())], capture_output=True,
                               text=True, timeout=120)
            if r.returncode != 0:
                raise SystemExit(f"t/pgcluster.sh failed: {r.stderr}")
            params = r.stdout.strip().splitlines()[-1]
        self.base = params
        self.schema = "bench_" + secrets.token_hex(4)
        self._psql(self.base, f"CREATE SCHEMA {self.schema}")
        self.params = f"{params} options='-csearch_path={self.schema}'"

    def dbd(self):
        return "pgsql", self.params

    @staticmethod
    def _psql(params, sql, stdin=False):
        cmd = ["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", params]
        cmd += ["-f", "-"] if stdin else ["-c", sql]
        r = subprocess.run(cmd, input=sql if stdin else None, capture_output=True, text=True,
                           timeout=600)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        return r.stdout.strip()

    def run(self, sql):
        return self._psql(self.params, sql)

    def bulk(self, sql):
        return self._psql(self.params, sql, stdin=True)

    def close(self):
        try:
            self._psql(self.base, f"DROP SCHEMA {self.schema} CASCADE")
        finally:
            if self.cluster:
                subprocess.run(["sh", str(REPO / "t" / "pgcluster.sh"), "stop",
                                str(self.cluster)], capture_output=True, timeout=120)


def insert_accounts(db, sealer, sim_url, seeded, now):
    """Account rows and sealed refresh tokens, in one transaction, not due."""
    lines = ["BEGIN;"]
    for a in seeded:
        lines.append(
            "INSERT INTO msoauth_accounts (id, company, client_id, mailbox, display_name, "
            "tenant_id, object_id, scopes, state, authority, access_expires_at, connected_by, "
            "created_at, updated_at, refresh_due_at, error_runs) VALUES ("
            + ", ".join(q(v) for v in (a["id"], COMPANY, CLIENT_ID.lower(), a["mailbox"],
                                        a["name"], TENANT, a["oid"], a["scope"], "connected",
                                        f"{sim_url}/common", now - 1, "bench", now, now,
                                        now + 86400, 0)) + ");")
        lines.append(
            "INSERT INTO msoauth_tokens (account_id, kind, sealed, expires_at, updated_at, "
            f"binding) VALUES ({a['id']}, 'refresh', "
            f"{q(sealer.seal_token(a['id'], 'refresh', a['rt']))}, NULL, {now}, 2);")
    lines.append("COMMIT;")
    db.bulk("\n".join(lines) + "\n")


# --- measuring -------------------------------------------------------------------------

def vm_rss_kb(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def sim_connections(port):
    out = subprocess.run(["ss", "-tnH", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True).stdout
    return sum(1 for l in out.splitlines() if l.strip())


def peak_overlap(entries):
    """Most requests in flight at once, from the simulator log's start times and durations."""
    events = []
    for e in entries:
        events.append((e["t"], 1))
        events.append((e["t"] + e["ms"] / 1000.0, -1))
    events.sort(key=lambda x: (x[0], x[1]))
    cur = peak = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def job_pids(h):
    import re
    return [int(m) for m in re.findall(r"job started in pid (\d+)", h.log())]


def wait(what, pred, timeout, every=0.2):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")


def get(url):
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--accounts", type=int, default=10000)
    ap.add_argument("--latency-ms", type=float, default=50)
    ap.add_argument("--db", choices=["sqlite3", "pgsql"], default="sqlite3")
    ap.add_argument("--pg-params", help="apr_dbd pgsql params of a running server "
                                        "(default: start a private cluster)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--seed-threads", type=int, default=8)
    ap.add_argument("--wave-timeout", type=float, default=0,
                    help="seconds (default: 60 + accounts x 0.5 x (latency + 20 ms))")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is missing: apt-get install wrk")
    if not MODULE.exists():
        raise SystemExit(f"{MODULE} is missing: build first (scripts/build.sh build/release)")
    n = args.accounts
    wave_timeout = args.wave_timeout or 60 + n * 0.5 * (args.latency_ms + 20) / 1000 * 2

    tmp = Path(tempfile.mkdtemp(prefix="msoauth-refresh-bench."))
    os.chmod(tmp, 0o755)
    sim = h = db = None
    try:
        # Seeding runs without latency; the wave with it.
        sim = Sim(tmp, 0)
        sim.call("POST", "/_sim/config", {"latency_ms": 0})
        sim.call("POST", "/_sim/apps", {
            "client_id": CLIENT_ID, "display_name": "ERP", "secrets": [{"value": SECRET}],
            "redirect_uris": [REDIRECT], "sign_in_audience": "AzureADandPersonalMicrosoftAccount",
            "home_tenant": TENANT})
        sim.call("POST", "/_sim/config", {"auto_approve": True})

        h = Httpd(tmp, "bench")
        key_hex = secrets.token_hex(32)
        h.file("keys/k1.hex", key_hex)
        db = PgStore(args.pg_params, tmp) if args.db == "pgsql" \
            else SqliteStore(h.root / "data" / "msoauth.db")
        driver, params = db.dbd()
        h.start(f"""
LogLevel warn msoauth:info
DBDriver {driver}
DBDParams "{params}"
MSOAuthTokenKeyFile keys/k1.hex
MSOAuthClientID {CLIENT_ID}
MSOAuthClientSecret "{SECRET}"
MSOAuthAuthorityURL {sim.url}
MSOAuthGraphURL {sim.url}
<Location /microsoft_outlook/token>
  SetHandler msoauth-token
  Require local
</Location>
""")
        wait("the schema", lambda: _try(lambda: db.run(
            "SELECT COUNT(*) FROM msoauth_accounts WHERE refresh_due_at IS NULL") == "0"), 30)
        job_pid = wait("the job's child", lambda: job_pids(h), 30)[-1]

        t0 = time.time()
        with ThreadPoolExecutor(args.seed_threads) as ex:
            seeded = list(ex.map(lambda i: seed_one(sim, i), range(1, n + 1)))
        t_seed = time.time() - t0
        t0 = time.time()
        now = int(time.time())
        insert_accounts(db, Sealer(key_hex), sim.url, seeded, now)
        t_insert = time.time() - t0
        del seeded
        print(f"seeded {n} users and refresh tokens at the simulator in {t_seed:.1f}s; "
              f"inserted {n} accounts in {t_insert:.1f}s", flush=True)

        sim.call("POST", "/_sim/config", {"latency_ms": args.latency_ms})
        sim.call("DELETE", "/_sim/log")
        time.sleep(2.5)                      # a job tick with nothing due
        rss_before = vm_rss_kb(job_pid)
        grants_before = sim.call("GET", "/_sim/counters")["token_grants"].get("refresh_token", 0)

        # The wave: everything due now.
        start_s = int(time.time())
        db.run(f"UPDATE msoauth_accounts SET refresh_due_at = {start_s}")
        t_start = time.time()
        samples = {"conns": 0, "rss": rss_before or 0}
        stop = threading.Event()

        def sampler():
            while not stop.is_set():
                samples["conns"] = max(samples["conns"], sim_connections(sim.port))
                samples["rss"] = max(samples["rss"], vm_rss_kb(job_pid) or 0)
                stop.wait(0.1)
        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        done = 0
        last_print = 0
        end = t_start + wave_timeout
        while True:
            done = int(db.run("SELECT COUNT(*) FROM msoauth_accounts "
                              f"WHERE last_refresh_at >= {start_s}"))
            if done >= n or time.time() > end:
                break
            if time.time() - last_print > 10:
                last_print = time.time()
                print(f"  {time.time() - t_start:6.1f}s: {done}/{n} refreshed", flush=True)
            time.sleep(0.5)
        t_wave = time.time() - t_start
        stop.set()
        th.join()
        rss_after = vm_rss_kb(job_pid)
        counters = sim.call("GET", "/_sim/counters")
        log = sim.call("GET", "/_sim/log")["requests"]
        bad = db.run("SELECT COUNT(*) FROM msoauth_accounts WHERE state <> 'connected' "
                     "OR error_runs > 0")
        if done < n:
            print(f"WARNING: only {done}/{n} accounts refreshed within {wave_timeout:.0f}s")
        pids = job_pids(h)
        token_calls = [e for e in log if e.get("grant_type") == "refresh_token"]

        # The token handler for a cached token, next to a static file.
        tok_url = f"{h.url}/microsoft_outlook/token?account=1"
        static_url = f"{h.url}/static.json"
        status, hdrs, body = get(tok_url)
        if status != 200 or "access_token" not in json.loads(body):
            raise SystemExit(f"token handler: {status} {body[:300]!r}")
        tok_size = len(body)
        # The static file: a JSON body of the same size.
        h.file("htdocs/static.json", json.dumps({"pad": "x" * (tok_size - 11)}), 0o644)
        grants_mid = sim.call("GET", "/_sim/counters")["token_grants"].get("refresh_token", 0)
        status, _, sbody = get(static_url)
        assert status == 200
        targets = [("static file (core)", static_url), ("msoauth-token (cached)", tok_url)]
        for _, url in targets:
            wrk(url, 1, args.connections)
        results = {name: [] for name, _ in targets}
        for rnd in range(args.rounds):
            order = targets if rnd % 2 == 0 else list(reversed(targets))
            for name, url in order:
                cpu0 = httpd_cpu_seconds(h)
                rps, reqs, non2xx = wrk(url, args.seconds, args.connections)
                cpu = httpd_cpu_seconds(h) - cpu0
                if non2xx:
                    raise SystemExit(f"{name}: {non2xx} responses were not 2xx/3xx")
                results[name].append((rps, cpu / max(reqs, 1) * 1e6))
        grants_end = sim.call("GET", "/_sim/counters")["token_grants"].get("refresh_token", 0)

        # --- the report ---
        print(f"\nrefresh benchmark: {n} accounts, {args.db}, simulator latency "
              f"{args.latency_ms:g} ms per identity call, one httpd (mpm_event), "
              f"{os.cpu_count()} cores")
        rate = done / t_wave if t_wave else 0
        ms = sorted(e["ms"] for e in token_calls)
        print(f"{'refresh wave':40} {'value':>14}")
        print(f"{'accounts refreshed':40} {done:>8}/{n}")
        print(f"{'wave duration (s)':40} {t_wave:14.1f}")
        print(f"{'refreshes per second':40} {rate:14.1f}")
        if args.latency_ms:
            print(f"{'one-at-a-time rate at this latency (/s)':40} "
                  f"{1000 / args.latency_ms:14.1f}")
        print(f"{'refresh grants at the simulator':40} "
              f"{counters['token_grants'].get('refresh_token', 0) - grants_before:14}")
        print(f"{'identity errors (aad_errors)':40} {json.dumps(counters['aad_errors']):>14}")
        print(f"{'accounts not connected or erroring':40} {bad:>14}")
        if ms:
            print(f"{'token call at simulator: median ms':40} {ms[len(ms) // 2]:14.1f}")
            print(f"{'token call at simulator: p99 ms':40} {ms[int(len(ms) * 0.99)]:14.1f}")
        print(f"{'peak token calls in flight (sim log)':40} {peak_overlap(token_calls):14}"
              f"   (last {len(log)} log entries)")
        print(f"{'peak TCP conns to simulator (ss, 10/s)':40} {samples['conns']:14}")
        print(f"{'simulator max_inflight (Graph only)':40} {counters.get('max_inflight', 0):14}")
        print(f"{'job child RSS before (kB)':40} {rss_before or 0:14}")
        print(f"{'job child RSS peak during (kB)':40} {samples['rss']:14}")
        print(f"{'job child RSS after (kB)':40} {rss_after or 0:14}")
        if rss_before and rss_after:
            print(f"{'RSS growth (kB, after - before)':40} {rss_after - rss_before:14}")
        print(f"{'job child unchanged':40} {str(pids[-1] == job_pid and len(pids) == 1):>14}")

        print(f"\ntoken handler: {args.rounds} alternating rounds x {args.seconds}s, "
              f"{args.connections} connections, wrk -t2; token JSON {tok_size} B, "
              f"static file {len(sbody)} B")
        print(f"{'target':26} {'req/s (median)':>15} {'min':>9} {'max':>9} "
              f"{'httpd CPU us/req':>17}")
        med = {}
        for name, rows in results.items():
            rps = sorted(r for r, _ in rows)
            cpu = sorted(c for _, c in rows)
            med[name] = (rps[len(rps) // 2], cpu[len(cpu) // 2])
            print(f"{name:26} {med[name][0]:15.0f} {rps[0]:9.0f} {rps[-1]:9.0f} "
                  f"{med[name][1]:17.1f}")
        t, s = med["msoauth-token (cached)"], med["static file (core)"]
        print(f"\nmsoauth-token / static file = {t[0] / s[0]:.2f}x req/s, "
              f"{t[1] / s[1]:.2f}x CPU per request")
        print(f"refresh grants during the wrk rounds: {grants_end - grants_mid} "
              "(0: the cached token was served)")
    finally:
        if h:
            h.stop()
        if sim:
            sim.stop()
        if db:
            db.close()
        if os.environ.get("MSO_BENCH_KEEP"):
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _try(fn):
    try:
        return fn()
    except RuntimeError:
        return False


if __name__ == "__main__":
    main()
