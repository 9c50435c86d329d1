/* Microsoft Graph mail, the protocol side: delta queries, Graph's errors and
 * the write-back requests (see mso_graph.h). */
#include <string.h>
#include <strings.h>

#include <apr_strings.h>
#include <apr_lib.h>
#include <apr_base64.h>

#include "mso_config.h"
#include "mso_crypto.h"
#include "mso_flow.h"
#include "mso_graph.h"
#include "mso_json.h"

#define TEXT_MAX 300                /* Graph's message in our texts */
#define ID_MAX 512                  /* immutable ids are ~150 characters */

const char *const mso_graph_link_keys[] = {"@odata.nextLink", "@odata.deltaLink", NULL};

const char *mso_graph_mailbox(apr_pool_t *p, const char *graph_root, const char *address)
{
    if (!address) {
        return apr_pstrcat(p, graph_root, "/v1.0/me", NULL);
    }
    return apr_pstrcat(p, graph_root, "/v1.0/users/", mso_url_encode(p, address), NULL);
}

const char *mso_graph_delta_url(apr_pool_t *p, const char *mailbox, const char *folder)
{
    /* Options go on the first request only: Graph encodes them in the links. */
    return apr_pstrcat(p, mailbox, "/mailFolders/", mso_url_encode(p, folder),
                       "/messages/delta?$select=", MSO_GRAPH_SELECT,
                       "&$orderby=receivedDateTime%20desc", NULL);
}

int mso_graph_link_ok(const char *graph_root, const char *url)
{
    apr_size_t n;
    const char *c;

    if (!graph_root || !url) {
        return 0;
    }
    n = strlen(graph_root);
    if (strncmp(url, graph_root, n) != 0 || strncmp(url + n, "/v1.0/", 6) != 0) {
        return 0;
    }
    for (c = url; *c; c++) {
        if (*c <= 0x20 || *c >= 0x7f) {
            return 0;
        }
    }
    return c - url < 8192;
}

/* A version 4 UUID for client-request-id (Microsoft support asks for it). */
static const char *request_guid(apr_pool_t *p)
{
    unsigned char b[16];

    if (mso_random_bytes(b, sizeof(b)) != APR_SUCCESS) {
        return NULL;
    }
    b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);
    b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
    return apr_psprintf(p, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-"
                        "%02x%02x%02x%02x%02x%02x", b[0], b[1], b[2], b[3], b[4], b[5], b[6],
                        b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}

apr_array_header_t *mso_graph_headers(apr_pool_t *p, const char *access_token, int page_size)
{
    apr_array_header_t *h = apr_array_make(p, 5, sizeof(const char *));
    const char *guid = request_guid(p);

    APR_ARRAY_PUSH(h, const char *) = apr_pstrcat(p, "Authorization: Bearer ",
                                                   access_token ? access_token : "", NULL);
    /* Immutable IDs on every request: a move keeps the message's id. */
    APR_ARRAY_PUSH(h, const char *) = page_size > 0
        ? apr_psprintf(p, "Prefer: odata.maxpagesize=%d, IdType=\"ImmutableId\"", page_size)
        : "Prefer: IdType=\"ImmutableId\"";
    APR_ARRAY_PUSH(h, const char *) = "Accept: application/json";
    if (guid) {
        APR_ARRAY_PUSH(h, const char *) = apr_pstrcat(p, "client-request-id: ", guid, NULL);
    }
    return h;
}

/* ------------------------------------------------------------------------- */

static int two(const char *s)
{
    if (!apr_isdigit(s[0]) || !apr_isdigit(s[1])) {
        return -1;
    }
    return (s[0] - '0') * 10 + (s[1] - '0');
}

/* Days since 1970-01-01 of a proleptic Gregorian date. */
static apr_int64_t days_from_civil(apr_int64_t y, int m, int d)
{
    apr_int64_t era, yoe, doy, doe;

    y -= m <= 2;
    era = (y >= 0 ? y : y - 399) / 400;
    yoe = y - era * 400;
    doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

apr_int64_t mso_graph_time(const char *s)
{
    int yh, yl, mo, d, h, mi, se, oh = 0, om = 0, sign = 0;
    const char *c;

    if (!s || strlen(s) < 19 || s[4] != '-' || s[7] != '-' || (s[10] != 'T' && s[10] != ' ')
        || s[13] != ':' || s[16] != ':') {
        return -1;
    }
    yh = two(s);
    yl = two(s + 2);
    mo = two(s + 5);
    d = two(s + 8);
    h = two(s + 11);
    mi = two(s + 14);
    se = two(s + 17);
    if (yh < 0 || yl < 0 || mo < 1 || mo > 12 || d < 1 || d > 31 || h < 0 || h > 23 || mi < 0
        || mi > 59 || se < 0 || se > 60) {
        return -1;
    }
    c = s + 19;
    if (*c == '.') {
        for (c++; apr_isdigit(*c); c++) {
        }
    }
    if (*c == 'Z' && !c[1]) {
        sign = 0;
    }
    else if ((*c == '+' || *c == '-') && strlen(c) == 6 && c[3] == ':') {
        sign = *c == '+' ? 1 : -1;
        oh = two(c + 1);
        om = two(c + 4);
        if (oh < 0 || oh > 23 || om < 0 || om > 59) {
            return -1;
        }
    }
    else if (*c) {
        return -1;
    }
    return days_from_civil(yh * 100 + yl, mo, d) * 86400 + h * 3600 + mi * 60 + se
           - sign * (oh * 3600 + om * 60);
}

/* Bytes a stored text must not hold: NUL (PostgreSQL's TEXT cannot) and the
 * other C0 controls; lines keeps tab, LF and CR (bodies, previews). */
static APR_INLINE int ctl_bad(unsigned char b, int lines)
{
    return b < 0x20 && (!lines || (b != '\t' && b != '\n' && b != '\r'));
}

/* A string of the page as it may be stored: NULL when absent; *cut when the
 * clip cut it (its marker, a NUL at the end, is dropped). Controls become
 * spaces (in a copy: the document is jansson's). */
static const char *page_text(apr_pool_t *p, const json_t *v, int lines, int *cut)
{
    const char *s;
    char *copy;
    apr_size_t n, i;

    if (cut) {
        *cut = 0;
    }
    if (!json_is_string(v)) {
        return NULL;
    }
    s = json_string_value(v);
    n = json_string_length(v);
    if (n && s[n - 1] == '\0') {
        n--;
        if (cut) {
            *cut = 1;
        }
    }
    for (i = 0; i < n && !ctl_bad((unsigned char)s[i], lines); i++) {
    }
    if (i == n) {
        return s;           /* the common case: no copy; s[n] is NUL */
    }
    copy = apr_pstrmemdup(p, s, n);
    for (; i < n; i++) {
        if (ctl_bad((unsigned char)copy[i], lines)) {
            copy[i] = ' ';
        }
    }
    return copy;
}

/* Ids and links as they are, or NULL when a NUL would shorten them. */
static const char *exact_str(const json_t *obj, const char *key)
{
    const json_t *v = json_object_get(obj, key);
    const char *s = json_is_string(v) ? json_string_value(v) : NULL;

    return s && strlen(s) == json_string_length(v) ? s : NULL;
}

static const char *page_str(apr_pool_t *p, const json_t *obj, const char *key)
{
    return page_text(p, json_is_object(obj) ? json_object_get(obj, key) : NULL, 0, NULL);
}

/* -1 when absent or not a boolean. */
static int flag_of(const json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);

    return json_is_boolean(v) ? json_is_true(v) : -1;
}

