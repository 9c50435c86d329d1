"""Start-up validation: `httpd -t` and real starts, with the shipped sample and
with each wrong value the contract lists."""
import datetime
import re
import secrets

import pytest

from conftest import REPO

CLIENT_ID = "6731de76-14a6-49ae-97bc-6eba6914391e"
SECRET = "Zq8~simulated.secret_VALUE-4f1b2c"     # must never appear in any output


def base_body(h, extra="", company=""):
    h.file("keys/k1.hex", secrets.token_hex(32) + "\n")
    return f"""
DBDriver sqlite3
DBDParams "{h.root}/data/msoauth.db"
MSOAuthTokenKeyFile keys/k1.hex
MSOAuthClientID {CLIENT_ID}
MSOAuthClientSecret "{SECRET}"
{extra}
{company}
"""


def line_of(h, needle):
    """file:line of the conf line that is needle (else the first containing it)."""
    lines = h.conf.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if line.strip() == needle.strip():
            return f"{h.conf}:{i}"
    for i, line in enumerate(lines, 1):
        if needle in line:
            return f"{h.conf}:{i}"
    raise AssertionError(f"{needle!r} not in {h.conf}")


def assert_fails(h, body, directive, needle, fix):
    rc, out = h.configtest(body)
    assert rc != 0, out
    assert directive in out, out
    # httpd names the file and line of the offending directive.
    num = line_of(h, needle).rsplit(":", 1)[1]
    assert re.search(rf"line {num} of {re.escape(str(h.conf))}", out), out
    assert fix in out, out
    assert SECRET not in out
    return out


def test_minimal_config_is_ok(httpd):
    rc, out = httpd.configtest(base_body(httpd))
    assert rc == 0, out
    assert "Syntax OK" in out
    assert SECRET not in out


def test_shipped_sample_passes_configtest(httpd):
    """conf/msoauth.load + conf/msoauth.conf as an administrator installs them:
    the key and secret files at the paths the sample names (relative to ServerRoot)."""
    httpd.file("msoauth.key", secrets.token_hex(32) + "\n")
    httpd.file("msoauth-secret.txt", SECRET + "\n")
    httpd.file("msoauth-api.key", secrets.token_hex(32) + "\n")
    httpd.modules += ["auth_basic", "authn_core", "authn_file", "authz_user"]
    sample = (REPO / "conf" / "msoauth.conf").read_text()
    httpd.file("msoauth.conf", sample, 0o644)
    httpd.with_msoauth = False
    load = (REPO / "conf" / "msoauth.load").read_text()
    assert "LoadModule msoauth_module" in load
    from conftest import MODULE
    body = "LoadModule msoauth_module " + str(MODULE) + "\nInclude msoauth.conf\n"
    rc, out = httpd.configtest(body)
    assert rc == 0, out
    assert "Syntax OK" in out
    assert SECRET not in out
    # The placeholder client ID is pointed out, not silently used.
    assert "MSO013" in out and "Overview page" in out, out


@pytest.mark.parametrize("directive,value,fix", [
    ("MSOAuthClientID", "not-a-guid", "Application (client) ID"),
    ("MSOAuthClientID", "6731de76-14a6-49ae-97bc-6eba6914391", "xxxxxxxx-xxxx"),
    ("MSOAuthTenant", "contoso", "Directory (tenant) ID"),
    ("MSOAuthCloud", "azure-germany", "usgov (GCC High)"),
    ("MSOAuthEdition", "enterprise", "use basic"),
    ("MSOAuthBaseURL", "http://erp.example.com", "Use https://"),
    ("MSOAuthBaseURL", "https://erp.example.com/", "without a trailing slash"),
    ("MSOAuthBaseURL", "https://erp.example.com/app", "without a trailing slash or path"),
    ("MSOAuthBaseURL", "https://erp.example.com?x=1", "must not have a query"),
    ("MSOAuthGraphURL", "https://graph.microsoft.com/v1.0", "the module adds /v1.0"),
    ("MSOAuthSecretExpires", "31.12.2027", "YYYY-MM-DD"),
    ("MSOAuthSecretExpires", "2027-02-30", "YYYY-MM-DD"),
    ("MSOAuthSyncFolders", "Inbox", "well-known Outlook folder"),
    ("MSOAuthSyncInterval", "5", "between 10 and 86400"),
    ("MSOAuthRedirectPath", "microsoft_outlook/confirm", "starting with a single /"),
])
def test_wrong_value_fails_with_directive_line_and_fix(httpd, directive, value, fix):
    body = base_body(httpd, extra=f"{directive} {value}")
    assert_fails(httpd, body, directive, f"{directive} {value}", fix)


