#!/usr/bin/python3
"""Module-side CPU cost of one msoauth-confirm (code exchange, ID token check,
sealing, database write), the simulator's own time excluded: httpd's CPU time
is read from /proc before and after N complete sign-ins, and the cost of the
connect requests (measured alone in the same run) is subtracted.

For diagnosis the same window is split by thread (/proc/PID/task/TID/schedstat,
nanoseconds on a CPU; utime and stime only count whole clock ticks): the job's
threads are those that keep working once the sign-ins
have ended (each new mailbox's first sync), the rest serve requests. An idle
window afterwards (no requests, the job's work done) gives each part's
background rate (the job's work, the MPM's housekeeping), which is then
taken out of the sign-in window: what is left on the request threads is the
confirm handler's own cost.

    python3 bench/confirm_bench.py [--signins 300] [--idle 10] [--strace]

--strace counts the children's system calls (strace -c -f) over the sign-ins
and prints them per sign-in; strace slows every call, so the CPU figures of
such a run are not comparable with a run without it.
"""
import argparse
import os
import signal
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


def children(h):
    """The pids of httpd's children."""
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(h.pid())],
                                           capture_output=True, text=True).stdout.split()]


TICK_NS = 1e9 / os.sysconf("SC_CLK_TCK")


def thread_cpu_ns(h):
    """{(pid, tid): nanoseconds on a CPU} of every thread of httpd's children:
    schedstat's first field, or utime+stime ticks where the kernel has no
    schedstat."""
    out = {}
    for pid in children(h):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            task = f"/proc/{pid}/task/{tid}"
            try:
                out[(pid, int(tid))] = int(Path(f"{task}/schedstat").read_text().split()[0])
                continue
            except (OSError, ValueError, IndexError):
                pass
            try:
                f = Path(f"{task}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[(pid, int(tid))] = (int(f[11]) + int(f[12])) * TICK_NS
    return out


def delta(a, b, keys=None):
    """CPU time from snapshot a to b of the threads in keys (all of b's) alive in b."""
    keys = b.keys() if keys is None else keys
    return sum(b[k] - a.get(k, 0) for k in keys if k in b)


def start_strace(h, tmp):
    """strace -c -f attached to every child; returns (process, output file)."""
    out = tmp / "strace.txt"
    cmd = ["strace", "-c", "-f", "-q", "-o", str(out)]
    for pid in children(h):
        cmd += ["-p", str(pid)]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    time.sleep(2)                   # attached to every thread before the first sign-in
    return proc, out


def stop_strace(tracer):
    """{system call: calls} from strace's summary once it has detached."""
    proc, out = tracer
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    calls = {}
    for line in out.read_text().splitlines():
        f = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
            try:
                calls[f[-1]] = int(f[3])
            except ValueError:
                continue
    return calls


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
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of the idle window")
    ap.add_argument("--strace", action="store_true",
                    help="count system calls per sign-in (slows the run; CPU figures not comparable)")
    ap.add_argument("--loglevel", default="warn",
                    help="httpd's LogLevel (the tests' own is 'info msoauth:debug')")
    args = ap.parse_args()
    sim = Sim()
    tmp = Path(tempfile.mkdtemp(prefix="msoauth-bench."))
    os.chmod(tmp, 0o755)
    h = Httpd(tmp)
    try:
        s = test_signin.Setup(h, sim, main_extra=f"LogLevel {args.loglevel}")
        s.wait_schema()
        users = []
        for i in range(args.signins):
            u = f"user{i:05d}@contoso.com"
            sim_call(sim, "POST", "/_sim/users", {"upn": u, "tenant_id": test_signin.TENANT})
            users.append(u)
        # Warm-up: discovery and keys fetched once per child; then wait until the
        # MPM has started the children it wants (MinSpareThreads), so that no
        # child's start-up falls into a measured window.
        for u in users[:4]:
            s.sign_in(mailbox=u)
        nchildren, stable_since, limit = None, time.time(), time.time() + 30
        while time.time() < limit and time.time() - stable_since < 3:
            now = len(children(h))
            if now != nchildren:
                nchildren, stable_since = now, time.time()
            time.sleep(0.25)
        for u in users[:4]:
            s.sign_in(mailbox=u)

        tc0 = time.time()
        cpu0 = httpd_cpu_seconds(h)
        c0 = thread_cpu_ns(h)
        for u in users:
            s.browser.get(s.connect_url(mailbox=u, return_to="/x"))
        connect_cpu = httpd_cpu_seconds(h) - cpu0
        c1 = thread_cpu_ns(h)
        connect_wall = time.time() - tc0

        tracer = start_strace(h, tmp) if args.strace else None
        t0 = time.time()
        cpu0 = httpd_cpu_seconds(h)
        s0 = thread_cpu_ns(h)
        for u in users:
            _, _, r3 = s.sign_in(mailbox=u, return_to="/x")
            assert r3 is not None and r3.status == 302 and r3.query().get("msoauth") == "connected", (r3 and (r3.status, r3.location, r3.text[:300]), h.log()[-2000:])
        total_cpu = httpd_cpu_seconds(h) - cpu0
        s1 = thread_cpu_ns(h)
        wall = time.time() - t0
        syscalls = stop_strace(tracer) if tracer else None
        # The job's tail: until its threads have been quiet for 2 s (at most 60 s).
        tail_end = time.time() + 60
        s2, quiet_since = s1, time.time()
        while time.time() < tail_end and time.time() - quiet_since < 2:
            time.sleep(0.5)
            now = thread_cpu_ns(h)
            if delta(s2, now) > 10e6:
                quiet_since = time.time()
            s2 = now
        i0, ti0 = thread_cpu_ns(h), time.time()
        time.sleep(args.idle)
        i1, idle_wall = thread_cpu_ns(h), time.time() - ti0
        # The threads that worked in the tail did the job's first syncs.
        tail_job = {k for k in s2 if s2[k] - s1.get(k, 0) > 10e6}
        rest = set(s1) - tail_job

        n = len(users)
        per_connect = connect_cpu / n * 1e6
        per_confirm = (total_cpu - connect_cpu) / n * 1e6
        us = lambda ns: ns / 1e3 / n  # noqa: E731  CPU time of the window, per sign-in
        idle_rest = delta(i0, i1, rest) / idle_wall          # ns per second
        idle_job = delta(i0, i1, tail_job) / idle_wall
        loop_rest, loop_job = delta(s0, s1, rest), delta(s0, s1, tail_job)
        tail_ns = delta(s1, s2, tail_job)
        conn_rest = delta(c0, c1, rest) - idle_rest * connect_wall
        confirm_own = loop_rest - idle_rest * wall - conn_rest
        print(f"\nconfirm benchmark: {n} sign-ins (new and re-connects), SQLite, one httpd "
              f"({nchildren} children), LogLevel {args.loglevel}")
        print(f"httpd CPU per connect                     {per_connect:8.0f} us")
        print(f"httpd CPU per confirm (connect subtracted) {per_confirm:8.0f} us")
        print(f"wall time per full sign-in incl. simulator {wall / n * 1e3:8.1f} ms")
        print("  for diagnosis, per sign-in (threads' CPU time):")
        print(f"  the job's threads ({len(tail_job)}), during the sign-ins {us(loop_job):8.0f} us")
        print(f"  the job's threads, after the last sign-in     {us(tail_ns):8.0f} us")
        print(f"  request threads ({len(rest)}), during the sign-ins   {us(loop_rest):8.0f} us")
        print(f"  ... their idle background over the same time  {us(idle_rest * wall):8.0f} us"
              f"  ({idle_rest / 1e6:.1f} ms/s; the job's threads {idle_job / 1e6:.1f} ms/s)")
        print(f"  ... their connect requests, idle taken out    {us(conn_rest):8.0f} us")
        print(f"  confirm on the request threads, both out      {us(confirm_own):8.0f} us"
              f"  (goal < 500)")
        if syscalls is not None:
            print("  system calls per sign-in (strace -c -f over the children, "
                  "the job's first syncs included):")
            for name, calls in sorted(syscalls.items(), key=lambda kv: -kv[1]):
                if calls / n >= 0.5:
                    print(f"    {name:24s} {calls / n:8.1f}")
    finally:
        h.stop()
        sim.proc.terminate()


if __name__ == "__main__":
    main()