static const char *email_field(apr_pool_t *p, const json_t *recipient, const char *key)
{
    return page_str(p, mso_json_obj(recipient, "emailAddress"), key);
}

/* toRecipients as [{"name","address"}]: only those two strings survive. */
static const char *recipients_json(apr_pool_t *p, const json_t *arr)
{
    json_t *out;
    const char *s;
    size_t i;
    json_t *r;

    if (!json_is_array(arr)) {
        return NULL;
    }
    out = json_array();
    json_array_foreach(arr, i, r) {
        const char *name = email_field(p, r, "name"), *addr = email_field(p, r, "address");
        json_t *e = json_object();

        json_t *jn = name ? json_string(name) : NULL, *ja = addr ? json_string(addr) : NULL;

        json_object_set_new(e, "name", jn ? jn : json_null());
        json_object_set_new(e, "address", ja ? ja : json_null());
        json_array_append_new(out, e);
    }
    s = mso_json_dump(p, out);
    json_decref(out);
    return s;
}

static int id_ok(const char *id)
{
    const char *c;

    if (!id || !*id || strlen(id) > ID_MAX) {
        return 0;
    }
    for (c = id; *c; c++) {
        if (!apr_isalnum(*c) && !strchr("+/=_-", *c)) {
            return 0;
        }
    }
    return 1;
}

/* The strings point into the parsed document, which lives as long as the
 * pool the page was parsed in: no copy of every body. */
static void parse_entry(apr_pool_t *p, const json_t *e, mso_graph_msg_t *m)
{
    const json_t *from = mso_json_obj(e, "from"), *body = mso_json_obj(e, "body");
    const char *when = mso_json_str(e, "receivedDateTime");

    memset(m, 0, sizeof(*m));
    m->graph_id = exact_str(e, "id");
    m->removed = json_object_get(e, "@removed") != NULL;
    m->received_at = when ? mso_graph_time(when) : -1;
    m->is_read = flag_of(e, "isRead");
    m->has_attachments = flag_of(e, "hasAttachments");
    m->internet_message_id = page_str(p, e, "internetMessageId");
    m->conversation_id = page_str(p, e, "conversationId");
    m->subject = page_str(p, e, "subject");
    m->importance = page_str(p, e, "importance");
    m->body_preview = page_text(p, json_object_get(e, "bodyPreview"), 1, NULL);
    m->web_link = page_str(p, e, "webLink");
    if (from) {
        m->from_address = email_field(p, from, "address");
        m->from_name = email_field(p, from, "name");
    }
    m->to_json = recipients_json(p, json_object_get(e, "toRecipients"));
    m->body_truncated = -1;
    if (body) {
        int cut = 0;

        m->body_type = page_str(p, body, "contentType");
        m->body = page_text(p, json_object_get(body, "content"), 1, &cut);
        if (cut) {
            /* Too long to keep: stored without its text, marked. */
            m->body = NULL;
            m->body_truncated = 1;
        }
        else if (m->body) {
            m->body_truncated = 0;
        }
    }
    /* New items come whole; an update carries the id and what changed. */
    m->full = !m->removed && m->received_at >= 0 && m->is_read >= 0;
}

apr_status_t mso_graph_parse_page(apr_pool_t *p, const char *body, apr_size_t len,
                                  mso_graph_page_t *page, const char **err)
{
    const json_t *value;
    const char *perr = NULL;
    json_t *j, *e;
    size_t i;

    memset(page, 0, sizeof(*page));
    *err = NULL;
    j = mso_json_parse_flags(p, body, len, JSON_ALLOW_NUL, &perr);
    if (!j || !json_is_object(j)) {
        *err = perr ? apr_pstrcat(p, "the delta page is not JSON: ", perr, NULL)
                    : "the delta page is not a JSON object";
        return APR_EINVAL;
    }
    value = mso_json_arr(j, "value");
    if (!value) {
        *err = "the delta page has no \"value\" array";
        return APR_EINVAL;
    }
    page->items = apr_array_make(p, (int)json_array_size(value) + 1, sizeof(mso_graph_msg_t));
    json_array_foreach(value, i, e) {
        mso_graph_msg_t m;

        if (!json_is_object(e)) {
            page->skipped++;
            continue;
        }
        parse_entry(p, e, &m);
        if (!id_ok(m.graph_id)) {
            page->skipped++;
            continue;
        }
        APR_ARRAY_PUSH(page->items, mso_graph_msg_t) = m;
    }
    page->next_link = exact_str(j, "@odata.nextLink");
    page->delta_link = exact_str(j, "@odata.deltaLink");
    page->next_link = page->next_link ? apr_pstrdup(p, page->next_link) : NULL;
    page->delta_link = page->delta_link ? apr_pstrdup(p, page->delta_link) : NULL;
    if (!page->next_link && !page->delta_link) {
        *err = "the delta page has neither @odata.nextLink nor @odata.deltaLink";
        return APR_EINVAL;
    }
    return APR_SUCCESS;
}

