"""Hostile mail: no single message can stop a folder's sync. Messages any
outside sender can make (a body larger than the 32 MiB a page may keep, a NUL
in a body, a lone surrogate in a subject) sit among normal ones; the folder
converges, what cannot be stored whole is stored without its body, and the
job's memory stays bounded (its peak RSS is measured and reported)."""
import http.client
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import sim_call, token_leaks
from test_nodes import pg_schema, poll  # noqa: F401 (fixture)
from test_signin import ADELE, SECRET
from test_sync import make_env

BIG = 40 * 1024 * 1024          # past the 32 MiB a page may keep, under Exchange's 150 MB
RSS_BOUND_MB = 600              # generous: the design bound is ~130 MiB of bodies per lane


@pytest.fixture(params=["sqlite3", "pgsql"])
def env(request, httpd, simulator):
    if request.param == "pgsql":
        params, _ = request.getfixturevalue("pg_schema")
        e = make_env(httpd, simulator, "pgsql", params)
    else:
        e = make_env(httpd, simulator, "sqlite3")
    yield e
    log = httpd.log()
    assert not token_leaks(log, SECRET)


def peak_rss_mb(h):
    """The largest VmHWM (peak resident set) among httpd's children, in MiB:
    one of them runs the job."""
    peak = 0
    for pid in h.children():
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) // 1024)
        except OSError:
            pass
    return peak


def has_column(env, table, column):
    try:
        env.rows(f"SELECT {column} FROM {table} WHERE 1 = 0", column)
        return True
    except AssertionError:
        return False


def test_hostile_messages_do_not_stop_the_folder(env):
    user = ADELE[0]
    normal = env.seed(user, 30)
    hostile = sim_call(env.sim, "POST", f"/_sim/mailbox/{user}/messages", {
        "folder": "inbox", "messages": [
            {"subject": "Huge body", "from": "big@example.com",
             "body": "<p>" + "x" * BIG + "</p>"},
            {"subject": "NUL in body", "from": "nul@example.com",
             "body": "<p>before\u0000after</p>"},
            {"subject": "Lone \ud800 surrogate", "from": "sur@example.com",
             "body": "<p>lone \udc00 low</p>"},
        ]})["messages"]
    after = env.seed(user, 5, subject_prefix="After")
    ids = {m["id"] for m in normal + hostile + after}
    huge, nul, lone = (m["id"] for m in hostile)
    rss_before = peak_rss_mb(env.h)

    started = time.time()
    acc = env.connect(user)

    def converged():
        rows = env.rows(f"SELECT graph_id FROM msoauth_messages WHERE account_id = {acc} "
                        "AND removed = 0", "graph_id")
        return {r["graph_id"] for r in rows} == ids

    poll("every message in msoauth_messages", converged, timeout=120, every=0.5)
    seconds = time.time() - started
    a = poll("the account to be idle", lambda: (lambda a: a if a["sync"]["phase"] == "idle"
                                                else None)(env.account(acc)), timeout=30)
    assert a["sync"]["last_error"] is None, a
    assert a["messages"] == len(ids)

    cols = "graph_id, subject, from_address, body_type, body_null, body_len, has_text, received"
    rows = {r["graph_id"]: r for r in env.rows(
        "SELECT graph_id, subject, from_address, body_type, "
        "CASE WHEN body IS NULL THEN 1 ELSE 0 END, COALESCE(LENGTH(body), 0), "
        "CASE WHEN body LIKE '%before after%' THEN 1 ELSE 0 END, received_at "
        f"FROM msoauth_messages WHERE account_id = {acc}", cols)}
    # Too big to keep whole: the row is there without its body, the rest intact.
    assert rows[huge]["subject"] == "Huge body"
    assert rows[huge]["from_address"] == "big@example.com"
    assert rows[huge]["body_type"] == "html" and int(rows[huge]["received"]) > 0
    assert rows[huge]["body_null"] == "1", rows[huge]
    # The NUL became a space; the page around it was stored.
    assert rows[nul]["subject"] == "NUL in body" and rows[nul]["has_text"] == "1", rows[nul]
    # Lone surrogates became U+FFFD.
    assert rows[lone]["subject"] == "Lone \ufffd surrogate", rows[lone]
    assert rows[lone]["body_null"] == "0"
    for i in ids - {huge}:
        assert rows[i]["body_null"] == "0" and int(rows[i]["body_len"]) > 0, rows[i]

    # TODO(body_truncated): the column is added with the database layer; until
    # then this checks it only where it exists.
    if has_column(env, "msoauth_messages", "body_truncated"):
        flags = {r["graph_id"]: r["t"] for r in env.rows(
            f"SELECT graph_id, body_truncated FROM msoauth_messages WHERE account_id = {acc}",
            "graph_id, t")}
        assert flags[huge] == "1"
        assert all(flags[i] == "0" for i in ids - {huge})

    # Memory: the 40 MiB body was never held whole, let alone per doubling.
    rss = peak_rss_mb(env.h)
    print(f"\nhostile mailbox converged in {seconds:.1f}s; httpd children's peak RSS "
          f"{rss_before} MiB before, {rss} MiB after")
    assert rss < RSS_BOUND_MB, rss

    # The next incremental round goes on as usual.
    env.seed(user, 2, subject_prefix="Later")
    env.sync_now(acc)
    poll("the later messages", lambda: env.count(acc) == len(ids) + 2, timeout=30)
    assert env.account(acc)["sync"]["last_error"] is None


