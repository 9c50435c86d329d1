/* Microsoft Graph mail, the protocol side: delta URLs and headers, a delta
 * page parsed into message changes, Graph's errors classified, and the
 * write-back requests. No database, no scheduling. Everything Graph sends is
 * hostile input: links are only followed inside the configured Graph root,
 * texts are cut and stripped of control characters. */
#ifndef MSO_GRAPH_H
#define MSO_GRAPH_H

#include <apr_pools.h>
#include <apr_errno.h>
#include <apr_tables.h>

#include "mso_http.h"

/* A string of a delta page longer than this (bytes of JSON text) is cut by
 * the clip as the page arrives (mso_http_opts_t.max_string): a body that
 * long is stored without its text and marked body_truncated. 4 MiB is far
 * above what mail clients show (HTML bodies are rarely above 1 MiB; what
 * makes messages big is attachments, which are not in the page), and eight
 * such bodies still fit in a 32 MiB page, so the page size seldom has to
 * shrink. */
#define MSO_GRAPH_MAX_STRING (4 * 1024 * 1024)
/* Bytes received for one delta page at most. A message is at most 150 MB
 * in Exchange Online (attachments, base64, included), so its body is too;
 * JSON escaping can make it up to six times longer (\u0001). One message
 * per page thus always fits; more can only be a page to make smaller. */
#define MSO_GRAPH_MAX_DOWNLOAD ((apr_size_t)1024 * 1024 * 1024)

/* The members of a delta page that say where the round goes on, for the
 * clip to capture (mso_http_opts_t.capture): known even for a page that is
 * refused, so that one can be skipped. */
extern const char *const mso_graph_link_keys[];

/* What the mirror stores, and nothing more. */
#define MSO_GRAPH_SELECT "internetMessageId,conversationId,subject,from,toRecipients," \
    "receivedDateTime,isRead,hasAttachments,importance,bodyPreview,body,webLink"

/* One entry of a delta page. Absent properties are NULL (strings) or -1
 * (numbers and flags): an update carries only what changed. */
typedef struct {
    const char *graph_id;
    int removed;                    /* "@removed" present */
    int full;                       /* a complete representation (new item) */
    const char *internet_message_id;
    const char *conversation_id;
    const char *subject;
    const char *from_address;
    const char *from_name;
    const char *to_json;            /* [{"name":..,"address":..}, ...] */
    apr_int64_t received_at;        /* epoch seconds */
    int is_read;
    int has_attachments;
    const char *importance;
    const char *body_preview;
    const char *body_type;          /* html | text */
    /* NULL when absent, or when it was too long to keep (the clip's marker):
     * then body_truncated is 1; 0 for a body kept whole, -1 when absent. */
    const char *body;
    int body_truncated;
    const char *web_link;
} mso_graph_msg_t;

typedef struct {
    apr_array_header_t *items;      /* mso_graph_msg_t */
    int skipped;                    /* entries without a usable id */
    const char *next_link;          /* @odata.nextLink, or NULL */
    const char *delta_link;         /* @odata.deltaLink, or NULL */
} mso_graph_page_t;

/* The Graph URL of a mailbox, which every mail URL below starts with:
 * "{root}/v1.0/me" for the signed-in person's own mailbox (address NULL),
 * "{root}/v1.0/users/{address}" for another one (app-only companies, or a
 * shared mailbox opened with a person's delegated token). */
const char *mso_graph_mailbox(apr_pool_t *p, const char *graph_root, const char *address);

/* "{mailbox}/mailFolders/{folder}/messages/delta?$select=...&$orderby=
 * receivedDateTime desc": the first request of a full round, newest first. */
const char *mso_graph_delta_url(apr_pool_t *p, const char *mailbox, const char *folder);

/* True when url may receive our bearer token: it starts with
 * "{graph_root}/v1.0/" and holds only printable ASCII without spaces. */
int mso_graph_link_ok(const char *graph_root, const char *url);

/* Request headers: bearer token, immutable IDs (and a page size cap when
 * page_size > 0), a fresh client-request-id, JSON. */
apr_array_header_t *mso_graph_headers(apr_pool_t *p, const char *access_token, int page_size);

/* Parses a delta page, as it came through the clip (a string ending in NUL
 * was cut; any other NUL becomes a space). The kept strings hold no control
 * characters but tab, CR and LF in body and preview (others become spaces),
 * and a cut one (subject, ...) stays cut. The items' strings live in the
 * parsed document, released with p. APR_EINVAL (and *err) when it is not a
 * page. */
apr_status_t mso_graph_parse_page(apr_pool_t *p, const char *body, apr_size_t len,
                                  mso_graph_page_t *page, const char **err);