/* ------------------------------------------------------------------------- */

/* Printable, one line, at most TEXT_MAX bytes (cut at a UTF-8 boundary). */
static const char *clean_text(apr_pool_t *p, const char *s)
{
    char *out, *o;
    apr_size_t n;

    if (!s) {
        return NULL;
    }
    n = strlen(s);
    if (n > TEXT_MAX) {
        n = TEXT_MAX;
        while (n > 0 && ((unsigned char)s[n] & 0xc0) == 0x80) {
            n--;
        }
    }
    out = apr_pstrndup(p, s, n);
    for (o = out; *o; o++) {
        if ((unsigned char)*o < 0x20 || *o == 0x7f) {
            *o = ' ';
        }
    }
    return out;
}

/* The innermost error code: Graph nests details in innerError/innererror. */
static void error_body(apr_pool_t *p, const mso_http_response_t *resp, mso_graph_result_t *g)
{
    const json_t *err, *inner;
    const char *perr = NULL;
    json_t *j;
    int depth;

    if (!resp->body || !resp->body_len) {
        return;
    }
    j = mso_json_parse(p, resp->body, resp->body_len, &perr);
    err = j ? mso_json_obj(j, "error") : NULL;
    if (!err) {
        return;
    }
    g->code = clean_text(p, mso_json_str(err, "code"));
    g->message = clean_text(p, mso_json_str(err, "message"));
    for (inner = err, depth = 0; inner && depth < 8; depth++) {
        const json_t *next = mso_json_obj(inner, "innerError");
        const char *c;

        if (!next) {
            next = mso_json_obj(inner, "innererror");
        }
        if (!next) {
            break;
        }
        c = mso_json_str(next, "code");
        if (c) {
            g->code = clean_text(p, c);
        }
        if (!g->request_id && mso_json_str(next, "request-id")) {
            g->request_id = clean_text(p, mso_json_str(next, "request-id"));
        }
        inner = next;
    }
}

static int code_is(const mso_graph_result_t *g, const char *code)
{
    return g->code && !strcasecmp(g->code, code);
}

const char *mso_graph_mailbox_reason(const mso_graph_result_t *g)
{
    if (g->status == 404 && (code_is(g, "ErrorInvalidUser") || code_is(g, "ResourceNotFound")
                             || code_is(g, "ErrorNonExistentMailbox")
                             || code_is(g, "MailboxNotEnabledForRESTAPI"))) {
        return "mailbox_not_found";
    }
    if (g->status == 403 && code_is(g, "ErrorAccessDenied") && g->message
        && strstr(g->message, "Access to OData is disabled")) {
        return "access_denied_by_policy";
    }
    if (g->status == 403 && g->message
        && strstr(g->message, "Either scp or roles claim need to be present")) {
        return "admin_consent_required";
    }
    return NULL;
}

void mso_graph_classify(apr_pool_t *p, apr_status_t rv, const mso_http_response_t *resp,
                        mso_graph_result_t *g)
{
    int s;

    memset(g, 0, sizeof(*g));
    g->retry_after = -1;
    if (!resp || rv != APR_SUCCESS || resp->status == 0) {
        g->cls = MSO_GRAPH_TRANSIENT;
        g->message = clean_text(p, resp && resp->error ? resp->error : "no answer from Graph");
        /* A request cut off may still have been carried out. */
        g->maybe_applied = !(resp && resp->not_sent) && rv != APR_EINVAL;
        return;
    }
    s = g->status = resp->status;
    g->retry_after = resp->retry_after;
    if (resp->headers) {
        const char *rid = apr_table_get(resp->headers, "request-id");
        const char *loc = apr_table_get(resp->headers, "Location");

        g->request_id = rid ? clean_text(p, rid) : NULL;
        g->location = loc ? apr_pstrdup(p, loc) : NULL;
    }
    if (s >= 200 && s < 300) {
        g->cls = MSO_GRAPH_OK;
        return;
    }
    error_body(p, resp, g);
    if (s == 410 || code_is(g, "syncStateNotFound") || code_is(g, "resyncRequired")) {
        g->cls = MSO_GRAPH_RESYNC;
    }
    else if (s == 429 || s == 503 || code_is(g, "activityLimitReached")) {
        g->cls = MSO_GRAPH_THROTTLED;
        g->maybe_applied = s == 503;
    }
    else if (s == 401) {
        g->cls = MSO_GRAPH_UNAUTHORIZED;
    }
    else if (s == 403) {
        g->cls = MSO_GRAPH_FORBIDDEN;
    }
    else if (s == 404 || code_is(g, "itemNotFound") || code_is(g, "ErrorItemNotFound")) {
        g->cls = MSO_GRAPH_NOT_FOUND;
    }
    else if (s >= 500 || s == 408) {
        g->cls = MSO_GRAPH_TRANSIENT;
        g->maybe_applied = 1;
    }
    else {
        g->cls = MSO_GRAPH_FAILED;
    }
}

const char *mso_graph_result_text(apr_pool_t *p, const mso_graph_result_t *g)
{
    const char *rid = g->request_id ? apr_pstrcat(p, " [request-id ", g->request_id, "]", NULL)
                                    : "";

    if (!g->status) {
        return apr_pstrcat(p, "Graph unreachable: ", g->message ? g->message : "no answer",
                           NULL);
    }
    return apr_psprintf(p, "HTTP %d%s%s%s%s%s", g->status, g->code ? " " : "",
                        g->code ? g->code : "", g->message ? ": " : "",
                        g->message ? g->message : "", rid);
}

/* ------------------------------------------------------------------------- */

const char *mso_graph_well_known_folder(apr_pool_t *p, const char *name)
{
    char *lower;
    char *c;

    if (!name || strlen(name) > 40) {
        return NULL;
    }
    lower = apr_pstrdup(p, name);
    for (c = lower; *c; c++) {
        *c = (char)apr_tolower(*c);
    }
    return mso_check_folder(p, lower) ? NULL : lower;
}

const char *mso_graph_action_destination(apr_pool_t *p, const char *action,
                                         const char *destination)
{
    const char *wk;

    if (action && !strcmp(action, "delete")) {
        return "deleteditems";
    }
    if (!destination) {
        return NULL;
    }
    wk = mso_graph_well_known_folder(p, destination);
    return wk ? wk : destination;
}

