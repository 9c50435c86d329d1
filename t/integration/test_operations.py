"""What an administrator watches and what cleans up after itself: the metrics
(Prometheus text), an account's last errors on the status page, the
retention sweep, and 503 naming the database when it is down. A real httpd
with the module and the Microsoft simulator."""
import re
import secrets
import time

import pytest

from conftest import Browser, free_port, sim_call
from test_job import ADMIN, connect, get_json, wait_for
from test_signin import ADELE, MEGAN, SECRET, Setup

API_KEY = secrets.token_hex(32)
KEY = {"Authorization": "Bearer " + API_KEY}
METRICS = """
<Location /microsoft_outlook/metrics>
  SetHandler msoauth-metrics
  Require local
</Location>
"""
# A sample line of the text exposition: name, optional labels, a number.
SAMPLE = re.compile(r'^([a-z_]+)(\{([a-z_]+="(?:[^"\\\n]|\\.)*")(,[a-z_]+="(?:[^"\\\n]|\\.)*")*\})?'
                    r' (-?[0-9.e+]+|NaN|[+-]Inf)$')


def keyed(httpd, more=""):
    httpd.file("api.key", API_KEY + "\n")
    return ADMIN + METRICS + "MSOAuthAPIKeyFile api.key\n" + more


def scrape(s, headers=KEY):
    r = Browser().get(s.h.url + "/microsoft_outlook/metrics", headers=headers)
    return r


