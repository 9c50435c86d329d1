#!/usr/bin/python3
"""Module-side CPU cost of one msoauth-confirm (code exchange, ID token check,
sealing, database write), the simulator's own time excluded: httpd's CPU time
is read from /proc before and after N complete sign-ins, and the cost of the
connect requests (measured alone in the same run) is subtracted.

    python3 bench/confirm_bench.py [--signins 300] [--db sqlite3|pgsql]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "t" / "integration"))
sys.path.insert(0, str(REPO / "bench"))
from conftest import Httpd, free_port, wait_port, sim_call  # noqa: E402
from connect_bench import httpd_cpu_seconds  # noqa: E402
import test_signin  # noqa: E402


class Sim:
    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, str(REPO / "t" / "sim" / "mssim.py"),
                                      "--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--signins", type=int, default=300)
    args = ap.parse_args()
    sim = Sim()
    tmp = Path(tempfile.mkdtemp(prefix="msoauth-bench."))
    os.chmod(tmp, 0o755)
    h = Httpd(tmp)
    try:
        s = test_signin.Setup(h, sim)
        s.wait_schema()
        users = []
        for i in range(args.signins):
            u = f"user{i:05d}@contoso.com"
            sim_call(sim, "POST", "/_sim/users", {"upn": u, "tenant_id": test_signin.TENANT})
            users.append(u)
        # Warm-up: discovery and keys fetched once per child.
        for u in users[:4]:
            s.sign_in(mailbox=u)

        cpu0 = httpd_cpu_seconds(h)
        for u in users:
            s.browser.get(s.connect_url(mailbox=u, return_to="/x"))
        connect_cpu = httpd_cpu_seconds(h) - cpu0

        t0 = time.time()
        cpu0 = httpd_cpu_seconds(h)
        for u in users:
            _, _, r3 = s.sign_in(mailbox=u, return_to="/x")
            assert r3 is not None and r3.status == 302 and r3.query().get("msoauth") == "connected", (r3 and (r3.status, r3.location, r3.text[:300]), h.log()[-2000:])
        total_cpu = httpd_cpu_seconds(h) - cpu0
        wall = time.time() - t0
        n = len(users)
        per_connect = connect_cpu / n * 1e6
        per_confirm = (total_cpu - connect_cpu) / n * 1e6
        print(f"\nconfirm benchmark: {n} sign-ins (new and re-connects), SQLite, one httpd")
        print(f"httpd CPU per connect                     {per_connect:8.0f} us")
        print(f"httpd CPU per confirm (connect subtracted) {per_confirm:8.0f} us")
        print(f"wall time per full sign-in incl. simulator {wall / n * 1e3:8.1f} ms")
    finally:
        h.stop()
        sim.proc.terminate()


if __name__ == "__main__":
    main()