static const char *message_url(apr_pool_t *p, const char *mailbox, const char *graph_id)
{
    return apr_pstrcat(p, mailbox, "/messages/", mso_url_encode(p, graph_id), NULL);
}

apr_status_t mso_graph_action_request(apr_pool_t *p, const char *mailbox, const char *action,
                                      const char *graph_id, const char *destination,
                                      mso_graph_request_t *req, const char **err)
{
    const char *dest;
    json_t *j;

    memset(req, 0, sizeof(*req));
    *err = NULL;
    if (!id_ok(graph_id)) {
        *err = "graph_id is not a Graph message id (letters, digits and +/=_- only, at most 512)";
        return APR_EINVAL;
    }
    if (action && (!strcmp(action, "mark_read") || !strcmp(action, "mark_unread"))) {
        req->method = "PATCH";
        req->url = message_url(p, mailbox, graph_id);
        req->body = !strcmp(action, "mark_read") ? "{\"isRead\":true}" : "{\"isRead\":false}";
        return APR_SUCCESS;
    }
    if (!action || (strcmp(action, "move") && strcmp(action, "delete"))) {
        *err = "action is not one of mark_read, mark_unread, move, delete";
        return APR_EINVAL;
    }
    dest = mso_graph_action_destination(p, action, destination);
    if (!dest || !*dest) {
        *err = "a move needs a destination: a well-known folder name (archive, inbox, ...) or "
               "a folder id";
        return APR_EINVAL;
    }
    if (!mso_graph_well_known_folder(p, dest) && !id_ok(dest)) {
        *err = "destination is neither a well-known folder name nor a folder id";
        return APR_EINVAL;
    }
    /* Outlook's Delete is a move to Deleted Items; DELETE would bypass it. */
    req->method = "POST";
    req->url = apr_pstrcat(p, message_url(p, mailbox, graph_id), "/move", NULL);
    j = json_pack("{s:s}", "destinationId", dest);
    req->body = mso_json_dump(p, j);
    json_decref(j);
    return APR_SUCCESS;
}

const char *mso_graph_message_state_url(apr_pool_t *p, const char *mailbox,
                                        const char *graph_id)
{
    return apr_pstrcat(p, message_url(p, mailbox, graph_id),
                       "?$select=isRead,parentFolderId", NULL);
}

const char *mso_graph_folder_url(apr_pool_t *p, const char *mailbox, const char *folder)
{
    return apr_pstrcat(p, mailbox, "/mailFolders/", mso_url_encode(p, folder),
                       "?$select=id", NULL);
}

/* ------------------------------------------------------------------------- */
/* Attachments */

int mso_graph_id_ok(const char *id)
{
    return id_ok(id);
}

const char *mso_graph_attachments_url(apr_pool_t *p, const char *mailbox, const char *graph_id)
{
    return apr_pstrcat(p, message_url(p, mailbox, graph_id), "/attachments?$select=",
                       MSO_GRAPH_ATTACH_SELECT, NULL);
}

const char *mso_graph_attachment_value_url(apr_pool_t *p, const char *mailbox,
                                           const char *graph_id, const char *attachment_id)
{
    return apr_pstrcat(p, message_url(p, mailbox, graph_id), "/attachments/",
                       mso_url_encode(p, attachment_id), "/$value", NULL);
}

const char *mso_graph_attachment_link_url(apr_pool_t *p, const char *mailbox,
                                          const char *graph_id, const char *attachment_id)
{
    const char *v = strstr(mailbox, "/v1.0/");
    const char *beta = v ? apr_pstrcat(p, apr_pstrmemdup(p, mailbox, v - mailbox), "/beta/",
                                       v + 6, NULL) : mailbox;

    return apr_pstrcat(p, message_url(p, beta, graph_id), "/attachments/",
                       mso_url_encode(p, attachment_id), NULL);
}

/* file | item | reference from "#microsoft.graph.fileAttachment" and the like. */
static const char *attachment_kind(const char *type)
{
    static const char *const kinds[][2] = {{"fileattachment", "file"},
                                           {"itemattachment", "item"},
                                           {"referenceattachment", "reference"}};
    const char *dot = type ? strrchr(type, '.') : NULL;
    apr_size_t i;

    for (i = 0; dot && i < sizeof(kinds) / sizeof(kinds[0]); i++) {
        if (!strcasecmp(dot + 1, kinds[i][0])) {
            return kinds[i][1];
        }
    }
    return NULL;
}

apr_status_t mso_graph_parse_attachments(apr_pool_t *p, const char *body, apr_size_t len,
                                         apr_array_header_t **atts, const char **next_link,
                                         int *skipped, const char **err)
{
    const json_t *value;
    const char *perr = NULL;
    json_t *j, *e;
    size_t i;

    *atts = NULL;
    *next_link = NULL;
    *skipped = 0;
    *err = NULL;
    j = mso_json_parse_flags(p, body, len, JSON_ALLOW_NUL, &perr);
    if (!j || !json_is_object(j) || !(value = mso_json_arr(j, "value"))) {
        *err = perr ? apr_pstrcat(p, "the attachment list is not JSON: ", perr, NULL)
                    : "the attachment list has no \"value\" array";
        return APR_EINVAL;
    }
    *atts = apr_array_make(p, (int)json_array_size(value) + 1, sizeof(mso_graph_att_t));
    json_array_foreach(value, i, e) {
        mso_graph_att_t a;
        const json_t *size;

        memset(&a, 0, sizeof(a));
        a.id = json_is_object(e) ? exact_str(e, "id") : NULL;
        a.kind = json_is_object(e) ? attachment_kind(exact_str(e, "@odata.type")) : NULL;
        if (!id_ok(a.id) || !a.kind) {
            (*skipped)++;
            continue;
        }
        a.name = page_str(p, e, "name");
        a.content_type = !strcmp(a.kind, "item") ? "message/rfc822"
                                                 : page_str(p, e, "contentType");
        size = json_object_get(e, "size");
        a.size = json_is_integer(size) && json_integer_value(size) >= 0
                 ? (apr_int64_t)json_integer_value(size) : -1;
        a.is_inline = flag_of(e, "isInline") > 0;
        a.content_id = page_str(p, e, "contentId");
        a.last_modified = page_str(p, e, "lastModifiedDateTime");
        APR_ARRAY_PUSH(*atts, mso_graph_att_t) = a;
    }
    *next_link = exact_str(j, "@odata.nextLink");
    *next_link = *next_link ? apr_pstrdup(p, *next_link) : NULL;
    return APR_SUCCESS;
}

