"""Test harness: a real httpd with the built module, the Microsoft simulator,
and private SQLite / PostgreSQL databases. Everything listens on 127.0.0.1."""
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("MSO_BUILD_DIR", REPO / "build" / "release")).resolve()
MODULE = BUILD / ".libs" / "mod_msoauth.so"
HTTPD = os.environ.get("MSO_HTTPD", "/usr/sbin/apache2")
MODDIR = os.environ.get("MSO_HTTPD_MODDIR", "/usr/lib/apache2/modules")
SANITIZE = os.environ.get("MSO_SANITIZE", "")   # "asan" when the module is built with ASan+UBSan
IS_ROOT = os.geteuid() == 0
RUN_USER = "www-data" if IS_ROOT else pwd.getpwuid(os.geteuid()).pw_name

BASE_MODULES = ["mpm_event", "authz_core", "authz_host", "dbd", "alias", "mime", "headers"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=15.0, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode} before listening")
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def alive(pid):
    """True while pid runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def give_to_run_user(path):
    """httpd children run as www-data when the tests run as root."""
    if IS_ROOT:
        shutil.chown(path, RUN_USER, RUN_USER)


def sanitizer_env(log_dir):
    env = dict(os.environ)
    if SANITIZE == "asan":
        lib = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                             text=True, check=True).stdout.strip()
        env["LD_PRELOAD"] = lib
        # httpd itself is not built with ASan and keeps its pools until exit:
        # leak reports would be httpd's, so leaks are checked by the unit tests.
        env["ASAN_OPTIONS"] = f"detect_leaks=0:log_path={log_dir}/asan:abort_on_error=0"
        env["UBSAN_OPTIONS"] = f"print_stacktrace=1:log_path={log_dir}/ubsan"
    return env


class Httpd:
    """One httpd instance in its own server root."""

    def __init__(self, root, name="httpd"):
        self.root = Path(root) / name
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("run", "htdocs", "data", "logs"):
            (self.root / sub).mkdir(exist_ok=True)
        give_to_run_user(self.root / "data")
        give_to_run_user(self.root / "logs")     # sanitizer reports come from the children
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.conf = self.root / "httpd.conf"
        self.error_log = self.root / "logs" / "error.log"
        self.modules = list(BASE_MODULES)
        self.body = ""
        self.with_msoauth = True

    def file(self, name, content, mode=0o600):
        """Writes a file into the server root (keys, secrets, included configs)."""
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
        p.chmod(mode)
        return p

    def header(self):
        lines = [
            f'ServerRoot "{self.root}"',
            f"ServerName 127.0.0.1:{self.port}",
            f"Listen 127.0.0.1:{self.port}",
            f'PidFile "{self.root}/run/httpd.pid"',
            f'DefaultRuntimeDir "{self.root}/run"',
            f'ErrorLog "{self.error_log}"',
            "LogLevel info msoauth:debug",
            f'DocumentRoot "{self.root}/htdocs"',
            "StartServers 2", "ServerLimit 4", "ThreadsPerChild 8", "MaxRequestWorkers 32",
            "GracefulShutdownTimeout 5",
            "TypesConfig /etc/mime.types",
            "<Directory />", "  AllowOverride None", "</Directory>",
        ]
        if IS_ROOT:
            lines += [f"User {RUN_USER}", f"Group {RUN_USER}"]
        for m in self.modules:
            lines.append(f"LoadModule {m}_module {MODDIR}/mod_{m}.so")
        if self.with_msoauth:
            lines.append(f"LoadModule msoauth_module {MODULE}")
        return "\n".join(lines) + "\n"

    def write(self, body=None):
        if body is not None:
            self.body = body
        self.conf.write_text(self.header() + self.body + "\n")

    def _run(self, *args, timeout=60):
        return subprocess.run([HTTPD, "-d", str(self.root), "-f", str(self.conf), *args],
                              capture_output=True, text=True, timeout=timeout,
                              env=sanitizer_env(self.root / "logs"))

    def configtest(self, body=None):
        self.write(body)
        r = self._run("-t")
        return r.returncode, r.stdout + r.stderr

    def start(self, body=None):
        self.write(body)
        r = self._run("-k", "start")
        if r.returncode != 0:
            raise RuntimeError(f"httpd did not start ({r.returncode}):\n{r.stdout}{r.stderr}"
                               f"\n--- error log ---\n{self.log()}")
        wait_port(self.port)
        return r.stdout + r.stderr

    def pid(self):
        try:
            return int((self.root / "run" / "httpd.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def children(self):
        pid = self.pid()
        if not pid:
            return []
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self):
        """Stops httpd and makes sure none of its children lives on: an orphaned
        job child would keep talking to the shared simulator."""
        pid = self.pid()
        if not pid:
            return
        kids = self.children()
        self._run("-k", "stop")
        end = time.time() + 20
        while time.time() < end and alive(pid):
            time.sleep(0.05)
        for p in [pid] + kids:
            if alive(p):
                os.kill(p, 9)
        end = time.time() + 10
        while time.time() < end and any(alive(p) for p in [pid] + kids):
            time.sleep(0.05)

    def graceful(self, body=None, wait_generation=True):
        self.write(body)
        before = self.log().count("resuming normal operations")
        r = self._run("-k", "graceful")
        assert r.returncode == 0, r.stdout + r.stderr
        end = time.time() + 15
        while time.time() < end and wait_generation:
            if self.log().count("resuming normal operations") > before:
                return
            time.sleep(0.05)
        if wait_generation:
            raise TimeoutError("httpd did not finish the graceful restart")

    def log(self):
        try:
            return self.error_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, needle, timeout=10.0):
        end = time.time() + timeout
        while time.time() < end:
            if needle in self.log():
                return True
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in the error log:\n{self.log()}")

    def sanitizer_reports(self):
        return [p for p in (self.root / "logs").glob("*san.*")]


def traversable_dir(prefix):
    """A fresh directory the httpd user (www-data) can reach: pytest's own
    temporary directories are private to root."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    return d


