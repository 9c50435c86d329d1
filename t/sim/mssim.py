#!/usr/bin/env python3
"""mssim: a Microsoft identity platform (Entra ID v2.0) + Microsoft Graph mail simulator.

One loopback port serves both halves, so mod_msoauth is pointed at it with
MSOAuthAuthorityURL http://127.0.0.1:PORT and MSOAuthGraphURL http://127.0.0.1:PORT:

  /{tenant}/v2.0/.well-known/openid-configuration    discovery
  /{tenant}/discovery/v2.0/keys                      JWKS
  /{tenant}/oauth2/v2.0/authorize | token | logout   sign-in page, code + PKCE, refresh
  /v1.0/me, /v1.0/me/mailFolders/..., /v1.0/me/messages/...   Graph mail
  /_sim/...                                          control API (tests only)

Behaviour and error bodies follow Microsoft's documentation of the identity platform and
Graph; t/sim/README.md lists what the simulator picks where it is silent. Standard library +
`cryptography` only.
Run:  python3 t/sim/mssim.py --port 8081 [--host 127.0.0.1] [--state-file F] [--demo]
"""
import argparse
import base64
import contextlib
import functools
import gc
import hashlib
import hmac
import html
import json
import operator
import os
import re
import secrets
import signal
import sys
import threading
import time
import traceback
import uuid
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, unquote_plus, urlencode, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

MSA_TENANT = "9188040d-6c67-4c5b-b112-36a304b66dad"   # personal Microsoft accounts
GRAPH = "https://graph.microsoft.com"
OUTLOOK = "https://outlook.office.com"
# Resource identifiers a scope prefix may use -> canonical resource.
RESOURCES = {
    "https://graph.microsoft.com": GRAPH,
    "00000003-0000-0000-c000-000000000000": GRAPH,
    "https://outlook.office.com": OUTLOOK,
    "https://outlook.office365.com": OUTLOOK,
    "00000002-0000-0ff1-ce00-000000000000": OUTLOOK,
}
OIDC_SCOPES = ("openid", "profile", "email", "offline_access")
# Canonical spelling for the Graph scopes the module may ask for (case-insensitive input).
GRAPH_SCOPES = ["User.Read", "User.ReadBasic.All", "Mail.Read", "Mail.ReadBasic", "Mail.ReadWrite",
                "Mail.Send", "Mail.Read.Shared", "Mail.ReadWrite.Shared", "Mail.Send.Shared",
                "MailboxSettings.Read", "MailboxSettings.ReadWrite"]
OUTLOOK_SCOPES = ["IMAP.AccessAsUser.All", "POP.AccessAsUser.All", "SMTP.Send",
                  "EWS.AccessAsUser.All"]

DEFAULT_TENANT = "b3a8f1e2-5c47-4d1a-9e36-2f0c8d7a6b51"
DEFAULT_CLIENT_ID = "5f3c2a1b-8d7e-4f6a-9b0c-1d2e3f4a5b6c"
DEFAULT_USERS = [
    {"oid": "6e2b8f3a-1c4d-4e5f-8a9b-0c1d2e3f4a5b", "upn": "adele@contoso.com",
     "name": "Adele Vance"},
    {"oid": "7f3c9a4b-2d5e-4f60-9bac-1d2e3f4a5b6c", "upn": "megan@contoso.com",
     "name": "Megan Bowen"},
]

DEFAULT_CONFIG = {
    "access_token_lifetime": 3600,      # expires_in (and ext_expires_in)
    "id_token_lifetime": 3600,
    "code_lifetime": 600,               # authorization codes: ~10 minutes
    "refresh_max_inactive": 90 * 86400,  # RT inactivity window -> AADSTS700082
    "strict_rotation": False,           # True: an RT dies as soon as it was rotated
    "refresh_grace_uses": None,         # None: rotated RTs keep working (as Microsoft does)
    "auto_approve": False,              # answer authorize with 302 when login_hint names a user
    "auto_approve_user": None,          # oid or upn: always sign in as this user, no page
    "default_user_read": True,          # Graph grants include User.Read, as new registrations do
    "latency_ms": 0,                    # added to every non-control request
    "graph_concurrency_limit": 4,       # per app + mailbox, as Outlook's limit
    "throttle_retry_after": 1,          # Retry-After seconds on concurrency 429s
    "default_page_size": 10,            # Graph's default page size for message delta
    "max_page_size": 1000,
    "request_size_limit": 4 << 20,      # Graph request bodies (and upload fragments): 4 MB
    "request_too_large_status": 413,    # 413 RequestEntityTooLarge (400 in older reports)
    "max_message_size": 150 << 20,      # body + attachments of a message (Graph: 150 MB)
    "max_recipients": 500,              # to + cc + bcc of a message (Exchange Online: 500)
    "upload_session_lifetime": 7200,    # seconds an attachment upload URL stays valid
    "upload_chunk_multiple": 0,         # e.g. 327680: fragments but the last in multiples of it
    "assertion_max_lifetime": None,     # client assertions: exp - nbf limit (Microsoft: none)
    "clock_skew": 300,                  # client assertions: tolerance for nbf and exp
    # Tests of the relying party's checks: issue ID tokens that must be refused.
    "id_token_tamper": None,            # signature | audience | issuer | nonce | expired | tenant
}

WELL_KNOWN_FOLDERS = [  # (well-known name, display name, hidden)
    ("msgfolderroot", "Top of Information Store", True),
    ("inbox", "Inbox", False), ("sentitems", "Sent Items", False),
    ("deleteditems", "Deleted Items", False), ("drafts", "Drafts", False),
    ("archive", "Archive", False), ("junkemail", "Junk Email", False),
    ("outbox", "Outbox", False),
    ("recoverableitemsdeletions", "Deletions", True),   # where Graph DELETE puts items
]
MESSAGE_PROPS = ["createdDateTime", "lastModifiedDateTime", "changeKey", "categories",
                 "receivedDateTime", "sentDateTime", "hasAttachments", "internetMessageId",
                 "subject", "bodyPreview", "importance", "parentFolderId", "conversationId",
                 "conversationIndex", "isDeliveryReceiptRequested", "isReadReceiptRequested",
                 "isRead", "isDraft", "webLink", "inferenceClassification", "body", "sender",
                 "from", "toRecipients", "ccRecipients", "bccRecipients", "replyTo", "flag",
                 "uniqueBody", "internetMessageHeaders"]
DEFAULT_MESSAGE_PROPS = [p for p in MESSAGE_PROPS if p not in ("uniqueBody", "internetMessageHeaders")]
MESSAGE_PROP_SET = frozenset(MESSAGE_PROPS)
IMM_PREFIX, REST_PREFIX = "AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0A", "AAMkAGI2THVSAAA"
DELTA_ENTRY_HEAD = '{"@odata.type": "#microsoft.graph.message", '   # json.dumps spacing
BASIC_HIDDEN = {"body", "bodyPreview", "uniqueBody"}           # not visible with Mail.ReadBasic
PATCHABLE = {"isRead", "categories", "flag", "importance", "inferenceClassification"}
SECRET_PARAMS = {"code", "client_secret", "refresh_token", "access_token", "code_verifier",
                 "client_assertion", "id_token"}
SENDERS = [("Contoso Billing", "billing@contoso.com"), ("Lee Gu", "lee.gu@fabrikam.com"),
           ("Nestor Wilke", "nestor@northwind.example"), ("Alex Wilber", "alex@adatum.example"),
           ("Patti Fernandez", "patti@contoso.com")]
TOPICS = ["Quarterly report", "Invoice", "Meeting notes", "Travel plans", "Project update",
          "Welcome aboard", "Budget review", "Support ticket"]

GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def int_b64url(n):
    return b64url(n.to_bytes((n.bit_length() + 7) // 8, "big"))


def guid():
    return str(uuid.uuid4())


def iso(ts):
    """Graph timestamps: ISO 8601 UTC with Z. (time.gmtime: seeding 100k messages calls this a lot.)"""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def aad_timestamp(ts):
    """The token endpoint's timestamp format, e.g. 2016-01-09 02:02:12Z."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def parse_time(value):
    """Epoch seconds from a number or an ISO 8601 string (control API input)."""
    if value is None or isinstance(value, (int, float)):
        return value
    v = value.strip().replace("Z", "+00:00")
    if len(v) == 10:
        v += "T00:00:00+00:00"
    dt = datetime.fromisoformat(v)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def graph_item_id(prefix, raw=None):
    """Exchange-looking ids: long, URL-safe base64, '=' padded, case-sensitive.
    `raw`: 45 random bytes the caller already has (one urandom call per new message)."""
    return prefix + base64.urlsafe_b64encode(raw or secrets.token_bytes(45)).decode() + "AAA="


@contextlib.contextmanager
def bulk_mode(enabled=True):
    """Creating 100k messages or 10k accounts makes millions of long-lived objects: the cyclic
    collector would rescan them again and again while they are made (a third of the time), and
    then on every full collection while pages are served. Pause it while they are made, then
    freeze them into the permanent generation. They hold no reference cycles, so reference
    counting still frees them after a reset. Small batches don't need it."""
    if not enabled:
        yield
        return
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was:
            gc.enable()


def add_query(uri, params):
    """Append response parameters to a redirect URI (which may carry its own query)."""
    parts = urlsplit(uri)
    if not parts.path:          # a URI without path comes back with '/' appended
        uri = uri + "/"
    return uri + ("&" if parts.query else "?") + urlencode(params)


def redact_query(query):
    if not query:
        return ""
    pairs = parse_qs(query, keep_blank_values=True)
    return urlencode([(k, "***" if k in SECRET_PARAMS else v) for k, vs in pairs.items() for v in vs])


def strip_tags(text):
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)).strip()


# ---------------------------------------------------------------------------
# Signing keys (generated at start-up; never written anywhere)
# ---------------------------------------------------------------------------

class SigningKey:
    def __init__(self):
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "accounts.accesscontrol.windows.net")])
        now = datetime.now(timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self.private.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=365))
                .sign(self.private, hashes.SHA256()))
        self.der = cert.public_bytes(serialization.Encoding.DER)
        # Microsoft's kid is the certificate's SHA-1 thumbprint, as x5t.
        self.kid = b64url(hashlib.sha1(self.der).digest())
        self.created = time.time()

    def jwk(self, issuer):
        nums = self.private.public_key().public_numbers()
        return {"kty": "RSA", "use": "sig", "kid": self.kid, "x5t": self.kid,
                "n": int_b64url(nums.n), "e": int_b64url(nums.e),
                "x5c": [base64.b64encode(self.der).decode()], "issuer": issuer}

    def sign_jwt(self, claims):
        header = {"typ": "JWT", "alg": "RS256", "kid": self.kid}
        signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                         + b64url(json.dumps(claims, separators=(",", ":")).encode()))
        sig = self.private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + b64url(sig)


class KeyRing:
    """Published keys; one of them signs. Rollover = add, activate, remove old."""

    def __init__(self):
        self.keys = [SigningKey()]
        self.signing = self.keys[0]

    def add(self):
        key = SigningKey()
        self.keys.append(key)
        return key

    def activate(self, kid=None):
        key = next((k for k in self.keys if k.kid == kid), None) if kid else self.keys[-1]
        if key is None:
            raise KeyError(kid)
        self.signing = key
        return key

    def remove_old(self):
        self.keys = [k for k in self.keys if k is self.signing]

    def describe(self):
        return {"signing_kid": self.signing.kid, "kids": [k.kid for k in self.keys]}


# ---------------------------------------------------------------------------
# Errors raised by handlers and rendered by the HTTP layer
# ---------------------------------------------------------------------------

class AadError(Exception):
    """A token-endpoint style JSON error (error, error_description with AADSTS code, trace and
    correlation ids, error_codes, timestamp, error_uri)."""

    def __init__(self, error, code, text, status=None, headers=None):
        super().__init__(f"{error} AADSTS{code}")
        self.error, self.code, self.text = error, code, text
        self.status = status or (401 if error == "invalid_client" else 400)
        self.headers = headers or {}


class PageError(Exception):
    """An error Microsoft shows on its own sign-in page instead of redirecting."""

    def __init__(self, code, text, status=400):
        super().__init__(f"AADSTS{code}")
        self.code, self.text, self.status = code, text, status


class GraphError(Exception):
    def __init__(self, status, code, message, headers=None):
        super().__init__(f"{status} {code}")
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


class Response:
    def __init__(self, status, body=b"", content_type="application/json; charset=utf-8",
                 headers=None):
        self.status = status
        self.body = body if isinstance(body, bytes) else body.encode()
        self.headers = dict(headers or {})
        self.parts = None           # streamed body (attachments): see stream()
        if content_type and (self.body or status not in (204, 302)):
            self.headers.setdefault("Content-Type", content_type)

    def stream(self, parts, sim):
        """Send `parts` (text, ("b64", att), ("raw", att)) without joining them: a list of
        20 attachments of 20 MB is written chunk by chunk, never held in memory."""
        self.parts, self.sim = parts, sim
        self.length = parts_length(parts)


def json_response(status, obj, headers=None, content_type="application/json; charset=utf-8"):
    return Response(status, json.dumps(obj, indent=None), content_type, headers)


def html_response(status, body, headers=None):
    return Response(status, body, "text/html; charset=utf-8", headers)


def redirect(location):
    return Response(302, b"", headers={"Location": location, "Cache-Control": "no-store"})


# ---------------------------------------------------------------------------
# Scopes
# ---------------------------------------------------------------------------

def parse_scopes(scope_string):
    """-> (oidc scopes in request order, {resource: [scope names]}) or AadError.

    Bare scopes are Graph scopes; prefixed ones name their resource by URL."""
    oidc, by_resource = [], {}
    for word in scope_string.split():
        if word.lower() in OIDC_SCOPES and "/" not in word:
            if word.lower() not in oidc:
                oidc.append(word.lower())
            continue
        if "/" in word:
            prefix, name = word.rsplit("/", 1)
            resource = RESOURCES.get(prefix.lower().rstrip("/"))
            if resource is None:
                raise AadError("invalid_resource", 500011,
                               f"The resource principal named {prefix} was not found in the tenant. "
                               "This can happen if the application has not been installed by the "
                               "administrator of the tenant or consented to by any user in the tenant. "
                               "You might have sent your authentication request to the wrong tenant.")
        else:
            resource, name = GRAPH, word
        known = GRAPH_SCOPES if resource == GRAPH else OUTLOOK_SCOPES
        name = next((k for k in known if k.lower() == name.lower()), name)
        names = by_resource.setdefault(resource, [])
        if name not in names:
            names.append(name)
    for resource, names in by_resource.items():
        if ".default" in names and len(names) > 1:
            raise AadError("invalid_scope", 70011,
                           f"The provided value for the input parameter 'scope' is not valid. "
                           f"The scope '{scope_string}' is not valid. static scope limit exceeded.")
    return oidc, by_resource


def scope_response_form(resource, names):
    """Graph scopes come back short (Mail.Read), other resources keep their prefix."""
    return [n if resource == GRAPH else f"{resource}/{n}" for n in names]


# ---------------------------------------------------------------------------
# Mailbox model
# ---------------------------------------------------------------------------

PLAIN, FOLDER_ID, WEB_LINK, TEXT_BODY = range(4)
FRAG_KEYS = {FOLDER_ID: "#folder", WEB_LINK: "#weblink", TEXT_BODY: "#textbody"}
PROP_HEADS = {n: f'"{n}": ' for n in MESSAGE_PROPS}


def web_link(rest_id):
    # quote(rest_id, safe=""), cheaply: rest ids are URL-safe base64 (graph_item_id).
    return ("https://outlook.office365.com/owa/?ItemID=" + rest_id.replace("=", "%3D")
            + "&exvsurl=1&viewmodel=ReadMessageItem")


@functools.lru_cache(maxsize=256)
def render_plan(names, basic, text_body):
    """How Mailbox.render fills each selected property, worked out once per $select."""
    plan = []
    for n in names:
        if basic and n in BASIC_HIDDEN:
            continue
        how = {"parentFolderId": FOLDER_ID, "webLink": WEB_LINK}.get(n, PLAIN)
        if n == "body" and text_body:
            how = TEXT_BODY
        plan.append((n, how))
    return tuple(plan)


@functools.lru_cache(maxsize=256)
def entry_plan(select, immutable, text_body, basic):
    """The Mailbox.frags keys of a delta entry, in render's order, and a getter for them."""
    keys = ["@odata.etag", "#imm" if immutable else "#rest"]
    for n, how in render_plan(select or tuple(DEFAULT_MESSAGE_PROPS), basic, text_body):
        keys.append(FRAG_KEYS.get(how, n))
    return tuple(keys), operator.itemgetter(*keys)


def _json_encoder():
    """json.dumps with the same text but without its per-call set-up and circular-reference
    check (message records hold no cycles)."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return json.dumps
    enc = make(None, None, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True)
    return lambda obj: "".join(enc(obj, 0))


dumps_fast = _json_encoder()
json_str = json.encoder.encode_basestring_ascii      # json.dumps of a str


def json_value(v):
    """json.dumps(v), with shortcuts for the common scalar types."""
    t = type(v)
    if t is str:
        return json_str(v)
    if t is bool:
        return "true" if v else "false"
    if v is None:
        return "null"
    if (t is list or t is dict) and not v:
        return "[]" if t is list else "{}"
    return dumps_fast(v)


class Mailbox:
    """One user's mailbox with a change sequence, so delta rounds can be computed.

    Every message has a stable immutable id (`imm`) and a rest id (`rest`) that
    changes when the message moves, as Exchange ids do. `writes` on a message lists
    the Graph writes that changed it, in order (the control API shows them)."""

    def __init__(self, oid, data=None):
        self.oid = oid
        self.seq = 0
        self.counter = 0            # numbering for generated messages
        self.folders = {}           # folder id -> {id, wk, displayName, parentFolderId, hidden}
        self.messages = {}          # immutable id -> message record
        self.removals = []          # [seq, folder id, immutable id, rest id at removal]
        if data:
            self.__dict__.update(data)
        else:
            root = None
            for wk, display, hidden in WELL_KNOWN_FOLDERS:
                fid = graph_item_id("AAMkAGI2TG93AAA")
                self.folders[fid] = {"id": fid, "wk": wk, "displayName": display,
                                     "parentFolderId": root or fid, "hidden": hidden}
                root = root or fid
        self.rest = {m["rest"]: imm for imm, m in self.messages.items()}
        # immutable id -> {key: '"name": <JSON>'} for each property and the computed members
        # (FRAG_KEYS). Serialising dominates a 100k-message delta round and messages rarely
        # change: a page joins these texts. Seeding fills them (warm), else the first render
        # does; update, move and purge drop a message's texts (nothing changes a value in place).
        self.frags = {}

    def to_json(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("rest", "oid", "frags")}

    def next_seq(self):
        self.seq += 1
        return self.seq

    def folder(self, name_or_id):
        """Well-known names are case-insensitive, folder ids are not."""
        if name_or_id in self.folders:
            return self.folders[name_or_id]
        low = name_or_id.lower()
        return next((f for f in self.folders.values() if f["wk"] == low), None)

    def folder_name(self, fid):
        """Well-known name, else the id (control API answers)."""
        return self.folders[fid]["wk"] or fid

    def find(self, any_id, include_hidden=False):
        imm = any_id if any_id in self.messages else self.rest.get(any_id)
        msg = self.messages.get(imm) if imm else None
        if msg and not include_hidden and self.folders[msg["folder"]]["hidden"]:
            return None
        return msg

    def in_folder(self, fid):
        return [m for m in self.messages.values() if m["folder"] == fid]

    def add(self, fid, props, preview=None):
        """`preview`: the bodyPreview when the caller already knows it (seeding skips the regexes)."""
        seq = self.next_seq()
        raw = os.urandom(180)       # one system call for all the random parts of a message
        imm = graph_item_id(IMM_PREFIX, raw[:45])
        rest = graph_item_id(REST_PREFIX, raw[45:90])
        now = props.get("receivedDateTime") or iso(time.time())
        p = {"createdDateTime": now, "lastModifiedDateTime": now, "changeKey": b64url(raw[90:102]),
             "categories": [], "receivedDateTime": now, "sentDateTime": now, "hasAttachments": False,
             "internetMessageId": f"<{raw[102:110].hex()}@sim.contoso.com>", "subject": "",
             "importance": "normal", "conversationId": graph_item_id("AAQkAGI2T", raw[110:155]),
             "conversationIndex": base64.b64encode(raw[155:177]).decode(),
             "isDeliveryReceiptRequested": False, "isReadReceiptRequested": False,
             "isRead": False, "isDraft": False, "inferenceClassification": "focused",
             "body": {"contentType": "html", "content": "<html><body><p></p></body></html>"},
             "toRecipients": [], "ccRecipients": [], "bccRecipients": [], "replyTo": [],
             "flag": {"flagStatus": "notFlagged"}, "internetMessageHeaders": []}
        for k, v in props.items():
            if k in MESSAGE_PROP_SET:
                p[k] = v
        if "from" not in p:
            p["from"] = {"emailAddress": {"name": "Sender", "address": "sender@example.com"}}
        if "sender" not in p:
            p["sender"] = p["from"]
        p["bodyPreview"] = preview if preview is not None else strip_tags(p["body"]["content"])[:255]
        msg = {"imm": imm, "rest": rest, "folder": fid, "entered": seq, "created": seq,
               "changed": {}, "props": p}
        self.messages[imm] = msg
        self.rest[rest] = imm
        return msg

    def update(self, msg, changes):
        """Apply property changes; record which properties changed at which seq.
        -> {property: new value} for the values that really changed."""
        seq = self.next_seq()
        changed = {}
        self.frags.pop(msg["imm"], None)
        for k, v in changes.items():
            if msg["props"].get(k) != v:
                msg["props"][k] = v
                msg["changed"][k] = seq
                changed[k] = v
        msg["props"]["changeKey"] = b64url(secrets.token_bytes(12))
        msg["props"]["lastModifiedDateTime"] = iso(time.time())
        msg["changed"]["changeKey"] = msg["changed"]["lastModifiedDateTime"] = seq
        return changed

    def move(self, msg, fid):
        """A move removes the item from one folder and creates it in another:
        a new rest id, the same immutable id."""
        if msg["folder"] == fid:
            return msg
        seq = self.next_seq()
        self.removals.append([seq, msg["folder"], msg["imm"], msg["rest"]])
        del self.rest[msg["rest"]]
        msg["rest"] = graph_item_id(REST_PREFIX)
        self.rest[msg["rest"]] = msg["imm"]
        msg["folder"], msg["entered"], msg["changed"] = fid, seq, {}
        self.frags.pop(msg["imm"], None)
        msg["props"]["changeKey"] = b64url(secrets.token_bytes(12))
        msg["props"]["lastModifiedDateTime"] = iso(time.time())
        return msg

    def purge(self, msg):
        """Gone for good (control API): only the removal record remains."""
        seq = self.next_seq()
        self.removals.append([seq, msg["folder"], msg["imm"], msg["rest"]])
        del self.rest[msg["rest"]]
        del self.messages[msg["imm"]]
        self.frags.pop(msg["imm"], None)

    def render(self, msg, select=None, immutable=False, text_body=False, basic=False, only=None):
        """A message as Graph returns it. `only` limits to changed properties (delta updates)."""
        p = msg["props"]
        names = select or DEFAULT_MESSAGE_PROPS
        if only is not None:
            names = [n for n in names if n in only]
        out = {"@odata.etag": f'W/"{p["changeKey"]}"', "id": msg["imm"] if immutable else msg["rest"]}
        for n, how in render_plan(names if type(names) is tuple else tuple(names), basic, text_body):
            if how == PLAIN:
                if n in p:
                    out[n] = p[n]
            elif how == FOLDER_ID:
                out[n] = msg["folder"]
            elif how == WEB_LINK:
                out[n] = web_link(msg["rest"])
            elif p["body"]["contentType"] == "html":        # TEXT_BODY
                out[n] = {"contentType": "text", "content": strip_tags(p["body"]["content"])}
            else:
                out[n] = p[n]
        return out

    def frag(self, msg, key):
        """The text for one key of self.frags (None: the message has no such property)."""
        p = msg["props"]
        if key == "@odata.etag":
            return '"@odata.etag": ' + json_str(f'W/"{p["changeKey"]}"')
        if key == "#imm":
            return '"id": ' + json_str(msg["imm"])
        if key == "#rest":
            return '"id": ' + json_str(msg["rest"])
        if key == "#folder":
            return '"parentFolderId": ' + json_str(msg["folder"])
        if key == "#weblink":
            return '"webLink": ' + json_str(web_link(msg["rest"]))
        if key == "#textbody":
            return '"body": ' + dumps_fast(self.render(msg, ("body",), text_body=True)["body"])
        if key in p:
            return f'"{key}": ' + json_value(p[key])
        return None

    def warm(self, msg, known=None):
        """Serialise every property now (seeding: the first delta round then only joins texts).
        `known`: texts the caller already has for shared values (a seed's senders, recipients)."""
        fr = dict(known) if known else {}
        heads, enc = PROP_HEADS, json_str        # locals: this runs 100,000 times per seed
        for n, v in msg["props"].items():
            if n in fr:
                continue
            t = type(v)
            head = heads.get(n) or f'"{n}": '
            if t is str:
                fr[n] = head + enc(v)
            elif t is bool:
                fr[n] = head + ("true" if v else "false")
            else:
                fr[n] = head + json_value(v)
        rest = msg["rest"]
        fr["@odata.etag"] = '"@odata.etag": ' + enc(f'W/"{msg["props"]["changeKey"]}"')
        fr["#imm"] = '"id": ' + enc(msg["imm"])
        fr["#rest"] = '"id": ' + enc(rest)
        fr["#folder"] = '"parentFolderId": ' + enc(msg["folder"])
        fr["#weblink"] = '"webLink": ' + enc(web_link(rest))
        self.frags[msg["imm"]] = fr

    def delta_entry_json(self, msg, plan):
        """JSON text of a full delta entry, exactly as json.dumps of
        {"@odata.type", **render(...)} writes it, joined from the message's texts.
        plan = entry_plan(select, immutable, text_body, basic)."""
        keys, getter = plan
        fr = self.frags.get(msg["imm"])
        try:
            return DELTA_ENTRY_HEAD + ", ".join(getter(fr)) + "}"
        except (KeyError, TypeError):       # not serialised yet, or lacks a selected property
            if fr is None:
                fr = self.frags[msg["imm"]] = {}
            for key in keys:
                if key not in fr:
                    fr[key] = self.frag(msg, key)
            return DELTA_ENTRY_HEAD + ", ".join(t for t in getter(fr) if t is not None) + "}"


# ---------------------------------------------------------------------------
# Attachments: bytes kept small, generated from a seed, or spilled to a file
# ---------------------------------------------------------------------------

ATT_CHUNK = 3 << 18             # 786,432 bytes, a multiple of 3: base64 of each chunk joins cleanly
SPILL_AT = 1 << 20              # uploads and attachments over 1 MiB live in a file, not in memory
ATT_TYPES = {"file": "#microsoft.graph.fileAttachment", "item": "#microsoft.graph.itemAttachment",
             "reference": "#microsoft.graph.referenceAttachment"}
ATT_KINDS = {v.lower(): k for k, v in ATT_TYPES.items()}
ATT_PROPS = ["lastModifiedDateTime", "name", "contentType", "size", "isInline", "contentId",
             "contentLocation", "contentBytes"]
FILLER = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
          "incididunt ut labore et dolore magna aliqua. ")