def test_missing_key_file(httpd):
    body = base_body(httpd).replace("MSOAuthTokenKeyFile keys/k1.hex",
                                    "MSOAuthTokenKeyFile keys/nope.key")
    out = assert_fails(httpd, body, "MSOAuthTokenKeyFile", "keys/nope.key", "openssl rand")
    assert "nope.key" in out


def test_unreadable_key_file(httpd):
    (httpd.root / "keys" / "adir").mkdir(parents=True)
    body = base_body(httpd).replace("MSOAuthTokenKeyFile keys/k1.hex",
                                    "MSOAuthTokenKeyFile keys/adir")
    assert_fails(httpd, body, "MSOAuthTokenKeyFile", "keys/adir", "adir")


@pytest.mark.parametrize("content", [secrets.token_hex(31), secrets.token_hex(33),
                                     "x" * 64, secrets.token_bytes(16)])
def test_key_of_wrong_size(httpd, content):
    body = base_body(httpd)
    httpd.file("keys/k1.hex", content)
    out = assert_fails(httpd, body, "MSOAuthTokenKeyFile", "keys/k1.hex", "openssl rand")
    if isinstance(content, str):
        assert content not in out       # key material never echoed


@pytest.mark.parametrize("name", ["acme corp", "a" * 65, "ac/me", "ümlaut"])
def test_company_name_out_of_pattern(httpd, name):
    company = f'<MSOAuthCompany "{name}">\nMSOAuthEdition pro\n</MSOAuthCompany>'
    out = assert_fails(httpd, base_body(httpd, company=company), "MSOAuthCompany",
                       "<MSOAuthCompany", "A-Z a-z 0-9 _ . -")


def test_server_level_directive_inside_company_is_refused(httpd):
    company = "<MSOAuthCompany acme>\nMSOAuthBaseURL https://a.example.com\n</MSOAuthCompany>"
    assert_fails(httpd, base_body(httpd, company=company), "MSOAuthBaseURL",
                 "MSOAuthBaseURL https://a.example.com", "move it outside the section")


def test_duplicate_company(httpd):
    company = ("<MSOAuthCompany acme>\n</MSOAuthCompany>\n"
               "<MSOAuthCompany acme>\n</MSOAuthCompany>")
    rc, out = httpd.configtest(base_body(httpd, company=company))
    assert rc != 0 and "already defined at" in out, out


def test_company_without_key_file_is_an_error(httpd):
    body = base_body(httpd).replace("MSOAuthTokenKeyFile keys/k1.hex", "")
    rc, out = httpd.configtest(body)
    assert rc != 0, out
    assert "MSOAuthTokenKeyFile is missing" in out and "openssl rand -hex 32" in out


def test_secret_file_read_and_trimmed(httpd):
    httpd.file("secret.txt", "\n  " + SECRET + "  \n")
    body = base_body(httpd).replace(f'MSOAuthClientSecret "{SECRET}"',
                                    "MSOAuthClientSecretFile secret.txt")
    rc, out = httpd.configtest(body)
    assert rc == 0, out
    assert SECRET not in out


def test_secret_file_missing(httpd):
    body = base_body(httpd).replace(f'MSOAuthClientSecret "{SECRET}"',
                                    "MSOAuthClientSecretFile missing-secret.txt")
    assert_fails(httpd, body, "MSOAuthClientSecretFile", "missing-secret.txt",
                 "not its Secret ID")


# --- warnings: configtest passes, the message names the place and the fix ---

def assert_warns(h, body, needle_line, *texts):
    rc, out = h.configtest(body)
    assert rc == 0, out
    assert "Syntax OK" in out
    assert line_of(h, needle_line) in out, out
    for t in texts:
        assert t in out, out
    assert SECRET not in out
    return out


def test_secret_shaped_like_guid_warns(httpd):
    guid_secret = "0f3b8a52-1c1e-4d1b-9a7e-2b9f6c1d4e5a"
    body = base_body(httpd).replace(f'"{SECRET}"', guid_secret)
    out = assert_warns(httpd, body, guid_secret, "Secret ID, not its Value")
    assert guid_secret not in out.replace(line_of(httpd, guid_secret), "")


def days_from_now(n):
    return (datetime.datetime.now(datetime.timezone.utc).date()
            + datetime.timedelta(days=n)).isoformat()


def test_secret_expiring_soon_warns(httpd):
    d = days_from_now(12)
    body = base_body(httpd, extra=f"MSOAuthSecretExpires {d}")
    assert_warns(httpd, body, f"MSOAuthSecretExpires {d}", "expires in 11 day",
                 "Create a new secret")


def test_secret_already_expired_warns_in_configtest(httpd):
    d = days_from_now(-3)
    body = base_body(httpd, extra=f"MSOAuthSecretExpires {d}")
    assert_warns(httpd, body, f"MSOAuthSecretExpires {d}", f"expired on {d}",
                 "AADSTS7000222")