/* ISO 8601 UTC ("2026-11-23T10:00:00Z", fraction and +hh:mm allowed) to
 * epoch seconds; -1 when malformed. */
apr_int64_t mso_graph_time(const char *iso);

typedef enum {
    MSO_GRAPH_OK = 0,
    MSO_GRAPH_THROTTLED,            /* 429, 503: wait Retry-After */
    MSO_GRAPH_UNAUTHORIZED,         /* 401: refresh the token once */
    MSO_GRAPH_FORBIDDEN,            /* 403: the grant lacks a permission */
    MSO_GRAPH_NOT_FOUND,            /* 404 itemNotFound */
    MSO_GRAPH_RESYNC,               /* 410, syncStateNotFound, resyncRequired */
    MSO_GRAPH_TRANSIENT,            /* network, timeout, 5xx: try again later */
    MSO_GRAPH_FAILED                /* another 4xx: our request is wrong */
} mso_graph_class_e;

typedef struct {
    mso_graph_class_e cls;
    int status;                     /* 0: no answer */
    const char *code;               /* Graph's error code (innermost), or NULL */
    const char *message;            /* cut and cleaned */
    const char *request_id;
    long retry_after;               /* -1 if none */
    const char *location;           /* 410 Location, or NULL */
    int maybe_applied;              /* a write may have happened (timeout, 5xx) */
} mso_graph_result_t;

/* Classifies a Graph call (rv and resp from mso_http). A 2xx is OK. */
void mso_graph_classify(apr_pool_t *p, apr_status_t rv, const mso_http_response_t *resp,
                        mso_graph_result_t *g);

/* What an error says about the mailbox addressed at /users/{address}
 * rather than about the request: "mailbox_not_found" (404 ErrorInvalidUser,
 * ResourceNotFound, ...: no such mailbox in the tenant), or
 * "access_denied_by_policy" (403 ErrorAccessDenied "Access to OData is
 * disabled": an Exchange application access policy); or about the token:
 * "admin_consent_required" (403 "Either scp or roles claim need to be
 * present": an application token without any permission); NULL otherwise
 * (a 403 for one missing permission stays a 403). */
const char *mso_graph_mailbox_reason(const mso_graph_result_t *g);

/* "HTTP 429 TooManyRequests: <message> [request-id ...]" for logs and
 * last_error; never a token. */
const char *mso_graph_result_text(apr_pool_t *p, const mso_graph_result_t *g);

/* A write-back action as one Graph request. action: mark_read, mark_unread,
 * move (destination: well-known name or folder id), delete (a move to
 * deleteditems, as Outlook's Delete). APR_EINVAL (and *err) for a value that
 * must not be sent: unknown action, a malformed id or destination. */
typedef struct {
    const char *method;
    const char *url;
    const char *body;
} mso_graph_request_t;

apr_status_t mso_graph_action_request(apr_pool_t *p, const char *mailbox, const char *action,
                                      const char *graph_id, const char *destination,
                                      mso_graph_request_t *req, const char **err);

/* The destination of an action as Graph understands it (delete: deleteditems)
 * and as the mirror stores it (well-known names in lower case). */
const char *mso_graph_action_destination(apr_pool_t *p, const char *action,
                                         const char *destination);

/* GET of the message's isRead and parentFolderId, and of a folder's id: what
 * a retry checks before repeating a write whose outcome is unknown. */
const char *mso_graph_message_state_url(apr_pool_t *p, const char *mailbox,
                                        const char *graph_id);
const char *mso_graph_folder_url(apr_pool_t *p, const char *mailbox, const char *folder);

/* The lower-case well-known folder name (inbox, deleteditems, ...) that name
 * spells in any case, or NULL when it is not one (a folder id). */
const char *mso_graph_well_known_folder(apr_pool_t *p, const char *name);

/* --- attachments --- */

/* The attachments' metadata without their bytes (contentBytes left out;
 * contentId belongs to file attachments, hence the cast). */
#define MSO_GRAPH_ATTACH_SELECT "id,name,contentType,size,isInline,lastModifiedDateTime," \
    "microsoft.graph.fileAttachment/contentId"

/* One attachment of a message, as Graph describes it. Strings are cleaned of
 * control characters; everything is still hostile (a name, a content type). */
typedef struct {
    const char *id;
    const char *kind;               /* file | item (an attached message) | reference (a link) */
    const char *name;
    const char *content_type;       /* items: message/rfc822, what their $value is */
    apr_int64_t size;               /* bytes as Graph counts them; -1 when absent */
    int is_inline;
    const char *content_id;         /* what cid: URLs of an HTML body name */
    const char *last_modified;      /* lastModifiedDateTime as sent: another means new bytes */
} mso_graph_att_t;

/* True for a Graph id we put in a URL: letters, digits and +/=_- only, at
 * most 512 characters (message, attachment and folder ids). */