apr_status_t mso_graph_parse_link(apr_pool_t *p, const char *body, apr_size_t len,
                                  const char **url, const char **err)
{
    const char *perr = NULL, *u, *c;
    json_t *j;

    *url = NULL;
    *err = NULL;
    j = mso_json_parse_flags(p, body, len, JSON_ALLOW_NUL, &perr);
    u = j && json_is_object(j) ? exact_str(j, "sourceUrl") : NULL;
    if (!u) {
        *err = "the reference attachment has no sourceUrl";
        return APR_EINVAL;
    }
    for (c = u; *c > 0x20 && *c < 0x7f; c++) {
    }
    if (*c || c - u > 8192
        || (strncasecmp(u, "https://", 8) != 0 && strncasecmp(u, "http://", 7) != 0)) {
        *err = "the reference attachment's sourceUrl is not an http(s) URL";
        return APR_EINVAL;
    }
    *url = apr_pstrdup(p, u);
    return APR_SUCCESS;
}

/* ------------------------------------------------------------------------- */
/* Who a token belongs to */

#define MSA_TENANT "9188040d-6c67-4c5b-b112-36a304b66dad"

const char *mso_graph_me_url(apr_pool_t *p, const char *graph_root)
{
    return apr_pstrcat(p, graph_root, "/v1.0/me?$select=id,displayName,mail,userPrincipalName",
                       NULL);
}

static const char *me_str(apr_pool_t *p, const json_t *j, const char *key, apr_size_t max)
{
    const char *v = mso_json_str(j, key);

    return v && *v && strlen(v) <= max ? apr_pstrdup(p, v) : NULL;
}

apr_status_t mso_graph_parse_me(apr_pool_t *p, const char *body, apr_size_t len,
                                mso_graph_me_t *me, const char **err)
{
    json_t *j = mso_json_parse(p, body, len, err);

    memset(me, 0, sizeof(*me));
    if (!j || !json_is_object(j)) {
        if (err && !*err) {
            *err = "Graph's answer about the signed-in account is not a JSON object";
        }
        return APR_EINVAL;
    }
    me->id = me_str(p, j, "id", 128);
    me->display_name = me_str(p, j, "displayName", 256);
    me->mail = me_str(p, j, "mail", 320);
    me->upn = me_str(p, j, "userPrincipalName", 320);
    if (!me->id) {
        *err = "Graph's answer about the signed-in account has no id";
        return APR_EINVAL;
    }
    return APR_SUCCESS;
}

const char *mso_graph_me_address(apr_pool_t *p, const mso_graph_me_t *me)
{
    const char *a = me->mail ? me->mail : me->upn;
    char *out, *c;

    if (!a) {
        return NULL;
    }
    out = apr_pstrdup(p, a);
    for (c = out; *c; c++) {
        *c = (char)apr_tolower(*c);
    }
    return out;
}

int mso_graph_me_is_object(const mso_graph_me_t *me, const char *tid, const char *oid)
{
    apr_size_t n;

    if (!me || !me->id || !oid) {
        return 0;
    }
    if (!strcasecmp(me->id, oid)) {
        return 1;
    }
    /* Personal accounts: Graph's id is the oid's last 16 hex digits. */
    n = strlen(me->id);
    return tid && !strcasecmp(tid, MSA_TENANT) && n == 16 && strlen(oid) == 36
           && !strncmp(oid, "00000000-0000-0000-", 19) && oid[23] == '-'
           && !strncasecmp(oid + 19, me->id, 4) && !strcasecmp(oid + 24, me->id + 4);
}

/* ------------------------------------------------------------------------- */
/* Sending mail (the outbox) */

#define NAME_MAX_CHARS 255
#define RECIPIENT_NAME_MAX 256

const char *mso_graph_message_url(apr_pool_t *p, const char *mailbox, const char *id)
{
    return message_url(p, mailbox, id);
}

/* True when s is valid UTF-8 (shortest forms, no surrogates, at most
 * U+10FFFF): jansson refuses anything else. */
static int utf8_ok(const char *s)
{
    const unsigned char *c = (const unsigned char *)s;

    while (*c) {
        apr_uint32_t cp;
        int n, i;

        if (*c < 0x80) {
            c++;
            continue;
        }
        if (*c >= 0xc2 && *c <= 0xdf) {
            n = 1, cp = *c & 0x1f;
        }
        else if (*c >= 0xe0 && *c <= 0xef) {
            n = 2, cp = *c & 0x0f;
        }
        else if (*c >= 0xf0 && *c <= 0xf4) {
            n = 3, cp = *c & 0x07;
        }
        else {
            return 0;
        }
        for (i = 1; i <= n; i++) {
            if ((c[i] & 0xc0) != 0x80) {
                return 0;
            }
            cp = (cp << 6) | (c[i] & 0x3f);
        }
        if ((n == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff)))
            || (n == 3 && (cp < 0x10000 || cp > 0x10ffff))) {
            return 0;
        }
        c += n + 1;
    }
    return 1;
}

/* True when s is valid UTF-8 without C0 controls (tab allowed when tab) or DEL. */
static int text_ok(const char *s, int tab)
{
    const unsigned char *c;

    if (!s) {
        return 1;
    }
    for (c = (const unsigned char *)s; *c; c++) {
        if ((*c < 0x20 && !(tab && *c == '\t')) || *c == 0x7f) {
            return 0;
        }
    }
    return utf8_ok(s);
}