def test_secret_far_from_expiry_is_quiet(httpd):
    body = base_body(httpd, extra=f"MSOAuthSecretExpires {days_from_now(200)}")
    rc, out = httpd.configtest(body)
    assert rc == 0 and "expire" not in out, out


def test_company_without_credentials_warns(httpd):
    h = httpd
    h.file("keys/k1.hex", secrets.token_hex(32))
    body = f"""
DBDriver sqlite3
DBDParams "{h.root}/data/msoauth.db"
MSOAuthTokenKeyFile keys/k1.hex
<MSOAuthCompany lonely>
MSOAuthEdition pro
</MSOAuthCompany>
"""
    assert_warns(h, body, "<MSOAuthCompany lonely>", "MSOAuthCompany lonely",
                 "no MSOAuthClientID", "not_configured")


def test_company_falls_back_to_main_server_credentials(httpd):
    """A company without credentials of its own uses the main server's: no warning."""
    company = "<MSOAuthCompany acme>\nMSOAuthEdition pro\n</MSOAuthCompany>"
    rc, out = httpd.configtest(base_body(httpd, company=company))
    assert rc == 0 and "no MSOAuthClientID" not in out, out


def test_world_readable_key_warns(httpd):
    body = base_body(httpd)
    httpd.file("keys/k1.hex", secrets.token_hex(32), 0o644)
    rc, out = httpd.configtest(body)
    assert rc == 0 and "readable by every user" in out and "chmod 600" in out, out


def test_warnings_reach_the_error_log_once_at_start(httpd):
    d = days_from_now(5)
    body = base_body(httpd, extra=f"MSOAuthSecretExpires {d}")
    httpd.start(body)
    httpd.wait_log("expires in")
    assert httpd.log().count("expires in") == 1, httpd.log()
    assert SECRET not in httpd.log()


def test_expired_secret_is_an_error_in_the_log_at_start(httpd):
    d = days_from_now(-1)
    httpd.start(base_body(httpd, extra=f"MSOAuthSecretExpires {d}"))
    httpd.wait_log("expired on")
    line = [l for l in httpd.log().splitlines() if "expired on" in l][0]
    assert ":error]" in line, line


def test_missing_mod_dbd_is_an_error(httpd):
    httpd.modules.remove("dbd")
    body = base_body(httpd).replace("DBDriver sqlite3", "").replace("DBDParams", "#")
    rc, out = httpd.configtest(body)
    assert rc != 0 and "mod_dbd" in out and "a2enmod dbd" in out, out


def test_vhost_inherits_and_overrides(httpd):
    """A vhost's company inherits the main server's credentials and overrides
    what it sets; errors inside a vhost name their own line."""
    h = httpd
    body = base_body(h) + f"""
<VirtualHost 127.0.0.1:{h.port}>
ServerName vhost.localhost
MSOAuthBaseURL http://localhost:{h.port}
<MSOAuthCompany acme>
MSOAuthTenant contoso.onmicrosoft.com
MSOAuthCloud usgov
</MSOAuthCompany>
</VirtualHost>
"""
    rc, out = h.configtest(body)
    assert rc == 0, out
    bad = body.replace("MSOAuthCloud usgov", "MSOAuthCloud mars")
    assert_fails(h, bad, "MSOAuthCloud", "MSOAuthCloud mars", "usgov")


# --- version 2: certificates, app-only companies, operations ---

def make_cert(h, name, days=365, key_bits=2048, encrypt=False, separate_key=True):
    """A self-signed certificate and its key, made with the openssl tool."""
    import subprocess
    cert, key = h.root / f"{name}.pem", h.root / f"{name}.key"
    args = ["openssl", "req", "-x509", "-newkey", f"rsa:{key_bits}", "-subj", "/CN=msoauth-test",
            "-keyout", str(key), "-out", str(cert), "-days", str(days)]
    args += ["-passout", "pass:secret1234"] if encrypt else ["-nodes"]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    key.chmod(0o600)
    if not separate_key:
        cert.write_text(cert.read_text() + key.read_text())
        cert.chmod(0o600)
    return cert, key


def test_certificate_credential_is_checked(httpd):
    cert, key = make_cert(httpd, "good")
    rc, out = httpd.configtest(base_body(httpd, extra=f"MSOAuthClientCertificateFile {cert} {key}"))
    assert rc == 0 and "Syntax OK" in out, out
    # The key in the certificate file: one argument.
    both, _ = make_cert(httpd, "both", separate_key=False)
    rc, out = httpd.configtest(base_body(httpd, extra=f"MSOAuthClientCertificateFile {both}"))
    assert rc == 0, out
    # A certificate alone is a credential: no secret needed.
    body = base_body(httpd, extra=f"MSOAuthClientCertificateFile {cert} {key}").replace(
        f'MSOAuthClientSecret "{SECRET}"', "")
    rc, out = httpd.configtest(body)
    assert rc == 0 and "has no" not in out, out


