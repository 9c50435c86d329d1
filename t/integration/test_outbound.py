"""Calls to Microsoft and how they leave: MSOAuthHTTPProxy (a forward proxy
in Python that counts what passes), never a proxy from httpd's environment,
MSOAuthCACertificateFile (a TLS front with a CA made here, in front of the
simulator's Graph) and MSOAuthOutlookURL for IMAP/SMTP tokens. A real httpd
with the module and the Microsoft simulator."""
import datetime
import http.client
import http.server
import ipaddress
import secrets
import socketserver
import ssl
import threading
import urllib.parse

import pytest

import conftest
from conftest import free_port, sim_call
from test_job import ADMIN, account, connect, get_json, wait_for
from test_signin import ADELE, Setup

API_KEY = secrets.token_hex(32)
KEY = {"Authorization": "Bearer " + API_KEY}
HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te",
       "trailer", "transfer-encoding", "upgrade", "content-length"}


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class Forwarder:
    """An HTTP/1.1 server that sends each request on to a target and its answer
    back, keeping a log (method, URL as received). As a forward proxy it takes
    absolute URLs; as a front it has a fixed upstream and may rewrite bodies."""

    def __init__(self, upstream=None, rewrite=None, tls=None):
        self.log = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                with outer.lock:
                    outer.log.append((self.command, self.path))
                if upstream:
                    target = urllib.parse.urlsplit(upstream)
                    path = self.path
                else:
                    target = urllib.parse.urlsplit(self.path)
                    path = urllib.parse.urlunsplit(("", "", target.path, target.query, ""))
                    if target.scheme != "http" or not target.hostname:
                        self.send_error(400, "absolute http:// URL expected")
                        return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                c = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=60)
                try:
                    c.request(self.command, path, body=body, headers=headers)
                    r = c.getresponse()
                    data = r.read()
                    if rewrite:
                        data = rewrite(data)
                    self.send_response(r.status, r.reason)
                    for k, v in r.getheaders():
                        if k.lower() not in HOP:
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    c.close()

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _any

        self.port = free_port()
        self.server = _Server(("127.0.0.1", self.port), Handler)
        if tls:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def seen(self, part):
        with self.lock:
            return [u for _, u in self.log if part in u]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def keyed(httpd):
    """The token and admin locations, with an API key (programs' admin POSTs)."""
    httpd.file("api.key", API_KEY + "\n")
    return ADMIN + "MSOAuthAPIKeyFile api.key\n"


def httpd_env(monkeypatch, proxy_url, **more):
    """httpd (not this test process) starts with proxy variables set."""
    plain = conftest.sanitizer_env

    def env(log_dir):
        e = plain(log_dir)
        for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
            e[var] = proxy_url
        e.update(more)
        return e
    monkeypatch.setattr(conftest, "sanitizer_env", env)


@pytest.fixture
def proxy():
    p = Forwarder()
    yield p
    p.close()


def test_every_call_goes_through_the_configured_proxy(httpd, simulator, proxy, monkeypatch):
    """Sign-in (code, signing keys, Graph /me), the job's refreshes and Graph
    pages, the token handler and the admin test all leave through
    MSOAuthHTTPProxy; a dead proxy in httpd's environment is never used."""
    httpd_env(monkeypatch, "http://127.0.0.1:9", no_proxy="*")
    s = Setup(httpd, simulator, extra=keyed(httpd) + f"MSOAuthHTTPProxy {proxy.url}\n")
    s.wait_schema()
    sim_call(simulator, "POST", "/_sim/mailbox/" + ADELE[0] + "/messages",
             {"folder": "inbox", "count": 3})
    acc = connect(s, ADELE[0])
    sim = simulator.url
    assert proxy.seen(f"{sim}/common/oauth2/v2.0/token"), proxy.log
    assert proxy.seen(f"{sim}/v1.0/me"), proxy.log
    # the job: the mirror's pages, and a refresh made due now
    wait_for("the mirror", lambda: s.rows("SELECT COUNT(*) FROM msoauth_messages", "n")[0]["n"]
             == "3")
    assert proxy.seen("/messages/delta"), proxy.log
    s.rows(f"UPDATE msoauth_accounts SET refresh_due_at = 0 WHERE id = {acc}", "x")
    wait_for("a refresh through the proxy",
             lambda: len(proxy.seen("/oauth2/v2.0/token")) >= 2)
    status, t = get_json(s, f"/microsoft_outlook/token?account={acc}", headers=KEY)
    assert status == 200, t
    status, body = get_json(s, f"/microsoft_outlook/admin/accounts/{acc}/test", method="POST",
                            headers=KEY)
    assert status == 200 and body["ok"] is True, body
    assert proxy.seen(f"{sim}/v1.0/me/mailFolders/inbox"), proxy.log
    # the simulator saw nothing that did not come through the proxy
    direct = [r for r in sim_call(simulator, "GET", "/_sim/log")["requests"]
              if r.get("kind") in ("token", "graph")]
    assert direct, "the simulator logged no calls"
    assert len(proxy.log) >= len(direct), (len(proxy.log), len(direct))
    assert account(s, acc)["state"] == "connected"