def b64_len(n):
    return 4 * ((n + 2) // 3)


def att_kind(spec):
    """fileAttachment | itemAttachment | referenceAttachment, by @odata.type or `kind`."""
    t = (spec.get("@odata.type") or "").lower().lstrip("#")
    if t:
        kind = ATT_KINDS.get("#" + t) or ATT_KINDS.get("#microsoft.graph." + t.split(".")[-1])
        if kind is None:
            raise GraphError(400, "ErrorInvalidRequest", f"Unsupported attachment type '{spec['@odata.type']}'.")
        return kind
    return spec.get("kind", "file")


def att_chunks(att):
    """The attachment's raw bytes, ATT_CHUNK at a time (never all in memory unless small)."""
    src = att.get("src")
    if src == "gen":
        size, seed = att["size"], att["seed"]
        block = seed_block(seed)
        for k in range((size + ATT_CHUNK - 1) // ATT_CHUNK):
            # chunk k: the seed's random block rotated by an offset drawn from (seed, k), so every
            # chunk differs (a repeated or misplaced chunk changes the hash) and costs a memcpy
            r = int.from_bytes(hashlib.sha256(f"{seed}:{k}".encode()).digest()[:4], "big") % ATT_CHUNK
            chunk = block[r:] + block[:r]
            yield chunk if size - k * ATT_CHUNK >= ATT_CHUNK else chunk[:size - k * ATT_CHUNK]
    elif src == "file":
        with open(att["path"], "rb") as f:
            while True:
                chunk = f.read(ATT_CHUNK)
                if not chunk:
                    return
                yield chunk
    else:
        data = att_bytes(att)
        for i in range(0, len(data), ATT_CHUNK):
            yield data[i:i + ATT_CHUNK]


@functools.lru_cache(maxsize=64)
def seed_block(seed):
    return hashlib.shake_128(seed.encode()).digest(ATT_CHUNK)


def att_bytes(att):
    """All bytes (small attachments, MIME of items, hashing in tests)."""
    if att.get("src") == "b64":
        return base64.b64decode(att["data"])
    if att["kind"] == "item":
        return item_mime(att["item"])
    return b"".join(att_chunks(att))


def att_sha256(att):
    if not att.get("sha256"):
        h = hashlib.sha256()
        for chunk in att_chunks(att):
            h.update(chunk)
        att["sha256"] = h.hexdigest()
    return att["sha256"]


def att_content_bytes(att):
    """Has a contentBytes member: file attachments."""
    return att["kind"] == "file"


def render_attachment(att, select=None, expand_item=False, beta=False):
    """-> (dict without contentBytes, whether contentBytes follows). Graph's shapes: file
    attachments carry contentId/contentLocation/contentBytes, items contentType null,
    references only the base properties in v1.0; beta adds sourceUrl, providerType,
    permission, isFolder, thumbnailUrl and previewUrl."""
    out = {"@odata.type": ATT_TYPES[att["kind"]]}
    if att["kind"] == "file":
        out["@odata.mediaContentType"] = att["contentType"]
    out["id"] = att["id"]
    names = ["lastModifiedDateTime", "name", "contentType", "size", "isInline"]
    if att["kind"] == "file":
        names += ["contentId", "contentLocation"]
    if select is not None:
        names = [n for n in names if n in select]
    for n in names:
        out[n] = None if (n == "contentType" and att["kind"] == "item") else att.get(n)
    if expand_item and att["kind"] == "item":
        out["item"] = dict({"@odata.type": "#microsoft.graph.message", "id": ""}, **att["item"])
    if beta and att["kind"] == "reference" and select is None:
        for n in ("sourceUrl", "providerType", "thumbnailUrl", "previewUrl", "permission",
                  "isFolder"):
            out[n] = att.get(n)
    with_bytes = att_content_bytes(att) and (select is None or "contentBytes" in select)
    return out, with_bytes


def attachment_parts(att, select=None, expand_item=False, beta=False):
    """The JSON text of one attachment as parts: str, or ("b64", att) for contentBytes."""
    out, with_bytes = render_attachment(att, select, expand_item, beta)
    text = json.dumps(out)
    if not with_bytes:
        return [text]
    return [text[:-1] + ', "contentBytes": "', ("b64", att), '"}']


def parts_length(parts):
    n = 0
    for p in parts:
        if isinstance(p, str):
            n += len(p.encode())
        elif isinstance(p, bytes):
            n += len(p)
        elif p[0] == "b64":
            n += b64_len(p[1]["size"])
        else:                   # ("raw", att)
            n += p[1]["size"]
    return n


def iter_parts(parts):
    """Bytes to write for parts (contentBytes encoded chunk by chunk)."""
    for p in parts:
        if isinstance(p, str):
            yield p.encode()
        elif isinstance(p, bytes):
            yield p
        elif p[0] == "b64":
            for chunk in att_chunks(p[1]):
                yield base64.b64encode(chunk)
        else:
            yield from att_chunks(p[1])


def safe_text(s):
    """Text with lone surrogates replaced (MIME must be valid UTF-8; JSON keeps escapes)."""
    return s.encode("utf-8", "replace").decode("utf-8") if isinstance(s, str) else s


def addr_header(recipients):
    from email.utils import formataddr
    out = []
    for r in recipients or []:
        ea = (r or {}).get("emailAddress") or {}
        out.append(formataddr((safe_text(ea.get("name") or ""), safe_text(ea.get("address") or ""))))
    return ", ".join(out)


def item_mime(item):
    """An attached message as MIME (what GET .../attachments/{id}/$value returns for items)."""
    from email.message import EmailMessage
    from email.policy import SMTP
    m = EmailMessage(policy=SMTP)
    frm = item.get("from") or {"emailAddress": {"name": "Sender", "address": "sender@example.com"}}
    m["From"] = addr_header([frm])
    if item.get("toRecipients"):
        m["To"] = addr_header(item["toRecipients"])
    if item.get("ccRecipients"):
        m["Cc"] = addr_header(item["ccRecipients"])
    m["Subject"] = safe_text(item.get("subject", ""))
    when = parse_time(item.get("sentDateTime") or item.get("receivedDateTime")) or 0
    m["Date"] = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(when))
    m["Message-ID"] = item.get("internetMessageId") or "<item@sim.contoso.com>"
    body = item.get("body") or {"contentType": "text", "content": ""}
    m.set_content(safe_text(body.get("content", "")),
                  subtype="html" if body.get("contentType", "html").lower() == "html" else "plain")
    return m.as_bytes()


def make_attachment(sim, spec, size_limit=None):
    """An attachment record from a Graph attachment (POST .../attachments) or a control-API
    spec: contentBytes | content_base64 | content_text | size (+ seed: generated bytes)."""
    if not isinstance(spec, dict):
        raise GraphError(400, "ErrorInvalidRequest", "An attachment must be a JSON object.")
    kind = att_kind(spec)
    if kind not in ATT_TYPES:
        raise GraphError(400, "ErrorInvalidRequest", f"Unsupported attachment kind '{kind}'.")
    raw = os.urandom(45)
    att = {"id": graph_item_id("AAMkAGI2THVSAAABEgAQA", raw), "kind": kind,
           "name": spec.get("name"), "contentType": spec.get("contentType"),
           "isInline": bool(spec.get("isInline", False)), "contentId": spec.get("contentId"),
           "contentLocation": spec.get("contentLocation"),
           "lastModifiedDateTime": spec.get("lastModifiedDateTime") or iso(sim.now()), "sha256": None}
    if kind == "file":
        b64 = spec.get("contentBytes", spec.get("content_base64"))
        if b64 is not None:
            try:
                data = base64.b64decode(b64, validate=True)
            except (ValueError, TypeError):
                raise GraphError(400, "ErrorInvalidRequest", "The contentBytes value is not valid "
                                 "base64.")
            if len(data) > SPILL_AT:
                att.update(src="file", path=sim.spill(data), size=len(data))
            else:
                att.update(src="b64", data=base64.b64encode(data).decode(), size=len(data))
        elif spec.get("content_text") is not None:
            data = spec["content_text"].encode("utf-8", "surrogatepass")
            att.update(src="b64", data=base64.b64encode(data).decode(), size=len(data))
        elif spec.get("size") is not None:
            if int(spec["size"]) < 0:
                raise GraphError(400, "ErrorInvalidRequest", "An attachment size cannot be negative.")
            att.update(src="gen", size=int(spec["size"]),
                       seed=str(spec.get("seed") or secrets.token_hex(8)))
        else:
            raise GraphError(400, "ErrorInvalidRequest", "A file attachment needs contentBytes.")
        if not att["name"]:
            raise GraphError(400, "ErrorInvalidRequest", "The attachment name is required.")
        att["contentType"] = att["contentType"] or "application/octet-stream"
    elif kind == "item":
        item = dict(spec.get("item") or {})
        item.pop("@odata.type", None)
        if isinstance(item.get("body"), str):
            item["body"] = {"contentType": "html", "content": item["body"]}
        if isinstance(item.get("from"), str):
            item["from"] = {"emailAddress": {"name": item["from"], "address": item["from"]}}
        item.setdefault("subject", att["name"] or "")
        item.setdefault("internetMessageId", f"<{secrets.token_hex(8)}@sim.contoso.com>")
        item.setdefault("receivedDateTime", iso(sim.now()))
        item.setdefault("hasAttachments", False)
        att["item"] = item
        att["name"] = att["name"] or item["subject"]
        att["size"] = len(item_mime(item))
        att["src"] = "item"
    else:
        if not spec.get("sourceUrl"):
            raise GraphError(400, "ErrorInvalidRequest", "A reference attachment needs a sourceUrl.")
        att.update(src="none", size=int(spec.get("size", 512)), sourceUrl=spec["sourceUrl"],
                   providerType=spec.get("providerType", "oneDriveBusiness"),
                   permission=spec.get("permission", "view"), isFolder=bool(spec.get("isFolder", False)))
    if size_limit is not None and att["size"] > size_limit:
        raise GraphError(400, "ErrorMessageSizeExceeded", "The message exceeds the maximum supported size.")
    return att


def control_attachment(att, sha=True):
    """An attachment as the control API shows it (bytes compared by hash)."""
    out = {k: att.get(k) for k in ("id", "kind", "name", "contentType", "size", "isInline", "contentId")}
    if sha and att["kind"] != "reference":
        out["sha256"] = att_sha256(att)
    if att["kind"] == "reference":
        out.update({k: att.get(k) for k in ("sourceUrl", "providerType", "permission", "isFolder")})
    if att["kind"] == "item":
        out["item_subject"] = att["item"].get("subject")
    return out


def has_attachments(msg):
    """Graph: true when the message has attachments other than inline ones."""
    return any(not a["isInline"] for a in msg.get("atts") or ())


def filler(n):
    """n bytes of text, cheaply (hostile-size bodies)."""
    reps = n // len(FILLER) + 1
    return (FILLER * reps)[:n]


# ---------------------------------------------------------------------------
# Simulator state
# ---------------------------------------------------------------------------

class Sim:
    def __init__(self, base, state_file=None, latency_ms=0, demo=False):
        self.lock = threading.RLock()
        self.base = base
        self.state_file = state_file
        self.demo = demo
        self.keys = KeyRing()
        # The default app's secret is made up per process: it is a simulator value.
        self.default_secret = {"value": "Sim8Q~" + secrets.token_urlsafe(27), "id": guid(),
                               "expires_at": time.time() + 180 * 86400}
        self.start_latency = latency_ms
        self.dirty = False
        self.reset()
        if state_file and os.path.exists(state_file):
            self.load(state_file)

    # -- lifecycle -----------------------------------------------------------

    def reset(self):
        with self.lock:
            # Requests still hanging from before a reset must not act on the new state.
            self.generation = getattr(self, "generation", 0) + 1
            self.config = dict(DEFAULT_CONFIG, latency_ms=self.start_latency)
            self.clock_offset = 0.0
            self.tenants = {}       # tid -> {id, name, domains}
            self.users = {}         # oid -> {oid, tenant_id, upn, mail, name, kind}
            self.user_index = {}    # lower-case upn / mail / Graph id -> oid
            self.apps = {}          # client_id -> app
            self.codes = {}         # authorization code -> grant record
            self.flows = {}         # sign-in page flow id -> authorize parameters
            self.rts = {}           # refresh token -> record
            self.ats = {}           # access token -> record
            self.mailboxes = {}     # oid -> Mailbox
            self.cursors = {}       # $skiptoken / $deltatoken -> delta cursor
            self.scenarios = []
            self.permissions = {}   # mailbox oid -> {user oid: [rights]} (FullAccess, SendAs)
            self.access_policies = []   # Exchange application access policies
            self.policy_sets = {}   # policy id -> set of mailbox oids (derived)
            self.inflight = {}      # (client_id, oid) -> in-flight Graph requests
            self.log = []
            self.log_max = 5000     # entries kept (--log-max); older ones are dropped
            self.log_dropped = 0
            self.counters = {"calls": {}, "token_grants": {}, "aad_errors": {},
                             "refresh_tokens_issued": 0, "access_tokens_issued": 0,
                             "codes_issued": 0, "graph_writes": {}, "graph_writes_total": 0,
                             "graph_effective_writes": {}, "graph_effective_writes_total": 0,
                             "throttled": 0, "concurrency_violations": 0, "max_inflight": 0,
                             "scenarios_fired": 0, "token_grants_by_client": {},
                             "token_requests_by_client": {}, "app_tokens": {}, "drafts_created": 0,
                             "sends": 0, "upload_bytes": 0, "uploads_completed": 0,
                             "attachment_bytes_served": 0, "xoauth2": {}}
            self.deliveries = []    # every accepted send: GET /_sim/deliveries
            self.uploads = {}       # attachment upload sessions
            self.used_jtis = {}     # client assertion jti -> exp (a replay is refused)
            self.clear_spill()
            self.add_tenant({"id": MSA_TENANT, "name": "Microsoft Accounts", "domains": []})
            self.add_tenant({"id": DEFAULT_TENANT, "name": "Contoso",
                             "domains": ["contoso.onmicrosoft.com", "contoso.com"]})
            for u in DEFAULT_USERS:
                self.add_user(dict(u, tenant_id=DEFAULT_TENANT))
            self.add_app({"client_id": DEFAULT_CLIENT_ID, "display_name": "mod_msoauth demo",
                          "secrets": [dict(self.default_secret)],
                          "redirect_uris": ["http://127.0.0.1/microsoft_outlook/confirm",
                                            "http://localhost/microsoft_outlook/confirm"],
                          "sign_in_audience": "AzureADandPersonalMicrosoftAccount",
                          "home_tenant": DEFAULT_TENANT})
            if self.demo:
                for u in DEFAULT_USERS:
                    self.seed(self.mailbox(u["oid"]), "inbox", 12, unread_every=3)
            self.dirty = True

    def now(self):
        return time.time() + self.clock_offset

    # -- attachment bytes over SPILL_AT live in files -----------------------------------

    def spill_dir(self):
        if getattr(self, "_spill", None) is None:
            if self.state_file:         # kept with the state file, so saved mailboxes keep them
                self._spill = self.state_file + ".files"
                os.makedirs(self._spill, exist_ok=True)
            else:
                import tempfile
                self._spill = tempfile.mkdtemp(prefix="mssim-files.")
                import atexit
                import shutil
                atexit.register(shutil.rmtree, self._spill, True)
        return self._spill

    def spill_path(self):
        path = os.path.join(self.spill_dir(), secrets.token_hex(12))
        open(path, "wb").close()
        return path

    def spill(self, data):
        path = self.spill_path()
        with open(path, "wb") as f:
            f.write(data)
        return path

    def clear_spill(self):
        d = getattr(self, "_spill", None)
        if d and os.path.isdir(d):
            for name in os.listdir(d):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(d, name))

    def save(self):
        if not self.state_file:
            return
        with self.lock:
            state = {"config": self.config, "clock_offset": self.clock_offset,
                     "tenants": self.tenants, "users": self.users, "apps": self.apps,
                     "rts": self.rts, "ats": self.ats, "permissions": self.permissions,
                     "access_policies": self.access_policies,
                     "mailboxes": {oid: mb.to_json() for oid, mb in self.mailboxes.items()},
                     "cursors": {k: v for k, v in self.cursors.items() if v["type"] == "delta"}}
            self.dirty = False
            tmp = self.state_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(state, f)
            os.replace(tmp, self.state_file)

    def load(self, path):
        with open(path) as f:
            state = json.load(f)
        with self.lock:
            for k in ("config", "clock_offset", "tenants", "users", "apps", "rts", "ats", "cursors",
                      "permissions", "access_policies"):
                setattr(self, k, state.get(k, getattr(self, k)))
            self.mailboxes = {oid: Mailbox(oid, d) for oid, d in state.get("mailboxes", {}).items()}
            self.config = dict(DEFAULT_CONFIG, **self.config)   # keys added since the file was saved
            self.user_index = {}
            for u in self.users.values():
                u.setdefault("kind", "user")
                self.index_user(u)
            # Keep printing (and resetting to) the secret the saved default app really has.
            saved = self.apps.get(DEFAULT_CLIENT_ID, {}).get("secrets")
            if saved:
                self.default_secret = dict(saved[0])

    # -- directory -------------------------------------------------------------

    def add_tenant(self, t):
        tid = t.get("id") or guid()
        self.tenants[tid.lower()] = {"id": tid.lower(), "name": t.get("name", tid),
                                     "domains": [d.lower() for d in t.get("domains", [])]}
        return self.tenants[tid.lower()]

    def add_user(self, u):
        """A person (kind "user") or a shared mailbox without a person (kind "shared": no
        sign-in). `mail` may be null (Graph then has no address; the UPN still works).
        `email_claim` / `preferred_username_claim`: what the ID token claims instead of the
        directory's values (unverified claims: the "nOAuth" tests)."""
        tid = (u.get("tenant_id") or DEFAULT_TENANT).lower()
        if tid == "consumers":
            tid = MSA_TENANT
        if tid not in self.tenants:
            raise ValueError(f"unknown tenant {tid}")
        upn = u.get("upn") or u.get("mail") or u.get("address")
        if not upn:
            raise ValueError("upn or mail is required")
        kind = u.get("kind", "user")
        if kind not in ("user", "shared"):
            raise ValueError(f"unknown kind {kind}")
        # Personal accounts get an oid with the 16-hex-digit Graph id embedded (Graph's id for them).
        default_oid = ("00000000-0000-0000-" + secrets.token_hex(2) + "-" + secrets.token_hex(6)
                       if tid == MSA_TENANT else guid())
        user = {"oid": (u.get("oid") or default_oid).lower(), "tenant_id": tid, "upn": upn,
                "mail": u.get("mail", upn), "name": u.get("name") or u.get("display_name")
                or upn.split("@")[0], "kind": kind}
        for k in ("email_claim", "preferred_username_claim"):
            if u.get(k) is not None:
                user[k] = u[k]
        old = self.users.get(user["oid"])
        if old:
            self.unindex_user(old)
        self.users[user["oid"]] = user
        self.index_user(user)
        return user

    def index_user(self, user):
        """upn, mail and Graph id -> oid: /users/{id|upn} over 10,000 mailboxes is no scan."""
        for key in (user["upn"], user.get("mail"), graph_user_id(user)):
            if key:
                self.user_index.setdefault(key.lower(), user["oid"])

    def unindex_user(self, user):
        for key in (user["upn"], user.get("mail"), graph_user_id(user)):
            if key and self.user_index.get(key.lower()) == user["oid"]:
                del self.user_index[key.lower()]

    def remove_user(self, oid):
        user = self.users.pop(oid, None)
        if user:
            self.unindex_user(user)
            for other in self.users.values():       # another user may have the same address
                if other.get("mail") and other["mail"].lower() == (user.get("mail") or "").lower():
                    self.index_user(other)
                    break
        return user

    def find_user(self, key):
        if not key:
            return None
        key = key.lower()
        user = self.users.get(key)
        if user is None:
            oid = self.user_index.get(key)
            user = self.users.get(oid) if oid else None
        return user

    def add_app(self, a):
        audience = a.get("sign_in_audience", "AzureADMultipleOrgs")
        if audience not in ("AzureADMyOrg", "AzureADMultipleOrgs", "AzureADandPersonalMicrosoftAccount"):
            raise ValueError(f"unknown sign_in_audience {audience}")
        app_secrets = []
        for s in a.get("secrets") or [{}]:
            app_secrets.append({"value": s.get("value") or "Sim8Q~" + secrets.token_urlsafe(27),
                                "id": s.get("id") or guid(),
                                "expires_at": parse_time(s.get("expires_at"))
                                or self.now() + 180 * 86400})
        app = {"client_id": (a.get("client_id") or guid()).lower(),
               "display_name": a.get("display_name", "mssim app"),
               "secrets": app_secrets, "redirect_uris": list(a.get("redirect_uris", [])),
               "sign_in_audience": audience,
               "home_tenant": (a.get("home_tenant") or DEFAULT_TENANT).lower(),
               "certificates": [make_certificate(self, c) for c in a.get("certificates") or ()],
               "app_roles": {}}    # tenant id -> {resource: [application permissions]}
        self.apps[app["client_id"]] = app
        return app

    def rights(self, mailbox_oid, user_oid):
        """Exchange mailbox permissions one user has on another mailbox."""
        return self.permissions.get(mailbox_oid, {}).get(user_oid, ())

    def access_policy_allows(self, client_id, oid):
        """Application access policies (Exchange): RestrictAccess = only the listed mailboxes,
        DenyAccess = all but them. Only app-only tokens are subject to them."""
        pols = [p for p in self.access_policies if p["client_id"] == client_id]
        if not pols:
            return True
        restrict = [p for p in pols if p["mode"] == "RestrictAccess"]
        if restrict and not any(oid in self.policy_set(p) for p in restrict):
            return False
        return not any(oid in self.policy_set(p) for p in pols if p["mode"] == "DenyAccess")

    def policy_set(self, p):
        cached = self.policy_sets.get(p["id"])
        if cached is None:
            cached = self.policy_sets[p["id"]] = frozenset(p["mailboxes"])
        return cached

    def mailbox(self, oid):
        if oid not in self.mailboxes:
            self.mailboxes[oid] = Mailbox(oid)
        return self.mailboxes[oid]

    def seed(self, mb, folder, count, unread_every=1, newest=None, spacing=37 * 60,
             subject_prefix=None):
        """Deterministic subjects, receivedDateTime spread back in time from `newest`."""
        f = mb.folder(folder)
        if f is None:
            raise ValueError(f"unknown folder {folder}")
        newest = parse_time(newest) or self.now()
        user = self.users.get(mb.oid, {})
        # Values shared by the seeded messages (nothing changes a value in place), serialised once.
        to = [{"emailAddress": {"name": user.get("name", ""), "address": user.get("mail", "")}}]
        senders = []
        for name, addr in SENDERS:
            sender = {"emailAddress": {"name": name, "address": addr}}
            text = json_value(sender)
            senders.append((sender, {"from": '"from": ' + text, "sender": '"sender": ' + text,
                                     "toRecipients": '"toRecipients": ' + json_value(to)}))
        made = []
        for i in range(count):
            mb.counter += 1
            n = mb.counter
            name = SENDERS[n % len(SENDERS)][0]
            sender, known = senders[n % len(SENDERS)]
            topic = TOPICS[n % len(TOPICS)]
            subject = f"{subject_prefix or 'Message'} {n:04d}: {topic}"
            received = newest - (count - 1 - i) * spacing
            when = iso(received)
            body = (f"<html><body><p>Hello,</p><p>This is simulated message {n} about "
                    f"{topic.lower()}.</p><p>Regards, {name}</p></body></html>")
            msg = mb.add(f["id"], {
                "subject": subject, "receivedDateTime": when,
                "sentDateTime": iso(received - 30), "createdDateTime": when,
                "lastModifiedDateTime": when, "from": sender, "toRecipients": to,
                "isRead": unread_every == 0 or (n % unread_every) != 0,
                "hasAttachments": n % 5 == 0, "importance": "high" if n % 7 == 0 else "normal",
                "body": {"contentType": "html", "content": body}},
                # what strip_tags(body) gives, without two regexes per message
                preview=f"Hello, This is simulated message {n} about {topic.lower()}. Regards, {name}")
            mb.warm(msg, known)
            made.append(msg)
        return made

    # -- scenarios -------------------------------------------------------------

    def take_scenario(self, endpoint, **facts):
        """First injected scenario for this endpoint whose `match` fits; consumes one use."""
        with self.lock:
            for sc in self.scenarios:
                if sc["endpoint"] != endpoint:
                    continue
                match = sc.get("match") or {}
                if any(not self._matches(k, v, facts) for k, v in match.items()):
                    continue
                if sc.get("times", 1) > 0:
                    sc["times"] = sc.get("times", 1) - 1
                    if sc["times"] == 0:
                        self.scenarios.remove(sc)
                sc["fired"] = sc.get("fired", 0) + 1
                self.counters["scenarios_fired"] += 1
                return dict(sc)
        return None

    @staticmethod
    def _matches(key, want, facts):
        have = facts.get(key)
        if have is None:
            return False
        if key == "path":
            return str(want) in have
        return str(want).lower() == str(have).lower()

    # -- accounting --------------------------------------------------------------

    def count(self, bucket, key, n=1):
        with self.lock:
            d = self.counters[bucket]
            d[key] = d.get(key, 0) + n

    def rt_usable(self, rec):
        """Is this refresh token accepted right now? -> None or an AadError."""
        if rec.get("revoked"):
            return revoked_error(rec, rec["revoked"])
        if self.now() - rec["last_used"] > self.config["refresh_max_inactive"]:
            return revoked_error(rec, 700082)
        if rec.get("rotated"):
            grace = self.config["refresh_grace_uses"]
            if self.config["strict_rotation"] or (grace is not None and rec["grace_used"] >= grace):
                return AadError("invalid_grant", 70000,
                                "Provided grant is invalid or malformed. The refresh token was "
                                "already exchanged for a newer one.")
        return None

    def counters_view(self):
        with self.lock:
            out = json.loads(json.dumps(self.counters))
            out["refresh_tokens_valid"] = sum(1 for r in self.rts.values() if self.rt_usable(r) is None)
            out["access_tokens_valid"] = sum(1 for a in self.ats.values()
                                             if a["expires_at"] > self.now() and not a.get("revoked"))
            out["inflight"] = sum(self.inflight.values())
            return out