/* The recipients of one field as Graph's [{"emailAddress":{...}}]; *n grows. */
static apr_status_t recipients_of(apr_pool_t *p, const char *text, const char *field,
                                  json_t **out, int *n, const char **err)
{
    const char *perr = NULL;
    json_t *j, *r;
    size_t i;

    *out = NULL;
    if (!text || !*text) {
        return APR_SUCCESS;
    }
    j = mso_json_parse(p, text, strlen(text), &perr);
    if (!j || !json_is_array(j)) {
        *err = apr_psprintf(p, "%s is not a JSON array of {\"address\", \"name\"} objects%s%s",
                            field, perr ? ": " : "", perr ? perr : "");
        return APR_EINVAL;
    }
    *out = json_array();
    json_array_foreach(j, i, r) {
        const char *addr = json_is_string(r) ? json_string_value(r) : mso_json_str(r, "address");
        const json_t *jn = json_is_object(r) ? json_object_get(r, "name") : NULL;
        const char *name = json_is_string(jn) ? json_string_value(jn) : NULL;
        const char *why;
        json_t *ea;

        if (!json_is_string(r) && !json_is_object(r)) {
            why = "is neither an object nor a string";
        }
        else if (!addr) {
            why = "has no \"address\"";
        }
        else if ((why = mso_check_mailbox(addr)) != NULL) {
            why = apr_pstrcat(p, "has the address \"", clean_text(p, addr), "\", which is not "
                              "valid: an address must be a plain e-mail address such as "
                              "someone@example.com", NULL);
        }
        else if (jn && !json_is_null(jn) && !name) {
            why = "has a \"name\" that is not a string";
        }
        else if (name && (strlen(name) > RECIPIENT_NAME_MAX || !text_ok(name, 0))) {
            why = "has a \"name\" longer than 256 bytes or with control characters";
        }
        if (why) {
            *err = apr_psprintf(p, "%s: recipient %d %s", field, (int)i + 1, why);
            json_decref(*out);
            *out = NULL;
            return APR_EINVAL;
        }
        ea = json_pack("{s:s}", "address", addr);
        if (name && *name) {
            json_object_set_new(ea, "name", json_string(name));
        }
        json_array_append_new(*out, json_pack("{s:o}", "emailAddress", ea));
        ++*n;
    }
    return APR_SUCCESS;
}

static const char *body_type_of(const char *t)
{
    if (!t || !*t || !strcasecmp(t, "text")) {
        return "text";
    }
    return !strcasecmp(t, "html") ? "html" : NULL;
}

typedef struct {
    json_t *to, *cc, *bcc;
    int n;
} recipients_t;

static apr_status_t mail_recipients(apr_pool_t *p, const mso_graph_mail_t *m, recipients_t *r,
                                    const char **err)
{
    apr_status_t rv;

    memset(r, 0, sizeof(*r));
    if ((rv = recipients_of(p, m->to_json, "to_json", &r->to, &r->n, err)) != APR_SUCCESS
        || (rv = recipients_of(p, m->cc_json, "cc_json", &r->cc, &r->n, err)) != APR_SUCCESS
        || (rv = recipients_of(p, m->bcc_json, "bcc_json", &r->bcc, &r->n, err))
           != APR_SUCCESS) {
        goto fail;
    }
    if (r->n == 0 && !m->reply_to) {
        *err = "the message has no recipient: to_json, cc_json and bcc_json are all empty";
        rv = APR_EINVAL;
        goto fail;
    }
    if (r->n > MSO_GRAPH_MAX_RECIPIENTS) {
        *err = apr_psprintf(p, "the message has %d recipients; Graph takes at most %d over "
                            "to, cc and bcc", r->n, MSO_GRAPH_MAX_RECIPIENTS);
        rv = APR_EINVAL;
        goto fail;
    }
    return APR_SUCCESS;

fail:
    json_decref(r->to);
    json_decref(r->cc);
    json_decref(r->bcc);
    memset(r, 0, sizeof(*r));
    return rv;
}

static apr_status_t mail_check(apr_pool_t *p, const mso_graph_mail_t *m, recipients_t *r,
                               const char **err)
{
    *err = NULL;
    if (!body_type_of(m->body_type)) {
        *err = "body_type must be text or html";
        return APR_EINVAL;
    }
    if (m->reply_to && !id_ok(m->reply_to)) {
        *err = "reply_to_graph_id is not a Graph message id (letters, digits and +/=_- only, at "
               "most 512)";
        return APR_EINVAL;
    }
    if (!text_ok(m->subject, 1)) {
        *err = "subject holds a line break or another control character, or is not UTF-8";
        return APR_EINVAL;
    }
    if (m->body && !utf8_ok(m->body)) {
        *err = "body is not valid UTF-8";
        return APR_EINVAL;
    }
    return mail_recipients(p, m, r, err);
}

apr_status_t mso_graph_mail_check(apr_pool_t *p, const mso_graph_mail_t *m, const char **err)
{
    recipients_t r;
    apr_status_t rv = mail_check(p, m, &r, err);

    if (rv == APR_SUCCESS) {
        json_decref(r.to);
        json_decref(r.cc);
        json_decref(r.bcc);
    }
    return rv;
}

apr_status_t mso_graph_mail_create(apr_pool_t *p, const char *mailbox, const mso_graph_mail_t *m,
                                   mso_graph_request_t *req, const char **err)
{
    recipients_t r;
    json_t *msg, *ext;
    const char *body;
    apr_status_t rv;
    int reply = m->reply_to != NULL;

    memset(req, 0, sizeof(*req));
    if ((rv = mail_check(p, m, &r, err)) != APR_SUCCESS) {
        return rv;
    }
    msg = json_object();
    if (m->subject && (*m->subject || !reply)) {
        json_object_set_new(msg, "subject", json_string(m->subject));
    }
    /* A reply without a body of its own keeps Outlook's quote of the original. */
    if (!reply || (m->body && *m->body)) {
        json_object_set_new(msg, "body", json_pack("{s:s, s:s}", "contentType",
                                                   body_type_of(m->body_type), "content",
                                                   m->body ? m->body : ""));
    }
    if (r.to) {
        json_object_set_new(msg, "toRecipients", r.to);
    }
    if (r.cc) {
        json_object_set_new(msg, "ccRecipients", r.cc);
    }
    if (r.bcc) {
        json_object_set_new(msg, "bccRecipients", r.bcc);
    }
    ext = json_pack("[{s:s, s:s}]", "id", MSO_GRAPH_MARKER_PROPERTY, "value",
                    m->marker ? m->marker : "");
    json_object_set_new(msg, "singleValueExtendedProperties", ext);
    if (reply) {
        msg = json_pack("{s:o}", "message", msg);
    }
    body = mso_json_dump(p, msg);
    json_decref(msg);
    if (!body) {
        *err = "the message cannot be written as JSON";
        return APR_EINVAL;
    }
    if (strlen(body) > MSO_GRAPH_MAX_REQUEST) {
        *err = apr_psprintf(p, "the message's body and recipients take %" APR_SIZE_T_FMT
                            " bytes of JSON; Graph takes at most 4 MB in one request: send "
                            "large content as an attachment", strlen(body));
        return APR_EINVAL;
    }
    req->method = "POST";
    req->url = reply ? apr_pstrcat(p, message_url(p, mailbox, m->reply_to), "/createReply", NULL)
                     : apr_pstrcat(p, mailbox, "/messages", NULL);
    req->body = body;
    return APR_SUCCESS;
}

