"""msoauthctl against a database the module populated: list and show (plain
and JSON, never a token or secret), test (refresh and Graph /me with the
company's flags), disconnect, migrate, check-key, and rekey while httpd runs,
after which the old key leaves httpd's configuration and the module still
opens every token. Run as the httpd user, as an administrator would for
SQLite (files it creates must stay writable for httpd)."""
import json
import os
import re
import secrets
import shutil
import subprocess

import pytest

from conftest import BUILD, IS_ROOT, RUN_USER, pg_reset, sim_call, token_leaks
from test_job import ADMIN, connect, get_json, graph_me, wait_for
from test_signin import ADELE, MEGAN, SECRET, Setup

CTL = BUILD / "tools" / "msoauthctl"


class Ctl:
    """msoauthctl with the database and key flags of one Setup."""

    def __init__(self, s):
        self.s = s
        self.dir = s.h.root / "ctl"
        self.dir.mkdir(exist_ok=True)
        self.own(self.dir)
        self.params = s.pg if s.db == "pgsql" else str(s.h.root / "data" / "msoauth.db")

    def own(self, path):
        if IS_ROOT:
            shutil.chown(path, RUN_USER, RUN_USER)

    def file(self, name, content):
        """A file for msoauthctl only (its user, mode 600)."""
        p = self.dir / name
        p.write_text(content)
        p.chmod(0o600)
        self.own(p)
        return str(p)

    def run(self, *args, keys=(), db=True, ok=True):
        cmd = [str(CTL)]
        if db:
            cmd += ["--driver", self.s.db, "--params", self.params]
        for k in keys:
            cmd += ["--key", k]
        cmd += list(args)
        if IS_ROOT:
            cmd = ["runuser", "-u", RUN_USER, "--"] + cmd
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        out = r.stdout + r.stderr
        if ok is not None:
            assert (r.returncode == 0) == ok, f"{cmd}: {r.returncode}\n{out}"
        # never a secret, a token or a key
        assert not token_leaks(out, SECRET)
        for t in self.s.rows("SELECT sealed FROM msoauth_tokens", "sealed"):
            assert t["sealed"] not in out
        return r


def populated(httpd, simulator, db, pg_params, extra=""):
    if db == "pgsql":
        pg_reset(pg_params)
    s = Setup(httpd, simulator, db=db, pg_params=pg_params, extra=ADMIN + extra)
    s.wait_schema()
    return s


@pytest.mark.parametrize("db", ["sqlite3", "pgsql"])
def test_list_show_test_disconnect(httpd, simulator, pg_params, db):
    s = populated(httpd, simulator, db, pg_params)
    sim_call(simulator, "POST", "/_sim/mailbox/" + ADELE[0] + "/messages",
             {"folder": "inbox", "count": 2})
    adele = connect(s, ADELE[0])
    megan = connect(s, MEGAN[0])
    ctl = Ctl(s)
    key = ctl.file("k1.hex", s.key_hex)
    kid = re.search(r"key id ([0-9a-f]{8})", ctl.run("check-key", key, db=False).stdout).group(1)

    out = ctl.run("list").stdout
    assert re.search(rf"^{adele}\s+default\s+{re.escape(ADELE[0])}\s+connected", out, re.M), out
    assert re.search(rf"^{megan}\s+default\s+{re.escape(MEGAN[0])}\s+connected", out, re.M), out
    rows = json.loads(ctl.run("list", "--json").stdout)
    assert [(a["id"], a["mailbox"], a["state"]) for a in rows] == \
        [(adele, ADELE[0], "connected"), (megan, MEGAN[0], "connected")]

    one = json.loads(ctl.run("show", str(adele), "--json").stdout)
    assert one["mailbox"] == ADELE[0] and one["display_name"] == ADELE[2]
    assert {t["kind"] for t in one["tokens"]} == {"refresh", "graph"}
    assert all(t["key_id"] == kid and t["binding"] == 2 for t in one["tokens"]), one["tokens"]
    assert one["history"] == []
    assert "sealed" not in json.dumps(one)
    text = ctl.run("show", str(adele)).stdout
    assert f"account {adele}" in text and f"key id {kid}" in text and "last errors" in text

    # test: the stored token (or a refresh) and Graph /me, with the company's flags
    secret = ctl.file("secret.txt", SECRET + "\n")
    company = ["--client-id", s.client_id, "--secret-file", secret,
               "--authority", simulator.url, "--graph", simulator.url]
    out = ctl.run("test", str(adele), *company, keys=[key]).stdout
    assert f"ok: account {adele} ({ADELE[0]}): Graph /me answers {ADELE[2]} <{ADELE[0]}>" \
        in out, out
    # an access token about to expire is refreshed first (the rotated refresh token stored)
    before = s.tokens(adele)["refresh"]["sealed"]
    s.rows(f"UPDATE msoauth_tokens SET expires_at = 1 WHERE account_id = {adele} "
           "AND kind = 'graph'", "x")
    out = ctl.run("test", str(adele), *company, keys=[key]).stdout
    assert "refreshed: a new access token" in out and "ok: account" in out, out
    assert s.tokens(adele)["refresh"]["sealed"] != before
    # the wrong company
    r = ctl.run("test", str(adele), "--client-id", "11111111-2222-3333-4444-555555555555",
                "--secret-file", secret, keys=[key], ok=False)
    assert r.returncode == 1 and "was connected with client ID" in r.stderr

    assert "disconnected" in ctl.run("disconnect", str(megan)).stdout
    assert [a["state"] for a in s.accounts()] == ["connected", "disconnected"]
    assert s.tokens(megan) == {}
    r = ctl.run("test", str(megan), *company, keys=[key], ok=False)
    assert "is disconnected" in r.stderr
    assert ctl.run("show", "999", ok=False).returncode == 1
    assert ctl.run("show", "x", ok=False).returncode == 2
    assert ctl.run("explode", ok=False).returncode == 2