def test_a_proxy_in_the_environment_is_not_used(httpd, simulator, proxy, monkeypatch):
    """Without MSOAuthHTTPProxy the calls go straight to Microsoft, even when
    httpd's environment names a proxy (which would see the client secret)."""
    httpd_env(monkeypatch, proxy.url)
    s = Setup(httpd, simulator, extra=keyed(httpd))
    s.wait_schema()
    acc = connect(s, ADELE[0])
    status, t = get_json(s, f"/microsoft_outlook/token?account={acc}", headers=KEY)
    assert status == 200, t
    assert proxy.log == []


def make_ca(tmp_path):
    """A CA and a certificate for 127.0.0.1 signed by it; returns (ca.pem,
    server SSLContext)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "msoauth test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(
                ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_pem = tmp_path / "ca.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain = tmp_path / "server.pem"
    chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                      + key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(chain))
    return ca_pem.read_bytes(), ctx


def test_graph_over_tls_trusts_the_configured_ca(httpd, simulator, tmp_path):
    """Graph behind TLS with a certificate of a private CA: with
    MSOAuthCACertificateFile naming that CA the sign-in (Graph /me), the
    mirror and the admin test work; without it, the sign-in fails on the
    certificate and nothing is stored."""
    ca_pem, ctx = make_ca(tmp_path)
    sim_host = simulator.url.encode()
    # Graph's links (nextLink, deltaLink) name the front, as Graph names itself.
    front = Forwarder(upstream=simulator.url, tls=ctx,
                      rewrite=lambda b: b.replace(sim_host, front.url.encode()))
    try:
        httpd.file("ca.pem", ca_pem, 0o644)
        graph = f"MSOAuthGraphURL {front.url}\n"
        s = Setup(httpd, simulator, extra=keyed(httpd) + graph)
        s.wait_schema()
        _, r2, r3 = s.sign_in(mailbox=ADELE[0], return_to="/a")
        assert r3.query()["msoauth"] == "error", r3.location
        assert r3.query()["reason"] == "graph_error", r3.location
        assert s.accounts() == []
        assert "certificate" in httpd.log().lower() or "SSL" in httpd.log(), httpd.log()[-2000:]

        httpd.graceful(httpd.body.replace(graph, graph + "MSOAuthCACertificateFile ca.pem\n"))
        sim_call(simulator, "POST", "/_sim/mailbox/" + ADELE[0] + "/messages",
                 {"folder": "inbox", "count": 4})
        acc = connect(s, ADELE[0])
        assert front.seen("/v1.0/me"), front.log
        wait_for("the mirror over TLS", lambda: s.rows(
            "SELECT COUNT(*) FROM msoauth_messages", "n")[0]["n"] == "4")
        assert front.seen("/messages/delta")
        status, t = get_json(s, f"/microsoft_outlook/admin/accounts/{acc}/test", method="POST",
                             headers=KEY)
        assert status == 200 and t["ok"] is True and t["inbox_total"] == 4, t
    finally:
        front.close()


def test_imap_tokens_are_for_the_configured_outlook_resource(httpd, simulator):
    """resource=imap asks for MSOAuthOutlookURL's resource (here Outlook's
    other name, outlook.office365.com), not a constant."""
    s = Setup(httpd, simulator, extra=keyed(httpd) + """
MSOAuthOutlookURL https://outlook.office365.com
MSOAuthScope https://outlook.office365.com/IMAP.AccessAsUser.All
""")
    s.wait_schema()
    acc = connect(s, ADELE[0])
    status, body = get_json(s, f"/microsoft_outlook/token?account={acc}&resource=imap",
                            headers=KEY)
    # The company grants only that resource's scope: a token asked for
    # outlook.office.com would be refused before any call (no scope for it).
    assert status == 200, body
    assert "IMAP.AccessAsUser.All" in body["scope"], body
    assert any(r.get("grant_type") == "refresh_token"
               for r in sim_call(simulator, "GET", "/_sim/log")["requests"])