def revoked_error(rec, code):
    issued = aad_timestamp(rec["issued_at"])
    texts = {
        700082: ("invalid_grant", f"The refresh token has expired due to inactivity. The token was "
                 f"issued on {issued} and was inactive for 90.00:00:00."),
        50173: ("invalid_grant", f"The provided grant has expired due to it being revoked, a fresh "
                f"auth token is needed. The user might have changed or reset their password. The grant "
                f"was issued on '{issued}' and the TokensValidFrom date (before which tokens are not "
                f"valid) for this user is '{aad_timestamp(time.time())}'."),
        70043: ("invalid_grant", f"The refresh token has expired or is invalid due to sign-in "
                f"frequency checks by conditional access. The token was issued on {issued} and the "
                f"maximum allowed lifetime for this request is 43200."),
        50076: ("interaction_required", "Due to a configuration change made by your administrator, "
                "or because you moved to a new location, you must use multi-factor authentication to "
                "access 'https://graph.microsoft.com'."),
        70008: ("invalid_grant", "The provided authorization code or refresh token has expired due to "
                "inactivity. Send a new interactive authorization request for this user and resource."),
        50078: ("interaction_required", "Presented multi-factor authentication has expired due to "
                "policies configured by your administrator, you must refresh your multi-factor "
                "authentication to access 'https://graph.microsoft.com'."),
    }
    error, text = texts.get(int(code), ("invalid_grant", "Provided grant is invalid or malformed."))
    return AadError(error, int(code), text)


# ---------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------

ROUTES = []   # (method, compiled path regex, kind, handler)


def route(method, pattern, kind):
    def deco(fn):
        ROUTES.append((method, re.compile(pattern + r"\Z"), kind, fn))
        return fn
    return deco


class Request:
    def __init__(self, method, raw_path, headers, body):
        parts = urlsplit(raw_path)
        self.method = method
        self.path = unquote(parts.path)
        self.orig_path = self.path      # before /users/{x} is rewritten to /me
        self.query_string = parts.query
        self.query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        self.headers = headers
        self.body = body
        self.log_extra = {}
        self.graph_user = None       # set by /users/{x}/ rewriting
        self.beta = False            # /beta/...: served as /v1.0/, with beta-only properties

    def header(self, name, default=None):
        return self.headers.get(name, default)

    def form(self):
        try:
            text = self.body.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        return {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}

    def json(self):
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise GraphError(400, "BadRequest", "Unable to read JSON request payload.")

    def prefer(self):
        """Prefer header -> {name: value}, e.g. {'odata.maxpagesize': '50', 'idtype': 'ImmutableId'}."""
        out = {}
        for part in (self.header("Prefer") or "").split(","):
            if "=" in part:
                k, v = part.split("=", 1)
                out[k.strip().lower()] = v.strip().strip('"')
            elif part.strip():
                out[part.strip().lower()] = ""
        return out


# ---------------------------------------------------------------------------
# Identity: tenants, discovery, JWKS
# ---------------------------------------------------------------------------

def resolve_tenant(sim, segment):
    """Tenant segment -> (kind, tenant or None); kind: common|organizations|consumers|tenant."""
    s = segment.lower()
    if s in ("common", "organizations"):
        return s, None
    if s == "consumers":
        return "consumers", sim.tenants[MSA_TENANT]
    tenant = sim.tenants.get(s) if GUID_RE.match(s) else next(
        (t for t in sim.tenants.values() if s in t["domains"]), None)
    if tenant is None:
        raise AadError("invalid_request", 90002,
                       f"Tenant '{segment}' not found. Check to make sure you have the correct tenant "
                       "ID and are signing into the correct cloud. Check with your subscription "
                       "administrator, this may happen if there are no active subscriptions for the "
                       "tenant.")
    return "tenant", tenant


def issuer_for(sim, kind, tenant):
    if kind in ("common", "organizations"):
        return f"{sim.base}/{{tenantid}}/v2.0"
    return f"{sim.base}/{tenant['id']}/v2.0"


@route("GET", r"/([^/]+)/v2\.0/\.well-known/openid-configuration", "discovery")
def discovery(sim, req, segment):
    kind, tenant = resolve_tenant(sim, segment)
    # Endpoints keep common/organizations/consumers; a domain is replaced by the tenant id.
    seg = segment.lower() if kind != "tenant" else tenant["id"]
    root = f"{sim.base}/{seg}"
    doc = {
        "token_endpoint": f"{root}/oauth2/v2.0/token",
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt",
                                                  "client_secret_basic"],
        "jwks_uri": f"{root}/discovery/v2.0/keys",
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "issuer": issuer_for(sim, kind, tenant),
        "request_uri_parameter_supported": False,
        "userinfo_endpoint": f"{sim.base}/oidc/userinfo",
        "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
        "device_authorization_endpoint": f"{root}/oauth2/v2.0/devicecode",
        "http_logout_supported": True,
        "frontchannel_logout_supported": True,
        "end_session_endpoint": f"{root}/oauth2/v2.0/logout",
        "claims_supported": ["sub", "iss", "cloud_instance_name", "cloud_instance_host_name",
                             "cloud_graph_host_name", "msgraph_host", "aud", "exp", "iat", "auth_time",
                             "acr", "nonce", "preferred_username", "name", "tid", "ver", "at_hash",
                             "c_hash", "email"],
        "kerberos_endpoint": f"{root}/kerberos",
        "tenant_region_scope": "WW" if kind == "tenant" else None,
        "cloud_instance_name": "microsoftonline.com",
        "cloud_graph_host_name": "graph.windows.net",
        "msgraph_host": urlsplit(sim.base).netloc,
        "rbac_url": "https://pas.windows.net",
    }
    return json_response(200, doc, {"Cache-Control": "max-age=86400, private"})


@route("GET", r"/([^/]+)/discovery/v2\.0/keys", "keys")
def jwks(sim, req, segment):
    kind, tenant = resolve_tenant(sim, segment)
    issuer = issuer_for(sim, kind, tenant)
    with sim.lock:
        keys = [k.jwk(issuer) for k in sim.keys.keys]
    return json_response(200, {"keys": keys}, {"Cache-Control": "max-age=86400, private"})


def check_app_segment(app, kind, tenant):
    """Can this app registration be used on this tenant segment? -> None or AadError."""
    aud = app["sign_in_audience"]
    if aud == "AzureADMyOrg":
        if kind in ("common", "organizations"):
            return AadError("invalid_request", 50194,
                            f"Application '{app['client_id']}'({app['display_name']}) is not configured "
                            "as a multi-tenant application. Usage of the /common endpoint is not "
                            "supported for such applications created after '10/15/2018'. Use a "
                            "tenant-specific endpoint or configure the application to be multi-tenant.")
        if tenant["id"] != app["home_tenant"]:
            return app_not_found(app["client_id"], tenant["id"])
    elif aud == "AzureADMultipleOrgs" and (kind == "consumers" or (tenant and tenant["id"] == MSA_TENANT)):
        return AadError("unauthorized_client", 700016,
                        f"Application with identifier '{app['client_id']}' was not found in the "
                        "directory 'Microsoft Accounts'. The client does not exist or is not enabled "
                        "for consumers.")
    return None


def app_not_found(client_id, where):
    return AadError("unauthorized_client", 700016,
                    f"Application with identifier '{client_id}' was not found in the directory "
                    f"'{where}'. This can happen if the application has not been installed by the "
                    "administrator of the tenant or consented to by any user in the tenant. You may "
                    "have sent your authentication request to the wrong tenant.")


def user_allowed(app, kind, tenant, user):
    if user.get("kind", "user") != "user":      # a shared mailbox has no person to sign in
        return False
    tid = user["tenant_id"]
    if kind == "tenant" and tid != tenant["id"]:
        return False
    if kind == "organizations" and tid == MSA_TENANT:
        return False
    if kind == "consumers" and tid != MSA_TENANT:
        return False
    aud = app["sign_in_audience"]
    if aud == "AzureADMyOrg":
        return tid == app["home_tenant"]
    if aud == "AzureADMultipleOrgs":
        return tid != MSA_TENANT
    return True


def redirect_registered(app, uri):
    """Exact match; for http loopback hosts the port is ignored (as Microsoft does)."""
    if uri in app["redirect_uris"]:
        return True
    u = urlsplit(uri)
    if u.scheme != "http" or u.hostname not in ("127.0.0.1", "localhost"):
        return False
    for reg in app["redirect_uris"]:
        r = urlsplit(reg)
        if (r.scheme, r.hostname, r.path, r.query) == (u.scheme, u.hostname, u.path, u.query):
            return True
    return False


# ---------------------------------------------------------------------------
# Identity: authorize (sign-in page, auto-approval, redirects)
# ---------------------------------------------------------------------------

AUTHORIZE_PRESETS = {  # scenario `error` -> (OAuth error, AADSTS code, text)
    "consent_required": ("consent_required", 65001,
                         "The user or administrator has not consented to use the application with ID "
                         "'{client_id}' named '{app_name}'. Send an interactive authorization request "
                         "for this user and resource."),
    "admin_consent_required": ("consent_required", 90094, "The grant requires admin permission."),
    "access_denied": ("access_denied", 65004, "User declined to consent to access the app."),
    "server_error": ("server_error", 50000,
                     "There was an error issuing a token or an issue with our sign-in service."),
    "temporarily_unavailable": ("temporarily_unavailable", 90033,
                                "A transient error has occurred. Please try again."),
    "login_required": ("login_required", 50058,
                       "A silent sign-in request was sent but no user is signed in."),
    "interaction_required": ("interaction_required", 50076,
                             "Due to a configuration change made by your administrator, or because "
                             "you moved to a new location, you must use multi-factor authentication "
                             "to access 'https://graph.microsoft.com'."),
    "invalid_resource": ("invalid_resource", 500011,
                         "The resource principal named https://outlook.office.com was not found in "
                         "the tenant."),
    "user_blocked": ("access_denied", 53003,
                     "Access has been blocked by Conditional Access policies. The access policy does "
                     "not allow token issuance."),
}


def described(code, text, correlation=None, ts=None):
    """error_description with the trailer Microsoft appends."""
    return (f"AADSTS{code}: {text}\r\nTrace ID: {guid()}\r\nCorrelation ID: {correlation or guid()}"
            f"\r\nTimestamp: {aad_timestamp(ts or time.time())}")


def error_page(code, text, status=400):
    rid, cid = guid(), guid()
    ts = iso(time.time())
    body = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Sign in to your account</title></head>
<body>
<h1>Sign in</h1>
<p>Sorry, but we're having trouble signing you in.</p>
<p id="error">AADSTS{code}: {html.escape(text)}</p>
<dl>
<dt>Request Id</dt><dd>{rid}</dd>
<dt>Correlation Id</dt><dd>{cid}</dd>
<dt>Timestamp</dt><dd>{ts}</dd>
<dt>Message</dt><dd>AADSTS{code}: {html.escape(text)}</dd>
</dl>
</body></html>
"""
    return html_response(status, body, {"x-ms-request-id": rid, "Cache-Control": "no-store"})


def respond_to_client(flow, params):
    """Send authorize results back to the app per response_mode."""
    params = {k: v for k, v in params.items() if v is not None}
    if flow.get("state") is not None:
        params["state"] = flow["state"]
    uri = flow["redirect_uri"]
    mode = flow.get("response_mode", "query")
    if mode == "form_post":
        inputs = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}" />'
                         for k, v in params.items())
        body = (f'<html><head><title>Working...</title></head><body>'
                f'<form method="POST" name="hiddenform" action="{html.escape(uri)}">{inputs}'
                f'<noscript><p>Script is disabled. Click Submit to continue.</p>'
                f'<input type="submit" value="Submit" /></noscript></form>'
                f'<script language="javascript">document.forms[0].submit();</script></body></html>')
        return html_response(200, body, {"Cache-Control": "no-store"})
    if mode == "fragment":
        return redirect(uri + "#" + urlencode(params))
    return redirect(add_query(uri, params))


def authorize_error(flow, error, code, text, subcode=None):
    return respond_to_client(flow, {"error": error, "error_subcode": subcode,
                                    "error_description": described(code, text)})


def validate_authorize(sim, segment, params):
    """Checks Microsoft makes before it trusts the redirect URI (errors are pages), then
    the ones it reports back to the app. -> (flow, app, kind, tenant) or a Response."""
    try:
        kind, tenant = resolve_tenant(sim, segment)
    except AadError as e:
        raise PageError(e.code, e.text)
    client_id = (params.get("client_id") or "").lower()
    if not client_id:
        raise PageError(900144, "The request body must contain the following parameter: 'client_id'.")
    app = sim.apps.get(client_id)
    if app is None:
        raise PageError(700016, app_not_found(client_id, tenant["name"] if tenant else segment).text)
    err = check_app_segment(app, kind, tenant)
    if err:
        raise PageError(err.code, err.text)
    redirect_uri = params.get("redirect_uri") or (app["redirect_uris"] or [""])[0]
    if not redirect_registered(app, redirect_uri):
        raise PageError(50011, f"The redirect URI '{redirect_uri}' specified in the request does not "
                        f"match the redirect URIs configured for the application '{client_id}'. Make "
                        "sure the redirect URI sent in the request matches one added to your "
                        "application in the Azure portal. Navigate to https://aka.ms/redirectUriMismatchError "
                        "to learn more about how to fix this.")
    flow = {"client_id": client_id, "redirect_uri": redirect_uri, "state": params.get("state"),
            "response_mode": params.get("response_mode") or "query", "segment": segment.lower(),
            "scope": params.get("scope", ""), "nonce": params.get("nonce"),
            "code_challenge": params.get("code_challenge"),
            "code_challenge_method": params.get("code_challenge_method"),
            "login_hint": params.get("login_hint"), "prompt": params.get("prompt"),
            "created": sim.now()}
    if flow["response_mode"] not in ("query", "fragment", "form_post"):
        flow["response_mode"] = "query"
        return authorize_error(flow, "invalid_request", 900144,
                               "The provided value for the input parameter 'response_mode' is not valid.")
    rtype = params.get("response_type", "")
    if rtype != "code":
        if not rtype:
            return authorize_error(flow, "invalid_request", 900144,
                                   "The request body must contain the following parameter: 'response_type'.")
        return authorize_error(flow, "unsupported_response_type", 700054,
                               f"response_type '{rtype}' is not enabled for the application.")
    if not flow["scope"].strip():
        return authorize_error(flow, "invalid_request", 900144,
                               "The request body must contain the following parameter: 'scope'.")
    try:
        parse_scopes(flow["scope"])
    except AadError as e:
        return authorize_error(flow, e.error, e.code, e.text)
    if not flow["code_challenge"]:
        return authorize_error(flow, "invalid_request", 900144,
                               "The request body must contain the following parameter: 'code_challenge'. "
                               "This simulator requires PKCE.")
    method = flow["code_challenge_method"] or "plain"
    if method not in ("S256", "plain"):
        return authorize_error(flow, "invalid_request", 9002313,
                               "Invalid request. Request is malformed or invalid. "
                               f"Unsupported code_challenge_method '{method}'.")
    if method == "S256" and not re.fullmatch(r"[A-Za-z0-9_-]{43}", flow["code_challenge"]):
        return authorize_error(flow, "invalid_request", 501491,
                               "Invalid size of Code_Challenge parameter.")
    flow["code_challenge_method"] = method
    return flow, app, kind, tenant


def finish_sign_in(sim, flow, app, user):
    """The user signed in (page or auto-approval): scenario errors or a code."""
    sc = sim.take_scenario("authorize", client_id=flow["client_id"], user=user["upn"])
    if sc:
        if sc.get("hang"):
            hang(sim, sc["hang"])
        name = sc.get("error", "server_error")
        error, code, text = AUTHORIZE_PRESETS.get(name, (name, 50000, "Injected error."))
        code = sc.get("code", code)
        text = sc.get("description") or text.format(client_id=app["client_id"],
                                                    app_name=app["display_name"])
        return authorize_error(flow, error, code, text)
    with sim.lock:
        code = "0.A" + secrets.token_urlsafe(96)
        sim.codes[code] = {"client_id": flow["client_id"], "redirect_uri": flow["redirect_uri"],
                           "scope": flow["scope"], "nonce": flow["nonce"],
                           "code_challenge": flow["code_challenge"],
                           "code_challenge_method": flow["code_challenge_method"],
                           "segment": flow["segment"], "oid": user["oid"], "tid": user["tenant_id"],
                           "expires_at": sim.now() + sim.config["code_lifetime"], "used": False}
        sim.counters["codes_issued"] += 1
    return respond_to_client(flow, {"code": code, "session_state": guid()})


def sign_in_page(sim, flow_id, flow, app, users):
    hint = (flow.get("login_hint") or "").lower()
    users = sorted(users, key=lambda u: (u["upn"].lower() != hint, u["name"]))
    buttons = "\n".join(
        f'<li><button type="submit" name="user" value="{html.escape(u["oid"])}"'
        f'{" autofocus class=selected" if u["upn"].lower() == hint else ""}>'
        f'{html.escape(u["name"])} &lt;{html.escape(u["upn"])}&gt;</button></li>' for u in users)
    scopes = "".join(f"<li>{html.escape(s)}</li>" for s in flow["scope"].split())
    body = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Sign in to your account</title></head>
<body>
<h1>Sign in</h1>
<p><b>{html.escape(app['display_name'])}</b> ({html.escape(app['client_id'])}) wants to:</p>
<ul>{scopes}</ul>
<form method="POST" action="/{html.escape(flow['segment'])}/oauth2/v2.0/authorize">
<input type="hidden" name="flow" value="{flow_id}">
<p>Pick an account (simulator: no password needed):</p>
<ul>
{buttons or '<li>No account can sign in here.</li>'}
</ul>
<button type="submit" name="cancel" value="1">Cancel</button>
</form>
</body></html>
"""
    return html_response(200, body, {"Cache-Control": "no-store"})


@route("GET", r"/([^/]+)/oauth2/v2\.0/authorize", "authorize")
def authorize(sim, req, segment):
    with sim.lock:
        checked = validate_authorize(sim, segment, req.query)
        if isinstance(checked, Response):
            return checked
        flow, app, kind, tenant = checked
        eligible = [u for u in sim.users.values() if user_allowed(app, kind, tenant, u)]
        # Automated tests: sign in without a page.
        user = None
        if sim.config["auto_approve_user"]:
            user = sim.find_user(sim.config["auto_approve_user"])
        elif sim.config["auto_approve"] and flow["login_hint"]:
            user = sim.find_user(flow["login_hint"])
        if user is not None and user not in eligible:
            raise PageError(50020, f"User account '{user['upn']}' from identity provider "
                            f"'{sim.base}/{user['tenant_id']}/' does not exist in tenant "
                            f"'{tenant['name'] if tenant else segment}' and cannot access the application "
                            f"'{app['client_id']}'({app['display_name']}) in that tenant.")
        if user is None and flow["prompt"] == "none":
            error, code, text = AUTHORIZE_PRESETS["login_required"]
            return authorize_error(flow, error, code, text)
        if user is None:
            flow_id = secrets.token_urlsafe(16)
            sim.flows[flow_id] = flow
            return sign_in_page(sim, flow_id, flow, app, eligible)
    return finish_sign_in(sim, flow, app, user)


@route("POST", r"/([^/]+)/oauth2/v2\.0/authorize(?:/submit)?", "authorize_submit")
def authorize_submit(sim, req, segment):
    form = req.form()
    with sim.lock:
        flow = sim.flows.pop(form.get("flow", ""), None)
        if flow is None or sim.now() - flow["created"] > 1800:
            raise PageError(50089, "Flow token expired - Authentication Failed. Have the user try "
                            "signing-in again with username -password")
        app = sim.apps.get(flow["client_id"])
        kind, tenant = resolve_tenant(sim, flow["segment"])
        if form.get("cancel") or app is None:
            error, code, text = AUTHORIZE_PRESETS["access_denied"]
            return authorize_error(flow, error, code, text, subcode="cancel")
        user = sim.users.get(form.get("user", "").lower())
        if user is None or not user_allowed(app, kind, tenant, user):
            raise PageError(50020, "User account does not exist in the tenant and cannot access the "
                            f"application '{flow['client_id']}' in that tenant.")
    return finish_sign_in(sim, flow, app, user)


@route("GET", r"/([^/]+)/oauth2/v2\.0/logout", "logout")
def logout(sim, req, segment):
    target = req.query.get("post_logout_redirect_uri")
    if target:
        return redirect(target)
    return html_response(200, "<!DOCTYPE html><title>Sign out</title><p>You signed out of your account.</p>")


# ---------------------------------------------------------------------------
# Identity: token endpoint
# ---------------------------------------------------------------------------

TOKEN_PRESETS = {  # scenario `error` -> (status, AADSTS code, text)
    "server_error": (500, 50000, "There was an error issuing a token or an issue with our sign-in service."),
    "temporarily_unavailable": (503, 90033, "A transient error has occurred. Please try again."),
    "throttled": (429, 90055, "The request is throttled temporarily. Please try after some time."),
}
STATUS_ERRORS = {429: "temporarily_unavailable", 500: "server_error", 502: "server_error",
                 503: "temporarily_unavailable", 504: "temporarily_unavailable"}


def token_scenario(sim, grant_type, client_id):
    sc = sim.take_scenario("token", grant_type=grant_type, client_id=client_id)
    if not sc:
        return
    if sc.get("hang"):
        hang(sim, sc["hang"])                   # then answer normally: the client should have given up
        if not (sc.get("status") or sc.get("error")):
            return
    name = sc.get("error") or STATUS_ERRORS.get(sc.get("status"), "server_error")
    status, code, text = TOKEN_PRESETS.get(name, (None, None, None))
    if name == "temporarily_unavailable" and sc.get("status") == 429:
        status, code, text = TOKEN_PRESETS["throttled"]
    status = sc.get("status") or status
    code = sc.get("code") or code or 50000
    text = sc.get("description") or (text if text else "Injected error.")
    headers = {}
    if sc.get("retry_after") is not None:
        headers["Retry-After"] = str(sc["retry_after"])
    raise AadError(name, int(code), text, status=status, headers=headers)


