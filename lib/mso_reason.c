#include <string.h>

#include "mso_reason.h"

static const mso_reason_t reasons[] = {
    {"not_configured", 404, "This company is not set up for Outlook",
     "mod_msoauth has no Microsoft app credentials for the requested company on this server.",
     "An administrator sets MSOAuthClientID, MSOAuthClientSecret(File) and "
     "MSOAuthTokenKeyFile for the company (or in the main server configuration) and reloads "
     "httpd. Check the company= parameter of the Connect link."},
    {"bad_request", 400, "The request is not valid",
     "A parameter of the request is missing or not acceptable.",
     "Use the Connect link the application offers; return_to must be a path on this site "
     "such as /mail/settings, and mailbox an e-mail address."},
    {"state_invalid", 400, "This sign-in cannot be completed",
     "The sign-in state did not match: the link was already used (a reload or a double click), "
     "was opened in another browser, or the cookies of this site are blocked.",
     "Start again from the Connect link, in the same browser, and allow cookies for this site. "
     "If the mailbox already shows as connected, nothing more is needed."},
    {"state_expired", 400, "The sign-in took too long",
     "More than 10 minutes passed between the Connect link and the return from Microsoft.",
     "Start again from the Connect link and finish the Microsoft sign-in within 10 minutes."},
    {"access_denied", 403, "The sign-in was cancelled",
     "The person signing in cancelled, or declined the permissions the app asked for.",
     "Start again from the Connect link and accept the permissions. If your organisation "
     "does not allow that, ask an administrator to grant consent for the app."},
    {"consent_required", 403, "Permission to the mailbox was not granted",
     "Microsoft needs consent to the app's permissions (Mail.Read or Mail.ReadWrite, "
     "offline_access) before it can issue tokens.",
     "Start again and accept the permissions, or have an administrator open the app in the "
     "Entra admin center, API permissions, and click Grant admin consent."},
    {"admin_consent_required", 403, "An administrator must approve this app",
     "Your organisation does not let users consent to apps: Microsoft showed \"Need admin "
     "approval\" (AADSTS65001 / 90094).",
     "A Global or Application Administrator opens the app registration in the Entra admin "
     "center, API permissions, and clicks Grant admin consent for the organisation; then "
     "connect again."},
    {"redirect_uri_mismatch", 400, "The redirect URI is not registered",
     "Microsoft refused the redirect URI because it is not registered on the app "
     "(AADSTS50011). Scheme, host, port, path and case must match exactly.",
     "In the Entra admin center open the app, Authentication, platform Web, and add exactly "
     "%R. Behind a TLS proxy set MSOAuthBaseURL to the public https:// address."},
    {"invalid_client_secret", 502, "The app's client secret is wrong",
     "Microsoft refused the client secret (AADSTS7000215). A frequent cause is the Secret ID "
     "pasted instead of the secret's Value.",
     "Create a new client secret under Certificates & secrets, copy its Value (not the Secret "
     "ID), put it into MSOAuthClientSecret or MSOAuthClientSecretFile and reload httpd."},
    {"client_secret_expired", 502, "The app's client secret has expired",
     "Microsoft refused the client secret because it expired (AADSTS7000222).",
     "Create a new client secret under Certificates & secrets, deploy its Value, update "
     "MSOAuthSecretExpires, reload httpd, then delete the old secret."},
    {"app_not_found", 502, "Microsoft does not know this app",
     "The Application (client) ID was not found in the directory used for sign-in "
     "(AADSTS700016): a wrong client ID, tenant or cloud.",
     "Check MSOAuthClientID against the app's Overview page, MSOAuthTenant and MSOAuthCloud; "
     "an app registered in one organisation needs to be multi-tenant to be used by another."},
    {"wrong_tenant", 403, "This account cannot sign in to this app",
     "The account belongs to a directory the app does not accept, or the app is single-tenant "
     "and was used through /common (AADSTS50194, 50020).",
     "For a single-tenant app set MSOAuthTenant to its Directory (tenant) ID; to accept other "
     "organisations or personal accounts change Supported account types on the app."},
    {"mailbox_mismatch", 409, "A different mailbox signed in",
     "The account that signed in at Microsoft is not the mailbox the application asked for.",
     "Start again and sign in as the requested mailbox (use \"Use another account\" on "
     "Microsoft's page if a different account is remembered)."},
    {"id_token_invalid", 502, "Microsoft's answer could not be verified",
     "The ID token from the token endpoint failed validation (signature, issuer, audience, "
     "nonce or time).",
     "Check that the server clock is correct (NTP) and that MSOAuthAuthorityURL, MSOAuthCloud "
     "and MSOAuthTenant point at the right Microsoft cloud. Start again; if it persists, see "
     "the error log for the failed check."},
    {"token_endpoint_unreachable", 504, "Microsoft's sign-in service could not be reached",
     "The call to Microsoft's token endpoint failed or timed out, or Microsoft answered with "
     "a temporary error.",
     "Try again in a few minutes. If it persists, check that this server can reach the "
     "Microsoft sign-in host over HTTPS (DNS, firewall, proxy)."},
    {"reconnect_required", 409, "The mailbox must be connected again",
     "Microsoft no longer accepts the stored refresh token (expired after 90 days unused, "
     "revoked by a password reset or an administrator, or a new MFA / Conditional Access "
     "requirement).",
     "Use the Reconnect link for this mailbox and sign in once more."},
    {"read_only", 403, "Changes cannot be written back to Outlook",
     "The mailbox was connected with read-only permission (Mail.Read).",
     "Set MSOAuthEdition pro for the company, reload httpd and reconnect the mailbox so "
     "Microsoft grants Mail.ReadWrite."},
    {"throttled", 503, "Microsoft is throttling this mailbox",
     "Microsoft Graph answered 429/503 and asked to wait (Retry-After).",
     "Nothing to do: the module waits as asked and continues by itself."},
    {"graph_error", 502, "Microsoft Graph returned an error",
     "A call to Microsoft Graph failed.",
     "See the account's last_error and the error log for Graph's error code and request-id; "
     "transient errors clear by themselves."},
    {"not_found", 404, "Not found",
     "The account, message or attachment asked for does not exist (or no longer exists in "
     "Outlook).",
     "Check the identifiers the application sends; a message deleted or moved in Outlook "
     "leaves the mirror at the next sync."},
    {"account_not_found", 404, "No such account",
     "The account ID the application sent names no account of this server.",
     "Read the account IDs from msoauth_accounts (or the status JSON) and send one of them."},
    {"message_not_found", 404, "The message is not in the mirror",
     "The message was never mirrored, or it was deleted or moved out of the mirrored folders.",
     "Read message IDs from msoauth_messages rows with removed = 0 of that account."},
    {"attachment_not_found", 404, "The message has no such attachment",
     "The attachment is not among the message's attachments, or the job has not read the "
     "message's attachment list yet.",
     "Read attachment IDs from msoauth_attachments; a new message's list arrives within "
     "seconds of the message."},
    {"forbidden", 403, "This request is not allowed",
     "The local API refused the request: it came through a proxy without MSOAuthTrustProxy, "
     "it lacks the API key of MSOAuthAPIKeyFile, or its Host does not name this server.",
     "Call the token, admin and metrics handlers directly (not through a proxy) with "
     "'Authorization: Bearer KEY' (the key in MSOAuthAPIKeyFile) and a Host of this server; "
     "behind a trusted proxy set MSOAuthTrustProxy on for that location."},
    {"cross_site", 403, "Connecting from another site is not allowed",
     "The Connect link was opened from another web site (Sec-Fetch-Site: cross-site); a "
     "mailbox is only connected from the application's own pages.",
     "Open the Connect link from the application's own page on this site."},
    {"certificate_invalid", 502, "The app's certificate was refused",
     "Microsoft refused the signed client assertion (AADSTS700027 and the like): the "
     "certificate is not uploaded to the app registration, or the key does not match it.",
     "Upload the certificate (the .crt/.pem, not the key) under Certificates & secrets of "
     "the app registration, check that MSOAuthClientCertificateFile names its key, and "
     "reload httpd."},
    {"certificate_expired", 502, "The app's certificate has expired",
     "The certificate in MSOAuthClientCertificateFile is past its expiry date.",
     "Make a new certificate, upload it under Certificates & secrets, point "
     "MSOAuthClientCertificateFile at it, reload httpd, then remove the old one."},
    {"mailbox_not_found", 404, "The mailbox does not exist",
     "Microsoft Graph does not know this mailbox in the company's tenant (ErrorInvalidUser "
     "or ResourceNotFound).",
     "Check the address in MSOAuthMailbox or on the admin page; a shared mailbox must exist "
     "in Exchange Online of the tenant named by MSOAuthTenant."},
    {"access_denied_by_policy", 403, "The app may not open this mailbox",
     "An Exchange Online application access policy (or RBAC for Applications) keeps the "
     "company's app out of this mailbox (ErrorAccessDenied: Access to OData is disabled).",
     "An Exchange administrator adds the mailbox to the group the policy allows, e.g. "
     "Add-DistributionGroupMember -Identity <policy group> -Member <mailbox>, checks it with "
     "Test-ApplicationAccessPolicy -Identity <mailbox> -AppId <client id>, and waits up to "
     "an hour for the change."},
    {"shared_access_denied", 403, "You cannot open this shared mailbox",
     "Microsoft Graph refused the person who signed in access to the shared mailbox asked "
     "for: they have no Full Access to it (yet), or the sign-in did not grant "
     "Mail.Read.Shared.",
     "An Exchange administrator grants Full Access (Add-MailboxPermission -Identity <shared "
     "mailbox> -User <person> -AccessRights FullAccess) and waits for it to apply; "
     "MSOAuthScope must list Mail.Read.Shared or Mail.ReadWrite.Shared. Then connect again, "
     "signed in as that person."},
    {"send_not_permitted", 403, "Mail cannot be sent from this mailbox",
     "The mailbox's grant lacks Mail.Send, so Microsoft refuses to send as it.",
     "Set MSOAuthEdition pro for the company (it asks for Mail.Send), reload httpd and "
     "reconnect the mailbox; for an app-only company grant the application permission "
     "Mail.Send with admin consent."},
    {NULL, 0, NULL, NULL, NULL}
};

const mso_reason_t *mso_reason_get(const char *code)
{
    const mso_reason_t *r;

    if (!code) {
        return NULL;
    }
    for (r = reasons; r->code; r++) {
        if (!strcmp(r->code, code)) {
            return r;
        }
    }
    return NULL;
}

const mso_reason_t *mso_reason_all(void)
{
    return reasons;
}