def samples(text):
    """{'name{labels}': value} of every sample; every line is HELP, TYPE or a sample."""
    out = {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        key, value = line.rsplit(" ", 1)
        out[key] = float(value)
    return out


def test_metrics(httpd, simulator):
    s = Setup(httpd, simulator, extra=keyed(httpd, "MSOAuthSecretExpires 2099-01-01\n"))
    s.wait_schema()
    sim_call(simulator, "POST", "/_sim/mailbox/" + ADELE[0] + "/messages",
             {"folder": "inbox", "count": 5})
    acc = connect(s, ADELE[0])
    connect(s, MEGAN[0])
    wait_for("the mirror", lambda: s.rows("SELECT COUNT(*) FROM msoauth_messages", "n")[0]["n"]
             == "5")
    s.rows(f"UPDATE msoauth_accounts SET refresh_due_at = 0 WHERE id = {acc}", "x")

    # The API key, as for the token handler.
    r = scrape(s, headers={})
    assert r.status == 401, r.text

    def counted(text):
        v = samples(text)
        return any(k.startswith("msoauth_refreshes_total{") and 'outcome="refreshed"' in k
                   for k in v) and v
    r = None
    v = wait_for("counters of a refresh and of the sync", lambda: counted(scrape(s).text))
    r = scrape(s)
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert "# TYPE msoauth_accounts gauge" in text
    assert "# TYPE msoauth_refreshes_total counter" in text
    assert v['msoauth_accounts{company="default",state="connected"}'] == 2
    assert v['msoauth_accounts{company="single",state="connected"}'] == 0
    assert v['msoauth_accounts{company="default",state="reconnect_required"}'] == 0
    assert v['msoauth_secret_expiry_days{company="default"}'] > 20000
    assert v['msoauth_actions{company="default",state="queued"}'] == 0
    assert v['msoauth_outbox{company="default",state="failed"}'] == 0
    assert v['msoauth_outbox_oldest_queued_seconds{company="default"}'] == 0
    assert v['msoauth_sync_lag_seconds{company="default"}'] < 120
    assert any(k.startswith('msoauth_info{version="') for k in v)
    nodes = {m.group(1) for m in re.finditer(r'node="([^"]+)"', text)}
    assert len(nodes) == 1, nodes
    node = nodes.pop()
    assert ":" not in node                       # the node, not one process of it
    assert v[f'msoauth_graph_messages_total{{node="{node}"}}'] >= 5
    assert v[f'msoauth_graph_requests_total{{node="{node}",outcome="ok"}}'] >= 1
    assert v[f'msoauth_refreshes_total{{node="{node}",outcome="refreshed"}}'] >= 1
    assert v[f'msoauth_job_last_cycle_age_seconds{{node="{node}"}}'] < 30
    assert f'msoauth_job_cycle_seconds{{node="{node}"}}' in v
    # No mailbox anywhere, no secret.
    assert "@" not in text and SECRET not in text and API_KEY not in text

    # Counters only grow, across a restart of the node.
    before = v[f'msoauth_graph_messages_total{{node="{node}"}}']
    httpd.stop()
    httpd.start()
    v = samples(wait_for("metrics after the restart", lambda: scrape(s).status == 200
                         and scrape(s).text))
    assert v[f'msoauth_graph_messages_total{{node="{node}"}}'] >= before


def test_last_errors_on_the_status_page(httpd, simulator):
    s = Setup(httpd, simulator, extra=keyed(httpd))
    s.wait_schema()
    sim_call(simulator, "POST", "/_sim/config", {"access_token_lifetime": 120})
    acc = connect(s, ADELE[0])
    sim_call(simulator, "POST", "/_sim/revoke", {"user": ADELE[0], "code": 700082,
                                                 "access_tokens": True})
    status, body = get_json(s, f"/microsoft_outlook/token?account={acc}", headers=KEY)
    assert status == 409 and body["state"] == "reconnect_required", body

    status, m = get_json(s, "/microsoft_outlook/admin/", headers=KEY)
    assert status == 200
    assert m["version"] and m["states"] == {"connected": 0, "reconnect_required": 1,
                                            "disconnected": 0}, m["states"]
    (a,) = m["accounts"]
    (e,) = a["history"]
    assert e["reason"] == "reconnect_required" and "700082" in e["text"], e
    assert e["fix"] and abs(e["at"] - time.time()) < 60
    status, one = get_json(s, f"/microsoft_outlook/admin/accounts/{acc}", headers=KEY)
    assert one["history"] == a["history"]

    page = Browser().get(s.h.url + "/microsoft_outlook/admin/")
    assert page.status == 200
    assert "<h2>Last errors</h2>" in page.text and f'id="history-{acc}"' in page.text
    assert "reconnect_required" in page.text and e["fix"][:40] in page.text
    assert f'id="reconnect-{acc}"' in page.text
    assert "1 to reconnect" in page.text and m["version"] in page.text
    # a mailbox to reconnect has no Test or Sync now, only Reconnect and Disconnect
    assert f'id="test-{acc}"' not in page.text and f'id="disconnect-{acc}"' in page.text


def add_old_rows(s, acc, days_ago):
    t = int(time.time()) - days_ago * 86400
    for k in range(3):
        s.rows("INSERT INTO msoauth_actions (account_id, graph_id, action, state, created_at, "
               f"updated_at) VALUES ({acc}, 'old{k}', 'mark_read', 'done', {t}, {t})", "x")
        s.rows("INSERT INTO msoauth_messages (account_id, graph_id, folder, removed, "
               f"updated_at) VALUES ({acc}, 'old{k}', 'inbox', 1, {t})", "x")
    s.rows("INSERT INTO msoauth_actions (account_id, graph_id, action, state, created_at, "
           f"updated_at) VALUES ({acc}, 'failed', 'mark_read', 'failed', {t}, {t})", "x")
    s.rows("INSERT INTO msoauth_messages (account_id, graph_id, folder, removed, "
           f"updated_at) VALUES ({acc}, 'kept', 'inbox', 0, {t})", "x")


def old_rows(s):
    return (int(s.rows("SELECT COUNT(*) FROM msoauth_actions WHERE graph_id LIKE 'old%'",
                       "n")[0]["n"]),
            int(s.rows("SELECT COUNT(*) FROM msoauth_messages WHERE graph_id LIKE 'old%'",
                       "n")[0]["n"]))


@pytest.mark.parametrize("db", ["sqlite3", "pgsql"])
def test_retention(httpd, simulator, pg_params, db):
    """Done actions and removed messages older than MSOAuthRetentionDays go
    with the job's first sweep; 0 keeps them; the rest is never touched."""
    if db == "pgsql":
        from conftest import pg_reset
        pg_reset(pg_params)
    s = Setup(httpd, simulator, db=db, pg_params=pg_params,
              extra=keyed(httpd, "MSOAuthRetentionDays 0\n"))
    s.wait_schema()
    acc = connect(s, ADELE[0])
    httpd.stop()
    add_old_rows(s, acc, 3)
    httpd.start()                                   # 0 keeps everything
    wait_for("a job cycle", lambda: s.rows("SELECT COUNT(*) FROM msoauth_job_runs",
                                           "n")[0]["n"] != "0")
    time.sleep(2)
    assert old_rows(s) == (3, 3)

    httpd.stop()
    httpd.start(httpd.body.replace("MSOAuthRetentionDays 0", "MSOAuthRetentionDays 2"))
    wait_for("the sweep", lambda: old_rows(s) == (0, 0))
    assert s.rows("SELECT COUNT(*) FROM msoauth_actions WHERE state = 'failed'",
                  "n")[0]["n"] == "1"
    assert s.rows("SELECT COUNT(*) FROM msoauth_messages WHERE graph_id = 'kept'",
                  "n")[0]["n"] == "1"
    httpd.wait_log("3 done actions older than 2 days deleted")
    v = samples(wait_for("the counters", lambda: 'table="messages"' in scrape(s).text
                         and scrape(s).text))
    assert sum(n for k, n in v.items() if k.startswith("msoauth_retention_deleted_total")
               and 'table="actions"' in k) == 3


def test_503_naming_the_database_when_it_is_down(httpd, simulator):
    """A PostgreSQL server that is not there: the metrics and the status page
    (HTML and JSON) answer 503 and say so, never an empty 200."""
    httpd.file("keys/k1.hex", secrets.token_hex(32))
    httpd.file("api.key", API_KEY + "\n")
    httpd.start(f"""
DBDriver pgsql
DBDParams "host=127.0.0.1 port={free_port()} dbname=none user=none connect_timeout=2"
MSOAuthTokenKeyFile keys/k1.hex
MSOAuthClientID 0c9a7d52-6a0e-4c55-9d0e-3c2b1a0f9e8d
MSOAuthClientSecret "x~secret"
MSOAuthAPIKeyFile api.key
{ADMIN}{METRICS}""")
    r = scrape(type("S", (), {"h": httpd})())
    assert r.status == 503 and "database" in r.text, r.text
    r = Browser().get(httpd.url + "/microsoft_outlook/admin/", headers=KEY)
    assert r.status == 503 and "database" in r.text, r.text
    r = Browser().get(httpd.url + "/microsoft_outlook/admin/",
                      headers=dict(KEY, Accept="application/json"))
    assert r.status == 503 and "database" in r.text, r.text