@pytest.mark.parametrize("case,fix", [
    ("other_key", "does not belong to the certificate"),
    ("encrypted", "encrypted with a passphrase"),
    ("small", "at least 2048"),
    ("missing", "cannot read"),
    ("no_key", "no PEM private key"),
])
def test_wrong_certificate_fails_with_the_fix(httpd, case, fix):
    cert, key = make_cert(httpd, "c", key_bits=1024 if case == "small" else 2048,
                          encrypt=case == "encrypted")
    _, other = make_cert(httpd, "o")
    arg = {"other_key": f"{cert} {other}", "encrypted": f"{cert} {key}", "small": f"{cert} {key}",
           "missing": f"{httpd.root}/nope.pem", "no_key": f"{cert}"}[case]
    directive = f"MSOAuthClientCertificateFile {arg}"
    out = assert_fails(httpd, base_body(httpd, extra=directive), "MSOAuthClientCertificateFile",
                       directive, fix)
    for line in key.read_text().splitlines()[1:-1] + other.read_text().splitlines()[1:-1]:
        assert line not in out          # no key material in any message


def test_certificate_expiry_is_warned(httpd):
    cert, key = make_cert(httpd, "soon", days=10)
    rc, out = httpd.configtest(base_body(httpd, extra=f"MSOAuthClientCertificateFile {cert} {key}"))
    assert rc == 0, out
    assert re.search(r"expires in (9|10) days", out) and "MSO012" in out, out


def test_app_only_needs_a_directory(httpd):
    company = ("<MSOAuthCompany shared>\nMSOAuthAppOnly on\nMSOAuthTenant organizations\n"
               "MSOAuthMailbox support@contoso.com\n</MSOAuthCompany>")
    rc, out = httpd.configtest(base_body(httpd, company=company))
    assert rc != 0 and "MSO009" in out and "Directory (tenant) ID" in out, out
    ok = company.replace("organizations", "contoso.onmicrosoft.com")
    rc, out = httpd.configtest(base_body(httpd, company=ok))
    assert rc == 0, out


def test_mailboxes_belong_to_an_app_only_company(httpd):
    assert_fails(httpd, base_body(httpd, extra="MSOAuthMailbox support@contoso.com"),
                 "MSOAuthMailbox", "MSOAuthMailbox support@contoso.com", "inside <MSOAuthCompany")
    company = "<MSOAuthCompany acme>\nMSOAuthMailbox support@contoso.com\n</MSOAuthCompany>"
    rc, out = httpd.configtest(base_body(httpd, company=company))
    assert rc != 0 and "MSO010" in out and "MSOAuthAppOnly on" in out, out
    company = ("<MSOAuthCompany acme>\nMSOAuthAppOnly on\nMSOAuthTenant contoso.com\n"
               "MSOAuthMailbox support@contoso.com not-an-address\n</MSOAuthCompany>")
    assert_fails(httpd, base_body(httpd, company=company), "MSOAuthMailbox",
                 "MSOAuthMailbox support@contoso.com not-an-address", "e-mail address")


@pytest.mark.parametrize("directive,value,fix", [
    ("MSOAuthAttachmentMaxBytes", "-1", "between 0 and 157286400"),
    ("MSOAuthAttachmentMaxBytes", "10MB", "between 0 and 157286400"),
    ("MSOAuthRetentionDays", "forever", "between 0 (keep everything) and 3650"),
    ("MSOAuthHTTPProxy", "proxy.example:3128", "http://proxy.example:3128"),
    ("MSOAuthCACertificateFile", "/nonexistent/ca.pem", "PEM file with the CA certificates"),
    ("MSOAuthOutlookURL", "http://outlook.example.com", "https://"),
    ("MSOAuthAPIKeyFile", "/nonexistent/api.key", "openssl rand -hex 32"),
])
def test_v2_values_fail_with_the_fix(httpd, directive, value, fix):
    body = base_body(httpd, extra=f"{directive} {value}")
    assert_fails(httpd, body, directive, f"{directive} {value}", fix)


def test_short_api_key_is_refused(httpd):
    httpd.file("api.key", "abc\n")
    assert_fails(httpd, base_body(httpd, extra="MSOAuthAPIKeyFile api.key"),
                 "MSOAuthAPIKeyFile", "MSOAuthAPIKeyFile api.key", "shorter than 32")
