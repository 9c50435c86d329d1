#!/usr/bin/python3
"""Requests per second of the msoauth-connect handler next to httpd's own
Redirect (mod_alias) and mod_auth_openidc answering the same kind of redirect
(state + nonce + PKCE + state cookie), all three in one httpd, in alternating
rounds of the same run, with httpd CPU time per request.

    sudo sh scripts/install-deps.sh test && apt-get install wrk libapache2-mod-auth-openidc
    python3 bench/connect_bench.py [--rounds 5] [--seconds 5] [--connections 32]

Prints a table and the ratios. Loopback only; every round is bounded in time.
"""
import argparse
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "t" / "integration"))
from conftest import Httpd, MODULE  # noqa: E402

CLIENT_ID = "6731de76-14a6-49ae-97bc-6eba6914391e"
AUTHORITY = "https://login.microsoftonline.com"


def httpd_cpu_seconds(h):
    """utime+stime of the httpd parent and its children (including reaped ones)."""
    tick = os.sysconf("SC_CLK_TCK")
    pid = h.pid()
    total = 0
    pids = [pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)],
                                                   capture_output=True, text=True).stdout.split()]
    for p in pids:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields after the comm: state is f[0]; utime f[11], stime f[12], cutime f[13], cstime f[14]
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / tick


def wrk(url, seconds, connections, threads=2):
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d",
                          f"{seconds}s", "--latency", "-H", "Accept: text/html", url],
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, reqs, int(non2xx.group(1)) if non2xx else 0


def check_redirect(url, expect_cookie):
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    req = urllib.request.Request(url, headers={"Accept": "text/html"})
    try:
        opener.open(req)
        raise SystemExit(f"{url}: expected a redirect")
    except urllib.error.HTTPError as e:
        assert e.code == 302, (url, e.code)
        loc = e.headers["Location"]
        if expect_cookie:
            assert e.headers.get("Set-Cookie"), f"{url}: no state cookie"
            for p in ("state=", "nonce=", "code_challenge=", "code_challenge_method=S256"):
                assert p in loc, f"{url}: {p} missing in {loc}"
        return loc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is missing: apt-get install wrk")
    if not Path("/usr/lib/apache2/modules/mod_auth_openidc.so").exists():
        raise SystemExit("mod_auth_openidc is missing: apt-get install libapache2-mod-auth-openidc")
    if not MODULE.exists():
        raise SystemExit(f"{MODULE} is missing: build first (scripts/build.sh build/release)")

    tmp = Path(tempfile.mkdtemp(prefix="msoauth-bench."))
    os.chmod(tmp, 0o755)
    h = Httpd(tmp)
    h.modules += ["authn_core", "authz_user", "auth_openidc"]
    h.file("k.hex", secrets.token_hex(32))
    # As Debian's stock apache2.conf: no .htaccess lookups.
    h.body = f"""
LogLevel warn
<Directory />
  AllowOverride None
</Directory>
DBDriver sqlite3
DBDParams "{h.root}/data/msoauth.db"
MSOAuthTokenKeyFile k.hex
MSOAuthClientID {CLIENT_ID}
MSOAuthClientSecret "bench~secret"
<Location /microsoft_outlook/connect>
  SetHandler msoauth-connect
</Location>
Redirect /alias {AUTHORITY}/common/oauth2/v2.0/authorize

OIDCProviderIssuer {AUTHORITY}/common/v2.0
OIDCProviderAuthorizationEndpoint {AUTHORITY}/common/oauth2/v2.0/authorize
OIDCProviderTokenEndpoint {AUTHORITY}/common/oauth2/v2.0/token
OIDCProviderJwksUri {AUTHORITY}/common/discovery/v2.0/keys
OIDCClientID {CLIENT_ID}
OIDCClientSecret bench~secret
OIDCRedirectURI http://127.0.0.1:{h.port}/oidc/redirect
OIDCCryptoPassphrase {secrets.token_hex(16)}
OIDCScope "openid profile email offline_access https://graph.microsoft.com/Mail.Read"
OIDCPKCEMethod S256
<Location /oidc>
  AuthType openid-connect
  Require valid-user
</Location>
"""
    h.start()
    targets = [
        ("mod_alias Redirect", f"{h.url}/alias", False),
        ("msoauth-connect", f"{h.url}/microsoft_outlook/connect?mailbox=a%40example.com"
                            "&return_to=/app", True),
        ("mod_auth_openidc", f"{h.url}/oidc/", True),
    ]
    try:
        for name, url, cookie in targets:
            check_redirect(url, cookie)
        for name, url, _ in targets:      # warm-up
            wrk(url, 1, args.connections)
        results = {name: [] for name, _, _ in targets}
        for rnd in range(args.rounds):
            order = targets if rnd % 2 == 0 else list(reversed(targets))
            for name, url, _ in order:
                cpu0 = httpd_cpu_seconds(h)
                rps, reqs, bad = wrk(url, args.seconds, args.connections)
                cpu = httpd_cpu_seconds(h) - cpu0
                if bad:
                    raise SystemExit(f"{name}: {bad} responses were not 3xx")
                results[name].append((rps, cpu / max(reqs, 1) * 1e6))
        print(f"\nconnect benchmark: {args.rounds} alternating rounds x {args.seconds}s, "
              f"{args.connections} connections, wrk -t2, Accept: text/html, one httpd "
              f"(mpm_event), {os.cpu_count()} cores")
        print(f"{'target':22} {'req/s (median)':>15} {'min':>9} {'max':>9} "
              f"{'httpd CPU us/req':>17}")
        med = {}
        for name, rows in results.items():
            rps = sorted(r for r, _ in rows)
            cpu = sorted(c for _, c in rows)
            med[name] = (rps[len(rps) // 2], cpu[len(cpu) // 2])
            print(f"{name:22} {med[name][0]:15.0f} {rps[0]:9.0f} {rps[-1]:9.0f} "
                  f"{med[name][1]:17.1f}")
        m, a, o = med["msoauth-connect"][0], med["mod_alias Redirect"][0], med["mod_auth_openidc"][0]
        print(f"\nmsoauth-connect / mod_alias        = {m / a:.2f}x   (goal >= 0.6x)")
        print(f"msoauth-connect / mod_auth_openidc = {m / o:.2f}x   (goal >= 2x)")
    finally:
        h.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
