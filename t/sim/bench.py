#!/usr/bin/env python3
"""Figures for t/sim/README.md: how fast mssim serves delta rounds.

  python3 t/sim/bench.py http [N]      a real server, one keep-alive client: seeding N messages
                                       (100,000), an initial round at 100 per page (wall clock and
                                       per second of the server's CPU), idle rounds over 10,000
                                       mailboxes
  python3 t/sim/bench.py inproc [N]    the handlers called in-process, CPU time, best of 9:
                                       an initial round of N (20,000), idle rounds, bulk accounts
                                       (steady on a busy machine, where wall-clock figures are not)
"""
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

SIM = Path(__file__).resolve().parent / "mssim.py"
SELECT = ("internetMessageId,conversationId,subject,from,toRecipients,receivedDateTime,isRead,"
          "hasAttachments,importance,bodyPreview,body,webLink,parentFolderId")
PREFER = 'odata.maxpagesize=100, IdType="ImmutableId"'


def http_bench(n):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(SIM), "--port", str(port)], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def call(method, path, body=None, token=None):
        headers = {"Content-Type": "application/json", "Prefer": PREFER}
        if token:
            headers["Authorization"] = "Bearer " + token
        conn.request(method, path, body=json.dumps(body).encode() if body is not None else None, headers=headers)
        r = conn.getresponse()
        data = r.read()
        assert r.status < 300, data[:300]
        return json.loads(data) if data else None

    def cpu():
        f = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def rel(url):
        p = urlsplit(url)
        return p.path + "?" + p.query

    try:
        acc = call("POST", "/_sim/bulk/accounts", {"count": 1, "prefix": "big"})["accounts"][0]
        t = time.time()
        call("POST", f"/_sim/mailbox/{acc['upn']}/messages", {"count": n})
        print(f"seeding {n} messages: {time.time() - t:.2f} s")
        for rnd in range(3):
            url = f"/v1.0/me/mailFolders/inbox/messages/delta?$select={SELECT}&$orderby=receivedDateTime%20desc"
            t, c, got = time.time(), cpu(), 0
            while True:
                page = call("GET", url, token=acc["access_token"])
                got += len(page["value"])
                if "@odata.deltaLink" in page:
                    break
                url = rel(page["@odata.nextLink"])
            print(f"initial round {rnd + 1}: {got / (time.time() - t):.0f} entries/s, "
                  f"{got / max(cpu() - c, 1e-9):.0f} per server CPU second")
        accs = call("POST", "/_sim/bulk/accounts", {"count": 10000, "prefix": "idle"})["accounts"]
        links = [(a["access_token"], rel(call("GET", "/v1.0/me/mailFolders/inbox/messages/delta",
                                              token=a["access_token"])["@odata.deltaLink"])) for a in accs]
        t, c = time.time(), cpu()
        for token, link in links:
            call("GET", link, token=token)
        print(f"idle rounds over 10,000 mailboxes: {len(links) / (time.time() - t):.0f}/s, "
              f"{len(links) / max(cpu() - c, 1e-9):.0f} per server CPU second")
    finally:
        proc.terminate()
        proc.wait()


def inproc_bench(n):
    sys.path.insert(0, str(SIM.parent))
    import mssim

    class Headers(dict):
        def get(self, k, d=None):
            return next((v for kk, v in self.items() if kk.lower() == k.lower()), d)

    def control(fn, body, *groups):
        return json.loads(fn(sim, mssim.Request("POST", "/_sim", Headers(), json.dumps(body).encode()), *groups).body)

    sim = mssim.Sim("http://127.0.0.1:1")
    acc = control(mssim.ctl_bulk_accounts, {"count": 1, "prefix": "big"})["accounts"][0]
    control(mssim.ctl_add_messages, {"count": n}, acc["upn"])
    headers = Headers({"Authorization": "Bearer " + acc["access_token"], "Prefer": PREFER})

    def get(url):
        req = mssim.Request("GET", url.replace(sim.base, ""), headers, b"")
        req.request_id = req.client_request_id = "bench"
        req.too_large = False
        fn, groups, _ = mssim.Handler.find_route(None, req)
        return json.loads(fn(sim, req, *groups).body)

    def best(fn, times=9):
        out = 1e9
        for _ in range(times):
            t = time.process_time()
            fn()
            out = min(out, time.process_time() - t)
        return out

    state = {}

    def initial():
        url, got = f"/v1.0/me/mailFolders/inbox/messages/delta?$select={SELECT}&$orderby=receivedDateTime%20desc", 0
        while True:
            page = get(url)
            got += len(page["value"])
            if "@odata.deltaLink" in page:
                state["link"] = page["@odata.deltaLink"]
                return
            url = page["@odata.nextLink"]

    print(f"initial round of {n}: {n / best(initial):.0f} entries per CPU second")

    def idle():
        for _ in range(2000):
            state["link"] = get(state["link"])["@odata.deltaLink"]

    print(f"idle rounds: {2000 / best(idle):.0f} per CPU second")
    count = iter(range(100))
    took = best(lambda: control(mssim.ctl_bulk_accounts, {"count": 2000, "prefix": f"b{next(count)}",
                                                          "messages": 20}), 3)
    print(f"2,000 bulk accounts with 20 messages: {took:.2f} CPU s")


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "http"
    if mode == "http":
        http_bench(int(sys.argv[2]) if len(sys.argv) > 2 else 100000)
    elif mode == "inproc":
        inproc_bench(int(sys.argv[2]) if len(sys.argv) > 2 else 20000)
    else:
        sys.exit(__doc__)