def client_credentials(req, form):
    """client_secret_basic (RFC 6749 2.3.1, form-encoded parts) or client_secret_post."""
    auth = req.header("Authorization") or ""
    if auth[:6].lower() == "basic ":
        try:
            raw = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8")
            cid, secret = raw.split(":", 1)
        except (ValueError, UnicodeDecodeError):
            raise AadError("invalid_client", 7000215, "Invalid client secret provided. The "
                           "Authorization header could not be decoded.")
        cid, secret = unquote_plus(cid), unquote_plus(secret)
        if form.get("client_id") and form["client_id"].lower() != cid.lower():
            raise AadError("invalid_request", 9002313, "Invalid request. Request is malformed or "
                           "invalid. client_id in the body differs from the Authorization header.")
        req.log_extra["client_auth"] = "client_secret_basic"
        return cid.lower(), secret
    if "client_secret" in form:
        req.log_extra["client_auth"] = "client_secret_post"
    return (form.get("client_id") or "").lower(), form.get("client_secret")


def authenticate_client(sim, req, app, form, secret, tenant):
    if form.get("client_assertion") or form.get("client_assertion_type"):
        if secret:
            raise AadError("invalid_request", 9002313, "Invalid request. Request is malformed or "
                           "invalid. Use either client_secret or client_assertion, not both.")
        return verify_assertion(sim, req, app, form, tenant)
    if not secret:
        raise AadError("invalid_client", 7000218, "The request body must contain the following "
                       "parameter: 'client_assertion' or 'client_secret'.")
    match = next((s for s in app["secrets"]
                  if hmac.compare_digest(s["value"].encode(), secret.encode())), None)
    if match is None:
        raise AadError("invalid_client", 7000215,
                       "Invalid client secret provided. Ensure the secret being sent in the request "
                       "is the client secret value, not the client secret ID, for a secret added to "
                       f"app '{app['client_id']}'.")
    if match["expires_at"] <= sim.now():
        raise AadError("invalid_client", 7000222,
                       f"The provided client secret keys for app '{app['client_id']}' are expired. "
                       "Visit the Azure portal to create new keys for your app: "
                       "https://aka.ms/NewClientSecret, or consider using certificate credentials for "
                       "added security: https://aka.ms/certCreds.")


def pick_resource(app, requested, consented):
    """One resource per token (+ OIDC scopes). -> (resource, granted names, oidc requested).

    Without a requested scope the token is for the first consented resource."""
    oidc_consented, consented_by_res = parse_scopes(consented)
    oidc, by_res = parse_scopes(requested) if requested else (oidc_consented, {})
    if len(by_res) > 1:
        raise AadError("invalid_scope", 700022,
                       "The provided value for the input parameter scope is not valid because it "
                       f"contains more than one resource. Scope {requested} is not valid.")
    if not by_res:      # only OIDC scopes (or none): the first consented resource
        resource = next(iter(consented_by_res), GRAPH)
        names = []
    else:
        resource, names = next(iter(by_res.items()))
    have = consented_by_res.get(resource, [])
    missing = [n for n in names if n != ".default" and n.lower() not in {h.lower() for h in have}]
    if missing:
        raise AadError("invalid_grant", 65001,
                       f"The user or administrator has not consented to use the application with ID "
                       f"'{app['client_id']}' named '{app['display_name']}'. Send an interactive "
                       f"authorization request for this user and resource.")
    # Microsoft grants every consented scope of that resource, not only the ones asked for.
    return resource, list(have), oidc


def issue_tokens(sim, app, user, consented, requested, nonce, family=None, with_id_token=True):
    """The token endpoint's answer for a grant (`consented` = the authorized scope string)
    and the records behind it. with_id_token=False: /_sim/bulk/accounts, which returns no
    ID token, skips the RSA signature."""
    resource, names, oidc_req = pick_resource(app, requested, consented)
    oidc_consented, _ = parse_scopes(consented)
    if resource == GRAPH and sim.config["default_user_read"] and "User.Read" not in names:
        names.append("User.Read")
    if not names:
        raise AadError("invalid_scope", 70011, "The provided request must include a 'scope' input "
                       "parameter. The provided value for the input parameter 'scope' is not valid.")
    now = sim.now()
    lifetime = int(sim.config["access_token_lifetime"])
    at = "EwA" + secrets.token_urlsafe(90)
    sim.ats[at] = {"oid": user["oid"], "tid": user["tenant_id"], "client_id": app["client_id"],
                   "resource": resource, "scopes": names, "issued_at": now, "expires_at": now + lifetime}
    sim.counters["access_tokens_issued"] += 1
    granted_oidc = [s for s in OIDC_SCOPES if s in oidc_req and s in oidc_consented]
    body = {"token_type": "Bearer",
            "scope": " ".join(scope_response_form(resource, names) + granted_oidc),
            "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": at}
    if "offline_access" in oidc_consented:
        rt = "0.AX" + secrets.token_urlsafe(160)
        sim.rts[rt] = {"client_id": app["client_id"], "oid": user["oid"], "tid": user["tenant_id"],
                       "scope": consented, "family": family or guid(), "issued_at": now,
                       "last_used": now, "rotated": False, "grace_used": 0, "revoked": None}
        sim.counters["refresh_tokens_issued"] += 1
        body["refresh_token"] = rt
    if "openid" in oidc_req and "openid" in oidc_consented and with_id_token:
        body["id_token"] = id_token(sim, app, user, oidc_consented, nonce)
    return body