@pytest.mark.parametrize("db", ["sqlite3", "pgsql"])
def test_rekey_while_httpd_runs_then_the_old_key_goes(httpd, simulator, pg_params, db):
    """The administrator puts a new key first (httpd reloaded), rekeys while
    httpd refreshes tokens, and removes the old key: the module still opens
    every token (refresh and access tokens of every account)."""
    s = populated(httpd, simulator, db, pg_params)
    # Two-minute tokens: every token request refreshes (it promises 5 minutes).
    sim_call(simulator, "POST", "/_sim/config", {"access_token_lifetime": 120})
    accounts = [connect(s, ADELE[0]), connect(s, MEGAN[0])]
    ctl = Ctl(s)
    k1 = ctl.file("k1.hex", s.key_hex)
    new_hex = secrets.token_hex(32)
    k2 = ctl.file("k2.hex", new_hex)
    httpd.file("keys/k2.hex", new_hex)
    kid1 = re.search(r"key id (\w+)", ctl.run("check-key", k1, db=False).stdout).group(1)
    kid2 = re.search(r"key id (\w+)", ctl.run("check-key", k2, db=False).stdout).group(1)
    httpd.graceful(httpd.body.replace("MSOAuthTokenKeyFile keys/k1.hex",
                                      "MSOAuthTokenKeyFile keys/k2.hex keys/k1.hex"))
    assert f"4 of 4 stored tokens are sealed under key {kid1}: keep it" in \
        ctl.run("check-key", k1).stdout
    # httpd keeps refreshing during the rekey
    for acc in accounts:
        s.rows(f"UPDATE msoauth_accounts SET refresh_due_at = 0 WHERE id = {acc}", "x")
    out = ctl.run("rekey", keys=[k2, k1]).stdout
    m = re.search(r"(\d+) tokens: (\d+) sealed again under key (\w+), (\d+) were already, "
                  r"(\d+) changed meanwhile", out)
    assert m and m.group(3) == kid2, out
    assert int(m.group(1)) == 4 and int(m.group(2)) + int(m.group(4)) + int(m.group(5)) == 4
    assert "the other keys can be removed" in out, out
    out = ctl.run("check-key", k1).stdout
    assert f"0 of 4 stored tokens are sealed under key {kid1}: no token needs it" in out, out

    httpd.graceful(httpd.body.replace("MSOAuthTokenKeyFile keys/k2.hex keys/k1.hex",
                                      "MSOAuthTokenKeyFile keys/k2.hex"))
    for acc, who in zip(accounts, (ADELE, MEGAN)):
        # the stored access token opens ...
        status, body = get_json(s, f"/microsoft_outlook/admin/accounts/{acc}")
        assert status == 200 and body["state"] == "connected", body
        # ... and so does the refresh token: a refresh happens for each request
        status, body = get_json(s, f"/microsoft_outlook/token?account={acc}")
        assert status == 200, body
        assert graph_me(simulator, body["access_token"])["userPrincipalName"] == who[0]
    assert "do not open" not in httpd.log() and "cannot be opened" not in httpd.log()
    # a key that never sealed anything: rekey says which tokens do not open
    k3 = ctl.file("k3.hex", secrets.token_hex(32))
    r = ctl.run("rekey", keys=[k3], ok=False)
    assert "4 do not open with these keys" in r.stdout, r.stdout


def test_migrate_and_check_key(tmp_path, httpd):
    s = type("S", (), {"db": "sqlite3", "pg": None, "h": httpd,
                       "rows": lambda self, *a: []})()
    (httpd.root / "data").mkdir(exist_ok=True)
    ctl = Ctl(s)
    ctl.params = str(ctl.dir / "new.db")
    out = ctl.run("migrate").stdout
    assert re.search(r"schema migrated from version 0 to \d+", out), out
    assert "nothing to do" in ctl.run("migrate").stdout
    assert json.loads(ctl.run("list", "--json").stdout) == []
    bad = ctl.file("bad.key", "too short\n")
    r = ctl.run("check-key", bad, db=False, ok=False)
    assert r.returncode == 1 and "bad.key" in r.stderr
    good = ctl.file("good.key", secrets.token_hex(32))
    os.chmod(good, 0o644)
    out = ctl.run("check-key", good, db=False).stdout
    assert "a valid key, key id" in out and "chmod 600" in out
    assert ctl.run("--version", db=False).stdout.startswith("msoauthctl (mod_msoauth) ")
    r = ctl.run("list", ok=False, db=False)
    assert r.returncode == 1 and "--driver" in r.stderr