#define ITEM_SELECT "$select=id,isDraft,internetMessageId,parentFolderId"

static void item_of(apr_pool_t *p, const json_t *e, mso_graph_item_t *it)
{
    const char *imid = mso_json_str(e, "internetMessageId");

    memset(it, 0, sizeof(*it));
    it->id = exact_str(e, "id");
    it->is_draft = flag_of(e, "isDraft");
    it->internet_message_id = imid && strlen(imid) <= 998 ? clean_text(p, imid) : NULL;
    it->parent_folder_id = exact_str(e, "parentFolderId");
    it->id = it->id ? apr_pstrdup(p, it->id) : NULL;
    it->parent_folder_id = it->parent_folder_id ? apr_pstrdup(p, it->parent_folder_id) : NULL;
}

apr_status_t mso_graph_parse_items(apr_pool_t *p, const char *body, apr_size_t len,
                                   apr_array_header_t **items, const char **err)
{
    const char *perr = NULL;
    const json_t *value;
    json_t *j, *e;
    size_t i;

    *items = apr_array_make(p, 2, sizeof(mso_graph_item_t));
    j = mso_json_parse(p, body, len, &perr);
    if (!j || !json_is_object(j)) {
        *err = perr ? apr_pstrcat(p, "Graph's answer is not JSON: ", perr, NULL)
                    : "Graph's answer is not a JSON object";
        return APR_EINVAL;
    }
    value = mso_json_arr(j, "value");
    if (!value) {
        mso_graph_item_t it;

        item_of(p, j, &it);
        if (!id_ok(it.id)) {
            *err = "Graph's answer about a message has no usable id";
            return APR_EINVAL;
        }
        APR_ARRAY_PUSH(*items, mso_graph_item_t) = it;
        return APR_SUCCESS;
    }
    json_array_foreach(value, i, e) {
        mso_graph_item_t it;

        item_of(p, e, &it);
        if (id_ok(it.id)) {
            APR_ARRAY_PUSH(*items, mso_graph_item_t) = it;
        }
    }
    return APR_SUCCESS;
}

const char *mso_graph_marker_url(apr_pool_t *p, const char *mailbox, const char *marker)
{
    const char *filter = apr_pstrcat(p, "singleValueExtendedProperties/Any(ep: ep/id eq '",
                                     MSO_GRAPH_MARKER_PROPERTY, "' and ep/value eq '",
                                     marker ? marker : "", "')", NULL);

    return apr_pstrcat(p, mailbox, "/messages?$filter=", mso_url_encode(p, filter),
                       "&" ITEM_SELECT "&$top=50", NULL);
}

const char *mso_graph_item_url(apr_pool_t *p, const char *mailbox, const char *id)
{
    return apr_pstrcat(p, message_url(p, mailbox, id), "?" ITEM_SELECT, NULL);
}

const char *mso_graph_send_url(apr_pool_t *p, const char *mailbox, const char *draft_id)
{
    return apr_pstrcat(p, message_url(p, mailbox, draft_id), "/send", NULL);
}

static int token_char(char c)
{
    return c && (apr_isalnum(c) || strchr("!#$&^_.+-", c) != NULL);
}

const char *mso_graph_attachment_check(apr_pool_t *p, const char *name,
                                       const char *content_type, const char *content_id,
                                       apr_int64_t size)
{
    const char *c;

    (void)p;
    if (!name || !*name) {
        return "it has no name";
    }
    if (!utf8_ok(name) || strlen(name) > 4 * NAME_MAX_CHARS) {
        return "its name is not valid UTF-8 or is too long";
    }
    if (!text_ok(name, 0) || strchr(name, '/') || strchr(name, '\\') || !strcmp(name, ".")
        || !strcmp(name, "..")) {
        return "its name holds a path separator (/ or \\) or a control character";
    }
    if (content_type) {
        for (c = content_type; token_char(*c); c++) {
        }
        if (c == content_type || *c++ != '/' || !token_char(*c)) {
            return "its content_type is not a media type such as image/png";
        }
        for (; token_char(*c); c++) {
        }
        if (*c && *c != ';' && *c != ' ') {
            return "its content_type is not a media type such as image/png";
        }
        for (; *c; c++) {
            if (*c < 0x20 || *c >= 0x7f) {
                return "its content_type holds characters other than printable ASCII";
            }
        }
        if (strlen(content_type) > 255) {
            return "its content_type is longer than 255 characters";
        }
    }
    if (content_id) {
        if (!*content_id || strlen(content_id) > 255) {
            return "its content_id is empty or longer than 255 characters";
        }
        for (c = content_id; *c; c++) {
            if (*c <= 0x20 || *c >= 0x7f || *c == '<' || *c == '>') {
                return "its content_id holds a space, a control character or < > (give it "
                       "without the angle brackets, as cid: URLs name it)";
            }
        }
    }
    if (size < 0 || size > MSO_GRAPH_MAX_MESSAGE) {
        return "it is larger than 150 MB, the largest message Graph takes";
    }
    return NULL;
}

/* The JSON before and after the base64 of a fileAttachment. */
static void attachment_json_parts(apr_pool_t *p, const char *name, const char *content_type,
                                  int is_inline, const char *content_id, const char **head,
                                  const char **tail)
{
    json_t *o = json_pack("{s:s, s:s, s:s, s:b}", "@odata.type",
                          "#microsoft.graph.fileAttachment", "name", name, "contentType",
                          content_type ? content_type : "application/octet-stream",
                          "isInline", is_inline);
    const char *s;

    if (content_id) {
        json_object_set_new(o, "contentId", json_string(content_id));
    }
    json_object_set_new(o, "contentBytes", json_string(""));
    s = mso_json_dump(p, o);
    json_decref(o);
    /* jansson keeps insertion order: contentBytes is last, "" just before }. */
    *head = apr_pstrndup(p, s, strlen(s) - 2);
    *tail = "\"}";
}