@pytest.fixture
def httpd():
    """An httpd that the test configures and starts; always stopped afterwards,
    and the test fails if ASan/UBSan reported anything."""
    instances = []
    base = traversable_dir("msoauth-httpd.")

    def make(name="httpd"):
        h = Httpd(base, name)
        instances.append(h)
        return h

    h = make()
    h.make_another = make
    yield h
    for inst in instances:
        inst.stop()
    reports = [r for inst in instances for r in inst.sanitizer_reports()]
    texts = [p.read_text(errors="replace") for p in reports]
    shutil.rmtree(base, ignore_errors=True)
    assert not reports, "sanitizer reports:\n" + "\n".join(texts)


@pytest.fixture(scope="session")
def pg_params(tmp_path_factory):
    """apr_dbd params of a private PostgreSQL cluster: the one scripts/test.sh
    started (MSO_TEST_PGSQL), or one started here."""
    params = os.environ.get("MSO_TEST_PGSQL")
    if params:
        yield params
        return
    d = tmp_path_factory.mktemp("pg")
    port = free_port()
    r = subprocess.run(["sh", str(REPO / "t" / "pgcluster.sh"), "start", str(d / "cluster"),
                        str(port)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    yield r.stdout.strip().splitlines()[-1]
    subprocess.run(["sh", str(REPO / "t" / "pgcluster.sh"), "stop", str(d / "cluster")])


def pg_conninfo(params):
    """apr_dbd's pgsql params are libpq conninfo: psql takes them as they are."""
    return params


def psql(params, sql):
    r = subprocess.run(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d",
                        pg_conninfo(params), "-c", sql], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def pg_reset(params):
    """Drops every table of the module, so a test starts from an empty database."""
    tables = psql(params, "SELECT string_agg(quote_ident(tablename), ', ') FROM pg_tables "
                          "WHERE schemaname = current_schema() AND tablename LIKE 'msoauth%'")
    if tables:
        psql(params, f"DROP TABLE IF EXISTS {tables} CASCADE")


class Simulator:
    def __init__(self, proc, port):
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def simulator(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("sim") / "sim.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "t" / "sim" / "mssim.py"), "--port",
                             str(port)], stdout=log, stderr=subprocess.STDOUT)
    wait_port(port, proc=proc)
    yield Simulator(proc, port)
    proc.terminate()
    proc.wait(10)


# --- talking to the module and the simulator as a browser would ---

import base64 as _b64
import http.cookiejar
import json as _json
import urllib.error
import urllib.parse
import urllib.request


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):
        return None


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body
        self.text = body.decode("utf-8", "replace")

    @property
    def location(self):
        return self.headers.get("Location")

    def query(self):
        """Parameters of the Location's query."""
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.location).query))


class Browser:
    """A cookie jar and one request at a time; redirects are returned, not followed,
    so each hop can be checked."""

    def __init__(self):
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar),
                                                  _NoRedirect())

    def request(self, url, method="GET", data=None, headers=None):
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        try:
            with self.opener.open(req, timeout=60) as r:
                return Response(r.status, r.headers, r.read())
        except urllib.error.HTTPError as e:
            return Response(e.code, e.headers, e.read())

    def get(self, url, **kw):
        return self.request(url, **kw)

    def follow(self, url, max_hops=10):
        """GET and follow redirects; returns every response on the way."""
        hops = []
        for _ in range(max_hops):
            r = self.get(url)
            hops.append(r)
            if r.status not in (301, 302, 303, 307, 308):
                return hops
            url = urllib.parse.urljoin(url, r.location)
        raise AssertionError("too many redirects")

    def cookies(self, prefix=""):
        return [c for c in self.jar if c.name.startswith(prefix)]


def sim_call(sim, method, path, body=None):
    data = _json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(sim.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        raise AssertionError(f"simulator {method} {path}: {e.code} {e.read()!r}")
    return _json.loads(raw) if raw else None


# The simulator's tokens: "EwA" + 120 and "0.AX" + 213 URL-safe characters.
# A bare "EwA" is not enough: random node names and lease owners in the log
# hold it about once in 20,000 runs. Twenty characters is still far less
# than any useful piece of a token.
_TOKEN_RE = re.compile(r"(?:EwA|0\.AX)[A-Za-z0-9_-]{20,}")


def token_leaks(text, *secrets):
    """What in text looks like a simulator token or equals one of secrets;
    empty when nothing leaked. Names only the first characters of a find."""
    found = [m.group(0)[:8] + "..." for m in _TOKEN_RE.finditer(text)]
    found += [s[:4] + "..." for s in secrets if s and s in text]
    return found


def open_sealed(key_hex, blob, aad, purpose=1):
    """Opens a sealed blob the way lib/mso_crypto does, with Python's own
    cryptography: proves the format is plain AES-256-GCM under an HKDF key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    info = b"mso-token-v1" if purpose == 1 else b"mso-state-v1"
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=info).derive(bytes.fromhex(key_hex))
    raw = _b64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))
    header, nonce, ct = raw[:5], raw[5:17], raw[17:]
    return AESGCM(key).decrypt(nonce, ct, header + bytes([purpose]) + aad.encode()).decode()