int mso_graph_id_ok(const char *id);

/* "{mailbox}/messages/{id}/attachments?$select=MSO_GRAPH_ATTACH_SELECT". */
const char *mso_graph_attachments_url(apr_pool_t *p, const char *mailbox, const char *graph_id);

/* "{mailbox}/messages/{id}/attachments/{aid}/$value": a file's bytes, an
 * attached message as MIME. */
const char *mso_graph_attachment_value_url(apr_pool_t *p, const char *mailbox,
                                           const char *graph_id, const char *attachment_id);

/* A reference attachment's link: only the beta version of Graph shows
 * sourceUrl, so this is the mailbox URL with /beta/ for /v1.0/ and
 * ".../attachments/{aid}". */
const char *mso_graph_attachment_link_url(apr_pool_t *p, const char *mailbox,
                                          const char *graph_id, const char *attachment_id);

/* Parses a list of attachments (as it came through the clip): *atts gets
 * mso_graph_att_t, entries without a usable id or of an unknown type are
 * left out and counted in *skipped, *next_link is @odata.nextLink or NULL.
 * APR_EINVAL (and *err) when it is not such a list. */
apr_status_t mso_graph_parse_attachments(apr_pool_t *p, const char *body, apr_size_t len,
                                         apr_array_header_t **atts, const char **next_link,
                                         int *skipped, const char **err);

/* A reference attachment's sourceUrl (http or https, printable ASCII, at
 * most 8192 bytes), copied into p. APR_EINVAL (and *err) otherwise. */
apr_status_t mso_graph_parse_link(apr_pool_t *p, const char *body, apr_size_t len,
                                  const char **url, const char **err);
/* ---- Sending mail (the outbox) ------------------------------------------ */

/* Graph's request body limit (4 MB), createUploadSession's least size (3
 * MB: smaller attachments go in one POST), one upload fragment (up to 4 MB;
 * a multiple of 320 KiB), the largest message with attachments (150 MB),
 * recipients over to, cc and bcc (500), attachments per message (250). */
#define MSO_GRAPH_MAX_REQUEST (4 * 1024 * 1024)
#define MSO_GRAPH_UPLOAD_MIN (3 * 1024 * 1024)
#define MSO_GRAPH_UPLOAD_CHUNK (12 * 327680)
#define MSO_GRAPH_MAX_MESSAGE ((apr_int64_t)150 * 1024 * 1024)
#define MSO_GRAPH_MAX_RECIPIENTS 500
#define MSO_GRAPH_MAX_ATTACHMENTS 250

/* The single-value extended property that marks an outbox row's draft
 * (value: the row's random marker), in a property set of our own. */
#define MSO_GRAPH_MARKER_PROPERTY \
    "String {4959df50-ab1e-42e5-b03d-ae7b7693af59} Name msoauth-outbox-marker"

/* A message as the application queued it. */
typedef struct {
    const char *to_json, *cc_json, *bcc_json;   /* [{"address","name"}] or NULL */
    const char *subject;
    const char *body_type;                      /* text | html; NULL: text */
    const char *body;
    const char *reply_to;                       /* a message's Graph id, or NULL */
    const char *marker;
} mso_graph_mail_t;

/* What can be checked before Graph: recipients are JSON arrays of objects
 * {"address", "name"} (or plain address strings), each address a plain
 * e-mail address, names without control characters; at least one recipient
 * (a reply may have none: it goes to the original sender) and at most
 * MSO_GRAPH_MAX_RECIPIENTS; body_type text or html; reply_to a Graph id.
 * APR_EINVAL and *err naming the field. */
apr_status_t mso_graph_mail_check(apr_pool_t *p, const mso_graph_mail_t *m, const char **err);

/* The request that makes the draft with the marker: POST {mailbox}/messages,
 * or for a reply POST {mailbox}/messages/{reply_to}/createReply with the
 * application's fields as its message (its body replaces the quote, its
 * subject and recipients replace the reply's when given). APR_EINVAL (and
 * *err) when the check fails or the request would exceed
 * MSO_GRAPH_MAX_REQUEST. */
apr_status_t mso_graph_mail_create(apr_pool_t *p, const char *mailbox, const mso_graph_mail_t *m,
                                   mso_graph_request_t *req, const char **err);

/* A message as the outbox looks at it. */
typedef struct {
    const char *id;
    int is_draft;                   /* -1: not said */
    const char *internet_message_id;
    const char *parent_folder_id;
} mso_graph_item_t;

/* One message ({"id", ...}) or a list ({"value": [...]}) into items
 * (mso_graph_item_t, those without a usable id left out). */
apr_status_t mso_graph_parse_items(apr_pool_t *p, const char *body, apr_size_t len,
                                   apr_array_header_t **items, const char **err);