apr_size_t mso_graph_attachment_post_len(apr_pool_t *p, const char *name,
                                         const char *content_type, int is_inline,
                                         const char *content_id, apr_int64_t size)
{
    const char *head, *tail;

    attachment_json_parts(p, name, content_type, is_inline, content_id, &head, &tail);
    return strlen(head) + (apr_size_t)(4 * ((size + 2) / 3)) + strlen(tail);
}

apr_status_t mso_graph_attachment_post(apr_pool_t *p, const char *mailbox,
                                       const char *draft_id, const char *name,
                                       const char *content_type, int is_inline,
                                       const char *content_id, const unsigned char *data,
                                       apr_size_t n, mso_graph_request_t *req, apr_size_t *len)
{
    const char *head, *tail;
    apr_size_t hl, b64;
    char *body;

    memset(req, 0, sizeof(*req));
    attachment_json_parts(p, name, content_type, is_inline, content_id, &head, &tail);
    hl = strlen(head);
    b64 = 4 * ((n + 2) / 3);
    *len = hl + b64 + strlen(tail);
    if (*len > MSO_GRAPH_MAX_REQUEST) {
        return APR_ENOSPC;
    }
    body = apr_palloc(p, *len + 1);
    memcpy(body, head, hl);
    /* apr_base64 writes a NUL after the text: the tail goes over it. */
    apr_base64_encode_binary(body + hl, data, (int)n);
    memcpy(body + hl + b64, tail, strlen(tail) + 1);
    req->method = "POST";
    req->url = apr_pstrcat(p, message_url(p, mailbox, draft_id), "/attachments", NULL);
    req->body = body;
    return APR_SUCCESS;
}

void mso_graph_upload_session(apr_pool_t *p, const char *mailbox, const char *draft_id,
                              const char *name, const char *content_type, int is_inline,
                              const char *content_id, apr_int64_t size,
                              mso_graph_request_t *req)
{
    json_t *item = json_pack("{s:s, s:s, s:I, s:b, s:s}", "attachmentType", "file", "name", name,
                             "size", (json_int_t)size, "isInline", is_inline, "contentType",
                             content_type ? content_type : "application/octet-stream");
    json_t *o;

    if (content_id) {
        json_object_set_new(item, "contentId", json_string(content_id));
    }
    o = json_pack("{s:o}", "AttachmentItem", item);
    req->method = "POST";
    req->url = apr_pstrcat(p, message_url(p, mailbox, draft_id),
                           "/attachments/createUploadSession", NULL);
    req->body = mso_json_dump(p, o);
    json_decref(o);
}

const char *mso_graph_parse_upload_url(apr_pool_t *p, const char *graph_root, const char *body,
                                       apr_size_t len, const char **err)
{
    const char *perr = NULL, *url, *c;
    json_t *j = mso_json_parse(p, body, len, &perr);
    apr_size_t rl = graph_root ? strlen(graph_root) : 0;

    url = j ? exact_str(j, "uploadUrl") : NULL;
    if (!url) {
        *err = "Graph's upload session has no uploadUrl";
        return NULL;
    }
    for (c = url; *c; c++) {
        if (*c <= 0x20 || *c >= 0x7f) {
            break;
        }
    }
    if (*c || c - url > 8192
        || (strncmp(url, "https://", 8) != 0
            && !(rl && !strncmp(url, graph_root, rl) && url[rl] == '/'))) {
        *err = "Graph's upload session names an upload URL that is not https (nor under "
               "MSOAuthGraphURL); it is not used";
        return NULL;
    }
    return apr_pstrdup(p, url);
}

const char *mso_graph_location_attachment_id(apr_pool_t *p, const char *location)
{
    const char *at, *end;
    const char *id;

    if (!location) {
        return NULL;
    }
    at = strstr(location, "Attachments('");
    if (!at) {
        at = strstr(location, "attachments('");
    }
    if (!at) {
        return NULL;
    }
    at += 13;
    end = strstr(at, "')");
    if (!end) {
        return NULL;
    }
    id = apr_pstrndup(p, at, end - at);
    return id_ok(id) ? id : NULL;
}

const char *mso_graph_draft_attachments_url(apr_pool_t *p, const char *mailbox,
                                            const char *draft_id)
{
    return apr_pstrcat(p, message_url(p, mailbox, draft_id),
                       "/attachments?$select=id,name,isInline,contentId", NULL);
}

const char *mso_graph_draft_attachment_url(apr_pool_t *p, const char *mailbox,
                                           const char *draft_id, const char *att_id)
{
    return apr_pstrcat(p, message_url(p, mailbox, draft_id), "/attachments/",
                       mso_url_encode(p, att_id), NULL);
}

apr_status_t mso_graph_parse_draft_attachments(apr_pool_t *p, const char *body, apr_size_t len,
                                               apr_array_header_t **items, const char **err)
{
    const char *perr = NULL;
    const json_t *value;
    json_t *j, *e;
    size_t i;

    *items = apr_array_make(p, 4, sizeof(mso_graph_att_item_t));
    j = mso_json_parse(p, body, len, &perr);
    value = j ? mso_json_arr(j, "value") : NULL;
    if (!value) {
        *err = "Graph's list of attachments is not a JSON object with a \"value\" array";
        return APR_EINVAL;
    }
    json_array_foreach(value, i, e) {
        mso_graph_att_item_t it;
        const char *id = exact_str(e, "id"), *name = exact_str(e, "name");
        const char *cid = exact_str(e, "contentId");

        if (!id_ok(id)) {
            continue;
        }
        it.id = apr_pstrdup(p, id);
        it.name = name ? apr_pstrdup(p, name) : NULL;
        it.is_inline = flag_of(e, "isInline") == 1;
        it.content_id = cid ? apr_pstrdup(p, cid) : NULL;
        APR_ARRAY_PUSH(*items, mso_graph_att_item_t) = it;
    }
    return APR_SUCCESS;
}