def id_token(sim, app, user, oidc, nonce):
    now = int(sim.now())
    claims = {"aud": app["client_id"], "iss": f"{sim.base}/{user['tenant_id']}/v2.0",
              "iat": now, "nbf": now, "exp": now + int(sim.config["id_token_lifetime"]),
              "sub": b64url(hashlib.sha256(f"{app['client_id']}|{user['oid']}".encode()).digest()),
              "tid": user["tenant_id"], "uti": b64url(secrets.token_bytes(16)), "ver": "2.0"}
    if nonce:
        claims["nonce"] = nonce
    if "profile" in oidc:
        claims.update(oid=user["oid"], name=user["name"],
                      preferred_username=user.get("preferred_username_claim") or user["upn"])
    # `email` is unverified and may name anyone (users of any tenant can set it): the claim a
    # relying party must never use as an identity. email_claim makes it say something else.
    email = user.get("email_claim") or user.get("mail")
    if "email" in oidc and email:
        claims["email"] = email
    tamper = sim.config.get("id_token_tamper")
    if tamper == "audience":
        claims["aud"] = guid()
    elif tamper == "issuer":
        claims["iss"] = f"{sim.base}/{guid()}/v2.0"
    elif tamper == "nonce":
        claims["nonce"] = b64url(secrets.token_bytes(32))
    elif tamper == "expired":
        claims.update(iat=now - 7200, nbf=now - 7200, exp=now - 3600)
    elif tamper == "tenant":
        claims["tid"] = guid()
        claims["iss"] = f"{sim.base}/{claims['tid']}/v2.0"
    token = sim.keys.signing.sign_jwt(claims)
    if tamper == "signature":
        head, payload, sig = token.split(".")
        raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
        raw[len(raw) // 2] ^= 0x01
        token = f"{head}.{payload}.{b64url(bytes(raw))}"
    return token


@route("POST", r"/([^/]+)/oauth2/v2\.0/token", "token")
def token(sim, req, segment):
    ctype = (req.header("Content-Type") or "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise AadError("invalid_request", 900144,
                       "The request body must contain the following parameter: 'grant_type'.")
    form = req.form()
    grant_type = form.get("grant_type")
    req.log_extra["grant_type"] = grant_type
    origin = req.header("Origin")
    if origin:
        raise AadError("invalid_request", 9002326,
                       "Cross-origin token redemption is permitted only for the 'Single-Page "
                       f"Application' client-type. Request origin: '{origin}'.")
    client_id, secret = client_credentials(req, form)
    if client_id:
        with sim.lock:      # every attempt, failed ones included (one token per app per lifetime)
            per = sim.counters["token_requests_by_client"].setdefault(client_id, {})
            per[grant_type or ""] = per.get(grant_type or "", 0) + 1
    token_scenario(sim, grant_type, client_id)
    with sim.lock:
        kind, tenant = resolve_tenant(sim, segment)
        if not grant_type:
            raise AadError("invalid_request", 900144,
                           "The request body must contain the following parameter: 'grant_type'.")
        if not client_id:
            raise AadError("invalid_request", 900144,
                           "The request body must contain the following parameter: 'client_id'.")
        app = sim.apps.get(client_id)
        if app is None:
            raise app_not_found(client_id, tenant["name"] if tenant else segment)
        if grant_type == "client_credentials" and (kind != "tenant" or tenant["id"] == MSA_TENANT):
            # App-only tokens are for one tenant: its id or domain (client credentials flow).
            where = "/organizations" if kind == "organizations" else "/common or /consumers"
            raise AadError("invalid_request", 9001023, f"The grant type isn't supported over the "
                           f"{where} endpoints. Please use the tenant-specific endpoint.")
        err = check_app_segment(app, kind, tenant)
        if err:
            raise err
        if grant_type not in ("authorization_code", "refresh_token", "client_credentials"):
            raise AadError("unsupported_grant_type", 70003,
                           f"The app requested an unsupported grant type '{grant_type}'.")
        authenticate_client(sim, req, app, form, secret, tenant)
        if grant_type == "authorization_code":
            body = redeem_code(sim, app, segment, form)
        elif grant_type == "refresh_token":
            body = redeem_refresh(sim, app, form)
        else:
            body = client_credentials_grant(sim, app, tenant, form)
        sim.count("token_grants", grant_type)
        per = sim.counters["token_grants_by_client"].setdefault(app["client_id"], {})
        per[grant_type] = per.get(grant_type, 0) + 1
    return json_response(200, body, {"Cache-Control": "no-store", "Pragma": "no-cache"})


# ---------------------------------------------------------------------------
# Identity: certificate credentials (private_key_jwt) and app-only tokens
# ---------------------------------------------------------------------------

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CERT_DOCS = "Review the documentation at https://learn.microsoft.com/entra/identity-platform/certificate-credentials ."
GRAPH_ROLES = ["Mail.Read", "Mail.ReadBasic", "Mail.ReadBasic.All", "Mail.ReadWrite", "Mail.Send",
               "MailboxSettings.Read", "MailboxSettings.ReadWrite", "User.Read.All",
               "User.ReadBasic.All", "Directory.Read.All"]
OUTLOOK_ROLES = ["IMAP.AccessAsApp", "POP.AccessAsApp", "SMTP.SendAsApp", "full_access_as_app",
                 "EWS.AccessAsApp"]
RESOURCE_NAMES = {"graph": GRAPH, "outlook": OUTLOOK}


def b64url_decode(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


@functools.lru_cache(maxsize=64)
def load_cert(pem):
    return x509.load_pem_x509_certificate(pem.encode())


def make_certificate(sim, spec):
    """A certificate credential: the PEM (or base64 DER) of an X.509 certificate, as uploaded
    in the portal. Thumbprints as the assertion header names them: x5t (SHA-1) and x5t#S256."""
    pem = spec.get("pem")
    try:
        if not pem and spec.get("der"):
            der = base64.b64decode(spec["der"])
            pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()
        cert = load_cert(pem.strip() + "\n")
    except (ValueError, TypeError, AttributeError):
        raise ValueError("pem must be a PEM X.509 certificate")
    der = cert.public_bytes(serialization.Encoding.DER)
    not_after = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after.replace(tzinfo=timezone.utc)
    return {"id": spec.get("id") or guid(), "pem": pem.strip() + "\n",
            "thumbprint": hashlib.sha1(der).hexdigest().upper(),
            "x5t": b64url(hashlib.sha1(der).digest()), "x5t_s256": b64url(hashlib.sha256(der).digest()),
            "expires_at": parse_time(spec.get("expires_at")) or not_after.timestamp()}


def public_certificate(c):
    return {"id": c["id"], "thumbprint": c["thumbprint"], "x5t": c["x5t"], "x5t#S256": c["x5t_s256"],
            "expires_at": iso(c["expires_at"])}


def resource_of(name):
    """graph | outlook | a resource URI or app id -> canonical resource (or None)."""
    if not name:
        return None
    return RESOURCE_NAMES.get(name.lower()) or RESOURCES.get(name.lower().rstrip("/"))


def verify_assertion(sim, req, app, form, tenant):
    """private_key_jwt (Microsoft's certificate-credentials page): the header
    names a registered certificate (x5t#S256, or the legacy SHA-1 x5t), RS256 or PS256,
    iss = sub = client_id, aud = the token endpoint, nbf/exp around now, a fresh jti."""
    atype = form.get("client_assertion_type")
    if not atype:
        raise AadError("invalid_request", 900144, "The request body must contain the following "
                       "parameter: 'client_assertion_type'.")
    if atype != JWT_BEARER:
        raise AadError("invalid_request", 9002313, f"Invalid request. Request is malformed or invalid. "
                       f"client_assertion_type '{atype}' is not supported.")
    assertion = form.get("client_assertion")
    if not assertion:
        raise AadError("invalid_request", 900144, "The request body must contain the following "
                       "parameter: 'client_assertion'.")
    try:
        head_b64, claims_b64, sig_b64 = assertion.split(".")
        header = json.loads(b64url_decode(head_b64))
        claims = json.loads(b64url_decode(claims_b64))
        sig = b64url_decode(sig_b64)
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise ValueError("not objects")
    except (ValueError, TypeError, UnicodeDecodeError):
        raise AadError("invalid_client", 50027, "Invalid JWT token. Token format not valid.")
    alg = header.get("alg")
    if alg not in ("RS256", "PS256"):
        raise AadError("invalid_client", 50027, f"Invalid JWT token. The signing algorithm '{alg}' is "
                       "not supported: use RS256 or PS256.")
    s256, s1 = header.get("x5t#S256"), header.get("x5t")
    cert = next((c for c in app.get("certificates") or ()
                 if (s256 and c["x5t_s256"] == s256) or (s1 and c["x5t"] == s1)), None)
    used = s256 or s1 or ""
    try:
        used_hex = b64url_decode(used).hex().upper()
    except ValueError:
        used_hex = used
    if cert is None:
        raise AadError("invalid_client", 700027, "The certificate with identifier used to sign the "
                       "client assertion is not registered on application. [Reason - The key was not "
                       f"found., Thumbprint of key used by client: '{used_hex}', Please visit the Azure "
                       f"Portal to see configured keys for app Id '{app['client_id']}'.]")
    if cert["expires_at"] <= sim.now():
        raise AadError("invalid_client", 700027, "The certificate with identifier used to sign the "
                       "client assertion is expired on application. [Reason - The key used is expired., "
                       f"Thumbprint of key used by client: '{used_hex}', Configured keys: "
                       f"[Key0:Start=..., End={aad_timestamp(cert['expires_at'])}, Thumbprint={cert['thumbprint']}]]")
    pub = load_cert(cert["pem"]).public_key()
    signing_input = f"{head_b64}.{claims_b64}".encode()
    try:
        if alg == "RS256":
            pub.verify(sig, signing_input, padding.PKCS1v15(), hashes.SHA256())
        else:
            pub.verify(sig, signing_input, padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                                      salt_length=padding.PSS.AUTO), hashes.SHA256())
    except Exception:       # InvalidSignature, or a key of another type
        raise AadError("invalid_client", 7000274, "Key was found, but use of the key to verify the "
                       "signature failed.")
    iss, sub = claims.get("iss"), claims.get("sub")
    if iss != sub:
        raise AadError("invalid_client", 50048, "Subject mismatches Issuer claim in the client assertion.")
    if str(iss or "").lower() != app["client_id"]:
        raise AadError("invalid_client", 700021, "Client assertion application identifier doesn't "
                       f"match 'client_id' parameter. {CERT_DOCS}")
    allowed = {f"{sim.base}{req.path}"}
    if tenant is not None:
        allowed.add(f"{sim.base}/{tenant['id']}/oauth2/v2.0/token")
    aud = claims.get("aud")
    auds = aud if isinstance(aud, list) else [aud]
    if not any(a in allowed for a in auds):
        raise AadError("invalid_client", 700023, f"Client assertion audience claim does not match Realm "
                       f"issuer. {CERT_DOCS}")
    now, skew = sim.now(), float(sim.config["clock_skew"])
    exp, nbf = claims.get("exp"), claims.get("nbf", claims.get("iat"))
    if not isinstance(exp, (int, float)) or (nbf is not None and not isinstance(nbf, (int, float))):
        raise AadError("invalid_client", 50027, "Invalid JWT token. The client assertion needs a "
                       "numeric 'exp' claim.")
    limit = sim.config["assertion_max_lifetime"]
    if exp < now - skew or (nbf is not None and nbf > now + skew) or (
            limit is not None and exp - (nbf if nbf is not None else now) > float(limit)):
        raise AadError("invalid_client", 700024, f"Client assertion is not within its valid time range. "
                       f"Current time: {iso(now)}, assertion valid from "
                       f"{iso(nbf) if nbf is not None else 'unspecified'}, expiry time of assertion "
                       f"{iso(exp)}. {CERT_DOCS}")
    jti = claims.get("jti")
    if not jti or not isinstance(jti, str):
        raise AadError("invalid_client", 50027, "Invalid JWT token. The client assertion has no 'jti' claim.")
    if jti in sim.used_jtis:
        raise AadError("invalid_client", 50027, f"Invalid JWT token. The client assertion with jti "
                       f"'{jti}' was already used: an assertion cannot be replayed.")
    if len(sim.used_jtis) > 10000:
        for k in [k for k, v in sim.used_jtis.items() if v < now - skew]:
            del sim.used_jtis[k]
    sim.used_jtis[jti] = exp
    req.log_extra["client_auth"] = "private_key_jwt"
    req.log_extra["certificate"] = cert["thumbprint"]


def client_credentials_grant(sim, app, tenant, form):
    """App-only token (client credentials): scope {resource}/.default, the application permissions
    admin-consented in that tenant as `roles`, never a refresh token."""
    scope = (form.get("scope") or "").strip()
    if not scope:
        raise AadError("invalid_request", 900144, "The request body must contain the following "
                       "parameter: 'scope'.")
    words = scope.split()
    if len(words) != 1:
        raise AadError("invalid_scope", 70011, "The provided value for the input parameter 'scope' is "
                       f"not valid. The scope {scope} is not valid.")
    word = words[0]
    if not word.lower().endswith("/.default"):
        raise AadError("invalid_scope", 1002012, f"The provided value for scope {word} is not valid. "
                       "Client credential flows must have a scope value with /.default suffixed to "
                       "the resource identifier (application ID URI).")
    prefix = word[:-len("/.default")]
    resource = RESOURCES.get(prefix.lower().rstrip("/"))
    if resource is None:
        raise AadError("invalid_resource", 500011, f"The resource principal named {prefix} was not "
                       "found in the tenant named " + tenant["name"] + ". This can happen if the "
                       "application has not been installed by the administrator of the tenant or "
                       "consented to by any user in the tenant. You might have sent your "
                       "authentication request to the wrong tenant.")
    tid = tenant["id"]
    grants = (app.get("app_roles") or {}).get(tid)
    if grants is None and tid != app["home_tenant"]:
        raise app_not_found(app["client_id"], tenant["name"])      # no service principal there
    roles = list((grants or {}).get(resource, []))
    now = sim.now()
    lifetime = int(sim.config["access_token_lifetime"])
    at = "EwA" + secrets.token_urlsafe(90)
    sim.ats[at] = {"app_only": True, "oid": None, "tid": tid, "client_id": app["client_id"],
                   "resource": resource, "aud": prefix.lower().rstrip("/"), "roles": roles, "scopes": [],
                   "issued_at": now, "expires_at": now + lifetime}
    sim.counters["access_tokens_issued"] += 1
    per_app = sim.counters["app_tokens"].setdefault(app["client_id"], {})
    per_app[tid] = per_app.get(tid, 0) + 1
    return {"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": at}


def redeem_code(sim, app, segment, form):
    code = form.get("code")
    if not code:
        raise AadError("invalid_request", 900144, "The request body must contain the following "
                       "parameter: 'code'.")
    rec = sim.codes.get(code)
    if rec is None:
        raise AadError("invalid_grant", 70000, "The provided value for the 'code' parameter is not valid.")
    if rec["used"]:
        raise AadError("invalid_grant", 54005, "OAuth2 Authorization code was already redeemed, "
                       "please retry with a new valid code or use an existing refresh token.")
    if rec["expires_at"] <= sim.now():
        raise AadError("invalid_grant", 70008, "The provided authorization code or refresh token has "
                       "expired due to inactivity. Send a new interactive authorization request for "
                       "this user and resource.")
    if rec["client_id"] != app["client_id"]:
        raise AadError("invalid_grant", 70000, "The provided value for the 'code' parameter is not "
                       "valid. The code was issued to a different client.")
    rec["used"] = True      # any redemption attempt past this point burns the code
    if rec["segment"] != segment.lower():
        raise AadError("invalid_grant", 700005, "Provided Authorization Code is intended to use "
                       "against other tenant, thus rejected.")
    redirect_uri = form.get("redirect_uri")
    if redirect_uri != rec["redirect_uri"]:
        raise AadError("invalid_grant", 50011,
                       f"The redirect URI '{redirect_uri}' specified in the request does not match the "
                       f"redirect URI '{rec['redirect_uri']}' used to request the authorization code.")
    if not pkce_ok(rec, form.get("code_verifier")):
        raise AadError("invalid_grant", 501481, "The Code_Verifier does not match the "
                       "code_challenge supplied in the authorization request.")
    user = sim.users.get(rec["oid"])
    if user is None:
        raise AadError("invalid_grant", 50034, "The user account does not exist in the directory.")
    return issue_tokens(sim, app, user, rec["scope"], form.get("scope"), rec["nonce"])


def pkce_ok(rec, verifier):
    if not rec.get("code_challenge"):
        return True
    if not verifier or not re.fullmatch(r"[A-Za-z0-9._~-]{43,128}", verifier):
        return False
    if rec["code_challenge_method"] == "S256":
        expected = b64url(hashlib.sha256(verifier.encode()).digest())
    else:
        expected = verifier
    return hmac.compare_digest(expected, rec["code_challenge"])


def redeem_refresh(sim, app, form):
    rt = form.get("refresh_token")
    if not rt:
        raise AadError("invalid_request", 900144, "The request body must contain the following "
                       "parameter: 'refresh_token'.")
    rec = sim.rts.get(rt)
    if rec is None:
        raise AadError("invalid_grant", 9002313, "Invalid request. Request is malformed or invalid.")
    if rec["client_id"] != app["client_id"]:
        raise AadError("invalid_grant", 70000, "Provided grant is invalid or malformed. The refresh "
                       "token was issued to a different client.")
    err = sim.rt_usable(rec)
    if err:
        raise err
    user = sim.users.get(rec["oid"])
    if user is None:
        raise revoked_error(rec, 50173)
    body = issue_tokens(sim, app, user, rec["scope"], form.get("scope"), None, family=rec["family"])
    # Rotation: the new RT replaces this one; the old one keeps working unless configured not to.
    if rec["rotated"]:
        rec["grace_used"] += 1
    rec["rotated"] = True
    rec["last_used"] = sim.now()
    return body


# ---------------------------------------------------------------------------
# Graph: authentication, throttling, errors
# ---------------------------------------------------------------------------

class Abandoned(Exception):
    """A request that hung across a reset: dropped without an answer."""


class Dropped(Abandoned):
    """A `drop` / `drop_after` scenario: the connection is closed without an answer (logged)."""


def hang(sim, seconds):
    gen = sim.generation
    time.sleep(float(seconds))
    if sim.generation != gen:
        raise Abandoned()


DENIED = "Access is denied. Check credentials and try again."


class GraphCtx:
    """One Graph request: the token, the mailbox it addresses (`user`: the signed-in user for
    /me, else /users/{x}) and how it may reach it (own mailbox, delegated shared, app-only)."""

    def __init__(self, sim, req, at, user, shared=False):
        self.sim, self.req, self.at = sim, req, at
        self.user = user
        self.app_only = bool(at.get("app_only"))
        self.caller = None if self.app_only else sim.users.get(at["oid"])
        self.shared = shared            # delegated access to another user's mailbox
        self.mb = sim.mailbox(user["oid"])
        # Links (nextLink, deltaLink, Location) keep the form the caller used: an app-only
        # caller cannot follow a /me link.
        self.base_path = ("/v1.0/users/" + quote(req.graph_user, safe="@")) if req.graph_user else "/v1.0/me"
        prefer = req.prefer()
        self.immutable = prefer.get("idtype", "").lower() == "immutableid"
        self.text_body = prefer.get("outlook.body-content-type", "").lower() == "text"
        self.prefer = prefer
        self.basic = False           # Mail.ReadBasic only: no body
        self.replay = None           # a delta "replay" scenario for this request
        self.applied = []            # Preference-Applied values
        if self.immutable:
            self.applied.append('IdType="ImmutableId"')

    def has(self, *names):
        have = {s.lower() for s in (self.at.get("roles") or self.at["scopes"])}
        return any(s.lower() in have for s in names)

    def _need(self, own, shared, app):
        """Permission names that allow this kind of access, by how the mailbox is reached."""
        names = app if self.app_only else shared if self.shared else own
        if not self.has(*names):
            raise GraphError(403, "ErrorAccessDenied", DENIED)

    def need_read(self):
        """-> True when only Mail.ReadBasic(.All) allows it (no body)."""
        if self.app_only:
            full, basic = ("Mail.Read", "Mail.ReadWrite"), ("Mail.ReadBasic.All", "Mail.ReadBasic")
        elif self.shared:
            full, basic = ("Mail.Read.Shared", "Mail.ReadWrite.Shared"), ()
        else:
            full = ("Mail.Read", "Mail.ReadWrite", "Mail.Read.Shared", "Mail.ReadWrite.Shared")
            basic = ("Mail.ReadBasic",)
        if self.has(*full):
            return False
        if basic and self.has(*basic):
            return True
        raise GraphError(403, "ErrorAccessDenied", DENIED)

    def need_write(self):
        self._need(("Mail.ReadWrite", "Mail.ReadWrite.Shared"), ("Mail.ReadWrite.Shared",), ("Mail.ReadWrite",))

    def need_send(self):
        self._need(("Mail.Send", "Mail.Send.Shared"), ("Mail.Send.Shared",), ("Mail.Send",))
        if self.shared and "SendAs" not in self.sim.rights(self.user["oid"], self.caller["oid"]):
            raise GraphError(403, "ErrorSendAsDenied", "The user account which was used to submit this "
                             "request does not have the right to send mail on behalf of the specified "
                             "sending account., Cannot submit message.")

    def message(self, any_id):
        msg = self.mb.find(any_id)
        if msg is None:
            raise GraphError(404, "itemNotFound", "The specified object was not found in the store., "
                             "The process failed to get the correct properties.")
        return msg

    def folder(self, name_or_id):
        f = self.mb.folder(name_or_id)
        if f is None:
            raise GraphError(404, "itemNotFound", "The specified folder could not be found in the store.")
        return f

    def render(self, msg, select=None, only=None):
        return self.mb.render(msg, select, self.immutable, self.text_body, self.basic, only)

    def link(self, path_and_query):
        """An absolute Graph URL under the caller's own prefix (/me or /users/{x})."""
        return f"{self.sim.base}{self.base_path}{path_and_query}"


def token_error(sim, message):
    return GraphError(401, "InvalidAuthenticationToken", message, {"WWW-Authenticate": www_authenticate(sim)})


def graph_auth(sim, req):
    """-> (token record, mailbox owner addressed, shared) or a GraphError, as Graph checks:
    the token, then (app-only) the /users/{x} form, the user, the application access policy;
    (delegated) another user's mailbox needs FullAccess."""
    auth = req.header("Authorization") or ""
    if not auth[:7].lower() == "bearer " or not auth[7:].strip():
        raise token_error(sim, "Access token is empty.")
    with sim.lock:
        at = sim.ats.get(auth[7:].strip())
        if at is None:
            raise token_error(sim, "IDX14100: JWT is not well formed, there are no dots (.).")
        if at.get("revoked"):
            raise token_error(sim, "Access token has been revoked.")
        if at["expires_at"] <= sim.now():
            raise token_error(sim, "Lifetime validation failed, the token is expired.")
        if at["resource"] != GRAPH:
            raise token_error(sim, "Access token validation failure. Invalid audience.")
        if at.get("app_only"):
            if not at.get("roles"):     # consented without application permissions
                raise GraphError(403, "accessDenied", "Either scp or roles claim need to be present in the token.")
            if not req.graph_user:
                raise GraphError(400, "BadRequest", "/me request is only valid with delegated authentication flow.")
            user = sim.find_user(req.graph_user)
            if user is None or user["tenant_id"] != at["tid"]:
                raise GraphError(404, "ErrorInvalidUser", f"The requested user '{req.graph_user}' is invalid.")
            if not sim.access_policy_allows(at["client_id"], user["oid"]):
                raise GraphError(403, "ErrorAccessDenied", "Access to OData is disabled.")
            return at, user, False
        me = sim.users.get(at["oid"])
        if me is None:
            raise GraphError(404, "ErrorInvalidUser", "The requested user is invalid.")
        if not req.graph_user:
            return at, me, False
        user = sim.find_user(req.graph_user)
        if user is me:
            return at, me, False
        if user is None or user["tenant_id"] != me["tenant_id"]:
            raise GraphError(404, "ErrorInvalidUser", f"The requested user '{req.graph_user}' is invalid.")
        if "FullAccess" not in sim.rights(user["oid"], me["oid"]):
            raise GraphError(403, "ErrorAccessDenied", DENIED)
        return at, user, True


def www_authenticate(sim):
    return (f'Bearer realm="", authorization_uri="{sim.base}/common/oauth2/authorize", '
            'client_id="00000003-0000-0000-c000-000000000000"')


def graph_user_id(user):
    """Work/school: id == oid. Personal accounts: the 16 hex digits embedded in the oid."""
    if user["tenant_id"] == MSA_TENANT and user["oid"].startswith("00000000-0000-0000-"):
        return user["oid"][19:].replace("-", "")
    return user["oid"]


class ConcurrencySlot:
    """At most N in-flight requests per app + mailbox (Outlook's limit); over -> 429."""

    def __init__(self, sim, client_id, oid):
        self.sim, self.key = sim, (client_id, oid)

    def __enter__(self):
        sim = self.sim
        with sim.lock:
            n = sim.inflight.get(self.key, 0) + 1
            if n > sim.config["graph_concurrency_limit"]:
                sim.counters["concurrency_violations"] += 1
                sim.counters["throttled"] += 1
                raise GraphError(429, "ApplicationThrottled",
                                 "Application is over its MailboxConcurrency limit.",
                                 {"Retry-After": str(sim.config["throttle_retry_after"])})
            sim.inflight[self.key] = n
            sim.counters["max_inflight"] = max(sim.counters["max_inflight"], n)
        return self

    def __exit__(self, *exc):
        with self.sim.lock:
            self.sim.inflight[self.key] -= 1


def graph_scenario(sim, req, user, client_id):
    """-> the scenario that applies to this request (or None), after any `hang` before it.
    Raises its error now (or drops the connection: `drop`) unless it is a replay or acts after
    the request (`hang_after`, `drop_after`)."""
    sc = sim.take_scenario("graph", path=req.orig_path, method=req.method, user=user["upn"],
                           oid=user["oid"], client_id=client_id)
    if not sc or sc.get("action") == "replay":
        return sc
    if sc.get("hang"):
        hang(sim, sc["hang"])
    if sc.get("drop"):
        raise Dropped()
    if sc.get("hang_after") is not None or sc.get("drop_after") not in (None, False):
        return sc
    scenario_error(sim, sc)
    return None


def after_scenario(sim, sc):
    """The request took effect; now the answer is late (`hang_after`), never comes
    (`drop_after`: the connection is closed, after that many seconds if a number), or is
    replaced by the scenario's error (e.g. a 504 for a write that was applied)."""
    if sc.get("hang_after") is not None:
        hang(sim, sc["hang_after"])
    drop = sc.get("drop_after")
    if drop not in (None, False):
        if drop is not True and float(drop) > 0:
            hang(sim, drop)
        raise Dropped()
    if sc.get("hang_after") is not None:
        scenario_error(sim, sc)


def scenario_error(sim, sc):
    """Raise the scenario's error: its status/code, 503 by default; a hang without either
    only delays the real answer."""
    if not (sc.get("status") or sc.get("code")) and (sc.get("hang") or sc.get("hang_after") is not None):
        return
    status = int(sc.get("status", 503))
    headers = {}
    # Graph's 429s carry Retry-After, and 503s usually do (Graph throttling); a scenario without
    # retry_after gets the configured one, "retry_after": null sends none (backoff path).
    retry_after = sc.get("retry_after", sim.config["throttle_retry_after"] if status in (429, 503)
                         else None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    default_code = {429: "TooManyRequests", 503: "serviceNotAvailable", 504: "UnknownError",
                    500: "generalException", 401: "InvalidAuthenticationToken",
                    403: "ErrorAccessDenied", 404: "itemNotFound"}.get(status, "generalException")
    if status == 429:
        sim.counters["throttled"] += 1
    raise GraphError(status, sc.get("code", default_code),
                     sc.get("message", "Injected by the simulator."), headers)


def graph_handler(fn):
    """Wraps Graph handlers: token check, throttling, scenarios, latency."""
    def wrapper(sim, req, *groups):
        if req.too_large:
            raise request_too_large(sim)
        at, user, shared = graph_auth(sim, req)
        with ConcurrencySlot(sim, at["client_id"], user["oid"]):
            if sim.config.get("latency_ms"):     # inside the slot: a slow call stays in flight
                time.sleep(float(sim.config["latency_ms"]) / 1000)
            sc = graph_scenario(sim, req, user, at["client_id"])
            try:
                with sim.lock:
                    ctx = GraphCtx(sim, req, at, user, shared)
                    ctx.replay = sc if sc and sc.get("action") == "replay" else None
                    resp = fn(ctx, *groups)
            finally:
                # hang_after / drop_after: the request took effect, the answer is late or never
                # comes (a crash between the Graph call and the caller's commit).
                if sc and sc.get("action") != "replay":
                    after_scenario(sim, sc)
            if ctx.applied:
                resp.headers["Preference-Applied"] = ", ".join(ctx.applied)
            return resp
    wrapper.__name__ = fn.__name__
    return wrapper


def select_param(req, allowed):
    raw = req.query.get("$select")
    if not raw:
        return None
    names = [s.strip() for s in raw.split(",") if s.strip()]
    lookup = {a.lower(): a for a in allowed}
    out = []
    for n in names:
        if n.lower() == "id":
            continue
        if n.lower() not in lookup:
            raise GraphError(400, "RequestBroker--ParseUri",
                             f"Could not find a property named '{n}' on type 'microsoft.graph.message'.")
        out.append(lookup[n.lower()])
    return out


def odata(sim, path):
    return f"{sim.base}/v1.0/$metadata#{path}"


# ---------------------------------------------------------------------------
# Graph: user, folders, messages
# ---------------------------------------------------------------------------

@route("GET", r"/v1\.0/me", "graph_me")
@graph_handler
def graph_me(ctx):
    if not ctx.has("User.Read", "User.ReadWrite", "User.ReadBasic.All", "User.Read.All"):
        raise GraphError(403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation.")
    u = ctx.user
    name = u["name"].split(" ", 1)
    full = {"businessPhones": [], "displayName": u["name"], "givenName": name[0],
            "jobTitle": None, "mail": u["mail"], "mobilePhone": None, "officeLocation": None,
            "preferredLanguage": "en-US", "surname": name[1] if len(name) > 1 else None,
            "userPrincipalName": u["upn"], "id": graph_user_id(u)}
    sel = ctx.req.query.get("$select")
    if sel:
        keys = {s.strip().lower() for s in sel.split(",")}
        full = {k: v for k, v in full.items() if k.lower() in keys or k == "id"}
    return json_response(200, dict({"@odata.context": odata(ctx.sim, "users/$entity")}, **full))


@route("GET", r"/oidc/userinfo", "userinfo")
@graph_handler
def userinfo(ctx):
    u = ctx.user
    name = u["name"].split(" ", 1)
    return json_response(200, {"sub": b64url(hashlib.sha256(f"{ctx.at['client_id']}|{u['oid']}".encode()).digest()),
                               "name": u["name"], "given_name": name[0],
                               "family_name": name[1] if len(name) > 1 else "", "email": u["mail"]})


@route("GET", r"/v1\.0/me/mailboxSettings", "graph_mailbox_settings")
@graph_handler
def mailbox_settings(ctx):
    return json_response(200, {"@odata.context": odata(ctx.sim, "users('me')/mailboxSettings"),
                               "timeZone": "UTC", "language": {"locale": "en-US", "displayName": "English (United States)"},
                               "automaticRepliesSetting": {"status": "disabled"}, "userPurpose": "user",
                               "dateFormat": "yyyy-MM-dd", "timeFormat": "HH:mm"})


def render_folder(mb, f):
    msgs = mb.in_folder(f["id"])
    return {"id": f["id"], "displayName": f["displayName"], "parentFolderId": f["parentFolderId"],
            "childFolderCount": 0, "unreadItemCount": sum(1 for m in msgs if not m["props"]["isRead"]),
            "totalItemCount": len(msgs), "isHidden": f["hidden"]}


@route("GET", r"/v1\.0/me/mailFolders", "graph_folders")
@graph_handler
def list_folders(ctx):
    ctx.need_read()
    value = [render_folder(ctx.mb, f) for f in ctx.mb.folders.values() if not f["hidden"]]
    return json_response(200, {"@odata.context": odata(ctx.sim, "users('me')/mailFolders"), "value": value})


FOLDER = r"/v1\.0/me/mailFolders(?:/([^/()]+)|\('([^']+)'\))"


@route("GET", FOLDER, "graph_folder")
@graph_handler
def get_folder(ctx, fid, fid_quoted):
    ctx.need_read()
    f = ctx.folder(fid or fid_quoted)
    return json_response(200, dict({"@odata.context": odata(ctx.sim, "users('me')/mailFolders/$entity")},
                                   **render_folder(ctx.mb, f)))


@route("GET", FOLDER + r"/messages", "graph_list")
@graph_handler
def list_messages(ctx, fid, fid_quoted):
    return message_list(ctx, ctx.folder(fid or fid_quoted))


@route("GET", r"/v1\.0/me/messages", "graph_list")
@graph_handler
def list_all_messages(ctx):
    return message_list(ctx, None)


# singleValueExtendedProperties/Any(ep: ep/id eq '...' and ep/value eq '...'), as Graph takes it
ODATA_STR = r"'((?:[^']|'')*)'"
EXT_FILTER_RE = re.compile(r"^\s*singleValueExtendedProperties/any\(\s*(\w+)\s*:\s*\1/id\s+eq\s+" + ODATA_STR
                           + r"(?:\s+and\s+\1/value\s+eq\s+" + ODATA_STR + r")?\s*\)\s*$", re.I)
IMID_FILTER_RE = re.compile(r"^\s*internetMessageId\s+eq\s+" + ODATA_STR + r"\s*$", re.I)
EXPAND_EXT_RE = re.compile(r"^\s*singleValueExtendedProperties(?:\(\s*\$filter=\s*id\s+eq\s+" + ODATA_STR
                           + r"\s*\))?\s*$", re.I)


def odata_str(s):
    return s.replace("''", "'") if s is not None else None


def list_filter(flt):
    """$filter of a message list -> predicate(msg). Graph takes many filters; the simulator
    the two a sender needs to find its message again."""
    if not flt:
        return None
    m = EXT_FILTER_RE.match(flt)
    if m:
        pid, value = odata_str(m.group(2)).lower(), odata_str(m.group(3))
        return lambda msg: any(e["id"].lower() == pid and (value is None or e["value"] == value)
                               for e in msg.get("ext") or ())
    m = IMID_FILTER_RE.match(flt)
    if m:
        imid = odata_str(m.group(1))
        return lambda msg: msg["props"]["internetMessageId"] == imid
    raise GraphError(400, "ErrorInvalidUrlQueryFilter", "The query filter contains one or more invalid nodes.")


def expand_ext(req):
    """$expand=singleValueExtendedProperties($filter=id eq '...') -> None (not asked),
    "" (all of them) or the lower-case id."""
    raw = req.query.get("$expand")
    if not raw:
        return None
    m = EXPAND_EXT_RE.match(raw)
    if not m:
        raise GraphError(400, "BadRequest", f"Parsing OData Select and Expand failed: could not find a "
                         f"property named '{raw.split('(')[0]}' on type 'microsoft.graph.message'.")
    return (odata_str(m.group(1)) or "").lower()


def with_ext(out, msg, want):
    if want is not None:
        out["singleValueExtendedProperties"] = [dict(e) for e in msg.get("ext") or ()
                                                if not want or e["id"].lower() == want]
    return out


def message_list(ctx, f):
    ctx.basic = ctx.need_read()
    select = select_param(ctx.req, MESSAGE_PROPS)
    pred = list_filter(ctx.req.query.get("$filter"))
    want = expand_ext(ctx.req)
    if f is None:
        msgs = [m for m in ctx.mb.messages.values() if not ctx.mb.folders[m["folder"]]["hidden"]]
    else:
        msgs = ctx.mb.in_folder(f["id"])
    if pred:
        msgs = [m for m in msgs if pred(m)]
    msgs.sort(key=lambda m: m["props"]["receivedDateTime"], reverse=True)
    top = min(int(ctx.req.query.get("$top", 10)), 1000)
    skip = int(ctx.req.query.get("$skip", 0))
    where = f"mailFolders('{f['id']}')/messages" if f else "messages"
    body = {"@odata.context": odata(ctx.sim, f"users('me')/{where}"),
            "value": [with_ext(ctx.render(m, select), m, want) for m in msgs[skip:skip + top]]}
    if skip + top < len(msgs):
        q = dict(ctx.req.query, **{"$skip": str(skip + top), "$top": str(top)})
        body["@odata.nextLink"] = ctx.link(f"/{where}?" + urlencode(q, safe="$,"))
    return json_response(200, body)


MESSAGE = r"/v1\.0/me/messages/([^/]+)"


@route("GET", MESSAGE, "graph_get")
@graph_handler
def get_message(ctx, mid):
    ctx.basic = ctx.need_read()
    msg = ctx.message(mid)
    select = select_param(ctx.req, MESSAGE_PROPS)
    want = expand_ext(ctx.req)
    return json_response(200, dict({"@odata.context": odata(ctx.sim, "users('me')/messages/$entity")},
                                   **with_ext(ctx.render(msg, select), msg, want)))


def count_write(ctx, msg, op, effective, detail=None):
    """graph_writes counts every accepted write call; graph_effective_writes only the ones
    that changed the message, so a test can prove a write-back queue applied each action
    exactly once even when it repeated an idempotent call. The message keeps the effective
    ones, in order, with their global sequence number (`seq`), for order assertions."""
    c = getattr(ctx, "sim", ctx).counters       # a GraphCtx, or the Sim (upload URLs)
    imm = msg["imm"]
    c["graph_writes"][imm] = c["graph_writes"].get(imm, 0) + 1
    c["graph_writes_total"] += 1
    if effective:
        c["graph_effective_writes"][imm] = c["graph_effective_writes"].get(imm, 0) + 1
        c["graph_effective_writes_total"] += 1
        entry = {"op": op}
        entry.update(detail or {})
        entry["seq"] = c["graph_effective_writes_total"]
        msg.setdefault("writes", []).append(entry)


# -- message content a client may write (drafts) ---------------------------------

RECIPIENT_FIELDS = ("toRecipients", "ccRecipients", "bccRecipients", "replyTo")
EXT_ID_RE = re.compile(r"^(String|Integer|Boolean|SystemTime|Long|Double|Binary|CLSID|Short|Float|Currency)"
                       r"\s+(\{[0-9a-fA-F-]{36}\}\s+(Name|Id)\s+\S.*|0x[0-9a-fA-F]{1,4})$", re.I)


def bad_request(message, code="BadRequest"):
    return GraphError(400, code, message)


def clean_recipients(sim, value, field):
    """Recipients as Graph stores them: emailAddress {name, address}; a missing name is the
    directory's display name for a known address, else the address."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad_request(f"Invalid value for property '{field}': a collection of recipients is expected.")
    out = []
    for r in value:
        ea = r.get("emailAddress") if isinstance(r, dict) else None
        addr = ea.get("address") if isinstance(ea, dict) else None
        if not isinstance(addr, str) or not addr.strip():
            raise GraphError(400, "ErrorInvalidRecipients", "At least one recipient is not valid., "
                             "Recipient '' is not resolved. All recipients must be resolved before a "
                             "message can be submitted.")
        name = ea.get("name")
        if not name:
            known = sim.find_user(addr)
            name = known["name"] if known else addr
        out.append({"emailAddress": {"name": name, "address": addr}})
    return out


def clean_headers(value):
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad_request("Invalid value for property 'internetMessageHeaders'.")
    out = []
    for h in value:
        name = h.get("name") if isinstance(h, dict) else None
        if not isinstance(name, str) or not name:
            raise bad_request("An internet message header needs a name.", "InvalidInternetMessageHeader")
        if not name.lower().startswith("x-"):
            raise GraphError(400, "InvalidInternetMessageHeader",
                             f"The internet message header name '{name}' should start with 'x-' or 'X-'.")
        out.append({"name": name, "value": "" if h.get("value") is None else str(h.get("value"))})
    return out


def clean_ext(value):
    if not isinstance(value, list):
        raise bad_request("Invalid value for property 'singleValueExtendedProperties'.")
    out = []
    for e in value:
        pid = e.get("id") if isinstance(e, dict) else None
        if not isinstance(pid, str) or not EXT_ID_RE.match(pid.strip()):
            raise GraphError(400, "ErrorInvalidProperty",
                             f"The extended property id '{pid}' is not valid.")
        out.append({"id": pid.strip(), "value": "" if e.get("value") is None else str(e["value"])})
    return out


def merge_ext(old, new):
    """PATCH/POST: a property of the same id (case-insensitive) is replaced. -> (list, changed)."""
    out = [dict(e) for e in old or ()]
    changed = False
    for e in new:
        cur = next((o for o in out if o["id"].lower() == e["id"].lower()), None)
        if cur is None:
            out.append(dict(e))
            changed = True
        elif cur["value"] != e["value"]:
            cur["value"] = e["value"]
            changed = True
    return out, changed


def wrap_html(content):
    """Exchange stores an HTML body as a whole document (Graph's create examples show it)."""
    if re.match(r"\s*<html", content, re.I):
        return content
    return ('<html><head>\r\n<meta http-equiv="Content-Type" content="text/html; charset=utf-8">\r\n'
            f'</head>\r\n<body>\r\n{content}\r\n</body>\r\n</html>\r\n')


def clean_body(value):
    if isinstance(value, str):
        value = {"contentType": "html", "content": value}
    if not isinstance(value, dict):
        raise bad_request("Invalid value for property 'body'.")
    ctype = str(value.get("contentType", "html")).lower()
    if ctype not in ("html", "text"):
        raise bad_request(f"Invalid value '{value.get('contentType')}' for property 'contentType'.")
    content = "" if value.get("content") is None else str(value["content"])
    return {"contentType": ctype, "content": wrap_html(content) if ctype == "html" else content}


def draft_fields(sim, data, for_patch=False):
    """A JSON message from a client -> (props, extended properties or None, attachment specs)."""
    if not isinstance(data, dict):
        raise bad_request("Unable to read JSON request payload.")
    props, ext, atts = {}, None, []
    for k, v in data.items():
        if k in RECIPIENT_FIELDS:
            props[k] = clean_recipients(sim, v, k)
        elif k == "internetMessageHeaders":
            props[k] = clean_headers(v)
        elif k == "body":
            props[k] = clean_body(v)
        elif k in ("from", "sender"):
            props[k] = clean_recipients(sim, [v], k)[0] if v else None
        elif k == "singleValueExtendedProperties":
            ext = clean_ext(v)
        elif k == "attachments" and not for_patch:
            atts = v if isinstance(v, list) else []
        elif k == "importance":
            props[k] = str(v).lower()
        elif k in MESSAGE_PROP_SET or k.startswith("@odata"):
            if not k.startswith("@odata"):
                props[k] = v
        elif not for_patch:
            raise GraphError(400, "RequestBroker--ParseUri",
                             f"Could not find a property named '{k}' on type 'microsoft.graph.message'.")
        else:
            props[k] = v        # reported as not updatable by the caller
    if "body" in props:
        props["bodyPreview"] = strip_tags(props["body"]["content"][:4096])[:255]
    return props, ext, atts


def message_size(msg):
    """What the size limits count: body text and attachments."""
    return len(msg["props"]["body"]["content"]) + sum(a["size"] for a in msg.get("atts") or ())


def add_attachment(ctx, msg, att):
    limit = ctx.sim.config["max_message_size"]
    if message_size(msg) + att["size"] > limit:
        raise GraphError(400, "ErrorMessageSizeExceeded", "The message exceeds the maximum supported size.")
    msg.setdefault("atts", []).append(att)
    ctx.mb.update(msg, {"hasAttachments": has_attachments(msg)})
    count_write(ctx, msg, "attach", True, {"name": att["name"]})


def create_draft(ctx, fid, props, ext, att_specs, extra=None, count=True):
    sim = ctx.sim
    now = iso(sim.now())
    p = {"isDraft": True, "isRead": True, "from": None, "sender": None, "receivedDateTime": now,
         "sentDateTime": now, "createdDateTime": now, "lastModifiedDateTime": now,
         "body": {"contentType": "html", "content": wrap_html("")}}
    p.update(extra or {})
    p.update(props)
    msg = ctx.mb.add(fid, p, strip_tags(p["body"]["content"][:4096])[:255])
    if ext:
        msg["ext"] = ext
    atts = [make_attachment(sim, a) for a in att_specs]
    if atts:
        msg["atts"] = atts
        msg["props"]["hasAttachments"] = has_attachments(msg)
        if message_size(msg) > sim.config["max_message_size"]:
            ctx.mb.purge(msg)
            raise GraphError(400, "ErrorMessageSizeExceeded", "The message exceeds the maximum supported size.")
    if count:
        sim.counters["drafts_created"] += 1
    return msg


def message_entity(ctx, msg, status=200):
    return json_response(status, dict({"@odata.context": odata(ctx.sim, "users('me')/messages/$entity")},
                                      **ctx.render(msg)))


def parse_mime(ctx):
    """POST /me/messages or /me/sendMail with Content-Type text/plain: a base64 MIME message
    -> (props, attachment specs)."""
    from email import policy
    from email.parser import BytesParser
    from email.utils import getaddresses
    try:
        raw = base64.b64decode(ctx.req.body.strip(), validate=True)
        if not raw:
            raise ValueError("empty")
        m = BytesParser(policy=policy.default).parsebytes(raw)
    except (ValueError, TypeError):
        raise GraphError(400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content.")
    props = {"subject": str(m.get("Subject", ""))}
    for field, header in (("toRecipients", "To"), ("ccRecipients", "Cc"), ("bccRecipients", "Bcc")):
        pairs = getaddresses(m.get_all(header, []))
        props[field] = clean_recipients(ctx.sim, [{"emailAddress": {"name": n, "address": a}}
                                                  for n, a in pairs if a], field)
    part = m.get_body(preferencelist=("html", "plain"))
    if part is not None:
        props["body"] = clean_body({"contentType": "html" if part.get_content_subtype() == "html" else "text",
                                    "content": part.get_content()})
        props["bodyPreview"] = strip_tags(props["body"]["content"][:4096])[:255]
    props["internetMessageHeaders"] = [{"name": k, "value": str(v)} for k, v in m.items()
                                       if k.lower().startswith("x-")]
    if m.get("Message-ID"):
        props["internetMessageId"] = str(m["Message-ID"]).strip()
    atts = []
    for part in m.iter_attachments():
        data = part.get_payload(decode=True) or b""
        atts.append({"kind": "file", "name": part.get_filename() or "attachment",
                     "contentType": part.get_content_type(), "contentBytes": base64.b64encode(data).decode(),
                     "isInline": part.get_content_disposition() == "inline",
                     "contentId": (part.get("Content-ID") or "").strip("<>") or None})
    return props, atts


def request_json(ctx):
    if ctx.req.body.strip() == b"":
        return {}
    return ctx.req.json()


@route("POST", r"/v1\.0/me/messages", "graph_create")
@graph_handler
def create_message(ctx):
    return post_draft(ctx, ctx.folder("drafts"))


@route("POST", FOLDER + r"/messages", "graph_create")
@graph_handler
def create_message_in_folder(ctx, fid, fid_quoted):
    return post_draft(ctx, ctx.folder(fid or fid_quoted))


def post_draft(ctx, f):
    ctx.need_write()
    if (ctx.req.header("Content-Type") or "").lower().startswith("text/plain"):
        props, specs = parse_mime(ctx)
        ext = None
    else:
        props, ext, specs = draft_fields(ctx.sim, request_json(ctx))
    msg = create_draft(ctx, f["id"], props, ext, specs)
    return message_entity(ctx, msg, 201)


@route("PATCH", MESSAGE, "graph_patch")
@graph_handler
def patch_message(ctx, mid):
    ctx.need_write()
    msg = ctx.message(mid)
    data = ctx.req.json()
    if not isinstance(data, dict):
        raise GraphError(400, "BadRequest", "Unable to read JSON request payload.")
    draft = msg["props"]["isDraft"]
    bad = [k for k in data if k not in PATCHABLE and k != "singleValueExtendedProperties"
           and not (draft and k in MESSAGE_PROPS)]
    if bad:
        raise GraphError(400, "ErrorInvalidPropertyUpdateSentMessage",
                         f"Update operation is not supported for property '{bad[0]}' of a sent message.")
    if "isRead" in data and not isinstance(data["isRead"], bool):
        raise GraphError(400, "BadRequest", "Cannot convert the literal to the expected type 'Edm.Boolean'.")
    changes, ext, _ = draft_fields(ctx.sim, data, for_patch=True)
    ext_changed = False
    if ext is not None:
        msg["ext"], ext_changed = merge_ext(msg.get("ext"), ext)
    changed = ctx.mb.update(msg, changes)
    detail = {"changes": changed}
    if ext_changed:
        detail["extended_properties"] = {e["id"]: e["value"] for e in ext}
    count_write(ctx, msg, "patch", bool(changed) or ext_changed, detail)
    if "return=minimal" in ctx.req.header("Prefer", ""):
        return Response(204)
    return message_entity(ctx, msg)


@route("POST", MESSAGE + r"/move", "graph_move")
@graph_handler
def move_message(ctx, mid):
    ctx.need_write()
    msg = ctx.message(mid)
    data = ctx.req.json() if ctx.req.body else {}
    dest = data.get("destinationId") if isinstance(data, dict) else None
    if not dest:
        raise GraphError(400, "ErrorInvalidIdMalformed", "Id is malformed.")
    f = ctx.folder(dest)
    moved = msg["folder"] != f["id"]
    ctx.mb.move(msg, f["id"])
    count_write(ctx, msg, "move", moved, {"to": ctx.mb.folder_name(f["id"])})
    return message_entity(ctx, msg, 201)


@route("DELETE", MESSAGE, "graph_delete")
@graph_handler
def delete_message(ctx, mid):
    ctx.need_write()
    msg = ctx.message(mid)
    # Soft delete into Recoverable Items: gone from every visible folder.
    ctx.mb.move(msg, ctx.mb.folder("recoverableitemsdeletions")["id"])
    count_write(ctx, msg, "delete", True)       # it existed (else 404 above): always effective
    return Response(204)


# -- sending -------------------------------------------------------------------------

def all_recipients(p):
    return [r["emailAddress"]["address"] for f in ("toRecipients", "ccRecipients", "bccRecipients")
            for r in p.get(f) or ()]


def check_sendable(sim, msg):
    p = msg["props"]
    n = len(all_recipients(p))
    if n == 0:
        raise GraphError(400, "ErrorInvalidRecipients", "At least one recipient isn't valid., A message "
                         "can't be sent because it contains no recipients.")
    if n > sim.config["max_recipients"]:
        raise GraphError(400, "ErrorTooManyRecipients", f"The message has {n} recipients; the maximum "
                         f"number of recipients per message is {sim.config['max_recipients']}.")
    if message_size(msg) > sim.config["max_message_size"]:
        raise GraphError(400, "ErrorMessageSizeExceeded", "The message exceeds the maximum supported size.")


def deliver(ctx, msg, via):
    """The delivery log: what left the mailbox, once per accepted send."""
    sim, p = ctx.sim, msg["props"]
    addrs = lambda f: [r["emailAddress"]["address"] for r in p.get(f) or ()]   # noqa: E731
    entry = {"seq": len(sim.deliveries) + 1, "t": iso(sim.now()), "via": via,
             "mailbox": ctx.user["upn"], "client_id": ctx.at["client_id"],
             "sender": (p.get("from") or {}).get("emailAddress", {}).get("address"),
             "message_id": msg["imm"] if msg.get("stored", True) else None,
             "internetMessageId": p["internetMessageId"], "conversationId": p["conversationId"],
             "subject": p["subject"], "to": addrs("toRecipients"), "cc": addrs("ccRecipients"),
             "bcc": addrs("bccRecipients"), "recipients": len(all_recipients(p)),
             "markers": {e["id"]: e["value"] for e in msg.get("ext") or ()},
             "headers": list(p.get("internetMessageHeaders") or ()),
             "in_reply_to": msg.get("in_reply_to"),
             "body_sha256": hashlib.sha256(p["body"]["content"].encode("utf-8", "surrogatepass")).hexdigest(),
             "size": message_size(msg), "atts": list(msg.get("atts") or ())}
    sim.deliveries.append(entry)
    sim.counters["sends"] += 1


def mark_sent(ctx, msg):
    me = {"emailAddress": {"name": ctx.user["name"], "address": ctx.user.get("mail") or ctx.user["upn"]}}
    now = iso(ctx.sim.now())
    sender = msg["props"].get("from") or me
    return {"isDraft": False, "isRead": True, "from": sender, "sender": sender,
            "sentDateTime": now, "receivedDateTime": now}


@route("POST", MESSAGE + r"/send", "graph_send")
@graph_handler
def send_message(ctx, mid):
    ctx.need_send()
    msg = ctx.mb.find(mid)
    if msg is None or not msg["props"]["isDraft"]:
        # A draft that was sent is no draft any more: Graph answers as for a missing item.
        raise GraphError(404, "itemNotFound", "The specified object was not found in the store., "
                         "The process failed to get the correct properties.")
    check_sendable(ctx.sim, msg)
    ctx.mb.update(msg, mark_sent(ctx, msg))
    ctx.mb.move(msg, ctx.mb.folder("sentitems")["id"])
    count_write(ctx, msg, "send", True)
    deliver(ctx, msg, "send")
    return Response(202, b"", None)


@route("POST", r"/v1\.0/me/sendMail", "graph_sendmail")
@graph_handler
def send_mail(ctx):
    ctx.need_send()
    if (ctx.req.header("Content-Type") or "").lower().startswith("text/plain"):
        props, specs = parse_mime(ctx)
        ext, save = None, True
    else:
        data = request_json(ctx)
        message = data.get("message") if isinstance(data, dict) else None
        if not isinstance(message, dict):
            raise GraphError(400, "ErrorInvalidParameter", "The value of the parameter 'Message' is empty.")
        props, ext, specs = draft_fields(ctx.sim, message)
        save = data.get("saveToSentItems", True)
        if isinstance(save, str):
            save = save.lower() != "false"
    msg = create_draft(ctx, ctx.mb.folder("sentitems")["id"], props, ext, specs, count=False)
    try:
        check_sendable(ctx.sim, msg)
    except GraphError:
        ctx.mb.purge(msg)           # nothing was stored: the request failed as a whole
        raise
    # Made in Sent Items directly: no draft ever shows in a delta.
    msg["props"].update(mark_sent(ctx, msg))
    deliver(ctx, msg, "sendMail")
    if not save:
        msg["stored"] = False
        ctx.sim.deliveries[-1]["message_id"] = None
        ctx.mb.purge(msg)
        ctx.mb.removals.pop()       # never visible: no @removed either
    return Response(202, b"", None)


def reply_draft(ctx, mid, reply_all):
    ctx.need_write()
    orig = ctx.message(mid)
    data = request_json(ctx)
    if not isinstance(data, dict):
        raise bad_request("Unable to read JSON request payload.")
    o = orig["props"]
    mine = {a.lower() for a in (ctx.user["upn"], ctx.user.get("mail")) if a}
    seen = set()

    def keep(rs):
        out = []
        for r in rs or ():
            a = r["emailAddress"]["address"].lower()
            if a not in mine and a not in seen:
                seen.add(a)
                out.append(r)
        return out

    to = keep(o.get("replyTo") or ([o["from"]] if o.get("from") else []))
    cc = []
    if reply_all:
        to += keep(o.get("toRecipients"))
        cc = keep(o.get("ccRecipients"))
    subject = o["subject"] if o["subject"].lower().startswith("re:") else "RE: " + o["subject"]
    frm = (o.get("from") or {}).get("emailAddress", {})
    quoted = (f'<div>{html.escape(str(data.get("comment") or ""))}</div><hr>'
              f'<div><b>From:</b> {html.escape(frm.get("name") or "")} &lt;{html.escape(frm.get("address") or "")}&gt;'
              f'<br><b>Sent:</b> {o["sentDateTime"]}<br><b>Subject:</b> {html.escape(o["subject"])}</div>'
              + re.sub(r"(?is)^.*?<body[^>]*>|</body>.*$", "", o["body"]["content"]))
    props, ext, specs = draft_fields(ctx.sim, data.get("message") or {})
    extra = {"subject": subject, "toRecipients": to, "ccRecipients": cc,
             "conversationId": o["conversationId"],
             "conversationIndex": base64.b64encode(base64.b64decode(o["conversationIndex"])
                                                   + secrets.token_bytes(5)).decode(),
             "body": {"contentType": "html", "content": wrap_html(quoted)}}
    msg = create_draft(ctx, ctx.mb.folder("drafts")["id"], props, ext, specs, extra)
    msg["in_reply_to"] = o["internetMessageId"]
    return message_entity(ctx, msg, 201)


@route("POST", MESSAGE + r"/createReply", "graph_create")
@graph_handler
def create_reply(ctx, mid):
    return reply_draft(ctx, mid, False)


@route("POST", MESSAGE + r"/createReplyAll", "graph_create")
@graph_handler
def create_reply_all(ctx, mid):
    return reply_draft(ctx, mid, True)


# -- attachments ---------------------------------------------------------------------

def find_attachment(ctx, msg, aid):
    att = next((a for a in msg.get("atts") or () if a["id"] == aid), None)
    if att is None:
        raise GraphError(404, "ErrorItemNotFound", "The attachment was not found.")
    return att


def attachment_select(req):
    raw = req.query.get("$select")
    if not raw:
        return None
    out = set()
    for n in (s.strip() for s in raw.split(",")):
        base = n.split("/")[-1]
        if base.lower() == "id":
            continue
        match = next((p for p in ATT_PROPS if p.lower() == base.lower()), None)
        if match is None:
            raise GraphError(400, "RequestBroker--ParseUri",
                             f"Could not find a property named '{n}' on type 'microsoft.graph.attachment'.")
        out.add(match)
    return out


def stream_json(ctx, parts, status=200):
    resp = Response(status, b"", "application/json; charset=utf-8")
    resp.stream(parts, ctx.sim)
    return resp


@route("GET", MESSAGE + r"/attachments", "graph_attachments")
@graph_handler
def list_attachments(ctx, mid):
    if ctx.need_read():
        raise GraphError(403, "ErrorAccessDenied", DENIED)     # Mail.ReadBasic: no attachments
    msg = ctx.message(mid)
    select = attachment_select(ctx.req)
    ctx_url = odata(ctx.sim, f"users('{ctx.user['oid']}')/messages('{quote(mid, safe='')}')/attachments")
    parts = ['{"@odata.context": ' + json.dumps(ctx_url) + ', "value": [']
    for i, att in enumerate(msg.get("atts") or ()):
        if i:
            parts.append(", ")
        parts += attachment_parts(att, select, beta=ctx.req.beta)
    parts.append("]}")
    return stream_json(ctx, parts)


ATTACHMENT = MESSAGE + r"/attachments/([^/]+)"


@route("GET", ATTACHMENT, "graph_attachment")
@graph_handler
def get_attachment(ctx, mid, aid):
    if ctx.need_read():
        raise GraphError(403, "ErrorAccessDenied", DENIED)
    att = find_attachment(ctx, ctx.message(mid), aid)
    expand = (ctx.req.query.get("$expand") or "").lower().replace(" ", "")
    parts = attachment_parts(att, attachment_select(ctx.req),
                             expand_item=expand.endswith("itemattachment/item"), beta=ctx.req.beta)
    ctx_url = odata(ctx.sim, f"users('{ctx.user['oid']}')/messages('{quote(mid, safe='')}')/attachments/$entity")
    parts[0] = '{"@odata.context": ' + json.dumps(ctx_url) + ", " + parts[0][1:]
    return stream_json(ctx, parts)


@route("GET", ATTACHMENT + r"/\$value", "graph_attachment_value")
@graph_handler
def get_attachment_value(ctx, mid, aid):
    if ctx.need_read():
        raise GraphError(403, "ErrorAccessDenied", DENIED)
    att = find_attachment(ctx, ctx.message(mid), aid)
    if att["kind"] == "reference":
        raise GraphError(405, "ErrorInvalidRequest", "The raw contents of a reference attachment "
                         "cannot be read.")
    if att["kind"] == "item":
        return Response(200, item_mime(att["item"]), "message/rfc822")
    resp = Response(200, b"", att["contentType"] or "application/octet-stream")
    resp.stream([("raw", att)], ctx.sim)
    return resp


@route("POST", MESSAGE + r"/attachments", "graph_attach")
@graph_handler
def post_attachment(ctx, mid):
    ctx.need_write()
    msg = ctx.message(mid)
    att = make_attachment(ctx.sim, request_json(ctx))
    add_attachment(ctx, msg, att)
    return stream_json(ctx, attachment_parts(att), 201)


@route("DELETE", ATTACHMENT, "graph_detach")
@graph_handler
def delete_attachment(ctx, mid, aid):
    ctx.need_write()
    msg = ctx.message(mid)
    att = find_attachment(ctx, msg, aid)
    msg["atts"].remove(att)
    ctx.mb.update(msg, {"hasAttachments": has_attachments(msg)})
    count_write(ctx, msg, "detach", True, {"name": att["name"]})
    return Response(204)


UPLOAD = r"/api/v2\.0/Users\('([^']+)'\)/Messages\('([^']+)'\)/AttachmentSessions\('([^']+)'\)"
UPLOAD_MIN = 3 << 20            # under 3 MB: POST .../attachments instead


@route("POST", MESSAGE + r"/attachments/createUploadSession", "graph_upload_session")
@graph_handler
def create_upload_session(ctx, mid):
    ctx.need_write()
    sim = ctx.sim
    msg = ctx.message(mid)
    data = request_json(ctx)
    item = data.get("AttachmentItem") or data.get("attachmentItem") if isinstance(data, dict) else None
    if not isinstance(item, dict) or str(item.get("attachmentType", "file")).lower() != "file":
        raise bad_request("The AttachmentItem parameter with attachmentType 'file' is required.",
                          "ErrorInvalidParameter")
    try:
        size = int(item.get("size"))
    except (TypeError, ValueError):
        raise bad_request("The AttachmentItem size is required.", "ErrorInvalidParameter")
    if not item.get("name"):
        raise bad_request("The AttachmentItem name is required.", "ErrorInvalidParameter")
    if size < UPLOAD_MIN:
        raise GraphError(400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
                         "Attachment size must be greater than the minimum size.")
    if message_size(msg) + size > sim.config["max_message_size"]:
        raise GraphError(400, "ErrorMessageSizeExceeded", "The message exceeds the maximum supported size.")
    sid = graph_item_id("AAMkAGI2TUpLAAA")
    token = b64url(secrets.token_bytes(48))
    expires = sim.now() + sim.config["upload_session_lifetime"]
    sim.uploads[sid] = {"token": token, "oid": ctx.user["oid"], "msg": msg["imm"], "name": item["name"],
                        "size": size, "isInline": bool(item.get("isInline", False)),
                        "contentId": item.get("contentId"),
                        "contentType": item.get("contentType") or "application/octet-stream",
                        "received": 0, "path": sim.spill_path(), "expires_at": expires,
                        "client_id": ctx.at["client_id"], "mid": mid}
    url = (f"{sim.base}/api/v2.0/Users('{ctx.user['oid']}@{ctx.user['tenant_id']}')/Messages('{mid}')"
           f"/AttachmentSessions('{sid}')?authtoken={token}")
    return json_response(201, {"@odata.context": odata(sim, "microsoft.graph.uploadSession"),
                               "uploadUrl": url, "expirationDateTime": iso(expires),
                               "nextExpectedRanges": ["0-"]})


CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+)\s*$", re.I)


def upload_error(status, code, message, headers=None):
    return GraphError(status, code, message, headers)


def upload_state(sim, sess, who, mid, sid, status=200):
    return json_response(status, {
        "@odata.context": f"{sim.base}/api/v2.0/$metadata#Users('{quote(who, safe='')}')/Messages("
                          f"'{quote(mid, safe='')}')/AttachmentSessions/$entity",
        "ExpirationDateTime": iso(sess["expires_at"]), "nextExpectedRanges": [str(sess["received"])]})


def upload_session(sim, req, sid):
    """The session of a pre-authenticated upload URL (no Authorization header: the token is in it)."""
    if req.header("Authorization"):
        raise upload_error(401, "InvalidAuthenticationToken", "The upload URL is pre-authenticated: "
                           "do not send an Authorization header with it.")
    sess = sim.uploads.get(sid)
    if sess is None or not hmac.compare_digest(req.query.get("authtoken", ""), sess["token"]):
        raise upload_error(404, "ErrorItemNotFound", "The upload session was not found.")
    if sess["expires_at"] <= sim.now():
        raise upload_error(401, "InvalidAuthenticationToken", "The upload session has expired.")
    return sess


def upload_handler(fn):
    """Upload URLs are Outlook's (outlook.office.com), not Graph's: no bearer token, no Graph
    concurrency slot; scenarios (endpoint graph, path AttachmentSessions) still apply."""
    def wrapper(sim, req, who, mid, sid):
        with sim.lock:
            sess = upload_session(sim, req, sid)
            user = sim.users.get(sess["oid"]) or {"upn": "", "oid": sess["oid"]}
        sc = graph_scenario(sim, req, user, sess["client_id"])
        try:
            with sim.lock:
                return fn(sim, req, sess, who, mid, sid)
        finally:
            if sc and sc.get("action") != "replay":
                after_scenario(sim, sc)
    wrapper.__name__ = fn.__name__
    return wrapper


@route("GET", UPLOAD, "graph_upload")
@upload_handler
def upload_get(sim, req, sess, who, mid, sid):
    return upload_state(sim, sess, who, mid, sid)


@route("DELETE", UPLOAD, "graph_upload")
@upload_handler
def upload_cancel(sim, req, sess, who, mid, sid):
    sim.uploads.pop(sid, None)
    with contextlib.suppress(OSError):
        os.unlink(sess["path"])
    return Response(204)


@route("PUT", UPLOAD, "graph_upload")
@upload_handler
def upload_put(sim, req, sess, who, mid, sid):
    if req.too_large:
        raise request_too_large(sim)
    m = CONTENT_RANGE_RE.match(req.header("Content-Range") or "")
    if not m:
        raise upload_error(400, "ErrorInvalidRequest", "The Content-Range header is missing or malformed; "
                           "expected 'bytes {start}-{end}/{total}'.")
    start, end, total = (int(x) for x in m.groups())
    if total != sess["size"]:
        raise upload_error(400, "ErrorInvalidRequest", f"The total size {total} differs from the size "
                           f"{sess['size']} of the upload session.")
    if start != sess["received"] or end < start or end >= total:
        raise upload_error(416, "ErrorInvalidRange", f"The range {start}-{end} is not the next expected "
                           f"range: upload from byte {sess['received']} in order.")
    if len(req.body) != end - start + 1:
        raise upload_error(400, "ErrorInvalidRequest", f"The request has {len(req.body)} bytes; the "
                           f"Content-Range announces {end - start + 1}.")
    multiple = sim.config["upload_chunk_multiple"]
    if multiple and end + 1 < total and len(req.body) % multiple:
        raise upload_error(400, "ErrorInvalidRequest", f"A fragment other than the last must be a "
                           f"multiple of {multiple} bytes.")
    with open(sess["path"], "ab") as f:
        f.write(req.body)
    sess["received"] = end + 1
    sim.counters["upload_bytes"] += len(req.body)
    if sess["received"] < total:
        return upload_state(sim, sess, who, mid, sid)
    # The last byte: the file becomes an attachment of the item (which must still exist).
    del sim.uploads[sid]
    mb = sim.mailbox(sess["oid"])
    msg = mb.find(sess["msg"])
    if msg is None:
        raise upload_error(404, "ErrorItemNotFound", "The item of the upload session no longer exists.")
    att = {"id": graph_item_id("AAMkAGI2THVSAAABEgAQA"), "kind": "file", "name": sess["name"],
           "contentType": sess["contentType"], "isInline": sess["isInline"],
           "contentId": sess["contentId"], "contentLocation": None,
           "lastModifiedDateTime": iso(sim.now()), "sha256": None, "src": "file",
           "path": sess["path"], "size": total}
    msg.setdefault("atts", []).append(att)
    mb.update(msg, {"hasAttachments": has_attachments(msg)})
    count_write(sim, msg, "attach", True, {"name": att["name"]})
    sim.counters["uploads_completed"] += 1
    location = (f"{sim.base}/api/v2.0/Users('{who}')/Messages('{mid}')/Attachments('{att['id']}')")
    return Response(201, b"", None, {"Location": location})     # no body, no Content-Type


def request_too_large(sim):
    return GraphError(int(sim.config["request_too_large_status"]), "RequestEntityTooLarge",
                      "Maximum request length exceeded.")



# ---------------------------------------------------------------------------
# Graph: message delta
# ---------------------------------------------------------------------------

FILTER_RE = re.compile(r"^\s*receivedDateTime\s+(ge|gt)\s+(\S+)\s*$", re.I)


def delta_items(mb, cur, since, replay):
    """The entries of one delta round: ("full"|"update"|"removed", imm, extra)."""
    fid = cur["folder"]
    lower = cur.get("filter")

    def passes(msg):
        if not lower:
            return True
        op, ts = lower
        t = parse_time(msg["props"]["receivedDateTime"])
        return t >= ts if op == "ge" else t > ts

    if since is not None and since >= mb.seq and not replay:
        return []       # nothing changed anywhere in the mailbox: an idle round costs O(1)
    msgs = [m for m in mb.in_folder(fid) if passes(m)]
    if since is None:
        if cur.get("orderby"):
            msgs.sort(key=lambda m: m["props"]["receivedDateTime"], reverse=True)
        else:           # no $orderby: order not guaranteed; insertion order keeps clients honest
            msgs.sort(key=lambda m: m["entered"])
        return [("full", m["imm"], None) for m in msgs]
    entries = []        # (seq, entry)
    ct = cur.get("change_type")
    for m in msgs:
        if m["entered"] > since:
            if ct in (None, "created"):
                entries.append((m["entered"], ("full", m["imm"], None)))
        else:
            changed = [p for p, s in m["changed"].items() if s > since]
            if changed and ct in (None, "updated"):
                entries.append((max(m["changed"][p] for p in changed), ("update", m["imm"], changed)))
    if ct in (None, "deleted"):
        for seq, f, imm, rest in mb.removals:
            if f == fid and seq > since:
                entries.append((seq, ("removed", imm, rest)))
    entries.sort(key=lambda e: e[0])
    items = [e for _, e in entries]
    if replay:          # Graph may send an item again; clients must be idempotent
        newest = sorted(msgs, key=lambda m: m["props"]["receivedDateTime"], reverse=True)
        items += [("full", m["imm"], None) for m in newest[:int(replay.get("count", 3))]]
    return items


def delta_url(ctx, fid, key, token):
    return ctx.link(f"/mailFolders('{fid}')/messages/delta?{key}={token}")


def initial_options_query(cur):
    q = {}
    if cur.get("select"):
        q["$select"] = ",".join(cur["select"])
    if cur.get("filter_raw"):
        q["$filter"] = cur["filter_raw"]
    if cur.get("orderby"):
        q["$orderby"] = "receivedDateTime desc"
    if cur.get("change_type"):
        q["changeType"] = cur["change_type"]
    return urlencode(q, safe="$,")


@route("GET", FOLDER + r"/messages/delta", "graph_delta")
@graph_handler
def message_delta(ctx, fid, fid_quoted):
    sim, req, mb = ctx.sim, ctx.req, ctx.mb
    ctx.basic = ctx.need_read()
    f = ctx.folder(fid or fid_quoted)
    skip, delta = req.query.get("$skiptoken"), req.query.get("$deltatoken")
    if skip is not None:                         # next page of a round in progress
        state = sim.cursors.get(skip)
        if state is None or state["type"] != "skip" or state["cursor"]["oid"] != ctx.user["oid"]:
            raise GraphError(400, "syncStateNotFound", "The sync state generation is not found.")
        cur, items, pos = state["cursor"], state["items"], state["pos"]
    elif delta:                                  # a new round from a stored deltaLink
        cur = sim.cursors.get(delta)
        if cur is None or cur["type"] != "delta" or cur["oid"] != ctx.user["oid"]:
            raise GraphError(400, "syncStateNotFound", "The sync state generation is not found.")
        if cur.get("expired") == "gone":
            location = (ctx.link(f"/mailFolders('{cur['folder']}')/messages/delta?$deltatoken=")
                        + ("&" + initial_options_query(cur) if initial_options_query(cur) else ""))
            raise GraphError(410, "resyncRequired", "The delta token is no longer valid, and the "
                             "app must reset the sync state.", {"Location": location})
        if cur.get("expired"):
            raise GraphError(400, cur["expired"], "The sync state generation is not found.")
        items = delta_items(mb, cur, cur["since"], ctx.replay)
        cur = dict(cur, type="round", round_seq=mb.seq)
        pos = 0
    else:                                        # initial round: options are read only here
        cur = {"type": "round", "oid": ctx.user["oid"], "folder": f["id"],
               "select": select_param(req, MESSAGE_PROPS), "round_seq": mb.seq}
        flt = req.query.get("$filter")
        if flt:
            m = FILTER_RE.match(flt)
            if not m:
                raise GraphError(400, "ErrorInvalidUrlQueryFilter",
                                 "The query filter contains one or more invalid nodes.")
            cur["filter"], cur["filter_raw"] = (m.group(1).lower(), parse_time(m.group(2))), flt
        orderby = req.query.get("$orderby")
        if orderby:
            if orderby.strip().lower() != "receiveddatetime desc":
                raise GraphError(400, "ErrorInvalidUrlQuery",
                                 "The query parameter '$orderby' is invalid for delta: only "
                                 "receivedDateTime desc is supported.")
            cur["orderby"] = True
        if req.query.get("changeType"):
            cur["change_type"] = req.query["changeType"].lower()
        cur["page_size"] = req.query.get("$top")
        items = delta_items(mb, cur, None, ctx.replay)
        pos = 0
    # Page size: the Prefer header of this request, else the initial $top, else the default.
    size = ctx.prefer.get("odata.maxpagesize") or cur.get("page_size") or sim.config["default_page_size"]
    size = max(1, min(int(size), int(sim.config["max_page_size"])))
    if "odata.maxpagesize" in ctx.prefer:
        ctx.applied.append(f"odata.maxpagesize={size}")
    # Entries are JSON texts (full ones joined from per-property texts, see Mailbox.frags),
    # joined into the page below: rendering and serialising dominate a 100k-message round.
    select = tuple(cur["select"]) if cur.get("select") else None
    plan = entry_plan(select, ctx.immutable, ctx.text_body, ctx.basic)
    value, end = [], pos
    while end < len(items) and len(value) < size:
        kind, imm, extra = items[end]
        end += 1
        if kind == "removed":
            value.append(json.dumps({"@odata.type": "#microsoft.graph.message",
                                     "id": imm if ctx.immutable else extra,
                                     "@removed": {"reason": "deleted"}}))
            continue
        msg = mb.messages.get(imm)
        if msg is None or msg["folder"] != cur["folder"]:
            continue        # changed again since the round started; the next round reports it
        if kind == "update":
            value.append(json.dumps(dict({"@odata.type": "#microsoft.graph.message"},
                                         **ctx.render(msg, select, extra))))
        else:
            value.append(mb.delta_entry_json(msg, plan))
    if end < len(items):
        token = secrets.token_urlsafe(24)
        # A client retries the last nextLink it got, never an older one: keep the page just
        # served and the new one, so a 100k-item round doesn't pin 1,000 cursors.
        if skip is not None and state.get("prev"):
            sim.cursors.pop(state["prev"], None)
        sim.cursors[token] = {"type": "skip", "cursor": cur, "items": items, "pos": end, "prev": skip}
        link = ("@odata.nextLink", delta_url(ctx, cur["folder"], "$skiptoken", token))
    else:
        if skip is not None and state.get("prev"):
            sim.cursors.pop(state["prev"], None)
        token = secrets.token_urlsafe(32)
        sim.cursors[token] = {k: v for k, v in cur.items() if k not in ("type", "round_seq")}
        sim.cursors[token].update(type="delta", since=cur["round_seq"], created=sim.now())
        link = ("@odata.deltaLink", delta_url(ctx, cur["folder"], "$deltatoken", token))
    # Same text json.dumps would give for {"@odata.context", "value", link}.
    body = "".join(('{"@odata.context": ', json.dumps(odata(sim, "Collection(message)")),
                    ', "value": [', ", ".join(value), "], ", json.dumps(link[0]), ": ",
                    json.dumps(link[1]), "}"))
    return Response(200, body, "application/json; charset=utf-8")


# ---------------------------------------------------------------------------
# Control API (/_sim/...): JSON in, JSON out
# ---------------------------------------------------------------------------

def control_body(req):
    try:
        data = json.loads(req.body or b"{}")
    except ValueError:
        raise GraphError(400, "BadRequest", "body is not JSON")
    if not isinstance(data, dict):
        raise GraphError(400, "BadRequest", "body must be a JSON object")
    return data


def public_app(app):
    return dict(app, secrets=[dict(s, expires_at=iso(s["expires_at"])) for s in app["secrets"]],
                certificates=[public_certificate(c) for c in app.get("certificates") or ()])


def control_user(sim, key):
    user = sim.find_user(key)
    if user is None:
        raise GraphError(404, "NotFound", f"no user {key}")
    return user


@route("GET", r"/_sim/state", "control")
def ctl_state(sim, req):
    with sim.lock:
        return json_response(200, {
            "base_url": sim.base, "config": sim.config, "clock_offset": sim.clock_offset,
            "default": {"client_id": DEFAULT_CLIENT_ID, "client_secret": sim.default_secret["value"],
                        "tenant_id": DEFAULT_TENANT, "users": [u["upn"] for u in DEFAULT_USERS]},
            "tenants": list(sim.tenants.values()), "users": list(sim.users.values()),
            "apps": [public_app(a) for a in sim.apps.values()], "keys": sim.keys.describe(),
            "scenarios": sim.scenarios})


@route("POST", r"/_sim/reset", "control")
def ctl_reset(sim, req):
    sim.reset()
    return json_response(200, {"ok": True})


@route("POST", r"/_sim/config", "control")
def ctl_config(sim, req):
    data = control_body(req)
    unknown = [k for k in data if k not in DEFAULT_CONFIG]
    if unknown:
        raise GraphError(400, "BadRequest", f"unknown config keys: {unknown}")
    with sim.lock:
        sim.config.update(data)
        return json_response(200, sim.config)


@route("POST", r"/_sim/clock", "control")
def ctl_clock(sim, req):
    data = control_body(req)
    with sim.lock:
        if "offset" in data:
            sim.clock_offset = float(data["offset"])
        sim.clock_offset += float(data.get("advance", 0))
        return json_response(200, {"clock_offset": sim.clock_offset, "now": iso(sim.now())})


@route("POST", r"/_sim/tenants", "control")
def ctl_add_tenant(sim, req):
    with sim.lock:
        return json_response(201, sim.add_tenant(control_body(req)))


@route("POST", r"/_sim/apps", "control")
def ctl_add_app(sim, req):
    try:
        with sim.lock:
            return json_response(201, public_app(sim.add_app(control_body(req))))
    except ValueError as e:
        raise GraphError(400, "BadRequest", str(e))


@route("DELETE", r"/_sim/apps/([^/]+)", "control")
def ctl_delete_app(sim, req, client_id):
    with sim.lock:
        sim.apps.pop(client_id.lower(), None)
    return Response(204)


@route("POST", r"/_sim/apps/([^/]+)/secrets", "control")
def ctl_add_secret(sim, req, client_id):
    data = control_body(req)
    with sim.lock:
        app = sim.apps.get(client_id.lower())
        if app is None:
            raise GraphError(404, "NotFound", f"no app {client_id}")
        s = {"value": data.get("value") or "Sim8Q~" + secrets.token_urlsafe(27), "id": data.get("id") or guid(),
             "expires_at": parse_time(data.get("expires_at")) or sim.now() + 180 * 86400}
        app["secrets"].append(s)
        return json_response(201, dict(s, expires_at=iso(s["expires_at"])))


@route("DELETE", r"/_sim/apps/([^/]+)/secrets/([^/]+)", "control")
def ctl_delete_secret(sim, req, client_id, secret_id):
    with sim.lock:
        app = sim.apps.get(client_id.lower())
        if app:
            app["secrets"] = [s for s in app["secrets"] if s["id"] != secret_id]
    return Response(204)


@route("POST", r"/_sim/users", "control")
def ctl_add_user(sim, req):
    try:
        with sim.lock:
            return json_response(201, sim.add_user(control_body(req)))
    except ValueError as e:
        raise GraphError(400, "BadRequest", str(e))


@route("DELETE", r"/_sim/users/([^/]+)", "control")
def ctl_delete_user(sim, req, key):
    with sim.lock:
        user = control_user(sim, key)
        sim.remove_user(user["oid"])
    return Response(204)


@route("GET", r"/_sim/scenarios", "control")
def ctl_scenarios(sim, req):
    with sim.lock:
        return json_response(200, {"scenarios": sim.scenarios})


@route("POST", r"/_sim/scenarios", "control")
def ctl_add_scenarios(sim, req):
    data = control_body(req)
    items = data.get("scenarios", [data])
    for sc in items:
        if sc.get("endpoint") not in ("authorize", "token", "graph"):
            raise GraphError(400, "BadRequest", "endpoint must be authorize, token or graph")
        sc.setdefault("times", 1)
    with sim.lock:
        sim.scenarios.extend(items)
        return json_response(201, {"scenarios": sim.scenarios})


@route("DELETE", r"/_sim/scenarios", "control")
def ctl_clear_scenarios(sim, req):
    with sim.lock:
        sim.scenarios.clear()
    return Response(204)


@route("POST", r"/_sim/revoke", "control")
def ctl_revoke(sim, req):
    """Kill a user's refresh tokens with a given AADSTS reason (700082, 50173, 70043, 50076...)."""
    data = control_body(req)
    code = int(data.get("code", 50173))
    with sim.lock:
        user = control_user(sim, data.get("user") or data.get("oid"))
        n = 0
        for rec in sim.rts.values():
            if rec["oid"] == user["oid"] and data.get("client_id", rec["client_id"]).lower() == rec["client_id"]:
                rec["revoked"] = code
                n += 1
        if data.get("access_tokens"):
            for at in sim.ats.values():
                if at["oid"] == user["oid"]:
                    at["revoked"] = True
        return json_response(200, {"revoked": n, "code": code})


@route("POST", r"/_sim/tokens/expire", "control")
def ctl_expire_tokens(sim, req):
    """Expire access tokens (and/or outstanding codes) now, e.g. to force a refresh."""
    data = control_body(req)
    kinds = data.get("kinds", ["access"])
    with sim.lock:
        user = control_user(sim, data["user"]) if data.get("user") else None
        n = 0
        if "access" in kinds:
            for at in sim.ats.values():
                if user is None or at["oid"] == user["oid"]:
                    at["expires_at"] = sim.now() - 1
                    n += 1
        if "code" in kinds:
            for c in sim.codes.values():
                c["expires_at"] = sim.now() - 1
                n += 1
        return json_response(200, {"expired": n})


@route("POST", r"/_sim/keys/rotate", "control")
def ctl_rotate_keys(sim, req):
    """mode: add (publish a new key), activate (newest or kid signs), remove_old, full (all three)."""
    data = control_body(req)
    mode = data.get("mode", "full")
    with sim.lock:
        if mode in ("add", "full"):
            sim.keys.add()
        if mode in ("activate", "full"):
            try:
                sim.keys.activate(data.get("kid"))
            except KeyError:
                raise GraphError(404, "NotFound", f"no key {data.get('kid')}")
        if mode in ("remove_old", "full"):
            sim.keys.remove_old()
        return json_response(200, sim.keys.describe())


@route("GET", r"/_sim/counters", "control")
def ctl_counters(sim, req):
    return json_response(200, sim.counters_view())


@route("GET", r"/_sim/log", "control")
def ctl_log(sim, req):
    with sim.lock:
        # "dropped": entries that fell out (--log-max) since the last clear, so a
        # reader can tell a complete log from the tail of one.
        return json_response(200, {"requests": list(sim.log), "dropped": sim.log_dropped})


@route("DELETE", r"/_sim/log", "control")
def ctl_clear_log(sim, req):
    with sim.lock:
        sim.log.clear()
        sim.log_dropped = 0
    return Response(204)


def summarize(mb, msg):
    out = {"id": msg["imm"], "rest_id": msg["rest"], "folder": mb.folder_name(msg["folder"]),
           "subject": msg["props"]["subject"], "isRead": msg["props"]["isRead"],
           "receivedDateTime": msg["props"]["receivedDateTime"], "writes": msg.get("writes", [])}
    if msg.get("atts"):
        out["attachments"] = [{"id": a["id"], "name": a["name"], "kind": a["kind"], "size": a["size"],
                               "isInline": a["isInline"]} for a in msg["atts"]]
    return out


@route("GET", r"/_sim/mailbox/([^/]+)", "control")
def ctl_mailbox(sim, req, key):
    with sim.lock:
        user = control_user(sim, key)
        mb = sim.mailbox(user["oid"])
        folders = {f["wk"] or f["id"]: {"id": f["id"], "count": len(mb.in_folder(f["id"]))}
                   for f in mb.folders.values()}
        msgs = sorted(mb.messages.values(), key=lambda m: m["props"]["receivedDateTime"], reverse=True)
        return json_response(200, {"user": user, "folders": folders,
                                   "messages": [summarize(mb, m) for m in msgs]})


def seed_message(sim, mb, fid, m):
    """One message of POST /_sim/mailbox/{user}/messages: Graph properties, plus
    `body_bytes` (a body of that many bytes, made cheaply), `attachments` (file, item,
    reference: see make_attachment), `singleValueExtendedProperties`, `to`/`cc` (addresses)."""
    if not isinstance(m, dict):
        raise ValueError("each message must be an object")
    m = dict(m)
    for k in ("from", "sender"):
        if isinstance(m.get(k), str):
            m[k] = {"emailAddress": {"name": m[k], "address": m[k]}}
    for short, field in (("to", "toRecipients"), ("cc", "ccRecipients")):
        if short in m:
            m[field] = [{"emailAddress": {"name": a, "address": a}} for a in m.pop(short)]
    if isinstance(m.get("body"), str):
        m["body"] = {"contentType": "html", "content": m["body"]}
    preview = None
    if m.get("body_bytes") is not None:
        n = int(m["body_bytes"])
        head, tail = "<html><body><p>", "</p></body></html>"
        content = head + filler(max(0, n - len(head) - len(tail))) + tail
        m["body"] = {"contentType": "html", "content": content}
        preview = strip_tags(content[:4096])[:255]
    elif isinstance(m.get("body"), dict) and len(m["body"].get("content") or "") > 65536:
        preview = strip_tags(m["body"]["content"][:4096])[:255]
    atts = [make_attachment(sim, a) for a in m.get("attachments") or ()]
    ext = clean_ext(m["singleValueExtendedProperties"]) if m.get("singleValueExtendedProperties") else None
    msg = mb.add(fid, m, preview)
    if atts:
        msg["atts"] = atts
        if "hasAttachments" not in m:       # Graph: false when only inline attachments exist
            msg["props"]["hasAttachments"] = has_attachments(msg)
    if ext:
        msg["ext"] = ext
    return msg


@route("POST", r"/_sim/mailbox/([^/]+)/messages", "control")
def ctl_add_messages(sim, req, key):
    """{"folder":"inbox","count":N,"unread_every":1,"newest":ISO,"spacing_minutes":37}
    or {"folder":"inbox","messages":[{subject, from, receivedDateTime, isRead, body, ...}]}."""
    data = control_body(req)
    big = int(data.get("count", 0)) >= 1000 or len(data.get("messages", [])) >= 1000
    with sim.lock, bulk_mode(big):
        user = control_user(sim, key)
        mb = sim.mailbox(user["oid"])
        folder = data.get("folder", "inbox")
        try:
            if "messages" in data:
                f = mb.folder(folder)
                if f is None:
                    raise ValueError(f"unknown folder {folder}")
                made = [seed_message(sim, mb, f["id"], m) for m in data["messages"]]
            else:
                made = sim.seed(mb, folder, int(data.get("count", 1)),
                                unread_every=int(data.get("unread_every", 1)),
                                newest=data.get("newest"),
                                spacing=float(data.get("spacing_minutes", 37)) * 60,
                                subject_prefix=data.get("subject_prefix"))
        except (ValueError, TypeError) as e:
            raise GraphError(400, "BadRequest", str(e))
        return json_response(201, {"messages": [summarize(mb, m) for m in made]})


@route("POST", r"/_sim/mailbox/([^/]+)/messages/([^/]+)", "control")
def ctl_change_message(sim, req, key, mid):
    """{"isRead": bool, ...props} and/or {"move_to": folder}: changes as if made in Outlook."""
    data = control_body(req)
    with sim.lock:
        user = control_user(sim, key)
        mb = sim.mailbox(user["oid"])
        msg = mb.find(mid)
        if msg is None:
            raise GraphError(404, "NotFound", f"no message {mid}")
        props = {k: v for k, v in data.items() if k in MESSAGE_PROPS}
        if props:
            mb.update(msg, props)
        if data.get("move_to"):
            f = mb.folder(data["move_to"])
            if f is None:
                raise GraphError(400, "BadRequest", f"unknown folder {data['move_to']}")
            mb.move(msg, f["id"])
        return json_response(200, summarize(mb, msg))


@route("DELETE", r"/_sim/mailbox/([^/]+)/messages/([^/]+)", "control")
def ctl_delete_message(sim, req, key, mid):
    with sim.lock:
        user = control_user(sim, key)
        mb = sim.mailbox(user["oid"])
        msg = mb.find(mid, include_hidden=True)
        if msg is None:
            raise GraphError(404, "NotFound", f"no message {mid}")
        mb.purge(msg)
    return Response(204)


@route("POST", r"/_sim/bulk/accounts", "control")
def ctl_bulk_accounts(sim, req):
    """{client_id, count, prefix:"bench", domain:"contoso.com", scopes, messages:0, start:0}:
    users {prefix}{i:05d}@{domain} in the default tenant, each signed in to the app as if an
    authorization-code grant for `scopes` had just been redeemed (same token records, scopes
    and lifetimes; no ID token). An existing user of that upn is reused (new tokens, no new
    messages). Seconds for 10,000 accounts, instead of 10,000 sign-ins."""
    data = control_body(req)
    count, start = int(data.get("count", 1)), int(data.get("start", 0))
    prefix, domain = data.get("prefix", "bench"), data.get("domain", "contoso.com")
    scopes = data.get("scopes") or "openid profile email offline_access https://graph.microsoft.com/Mail.ReadWrite"
    messages = int(data.get("messages", 0))
    if count < 0 or messages < 0:
        raise GraphError(400, "BadRequest", "count and messages must be >= 0")
    with sim.lock, bulk_mode(count * (messages + 1) >= 1000):
        app = sim.apps.get((data.get("client_id") or DEFAULT_CLIENT_ID).lower())
        if app is None:
            raise GraphError(404, "NotFound", f"no app {data.get('client_id')}")
        tenant = sim.tenants[DEFAULT_TENANT]
        if not user_allowed(app, "tenant", tenant, {"tenant_id": DEFAULT_TENANT}):
            raise GraphError(400, "BadRequest", f"app {app['client_id']} does not accept users of "
                             f"the default tenant")
        try:
            parse_scopes(scopes)
        except AadError as e:
            raise GraphError(400, "BadRequest", f"scopes: AADSTS{e.code}: {e.text}")
        by_upn = {u["upn"].lower(): u for u in sim.users.values()}     # find_user is a scan
        accounts = []
        for i in range(start, start + count):
            upn = f"{prefix}{i:05d}@{domain}"
            user = by_upn.get(upn.lower())
            new = user is None
            if new:
                user = sim.add_user({"tenant_id": DEFAULT_TENANT, "upn": upn,
                                     "name": f"{prefix.capitalize()} {i:05d}"})
            try:
                body = issue_tokens(sim, app, user, scopes, scopes, None, with_id_token=False)
            except AadError as e:      # the scopes themselves: the first account fails, no other
                if new:
                    sim.remove_user(user["oid"])
                raise GraphError(400, "BadRequest", f"scopes: AADSTS{e.code}: {e.text}")
            if new and messages:
                sim.seed(sim.mailbox(user["oid"]), "inbox", messages)
            accounts.append({"upn": user["upn"], "oid": user["oid"], "name": user["name"],
                             "refresh_token": body.get("refresh_token"),
                             "access_token": body["access_token"],
                             "expires_in": body["expires_in"], "scope": body["scope"]})
        sim.dirty = True
        return json_response(201, {"accounts": accounts})


@route("POST", r"/_sim/delta/expire", "control")
def ctl_expire_delta(sim, req):
    """mode: "gone" (410 + Location), "syncStateNotFound" or "resyncRequired" (400)."""
    data = control_body(req)
    mode = data.get("mode", "gone")
    with sim.lock:
        user = control_user(sim, data["user"]) if data.get("user") else None
        n = 0
        for cur in sim.cursors.values():
            if cur["type"] == "delta" and (user is None or cur["oid"] == user["oid"]):
                cur["expired"] = mode
                n += 1
        return json_response(200, {"expired": n, "mode": mode})


# -- control API: apps' certificates and application permissions ------------------------

def control_app(sim, client_id):
    app = sim.apps.get(client_id.lower())
    if app is None:
        raise GraphError(404, "NotFound", f"no app {client_id}")
    return app


@route("POST", r"/_sim/apps/([^/]+)/certificates", "control")
def ctl_add_certificate(sim, req, client_id):
    """{pem (or der: base64), id?, expires_at?} -> the certificate's id and thumbprints."""
    data = control_body(req)
    with sim.lock:
        app = control_app(sim, client_id)
        try:
            cert = make_certificate(sim, data)
        except ValueError as e:
            raise GraphError(400, "BadRequest", str(e))
        app.setdefault("certificates", []).append(cert)
        sim.dirty = True
        return json_response(201, public_certificate(cert))


@route("DELETE", r"/_sim/apps/([^/]+)/certificates/([^/]+)", "control")
def ctl_delete_certificate(sim, req, client_id, cert_id):
    with sim.lock:
        app = control_app(sim, client_id)
        app["certificates"] = [c for c in app.get("certificates") or () if c["id"] != cert_id
                               and c["thumbprint"] != cert_id.upper()]
    return Response(204)


@route("POST", r"/_sim/apps/([^/]+)/app_roles", "control")
def ctl_app_roles(sim, req, client_id):
    """Admin consent to application permissions in a tenant: {tenant_id? (the app's home),
    resource: graph|outlook|URI, roles: [...]} replaces that resource's roles; roles [] is a
    consent without permissions (a service principal in that tenant)."""
    data = control_body(req)
    with sim.lock:
        app = control_app(sim, client_id)
        tid = (data.get("tenant_id") or app["home_tenant"]).lower()
        tenant = sim.tenants.get(tid) or next((t for t in sim.tenants.values() if tid in t["domains"]), None)
        if tenant is None or tenant["id"] == MSA_TENANT:
            raise GraphError(400, "BadRequest", f"unknown tenant {tid}")
        resource = resource_of(data.get("resource", "graph"))
        if resource is None:
            raise GraphError(400, "BadRequest", f"unknown resource {data.get('resource')}")
        known = GRAPH_ROLES if resource == GRAPH else OUTLOOK_ROLES
        roles = []
        for r in data.get("roles") or []:
            name = next((k for k in known if k.lower() == str(r).lower()), None)
            if name is None:
                raise GraphError(400, "BadRequest", f"unknown application permission {r} for {resource}")
            roles.append(name)
        grants = app.setdefault("app_roles", {}).setdefault(tenant["id"], {})
        grants[resource] = roles
        sim.dirty = True
        return json_response(200, {"client_id": app["client_id"], "app_roles": app["app_roles"]})


# -- control API: shared mailboxes, permissions, application access policies ---------------

@route("POST", r"/_sim/mailboxes", "control")
def ctl_add_mailbox(sim, req):
    """A shared mailbox (no person, no sign-in): {address, tenant_id?, display_name?, oid?, messages?}."""
    data = control_body(req)
    if not data.get("address"):
        raise GraphError(400, "BadRequest", "address is required")
    with sim.lock:
        try:
            user = sim.add_user({"upn": data["address"], "mail": data["address"], "kind": "shared",
                                 "tenant_id": data.get("tenant_id"), "oid": data.get("oid"),
                                 "name": data.get("display_name")})
        except ValueError as e:
            raise GraphError(400, "BadRequest", str(e))
        if data.get("messages"):
            sim.seed(sim.mailbox(user["oid"]), "inbox", int(data["messages"]))
        return json_response(201, user)


@route("POST", r"/_sim/bulk/mailboxes", "control")
def ctl_bulk_mailboxes(sim, req):
    """{count, prefix:"shared", domain:"contoso.com", tenant_id?, messages:0, start:0} ->
    {mailboxes:[{address, oid}]}: shared mailboxes {prefix}{i:05d}@{domain}."""
    data = control_body(req)
    count, start = int(data.get("count", 1)), int(data.get("start", 0))
    prefix, domain = data.get("prefix", "shared"), data.get("domain", "contoso.com")
    messages = int(data.get("messages", 0))
    with sim.lock, bulk_mode(count * (messages + 1) >= 1000):
        out = []
        for i in range(start, start + count):
            address = f"{prefix}{i:05d}@{domain}"
            user = sim.find_user(address)
            if user is None:
                try:
                    user = sim.add_user({"upn": address, "kind": "shared", "tenant_id": data.get("tenant_id"),
                                         "name": f"{prefix.capitalize()} {i:05d}"})
                except ValueError as e:
                    raise GraphError(400, "BadRequest", str(e))
                if messages:
                    sim.seed(sim.mailbox(user["oid"]), "inbox", messages)
            out.append({"address": user["upn"], "oid": user["oid"]})
        sim.dirty = True
        return json_response(201, {"mailboxes": out})


def grantee(sim, key):
    """A user (oid/upn) or an app (client_id: Exchange service principal, IMAP/SMTP app-only)."""
    app = sim.apps.get((key or "").lower())
    if app is not None:
        return "app:" + app["client_id"]
    return control_user(sim, key)["oid"]


@route("POST", r"/_sim/mailbox/([^/]+)/permissions", "control")
def ctl_add_permission(sim, req, key):
    """Add-MailboxPermission / Add-RecipientPermission: {user (oid, upn or an app's client_id),
    rights: "FullAccess" | ["FullAccess", "SendAs"]}."""
    data = control_body(req)
    rights = data.get("rights", "FullAccess")
    rights = [rights] if isinstance(rights, str) else list(rights)
    bad = [r for r in rights if r not in ("FullAccess", "SendAs")]
    if bad:
        raise GraphError(400, "BadRequest", f"unknown rights {bad}: FullAccess or SendAs")
    with sim.lock:
        mbx = control_user(sim, key)
        who = grantee(sim, data.get("user"))
        have = sim.permissions.setdefault(mbx["oid"], {}).setdefault(who, [])
        have.extend(r for r in rights if r not in have)
        sim.dirty = True
        return json_response(201, {"mailbox": mbx["upn"], "permissions": sim.permissions[mbx["oid"]]})


@route("GET", r"/_sim/mailbox/([^/]+)/permissions", "control")
def ctl_permissions(sim, req, key):
    with sim.lock:
        mbx = control_user(sim, key)
        return json_response(200, {"mailbox": mbx["upn"], "permissions": sim.permissions.get(mbx["oid"], {})})


@route("DELETE", r"/_sim/mailbox/([^/]+)/permissions/([^/]+)", "control")
def ctl_delete_permission(sim, req, key, who):
    with sim.lock:
        mbx = control_user(sim, key)
        sim.permissions.get(mbx["oid"], {}).pop(grantee(sim, who), None)
    return Response(204)


@route("POST", r"/_sim/access_policies", "control")
def ctl_add_access_policy(sim, req):
    """New-ApplicationAccessPolicy: {client_id, mailboxes:[upn|oid], mode: RestrictAccess|DenyAccess}."""
    data = control_body(req)
    mode = data.get("mode", "RestrictAccess")
    if mode not in ("RestrictAccess", "DenyAccess"):
        raise GraphError(400, "BadRequest", "mode must be RestrictAccess or DenyAccess")
    with sim.lock:
        app = control_app(sim, data.get("client_id") or "")
        oids = [control_user(sim, m)["oid"] for m in data.get("mailboxes") or []]
        pol = {"id": data.get("id") or guid(), "client_id": app["client_id"], "mode": mode, "mailboxes": oids}
        sim.access_policies = [p for p in sim.access_policies if p["id"] != pol["id"]] + [pol]
        sim.policy_sets.pop(pol["id"], None)
        sim.dirty = True
        return json_response(201, pol)


@route("GET", r"/_sim/access_policies", "control")
def ctl_access_policies(sim, req):
    with sim.lock:
        return json_response(200, {"policies": sim.access_policies})


@route("DELETE", r"/_sim/access_policies(?:/([^/]+))?", "control")
def ctl_delete_access_policies(sim, req, pid=None):
    with sim.lock:
        sim.access_policies = [p for p in sim.access_policies if pid is not None and p["id"] != pid]
        sim.policy_sets.clear()
    return Response(204)


# -- control API: what a token is, what an IMAP/SMTP server would say to it ----------------

def describe_token(sim, token):
    at = sim.ats.get(token or "")
    if at is None:
        return {"active": False, "reason": "unknown token"}
    now = sim.now()
    user = sim.users.get(at["oid"]) if at.get("oid") else None
    out = {"active": not at.get("revoked") and at["expires_at"] > now,
           "kind": "app" if at.get("app_only") else "delegated", "client_id": at["client_id"],
           "tid": at["tid"], "resource": at["resource"], "aud": at.get("aud") or at["resource"],
           "iat": int(at["issued_at"]), "exp": int(at["expires_at"]),
           "expired": at["expires_at"] <= now, "revoked": bool(at.get("revoked"))}
    if at.get("app_only"):
        out["roles"] = list(at["roles"])
    else:
        out["scp"] = " ".join(at["scopes"])
        out.update(oid=at["oid"], upn=user["upn"] if user else None)
    return out


@route("POST", r"/_sim/introspect", "control")
def ctl_introspect(sim, req):
    """{token} -> {active, kind: delegated|app, aud, resource, scp | roles, oid, upn, tid, client_id,
    iat, exp, expired, revoked}."""
    data = control_body(req)
    with sim.lock:
        return json_response(200, describe_token(sim, data.get("token")))


XOAUTH2_NEEDS = {   # protocol -> (delegated scope, application permission, mailbox right)
    "imap": ("IMAP.AccessAsUser.All", "IMAP.AccessAsApp", "FullAccess"),
    "pop": ("POP.AccessAsUser.All", "POP.AccessAsApp", "FullAccess"),
    "smtp": ("SMTP.Send", "SMTP.SendAsApp", "SendAs"),
}
XOAUTH2_ANSWERS = {
    "imap": ("OK AUTHENTICATE completed.", "NO AUTHENTICATE failed."),
    "pop": ("+OK User successfully authenticated.", "-ERR Authentication failure: unknown user name or bad password."),
    "smtp": ("235 2.7.0 Authentication successful", "535 5.7.3 Authentication unsuccessful"),
}


def xoauth2_check(sim, protocol, mailbox, token):
    """-> None (accepted) or the reason Exchange would refuse this SASL XOAUTH2 login."""
    at = sim.ats.get(token or "")
    if at is None or at.get("revoked") or at["expires_at"] <= sim.now():
        return "token unknown, expired or revoked"
    if at["resource"] != OUTLOOK:
        return f"token audience is {at.get('aud') or at['resource']}, not Exchange Online (outlook.office.com)"
    scope, role, right = XOAUTH2_NEEDS[protocol]
    target = sim.find_user(mailbox)
    if target is None or target["tenant_id"] != at["tid"]:
        return f"no mailbox {mailbox} in the token's tenant"
    if at.get("app_only"):
        if role not in at["roles"]:
            return f"the app token lacks the {role} permission"
        if "FullAccess" not in sim.rights(target["oid"], "app:" + at["client_id"]):
            return "the app's service principal has no FullAccess on the mailbox"
        return None
    if scope.lower() not in {s.lower() for s in at["scopes"]}:
        return f"the token lacks the {scope} scope"
    if target["oid"] != at["oid"] and right not in sim.rights(target["oid"], at["oid"]):
        return f"the signed-in user has no {right} right on {mailbox}"
    return None


@route("POST", r"/_sim/xoauth2", "control")
def ctl_xoauth2(sim, req):
    """What Exchange answers to AUTHENTICATE XOAUTH2 (IMAP, POP) or AUTH XOAUTH2 (SMTP):
    {protocol: imap|pop|smtp, sasl: base64("user=" mailbox ^A "auth=Bearer " token ^A^A)} or
    {protocol, user, token} -> {ok, user, response, reason?}. Not a mail server: a check of the
    token the module would present."""
    data = control_body(req)
    protocol = str(data.get("protocol", "imap")).lower()
    if protocol not in XOAUTH2_NEEDS:
        raise GraphError(400, "BadRequest", "protocol must be imap, pop or smtp")
    user, token, reason = data.get("user"), data.get("token"), None
    if data.get("sasl") is not None:
        try:
            raw = base64.b64decode(data["sasl"], validate=True).decode("utf-8")
            if not raw.endswith("\x01\x01"):
                raise ValueError("no ^A^A at the end")
            fields = dict(f.split("=", 1) for f in raw[:-2].split("\x01"))
            user = fields["user"]
            auth = fields["auth"]
            if not auth.startswith("Bearer "):
                raise ValueError("auth is not 'Bearer <token>'")
            token = auth[7:]
        except (ValueError, KeyError, UnicodeDecodeError) as e:
            reason = f"malformed XOAUTH2 initial response: {e}"
    with sim.lock:
        reason = reason or xoauth2_check(sim, protocol, user, token)
        sim.counters.setdefault("xoauth2", {}).setdefault(protocol, 0)
        sim.counters["xoauth2"][protocol] += 1
    ok, bad = XOAUTH2_ANSWERS[protocol]
    out = {"ok": reason is None, "user": user, "response": ok if reason is None else bad}
    if reason:
        out["reason"] = reason
    return json_response(200, out)


# -- control API: deliveries, message details, attachments "in Outlook" -----------------

def public_delivery(d):
    out = {k: v for k, v in d.items() if k != "atts"}
    out["attachments"] = [control_attachment(a) for a in d["atts"]]
    return out


@route("GET", r"/_sim/deliveries", "control")
def ctl_deliveries(sim, req):
    """Every accepted send: ?marker=V (an extended property value), ?internetMessageId=, ?mailbox=."""
    with sim.lock:
        items = list(sim.deliveries)
    q = req.query
    if q.get("marker") is not None:
        items = [d for d in items if q["marker"] in d["markers"].values()]
    if q.get("internetMessageId"):
        items = [d for d in items if d["internetMessageId"] == q["internetMessageId"]]
    if q.get("mailbox"):
        items = [d for d in items if d["mailbox"].lower() == q["mailbox"].lower()]
    by_imid, by_marker = {}, {}
    for d in items:
        by_imid[d["internetMessageId"]] = by_imid.get(d["internetMessageId"], 0) + 1
        for v in d["markers"].values():
            by_marker[v] = by_marker.get(v, 0) + 1
    return json_response(200, {"count": len(items), "deliveries": [public_delivery(d) for d in items],
                               "by_internet_message_id": by_imid, "by_marker": by_marker})


@route("DELETE", r"/_sim/deliveries", "control")
def ctl_clear_deliveries(sim, req):
    with sim.lock:
        sim.deliveries.clear()
    return Response(204)


def control_message(sim, key, mid):
    user = control_user(sim, key)
    mb = sim.mailbox(user["oid"])
    msg = mb.find(mid, include_hidden=True)
    if msg is None:
        raise GraphError(404, "NotFound", f"no message {mid}")
    return mb, msg


@route("GET", r"/_sim/mailbox/([^/]+)/messages/([^/]+)", "control")
def ctl_message(sim, req, key, mid):
    """One message in full: properties, extended properties, attachments with sha256."""
    with sim.lock:
        mb, msg = control_message(sim, key, mid)
        out = summarize(mb, msg)
        p = msg["props"]
        out.update({k: p.get(k) for k in ("isDraft", "hasAttachments", "internetMessageId", "conversationId",
                                          "from", "sender", "toRecipients", "ccRecipients", "bccRecipients",
                                          "internetMessageHeaders", "body", "bodyPreview", "sentDateTime",
                                          "changeKey")})
        out["singleValueExtendedProperties"] = list(msg.get("ext") or ())
        out["in_reply_to"] = msg.get("in_reply_to")
        atts = list(msg.get("atts") or ())
    out["attachments"] = [control_attachment(a) for a in atts]     # hashing outside the lock
    return json_response(200, out)


@route("POST", r"/_sim/mailbox/([^/]+)/messages/([^/]+)/attachments", "control")
def ctl_add_attachment(sim, req, key, mid):
    """Attach a file/item/reference "in Outlook" (same spec as seeding)."""
    data = control_body(req)
    with sim.lock:
        mb, msg = control_message(sim, key, mid)
        att = make_attachment(sim, data)
        msg.setdefault("atts", []).append(att)
        mb.update(msg, {"hasAttachments": has_attachments(msg)})
        return json_response(201, control_attachment(att, sha=False))


@route("DELETE", r"/_sim/mailbox/([^/]+)/messages/([^/]+)/attachments/([^/]+)", "control")
def ctl_delete_attachment(sim, req, key, mid, aid):
    """Remove an attachment "in Outlook" (e.g. from a draft being written)."""
    with sim.lock:
        mb, msg = control_message(sim, key, mid)
        before = len(msg.get("atts") or ())
        msg["atts"] = [a for a in msg.get("atts") or () if a["id"] != aid]
        if len(msg["atts"]) == before:
            raise GraphError(404, "NotFound", f"no attachment {aid}")
        mb.update(msg, {"hasAttachments": has_attachments(msg)})
    return Response(204)


# Routes are tried in order and no two patterns match the same path: the hottest (a delta
# page, the token endpoint, write-back) go first, so a request does not try 70 patterns before it.
ROUTES.sort(key=lambda r: {"graph_delta": 0, "token": 1, "graph_patch": 2, "graph_move": 2, "graph_get": 2,
                           "graph_delete": 2}.get(r[2], 3))


# ---------------------------------------------------------------------------
# HTTP plumbing
# ---------------------------------------------------------------------------

def graph_error_response(e, req):
    body = {"error": {"code": e.code, "message": e.message,
                      "innerError": {"date": iso(time.time()), "request-id": req.request_id,
                                     "client-request-id": req.client_request_id}}}
    return json_response(e.status, body, e.headers)


def aad_error_response(sim, e, req):
    now = time.time()
    corr = req.header("client-request-id")
    corr = corr if corr and GUID_RE.match(corr) else guid()
    trace = guid()
    body = {"error": e.error,
            "error_description": (f"AADSTS{e.code}: {e.text}\r\nTrace ID: {trace}\r\n"
                                  f"Correlation ID: {corr}\r\nTimestamp: {aad_timestamp(now)}"),
            "error_codes": [e.code], "timestamp": aad_timestamp(now), "trace_id": trace,
            "correlation_id": corr, "error_uri": f"https://login.microsoftonline.com/error?code={e.code}"}
    sim.count("aad_errors", str(e.code))
    return json_response(e.status, body, dict(e.headers, **{"Cache-Control": "no-store"}))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"      # keep-alive, as libcurl uses it
    # Small answers sent after the headers would wait for the client's delayed ACK (~40 ms per
    # call) under Nagle's algorithm; send() writes each answer in one piece anyway.
    disable_nagle_algorithm = True

    def version_string(self):
        return "mssim"

    def log_message(self, fmt, *args):     # the request log lives in /_sim/log
        if self.server.verbose:
            sys.stderr.write("mssim: " + fmt % args + "\n")

    def read_body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    body = b"".join(chunks)
                    if self.limit is not None and len(body) > self.limit:
                        self.too_large = True
                        return b""
                    return body
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        if self.limit is not None and n > self.limit:
            while n > 0:            # over Graph's request limit: drain it, keep nothing
                n -= len(self.rfile.read(min(n, 1 << 20)) or b"\0" * n)
            self.too_large = True
            return b""
        return self.rfile.read(n) if n > 0 else b""

    def dispatch(self):
        sim = self.server.sim
        started = time.time()
        # Graph (and Outlook's upload URLs) refuse request bodies over 4 MB.
        self.too_large = False
        self.limit = (int(sim.config["request_size_limit"])
                      if self.path.startswith(("/v1.0/", "/beta/", "/api/")) else None)
        req = Request(self.command, self.path, self.headers, self.read_body())
        req.too_large = self.too_large
        req.request_id = guid()
        req.client_request_id = req.header("client-request-id") or req.request_id
        m = re.match(r"/beta(/.*)\Z", req.path)
        if m:       # beta serves the same resources (attachments show more)
            req.beta, req.path = True, "/v1.0" + m.group(1)
        m = re.match(r"/v1\.0/users/([^/]+)(/.*)?\Z", req.path)
        if m:       # /users/{id|upn}/... is /me/... for the signed-in user
            req.graph_user, req.path = m.group(1), "/v1.0/me" + (m.group(2) or "")
        kind, resp = "unknown", None
        try:
            handler, groups, kind = self.find_route(req)
            if handler is None:
                resp = self.not_found(req, kind)
            else:
                if (kind != "control" and sim.config.get("latency_ms")
                        and not req.path.startswith(("/v1.0/", "/oidc/"))):
                    time.sleep(float(sim.config["latency_ms"]) / 1000)
                resp = handler(sim, req, *groups)
        except Dropped:             # a scenario cuts the connection: no answer at all
            self.close_connection = True
            self.record(req, kind, None, started)
            return
        except Abandoned:
            self.close_connection = True
            return
        except AadError as e:
            resp = aad_error_response(sim, e, req)
        except PageError as e:
            resp = error_page(e.code, e.text, e.status)
        except GraphError as e:
            resp = graph_error_response(e, req)
        except Exception as e:      # a simulator bug: say so loudly, keep serving
            traceback.print_exc()
            resp = json_response(500, {"error": {"code": "simulatorBug", "message": repr(e)}})
        if req.path.startswith(("/v1.0/", "/oidc/")):
            resp.headers.setdefault("request-id", req.request_id)
            resp.headers.setdefault("client-request-id", req.client_request_id)
            resp.headers.setdefault("x-ms-ags-diagnostic",
                                    '{"ServerInfo":{"DataCenter":"Simulated","Slice":"E","Ring":"5"}}')
        elif kind != "control":
            resp.headers.setdefault("x-ms-request-id", req.request_id)
        self.record(req, kind, resp, started)
        self.send(resp)

    def find_route(self, req):
        path_matched = False
        for method, rx, kind, fn in ROUTES:
            m = rx.match(req.path)
            if m:
                path_matched = True
                if method == req.method:
                    return fn, m.groups(), kind
        return None, (), "method_not_allowed" if path_matched else "not_found"

    def not_found(self, req, kind):
        status = 405 if kind == "method_not_allowed" else 404
        if req.path.startswith("/v1.0/"):
            code = "BadRequest" if status == 405 else "UnknownError"
            raise GraphError(status if status == 405 else 400, code,
                             f"Unsupported request: {req.method} {req.path}" if status == 405
                             else f"Resource not found for the segment '{req.path.rsplit('/', 1)[-1]}'.")
        return json_response(status, {"error": "not_found", "path": req.path, "method": req.method})

    def record(self, req, kind, resp, started):
        sim = self.server.sim
        with sim.lock:
            if kind != "control":
                sim.count("calls", kind)
                sim.dirty = True
                entry = {"t": round(started, 3), "method": req.method, "path": req.orig_path,
                         "query": redact_query(req.query_string), "status": resp.status if resp else 0,
                         "kind": kind, "ms": round((time.time() - started) * 1000, 1)}
                if resp is None:
                    entry["dropped"] = True
                if req.path.startswith("/v1.0/"):
                    entry.update(client_request_id=req.header("client-request-id"),
                                 prefer=req.header("Prefer"))
                entry.update(req.log_extra)
                if req.header("Origin"):
                    entry["origin"] = req.header("Origin")
                sim.log.append(entry)
                if len(sim.log) > sim.log_max:
                    sim.log_dropped += len(sim.log) - sim.log_max
                    del sim.log[:-sim.log_max]

    def send(self, resp):
        """Status line, headers and body in one write (one TCP segment train, no Nagle stall)."""
        self.log_request(resp.status, len(resp.body))
        phrase = self.responses.get(resp.status, ("",))[0]
        head = [f"{self.protocol_version} {resp.status} {phrase}", f"Server: {self.version_string()}",
                f"Date: {self.date_time_string()}"]
        for k, v in resp.headers.items():
            head.append(f"{k}: {v}")
            if k.lower() == "connection" and v.lower() == "close":
                self.close_connection = True
        head.append(f"Content-Length: {len(resp.body) if resp.parts is None else resp.length}")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1", "strict")
        try:
            if resp.parts is None:
                self.wfile.write(data + resp.body if self.command != "HEAD" else data)
                return
            self.wfile.write(data)
            sent = 0
            for chunk in iter_parts(resp.parts):
                self.wfile.write(chunk)
                sent += len(chunk)
            with resp.sim.lock:
                resp.sim.counters["attachment_bytes_served"] += sent
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True    # the client gave up (e.g. a timeout test)

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = dispatch


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256    # listen backlog: a benchmark opens hundreds of connections at once


def save_loop(sim):
    while True:
        time.sleep(1)
        if sim.dirty:
            try:
                sim.save()
            except OSError as e:
                print(f"mssim: cannot save state: {e}", file=sys.stderr, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Microsoft identity platform + Graph mail simulator")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1", help="loopback only (127.0.0.1 or localhost)")
    ap.add_argument("--state-file", help="keep apps, users, tokens and mailboxes across restarts")
    ap.add_argument("--latency-ms", type=float, default=0, help="delay added to every non-control call")
    ap.add_argument("--demo", action="store_true",
                    help="seed the default mailboxes and print the default app's credentials")
    ap.add_argument("--verbose", action="store_true", help="log each request to stderr")
    ap.add_argument("--log-max", type=int, default=5000,
                    help="requests kept in /_sim/log (older ones are dropped and counted)")
    args = ap.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost"):
        ap.error("mssim listens on loopback only: --host 127.0.0.1")

    httpd = Server(("127.0.0.1", args.port), Handler)
    port = httpd.server_address[1]
    base = f"http://127.0.0.1:{port}"
    httpd.sim = Sim(base, args.state_file, args.latency_ms, args.demo)
    httpd.sim.log_max = max(args.log_max, 1)
    httpd.verbose = args.verbose
    if args.state_file:
        threading.Thread(target=save_loop, args=(httpd.sim,), daemon=True).start()

    def stop(signum, frame):
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, stop)

    if args.demo:
        print(f"demo client_id: {DEFAULT_CLIENT_ID}")
        print(f"demo client_secret: {httpd.sim.default_secret['value']}")
        print(f"demo tenant: {DEFAULT_TENANT} (users: {', '.join(u['upn'] for u in DEFAULT_USERS)})")
    print(f"mssim listening on {base}", flush=True)
    try:
        httpd.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        httpd.sim.save()
        httpd.server_close()


if __name__ == "__main__":
    main()