/* GET: the messages anywhere in the mailbox carrying marker. */
const char *mso_graph_marker_url(apr_pool_t *p, const char *mailbox, const char *marker);
/* GET: a message's id, isDraft, internetMessageId, parentFolderId. */
const char *mso_graph_item_url(apr_pool_t *p, const char *mailbox, const char *id);
/* POST: sends a draft. DELETE on mso_graph_message_url: removes one. */
const char *mso_graph_send_url(apr_pool_t *p, const char *mailbox, const char *draft_id);
const char *mso_graph_message_url(apr_pool_t *p, const char *mailbox, const char *id);

/* Checks an attachment as queued: a name of 1..255 characters without path
 * separators or control characters, content_type type/subtype (parameters
 * allowed, printable ASCII), a content_id without spaces, controls or <>,
 * size at most MSO_GRAPH_MAX_MESSAGE. NULL when good, else why. */
const char *mso_graph_attachment_check(apr_pool_t *p, const char *name,
                                       const char *content_type, const char *content_id,
                                       apr_int64_t size);

/* The POST of a whole attachment (fileAttachment with contentBytes) to a
 * draft; *len: the body's bytes. APR_ENOSPC when it exceeds
 * MSO_GRAPH_MAX_REQUEST (then it needs an upload session). */
apr_status_t mso_graph_attachment_post(apr_pool_t *p, const char *mailbox,
                                       const char *draft_id, const char *name,
                                       const char *content_type, int is_inline,
                                       const char *content_id, const unsigned char *data,
                                       apr_size_t n, mso_graph_request_t *req, apr_size_t *len);
/* The body bytes that POST would have for an attachment of size bytes. */
apr_size_t mso_graph_attachment_post_len(apr_pool_t *p, const char *name,
                                         const char *content_type, int is_inline,
                                         const char *content_id, apr_int64_t size);

/* createUploadSession for an attachment of size bytes. */
void mso_graph_upload_session(apr_pool_t *p, const char *mailbox, const char *draft_id,
                              const char *name, const char *content_type, int is_inline,
                              const char *content_id, apr_int64_t size,
                              mso_graph_request_t *req);

/* The uploadUrl of createUploadSession's answer, when it may be used: https,
 * or the scheme and host of graph_root (a simulator); printable, at most 8
 * KiB. It is pre-authenticated: never send the token with it. */
const char *mso_graph_parse_upload_url(apr_pool_t *p, const char *graph_root, const char *body,
                                       apr_size_t len, const char **err);

/* The attachment id in the Location of the last fragment's answer
 * (".../Attachments('ID')"), or NULL. */
const char *mso_graph_location_attachment_id(apr_pool_t *p, const char *location);

/* GET: a draft's attachments (id, name, isInline, contentId, no bytes);
 * DELETE on mso_graph_attachment_url: removes one. */
const char *mso_graph_draft_attachments_url(apr_pool_t *p, const char *mailbox,
                                            const char *draft_id);
const char *mso_graph_draft_attachment_url(apr_pool_t *p, const char *mailbox,
                                           const char *draft_id, const char *att_id);

typedef struct {
    const char *id;
    const char *name;
    int is_inline;
    const char *content_id;
} mso_graph_att_item_t;

apr_status_t mso_graph_parse_draft_attachments(apr_pool_t *p, const char *body, apr_size_t len,
                                               apr_array_header_t **items, const char **err);

/* --- who a token belongs to --- */

/* "{root}/v1.0/me?$select=id,displayName,mail,userPrincipalName". */
const char *mso_graph_me_url(apr_pool_t *p, const char *graph_root);

typedef struct {
    const char *id;
    const char *display_name;
    const char *mail;               /* NULL for accounts without a mailbox address */
    const char *upn;                /* userPrincipalName */
} mso_graph_me_t;

/* Parses Graph's /me answer. APR_EINVAL (and *err) without an id. */
apr_status_t mso_graph_parse_me(apr_pool_t *p, const char *body, apr_size_t len,
                                mso_graph_me_t *me, const char **err);

/* The mailbox address Graph gives the object: mail, else userPrincipalName,
 * in lower case; NULL when it has neither. */
const char *mso_graph_me_address(apr_pool_t *p, const mso_graph_me_t *me);

/* True when Graph's object is the ID token's: the same id (work and school
 * accounts), or for a personal account (tid the consumers tenant
 * 9188040d-6c67-4c5b-b112-36a304b66dad) the 16 hex digits that end its oid
 * 00000000-0000-0000-XXXX-XXXXXXXXXXXX. Case-insensitive. */
int mso_graph_me_is_object(const mso_graph_me_t *me, const char *tid, const char *oid);

#endif
