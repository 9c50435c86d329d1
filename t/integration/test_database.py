"""The module creates its tables itself at start-up, on SQLite and on a real
PostgreSQL server, and later starts and graceful restarts leave them intact."""
import secrets
import subprocess
import time

import pytest

from conftest import IS_ROOT, RUN_USER, pg_reset, psql

CLIENT_ID = "6731de76-14a6-49ae-97bc-6eba6914391e"

CONTRACT = {
    "msoauth_accounts": ["id", "company", "mailbox", "display_name", "tenant_id", "object_id",
                         "scopes", "state", "access_expires_at", "last_sync_at", "last_error",
                         "connected_by", "created_at", "updated_at"],
    "msoauth_messages": ["account_id", "graph_id", "folder", "internet_message_id",
                         "conversation_id", "subject", "from_address", "from_name", "to_json",
                         "received_at", "is_read", "has_attachments", "importance",
                         "body_preview", "body_type", "body", "web_link", "removed"],
    "msoauth_actions": ["id", "account_id", "graph_id", "action", "destination", "state",
                        "attempts", "last_error", "created_at", "updated_at"],
}


def body_for(h, driver, params):
    h.file("keys/k1.hex", secrets.token_hex(32))
    return f"""
DBDriver {driver}
DBDParams "{params}"
MSOAuthTokenKeyFile keys/k1.hex
MSOAuthClientID {CLIENT_ID}
MSOAuthClientSecret "x~secret-value"
"""


class SQLiteDB:
    """Reads and writes the database as the httpd user, through the sqlite3
    shell: a file (or WAL/SHM file) created by root would lock httpd out."""

    def __init__(self, path):
        self.path = path

    def params(self):
        return str(self.path)

    def query(self, sql):
        cmd = ["sqlite3", "-batch", "-cmd", ".timeout 10000", str(self.path), sql]
        if IS_ROOT:
            cmd = ["runuser", "-u", RUN_USER, "--"] + cmd
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return [line.split("|") for line in r.stdout.splitlines()]

    def tables(self):
        if not self.path.exists():
            return set()
        return {r[0] for r in self.query("SELECT name FROM sqlite_master WHERE type='table'")}

    def columns(self, table):
        return [r[1] for r in self.query(f"PRAGMA table_info({table})")]

    def schema_version(self):
        return int(self.query("SELECT MAX(version) FROM msoauth_schema")[0][0] or 0)

    def count(self, table):
        return int(self.query(f"SELECT COUNT(*) FROM {table}")[0][0])

    def insert_account(self, mailbox):
        self.query("INSERT INTO msoauth_accounts (company, mailbox, state, created_at, "
                   f"updated_at) VALUES ('default', '{mailbox}', 'connected', 1, 1)")


class PgDB:
    def __init__(self, params):
        self._params = params
        pg_reset(params)

    def params(self):
        return self._params

    def tables(self):
        out = psql(self._params, "SELECT table_name FROM information_schema.tables "
                                 "WHERE table_schema = current_schema()")
        return set(out.split())

    def columns(self, table):
        out = psql(self._params, "SELECT column_name FROM information_schema.columns WHERE "
                                 f"table_name = '{table}' ORDER BY ordinal_position")
        return out.split()

    def schema_version(self):
        return int(psql(self._params, "SELECT MAX(version) FROM msoauth_schema"))

    def count(self, table):
        return int(psql(self._params, f"SELECT COUNT(*) FROM {table}"))

    def insert_account(self, mailbox):
        psql(self._params, "INSERT INTO msoauth_accounts (company, mailbox, state, created_at, "
                           f"updated_at) VALUES ('default', '{mailbox}', 'connected', 1, 1)")


@pytest.fixture(params=["sqlite3", "pgsql"])
def db(request, httpd, pg_params):
    if request.param == "sqlite3":
        return "sqlite3", SQLiteDB(httpd.root / "data" / "msoauth.db")
    return "pgsql", PgDB(pg_params)


def wait_schema(h, database, timeout=15):
    end = time.time() + timeout
    while time.time() < end:
        try:
            if "msoauth_schema" in database.tables() and database.schema_version():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise AssertionError("schema not created; error log:\n" + h.log())


def test_tables_created_at_startup_and_kept(httpd, db):
    driver, database = db
    body = body_for(httpd, driver, database.params())
    httpd.start(body)
    wait_schema(httpd, database)
    tables = database.tables()
    for table, cols in CONTRACT.items():
        assert table in tables
        have = database.columns(table)
        missing = [c for c in cols if c not in have]
        assert not missing, f"{table} lacks {missing}"
    assert "msoauth_tokens" in tables
    version = database.schema_version()
    assert "schema migrated from version 0 to" in httpd.log()
    database.insert_account("someone@example.com")

    # A graceful restart and a full second start leave the data alone.
    httpd.graceful()
    time.sleep(0.5)
    assert database.count("msoauth_accounts") == 1
    httpd.stop()
    httpd.start(body)
    time.sleep(1.0)
    assert database.count("msoauth_accounts") == 1
    assert database.schema_version() == version
    assert httpd.log().count("schema migrated from version 0") == 1
    assert "database schema not ready" not in httpd.log()


def test_tokens_are_never_stored_in_the_clear_columns(httpd, db):
    """The token table holds only sealed blobs: there is no plain token column."""
    driver, database = db
    httpd.start(body_for(httpd, driver, database.params()))
    wait_schema(httpd, database)
    cols = database.columns("msoauth_tokens")
    assert "sealed" in cols
    assert not [c for c in cols if c in ("access_token", "refresh_token", "token")]


def test_unwritable_sqlite_database_is_reported(httpd):
    bad = httpd.root / "readonly-dir"
    bad.mkdir()
    bad.chmod(0o555)
    httpd.start(body_for(httpd, "sqlite3", bad / "db" / "msoauth.db"))
    httpd.wait_log("mod_msoauth: cannot open the database")
    assert "DBDParams" in httpd.log()