def test_many_large_bodies_shrink_the_page_and_converge(httpd, simulator):
    """A page with more large (but storable) bodies than 32 MiB: smaller pages,
    every body kept whole."""
    env = make_env(httpd, simulator, "sqlite3")
    user = ADELE[0]
    made = sim_call(env.sim, "POST", f"/_sim/mailbox/{user}/messages", {
        "folder": "inbox", "messages": [
            {"subject": f"Large {i}", "body": "<p>" + chr(97 + i % 26) * (3 << 20) + "</p>"}
            for i in range(14)]})["messages"]
    ids = {m["id"] for m in made}
    acc = env.connect(user)
    poll("the large messages", lambda: env.count(acc) == len(ids), timeout=120, every=0.5)
    rows = env.rows(f"SELECT graph_id, LENGTH(body) FROM msoauth_messages "
                    f"WHERE account_id = {acc}", "graph_id, n")
    assert {r["graph_id"] for r in rows} == ids
    assert all(int(r["n"]) == (3 << 20) + 7 for r in rows), rows
    sizes = [e.get("prefer") or "" for e in env.delta_requests()]
    assert any("maxpagesize=25" in p for p in sizes), sizes
    a = poll("the account to be idle", lambda: (lambda a: a if a["sync"]["phase"] == "idle"
                                                else None)(env.account(acc)), timeout=30)
    assert a["sync"]["last_error"] is None, a


class BreakingProxy:
    """Graph through a proxy that breaks the JSON of every delta page holding
    the message whose subject is MARK (a Graph fault: no sender can make the
    clip's output invalid), and points the simulator's links at itself."""

    MARK = "BREAK-THIS-PAGE"

    def __init__(self, sim_url):
        proxy = self
        target = urllib.parse.urlsplit(sim_url)
        self.broken = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def forward(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection", "content-length")}
                c = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                c.request(self.command, self.path, body, headers)
                r = c.getresponse()
                data = r.read().replace(sim_url.encode(), proxy.url.encode())
                c.close()
                if "/messages/delta" in self.path and proxy.MARK.encode() in data:
                    data = re.sub(rb'"subject":\s*"' + proxy.MARK.encode() + rb'"',
                                  b'"subject": ' + proxy.MARK.encode(), data)
                    proxy.broken += 1
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v.replace(sim_url, proxy.url))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_page_graph_breaks_is_skipped_alone(httpd, simulator):
    """A page that cannot be read even with one entry, whose link to what
    follows was read as it passed: skipped with an error in the log, and the
    rest of the folder converges with no sync error."""
    proxy = BreakingProxy(simulator.url)
    try:
        env = make_env(httpd, simulator, "sqlite3", extra=f"MSOAuthGraphURL {proxy.url}\n")
        user = ADELE[0]
        older = env.seed(user, 40, newest="2026-01-01T00:00:00Z")
        (bad,) = sim_call(env.sim, "POST", f"/_sim/mailbox/{user}/messages", {
            "folder": "inbox", "messages": [{"subject": BreakingProxy.MARK,
                                             "receivedDateTime": "2026-02-01T00:00:00Z"}]})[
            "messages"]
        newer = env.seed(user, 40, newest="2026-03-01T00:00:00Z", subject_prefix="Newer")
        want = {m["id"] for m in older + newer}
        acc = env.connect(user)

        def converged():
            rows = env.rows(f"SELECT graph_id FROM msoauth_messages WHERE account_id = {acc} "
                            "AND removed = 0", "graph_id")
            return {r["graph_id"] for r in rows} == want

        poll("every readable message in msoauth_messages", converged, timeout=60, every=0.5)
        a = poll("the account to be idle", lambda: (lambda a: a if a["sync"]["phase"] == "idle"
                                                    else None)(env.account(acc)), timeout=30)
        assert a["sync"]["last_error"] is None, a
        assert proxy.broken >= 4            # at 100, 25, 6 and 1 entries
        assert "it is skipped" in env.h.log()
        sizes = [e.get("prefer") or "" for e in env.delta_requests()]
        assert any("maxpagesize=1," in p for p in sizes), sizes
    finally:
        proxy.close()
