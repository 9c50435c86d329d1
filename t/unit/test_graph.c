/* Checks of the Graph protocol side (lib/mso_graph) and of the write
 * permission test (lib/mso_sync): hostile pages, links, errors, requests. */
#include <check.h>

#include "unit.h"
#include <stdlib.h>
#include <string.h>

#include <apr_general.h>
#include <apr_strings.h>
#include <apr_tables.h>

#include "mso_graph.h"
#include "mso_json.h"
#include "mso_sync.h"

#define ROOT "https://graph.microsoft.com"
#define ME ROOT "/v1.0/me"

static apr_pool_t *pool;

static void setup(void)
{
    apr_pool_create(&pool, NULL);
}

static void teardown(void)
{
    apr_pool_destroy(pool);
}

static apr_status_t parse(const char *body, mso_graph_page_t *page, const char **err)
{
    return mso_graph_parse_page(pool, body, strlen(body), page, err);
}

static const mso_graph_msg_t *item(const mso_graph_page_t *page, int i)
{
    ck_assert_int_lt(i, page->items->nelts);
    return &APR_ARRAY_IDX(page->items, i, mso_graph_msg_t);
}

START_TEST(page_entries)
{
    mso_graph_page_t page;
    const char *err = NULL;
    const mso_graph_msg_t *m;

    ck_assert_int_eq(parse(
        "{\"value\":["
        "{\"id\":\"AAkALg==\",\"subject\":\"Hi\",\"isRead\":false,\"hasAttachments\":true,"
        "\"receivedDateTime\":\"2026-11-23T10:00:00Z\",\"importance\":\"high\","
        "\"from\":{\"emailAddress\":{\"name\":\"Ann\",\"address\":\"ann@x.com\"}},"
        "\"toRecipients\":[{\"emailAddress\":{\"name\":\"B\",\"address\":\"b@x.com\","
        "\"extra\":\"dropped\"}}],\"body\":{\"contentType\":\"html\",\"content\":\"<p>x</p>\"}},"
        "{\"id\":\"AAkALh==\",\"isRead\":true},"
        "{\"@odata.type\":\"#microsoft.graph.message\",\"id\":\"AAkALi==\","
        "\"@removed\":{\"reason\":\"deleted\"}},"
        "{\"id\":\"bad id with spaces\",\"subject\":\"x\"},"
        "{\"subject\":\"no id\"}, 42],"
        "\"@odata.nextLink\":\"" ROOT "/v1.0/me/mailFolders('x')/messages/delta?$skiptoken=a\"}",
        &page, &err), APR_SUCCESS);
    ck_assert_int_eq(page.items->nelts, 3);
    ck_assert_int_eq(page.skipped, 3);
    ck_assert_ptr_null(page.delta_link);
    ck_assert_ptr_nonnull(strstr(page.next_link, "skiptoken"));

    m = item(&page, 0);
    ck_assert(m->full && !m->removed);
    ck_assert_str_eq(m->graph_id, "AAkALg==");
    ck_assert_str_eq(m->subject, "Hi");
    ck_assert_int_eq(m->is_read, 0);
    ck_assert_int_eq(m->has_attachments, 1);
    ck_assert_int_eq(m->received_at, 1795428000);
    ck_assert_str_eq(m->from_address, "ann@x.com");
    ck_assert_str_eq(m->from_name, "Ann");
    ck_assert_str_eq(m->to_json, "[{\"name\":\"B\",\"address\":\"b@x.com\"}]");
    ck_assert_str_eq(m->body_type, "html");
    ck_assert_str_eq(m->body, "<p>x</p>");

    m = item(&page, 1);             /* an update: only what changed */
    ck_assert(!m->full && !m->removed);
    ck_assert_int_eq(m->is_read, 1);
    ck_assert_int_eq(m->has_attachments, -1);
    ck_assert_int_eq(m->received_at, -1);
    ck_assert_ptr_null(m->subject);

    m = item(&page, 2);
    ck_assert(m->removed && !m->full);
}
END_TEST

START_TEST(page_refused)
{
    mso_graph_page_t page;
    const char *err = NULL;

    ck_assert_int_eq(parse("not json", &page, &err), APR_EINVAL);
    ck_assert_ptr_nonnull(strstr(err, "not JSON"));
    ck_assert_int_eq(parse("{\"value\":{}}", &page, &err), APR_EINVAL);
    ck_assert_int_eq(parse("[1,2]", &page, &err), APR_EINVAL);
    /* A page that ends neither a round nor continues it cannot move the cursor. */
    ck_assert_int_eq(parse("{\"value\":[]}", &page, &err), APR_EINVAL);
    ck_assert_ptr_nonnull(strstr(err, "deltaLink"));
    ck_assert_int_eq(parse("{\"value\":[],\"@odata.deltaLink\":\"" ROOT "/v1.0/d\"}", &page,
                           &err), APR_SUCCESS);
    ck_assert_int_eq(page.items->nelts, 0);
}
END_TEST

START_TEST(page_hostile_strings)
{
    mso_graph_page_t page;
    const char *err = NULL;
    const mso_graph_msg_t *m;

    ck_assert_int_eq(parse(
        "{\"value\":["
        /* A NUL in the body: the page is read, the NUL becomes a space. */
        "{\"id\":\"AAkA1\",\"subject\":\"nul\",\"isRead\":false,"
        "\"receivedDateTime\":\"2026-11-23T10:00:00Z\","
        "\"body\":{\"contentType\":\"text\",\"content\":\"a\\u0000b\\u0000c\"}},"
        /* Cut by the clip (the NUL at the end): no body, marked; the rest kept. */
        "{\"id\":\"AAkA2\",\"subject\":\"big\",\"isRead\":true,"
        "\"receivedDateTime\":\"2026-11-23T10:00:00Z\",\"bodyPreview\":\"first words\","
        "\"from\":{\"emailAddress\":{\"name\":\"Eve\",\"address\":\"eve@x.com\"}},"
        "\"body\":{\"contentType\":\"html\",\"content\":\"<p>xxxx\\u0000\"}},"
        /* Controls: tab, CR, LF kept in body and preview only. */
        "{\"id\":\"AAkA3\",\"subject\":\"x\\u0001y\\tz\\nw\\u001f\",\"isRead\":true,"
        "\"receivedDateTime\":\"2026-11-23T10:00:00Z\",\"bodyPreview\":\"p\\r\\nq\\u0007\","
        "\"from\":{\"emailAddress\":{\"name\":\"N\\u0000ame\",\"address\":\"n@x.com\"}},"
        "\"toRecipients\":[{\"emailAddress\":{\"name\":\"T\\u0002o\",\"address\":"
        "\"t@x.com\\u0000\"}}],"
        "\"body\":{\"contentType\":\"text\",\"content\":\"l1\\r\\n\\tl2\\u0007\\u007f\"}},"
        /* A cut subject stays cut. */
        "{\"id\":\"AAkA4\",\"subject\":\"Subj\\u0000\",\"isRead\":true,"
        "\"receivedDateTime\":\"2026-11-23T10:00:00Z\"},"
        /* An update without a body; an id with a NUL is no id. */
        "{\"id\":\"AAkA5\",\"isRead\":false},"
        "{\"id\":\"AAkA6\\u0000x\",\"isRead\":false}],"
        "\"@odata.deltaLink\":\"" ROOT "/v1.0/d\"}", &page, &err), APR_SUCCESS);
    ck_assert_int_eq(page.items->nelts, 5);
    ck_assert_int_eq(page.skipped, 1);

    m = item(&page, 0);
    ck_assert_str_eq(m->body, "a b c");
    ck_assert_int_eq(m->body_truncated, 0);
    ck_assert(m->full);

    m = item(&page, 1);
    ck_assert(m->full);
    ck_assert_ptr_null(m->body);
    ck_assert_int_eq(m->body_truncated, 1);
    ck_assert_str_eq(m->body_type, "html");
    ck_assert_str_eq(m->subject, "big");
    ck_assert_str_eq(m->body_preview, "first words");
    ck_assert_str_eq(m->from_address, "eve@x.com");

    m = item(&page, 2);
    ck_assert_str_eq(m->subject, "x y z w ");
    ck_assert_str_eq(m->body_preview, "p\r\nq ");
    ck_assert_str_eq(m->body, "l1\r\n\tl2 \x7f");
    ck_assert_int_eq(m->body_truncated, 0);
    ck_assert_str_eq(m->from_name, "N ame");
    ck_assert_str_eq(m->to_json, "[{\"name\":\"T o\",\"address\":\"t@x.com\"}]");

    m = item(&page, 3);
    ck_assert_str_eq(m->subject, "Subj");
    ck_assert_ptr_null(m->body);
    ck_assert_int_eq(m->body_truncated, -1);

    m = item(&page, 4);
    ck_assert(!m->full);
    ck_assert_ptr_null(m->body);
    ck_assert_int_eq(m->body_truncated, -1);

    /* A link shortened by a NUL is no link. */
    ck_assert_int_eq(parse("{\"value\":[],\"@odata.deltaLink\":\"" ROOT "/v1.0/d\\u0000x\"}",
                           &page, &err), APR_EINVAL);
}
END_TEST

/* A page as the job gets it: through the clip with Graph's limits. */
START_TEST(page_through_the_clip)
{
    apr_size_t big = MSO_GRAPH_MAX_STRING + 100, n, len;
    char *doc = apr_palloc(pool, big + 1024), *out, *o;
    const char *head = "{\"@odata.context\":\"x\",\"value\":["
        "{\"id\":\"AAkB1\",\"subject\":\"huge\",\"isRead\":false,"
        "\"receivedDateTime\":\"2026-11-23T10:00:00Z\","
        "\"body\":{\"contentType\":\"html\",\"content\":\"";
    const char *tail = "\"}},"
        "{\"id\":\"AAkB2\",\"subject\":\"bad \xff utf-8 \\ud800\",\"isRead\":false,"
        "\"receivedDateTime\":\"2026-11-23T10:00:00Z\","
        "\"body\":{\"contentType\":\"text\",\"content\":\"ok \xc3\"}}],"
        "\"@odata.nextLink\":\"" ROOT "/v1.0/n\"}";
    mso_json_clip_t clip;
    mso_graph_page_t page;
    const char *err = NULL;

    o = doc;
    memcpy(o, head, strlen(head));
    o += strlen(head);
    /* Euro signs and escaped newlines: 5 bytes a pair, cut between them. */
    for (n = 0; n < big; n += 5) {
        memcpy(o, "\xe2\x82\xac\\n", 5);
        o += 5;
    }
    memcpy(o, tail, strlen(tail));
    o += strlen(tail);
    n = (apr_size_t)(o - doc);
    /* jansson alone refuses the invalid UTF-8 (and the page is too big). */
    ck_assert_int_eq(mso_graph_parse_page(pool, doc, n, &page, &err), APR_EINVAL);

    out = apr_palloc(pool, MSO_JSON_CLIP_ROOM(n));
    mso_json_clip_init(&clip, MSO_GRAPH_MAX_STRING);
    len = mso_json_clip_feed(&clip, doc, n, out);
    ck_assert_uint_lt(len, MSO_GRAPH_MAX_STRING + 1024);
    ck_assert_int_eq(mso_graph_parse_page(pool, out, len, &page, &err), APR_SUCCESS);
    ck_assert_int_eq(page.items->nelts, 2);
    ck_assert_ptr_null(item(&page, 0)->body);
    ck_assert_int_eq(item(&page, 0)->body_truncated, 1);
    ck_assert_str_eq(item(&page, 0)->subject, "huge");
    ck_assert_str_eq(item(&page, 1)->subject, "bad \xef\xbf\xbd utf-8 \xef\xbf\xbd");
    ck_assert_str_eq(item(&page, 1)->body, "ok \xef\xbf\xbd");
    ck_assert_int_eq(item(&page, 1)->body_truncated, 0);
    ck_assert_str_eq(page.next_link, ROOT "/v1.0/n");
}
END_TEST

START_TEST(times)
{
    ck_assert_int_eq(mso_graph_time("1970-01-01T00:00:00Z"), 0);
    ck_assert_int_eq(mso_graph_time("2026-11-23T10:00:00Z"), 1795428000);
    ck_assert_int_eq(mso_graph_time("2026-11-23T10:00:00.1234567Z"), 1795428000);
    ck_assert_int_eq(mso_graph_time("2026-11-23T12:00:00+02:00"), 1795428000);
    ck_assert_int_eq(mso_graph_time("2024-02-29T00:00:00Z"), 1709164800);
    ck_assert_int_eq(mso_graph_time("2026-13-01T00:00:00Z"), -1);
    ck_assert_int_eq(mso_graph_time("2026-11-23"), -1);
    ck_assert_int_eq(mso_graph_time("2026-11-23T10:00:00Zjunk"), -1);
    ck_assert_int_eq(mso_graph_time(NULL), -1);
}
END_TEST

START_TEST(links)
{
    ck_assert(mso_graph_link_ok(ROOT, ROOT "/v1.0/me/mailFolders/inbox/messages/delta?$d=1"));
    /* The bearer token goes nowhere else. */
    ck_assert(!mso_graph_link_ok(ROOT, "https://graph.microsoft.com.evil.example/v1.0/x"));
    ck_assert(!mso_graph_link_ok(ROOT, "http://graph.microsoft.com/v1.0/x"));
    ck_assert(!mso_graph_link_ok(ROOT, ROOT "/beta/x"));
    ck_assert(!mso_graph_link_ok(ROOT, ROOT "@evil.example/v1.0/x"));
    ck_assert(!mso_graph_link_ok(ROOT, ROOT "/v1.0/a b"));
    ck_assert(!mso_graph_link_ok(ROOT, ROOT "/v1.0/a\r\nX-Evil: 1"));
    ck_assert(!mso_graph_link_ok(ROOT, NULL));
    ck_assert_str_eq(mso_graph_delta_url(pool, ME, "inbox"),
                     ROOT "/v1.0/me/mailFolders/inbox/messages/delta?$select=" MSO_GRAPH_SELECT
                     "&$orderby=receivedDateTime%20desc");
}
END_TEST

START_TEST(headers)
{
    apr_array_header_t *h = mso_graph_headers(pool, "tok", 100);
    const char *all = apr_array_pstrcat(pool, h, '|');

    ck_assert_ptr_nonnull(strstr(all, "Authorization: Bearer tok"));
    ck_assert_ptr_nonnull(strstr(all, "Prefer: odata.maxpagesize=100, IdType=\"ImmutableId\""));
    ck_assert_ptr_nonnull(strstr(all, "client-request-id: "));
    h = mso_graph_headers(pool, "tok", 0);
    all = apr_array_pstrcat(pool, h, '|');
    ck_assert_ptr_null(strstr(all, "maxpagesize"));
    ck_assert_ptr_nonnull(strstr(all, "IdType=\"ImmutableId\""));
}
END_TEST

static mso_graph_result_t classify(int status, const char *body, const char *retry_after,
                                   const char *location)
{
    mso_http_response_t r;
    mso_graph_result_t g;

    memset(&r, 0, sizeof(r));
    r.status = status;
    r.body = body ? body : "";
    r.body_len = strlen(r.body);
    r.headers = apr_table_make(pool, 2);
    r.retry_after = retry_after ? atol(retry_after) : -1;
    if (location) {
        apr_table_set(r.headers, "Location", location);
    }
    apr_table_set(r.headers, "request-id", "rid-1");
    mso_graph_classify(pool, APR_SUCCESS, &r, &g);
    return g;
}

START_TEST(errors)
{
    mso_graph_result_t g;
    mso_http_response_t r;

    g = classify(200, "{}", NULL, NULL);
    ck_assert_int_eq(g.cls, MSO_GRAPH_OK);
    g = classify(429, "{\"error\":{\"code\":\"TooManyRequests\",\"message\":\"slow\\ndown\"}}",
                 "7", NULL);
    ck_assert_int_eq(g.cls, MSO_GRAPH_THROTTLED);
    ck_assert_int_eq(g.retry_after, 7);
    ck_assert(!g.maybe_applied);
    ck_assert_str_eq(mso_graph_result_text(pool, &g),
                     "HTTP 429 TooManyRequests: slow down [request-id rid-1]");
    g = classify(503, NULL, NULL, NULL);
    ck_assert_int_eq(g.cls, MSO_GRAPH_THROTTLED);
    ck_assert(g.maybe_applied);
    g = classify(410, NULL, NULL, ROOT "/v1.0/me/mailFolders('x')/messages/delta?$deltatoken=");
    ck_assert_int_eq(g.cls, MSO_GRAPH_RESYNC);
    ck_assert_ptr_nonnull(g.location);
    g = classify(400, "{\"error\":{\"code\":\"badRequest\",\"innerError\":{\"code\":"
                 "\"syncStateNotFound\"}}}", NULL, NULL);
    ck_assert_int_eq(g.cls, MSO_GRAPH_RESYNC);
    ck_assert_str_eq(g.code, "syncStateNotFound");
    g = classify(400, "{\"error\":{\"code\":\"resyncRequired\"}}", NULL, NULL);
    ck_assert_int_eq(g.cls, MSO_GRAPH_RESYNC);
    ck_assert_int_eq(classify(401, NULL, NULL, NULL).cls, MSO_GRAPH_UNAUTHORIZED);
    ck_assert_int_eq(classify(403, NULL, NULL, NULL).cls, MSO_GRAPH_FORBIDDEN);
    ck_assert_int_eq(classify(404, "{\"error\":{\"code\":\"ErrorItemNotFound\"}}", NULL,
                              NULL).cls, MSO_GRAPH_NOT_FOUND);
    ck_assert_int_eq(classify(400, "{\"error\":{\"code\":\"invalidRequest\"}}", NULL,
                              NULL).cls, MSO_GRAPH_FAILED);
    g = classify(504, "<html>gateway</html>", NULL, NULL);
    ck_assert_int_eq(g.cls, MSO_GRAPH_TRANSIENT);
    ck_assert(g.maybe_applied);

    /* No answer: transient; applied unless it never left. */
    memset(&r, 0, sizeof(r));
    r.error = "timed out";
    mso_graph_classify(pool, APR_TIMEUP, &r, &g);
    ck_assert_int_eq(g.cls, MSO_GRAPH_TRANSIENT);
    ck_assert(g.maybe_applied);
    r.not_sent = 1;
    mso_graph_classify(pool, APR_TIMEUP, &r, &g);
    ck_assert(!g.maybe_applied);

    /* A long, hostile message is cut and kept on one line. */
    {
        char *big = apr_palloc(pool, 5000);
        const char *text;
        size_t n;

        strcpy(big, "{\"error\":{\"code\":\"x\",\"message\":\"");
        n = strlen(big);
        memset(big + n, 'a', 2000);
        strcpy(big + n + 2000, "\"}}");
        g = classify(400, big, NULL, NULL);
        text = mso_graph_result_text(pool, &g);
        ck_assert_int_lt(strlen(text), 400);
    }
}
END_TEST

START_TEST(action_requests)
{
    mso_graph_request_t req;
    const char *err = NULL;

    ck_assert_int_eq(mso_graph_action_request(pool, ME, "mark_read", "AAk+/=_-", NULL, &req,
                                              &err), APR_SUCCESS);
    ck_assert_str_eq(req.method, "PATCH");
    ck_assert_str_eq(req.url, ROOT "/v1.0/me/messages/AAk%2B%2F%3D_-");
    ck_assert_str_eq(req.body, "{\"isRead\":true}");
    ck_assert_int_eq(mso_graph_action_request(pool, ME, "mark_unread", "A", NULL, &req, &err),
                     APR_SUCCESS);
    ck_assert_str_eq(req.body, "{\"isRead\":false}");
    /* Outlook's Delete: a move to Deleted Items. */
    ck_assert_int_eq(mso_graph_action_request(pool, ME, "delete", "A", NULL, &req, &err),
                     APR_SUCCESS);
    ck_assert_str_eq(req.method, "POST");
    ck_assert_str_eq(req.url, ROOT "/v1.0/me/messages/A/move");
    ck_assert_str_eq(req.body, "{\"destinationId\":\"deleteditems\"}");
    ck_assert_int_eq(mso_graph_action_request(pool, ME, "move", "A", "Archive", &req, &err),
                     APR_SUCCESS);
    ck_assert_str_eq(req.body, "{\"destinationId\":\"archive\"}");
    ck_assert_int_eq(mso_graph_action_request(pool, ME, "move", "A", "AQMkADAw==", &req,
                                              &err), APR_SUCCESS);
    ck_assert_str_eq(req.body, "{\"destinationId\":\"AQMkADAw==\"}");

    ck_assert_int_eq(mso_graph_action_request(pool, ME, "move", "A", "x\"}, {\"y", &req,
                                              &err), APR_EINVAL);
    ck_assert_ptr_nonnull(strstr(err, "destination"));
    ck_assert_int_eq(mso_graph_action_request(pool, ME, "move", "A", NULL, &req, &err),
                     APR_EINVAL);
    ck_assert_int_eq(mso_graph_action_request(pool, ME, "mark_read", "../../me", NULL, &req,
                                              &err), APR_EINVAL);
    ck_assert_ptr_nonnull(strstr(err, "graph_id"));
    ck_assert_int_eq(mso_graph_action_request(pool, ME, "mark_read", "", NULL, &req, &err),
                     APR_EINVAL);
    ck_assert_int_eq(mso_graph_action_request(pool, ME, "purge", "A", NULL, &req, &err),
                     APR_EINVAL);
    ck_assert_str_eq(mso_graph_action_destination(pool, "delete", "inbox"), "deleteditems");
    ck_assert_str_eq(mso_graph_action_destination(pool, "move", "JunkEmail"), "junkemail");
    ck_assert_str_eq(mso_graph_folder_url(pool, ME, "archive"),
                     ROOT "/v1.0/me/mailFolders/archive?$select=id");
    ck_assert_str_eq(mso_graph_message_state_url(pool, ME, "A"),
                     ROOT "/v1.0/me/messages/A?$select=isRead,parentFolderId");
}
END_TEST

START_TEST(write_scopes)
{
    ck_assert(mso_sync_scopes_can_write("Mail.ReadWrite User.Read openid"));
    ck_assert(mso_sync_scopes_can_write("openid https://graph.microsoft.com/Mail.ReadWrite"));
    ck_assert(!mso_sync_scopes_can_write("Mail.Read User.Read"));
    ck_assert(!mso_sync_scopes_can_write("Mail.ReadWrite.Shared"));
    ck_assert(!mso_sync_scopes_can_write("XMail.ReadWrite"));
    ck_assert(!mso_sync_scopes_can_write(NULL));
}
END_TEST

/* Who signed in, from Graph's /me: the address is mail, else the UPN; the
 * object must be the ID token's (personal accounts: the oid's tail). */
START_TEST(me_identity)
{
    mso_graph_me_t me;
    const char *err = NULL;
    const char *body = "{\"id\":\"6e2b8f3a-1c4d-4e5f-8a9b-0c1d2e3f4a5b\",\"displayName\":\"A\","
                       "\"mail\":\"Adele@Contoso.com\",\"userPrincipalName\":\"adele@contoso"
                       ".onmicrosoft.com\"}";

    ck_assert_str_eq(mso_graph_me_url(pool, "https://graph.microsoft.com"),
                     "https://graph.microsoft.com/v1.0/me?$select=id,displayName,mail,"
                     "userPrincipalName");
    ck_assert_int_eq(mso_graph_parse_me(pool, body, strlen(body), &me, &err), APR_SUCCESS);
    ck_assert_str_eq(mso_graph_me_address(pool, &me), "adele@contoso.com");
    ck_assert(mso_graph_me_is_object(&me, "b3a8f1e2-5c47-4d1a-9e36-2f0c8d7a6b51",
                                     "6E2B8F3A-1C4D-4E5F-8A9B-0C1D2E3F4A5B"));
    ck_assert(!mso_graph_me_is_object(&me, "b3a8f1e2-5c47-4d1a-9e36-2f0c8d7a6b51",
                                      "7f3c9a4b-2d5e-4f60-9bac-1d2e3f4a5b6c"));
    ck_assert(!mso_graph_me_is_object(&me, NULL, NULL));

    body = "{\"id\":\"a1b2c3d4e5f60718\",\"mail\":null,\"userPrincipalName\":\"Pat@outlook.com\"}";
    ck_assert_int_eq(mso_graph_parse_me(pool, body, strlen(body), &me, &err), APR_SUCCESS);
    ck_assert_str_eq(mso_graph_me_address(pool, &me), "pat@outlook.com");
    ck_assert(mso_graph_me_is_object(&me, "9188040d-6c67-4c5b-b112-36a304b66dad",
                                     "00000000-0000-0000-a1b2-c3d4e5f60718"));
    /* The same tail in a work tenant, or a wrong tail, is not the object. */
    ck_assert(!mso_graph_me_is_object(&me, "b3a8f1e2-5c47-4d1a-9e36-2f0c8d7a6b51",
                                      "00000000-0000-0000-a1b2-c3d4e5f60718"));
    ck_assert(!mso_graph_me_is_object(&me, "9188040d-6c67-4c5b-b112-36a304b66dad",
                                      "00000000-0000-0000-a1b2-c3d4e5f60719"));
    ck_assert(!mso_graph_me_is_object(&me, "9188040d-6c67-4c5b-b112-36a304b66dad",
                                      "10000000-0000-0000-a1b2-c3d4e5f60718"));

    body = "{\"displayName\":\"no id\"}";
    ck_assert_int_eq(mso_graph_parse_me(pool, body, strlen(body), &me, &err), APR_EINVAL);
    body = "[1]";
    ck_assert_int_eq(mso_graph_parse_me(pool, body, strlen(body), &me, &err), APR_EINVAL);
    body = "{\"id\":\"x\"}";
    ck_assert_int_eq(mso_graph_parse_me(pool, body, strlen(body), &me, &err), APR_SUCCESS);
    ck_assert_ptr_null(mso_graph_me_address(pool, &me));
}
END_TEST

/* Every mail URL starts with the mailbox: /me for the person's own, the
 * address (encoded) under /users for app-only and shared mailboxes. */
START_TEST(attachment_lists)
{
    apr_array_header_t *atts = NULL;
    const mso_graph_att_t *a;
    const char *next = NULL, *err = NULL;
    int skipped = -1;
    /* Graph's three kinds, an inline part, hostile strings, entries to skip. */
    const char *list = "{\"value\":["
        "{\"@odata.type\":\"#microsoft.graph.fileAttachment\",\"id\":\"AAMk-f1=\","
        "\"name\":\"a\\u0000b\\r\\n.pdf\",\"contentType\":\"application/pdf\",\"size\":1234,"
        "\"isInline\":false,\"contentId\":null,\"lastModifiedDateTime\":\"2026-01-02T03:04:05Z\"},"
        "{\"@odata.type\":\"#microsoft.graph.fileAttachment\",\"id\":\"AAMk-img\",\"name\":\"logo.png\","
        "\"contentType\":\"image/png\",\"size\":-5,\"isInline\":true,\"contentId\":\"logo@x\"},"
        "{\"@odata.type\":\"#microsoft.graph.itemAttachment\",\"id\":\"AAMk-item\",\"name\":\"Fwd\","
        "\"contentType\":null,\"size\":\"9\"},"
        "{\"@odata.type\":\"#Microsoft.Graph.ReferenceAttachment\",\"id\":\"AAMk-ref\",\"name\":\"Doc\"},"
        "{\"@odata.type\":\"#microsoft.graph.fileAttachment\",\"id\":\"../../x\"},"
        "{\"@odata.type\":\"#microsoft.graph.somethingNew\",\"id\":\"AAMk-new\"},"
        "{\"id\":\"AAMk-untyped\"}, 7],"
        "\"@odata.nextLink\":\"" ME "/messages/M/attachments?$skip=4\"}";

    ck_assert_int_eq(mso_graph_parse_attachments(pool, list, strlen(list), &atts, &next,
                                                 &skipped, &err), APR_SUCCESS);
    ck_assert_int_eq(atts->nelts, 4);
    ck_assert_int_eq(skipped, 4);
    ck_assert_str_eq(next, ME "/messages/M/attachments?$skip=4");
    a = &APR_ARRAY_IDX(atts, 0, mso_graph_att_t);
    ck_assert_str_eq(a->kind, "file");
    ck_assert_str_eq(a->id, "AAMk-f1=");
    ck_assert_str_eq(a->name, "a b  .pdf");
    ck_assert_str_eq(a->content_type, "application/pdf");
    ck_assert_int_eq(a->size, 1234);
    ck_assert_int_eq(a->is_inline, 0);
    ck_assert_ptr_null(a->content_id);
    ck_assert_str_eq(a->last_modified, "2026-01-02T03:04:05Z");
    a = &APR_ARRAY_IDX(atts, 1, mso_graph_att_t);
    ck_assert_int_eq(a->is_inline, 1);
    ck_assert_str_eq(a->content_id, "logo@x");
    ck_assert_int_eq(a->size, -1);
    a = &APR_ARRAY_IDX(atts, 2, mso_graph_att_t);
    ck_assert_str_eq(a->kind, "item");
    ck_assert_str_eq(a->content_type, "message/rfc822");
    ck_assert_int_eq(a->size, -1);
    a = &APR_ARRAY_IDX(atts, 3, mso_graph_att_t);
    ck_assert_str_eq(a->kind, "reference");
    ck_assert_ptr_null(a->content_type);

    ck_assert_int_eq(mso_graph_parse_attachments(pool, "[]", 2, &atts, &next, &skipped, &err),
                     APR_EINVAL);
    ck_assert_ptr_nonnull(err);
    ck_assert_int_eq(mso_graph_parse_attachments(pool, "{\"value\":[]}", 12, &atts, &next,
                                                 &skipped, &err), APR_SUCCESS);
    ck_assert_int_eq(atts->nelts, 0);
    ck_assert_ptr_null(next);
}
END_TEST

START_TEST(attachment_urls_and_links)
{
    const char *url = NULL, *err = NULL, *body;

    ck_assert_str_eq(mso_graph_attachments_url(pool, ME, "A+b/c="),
                     ME "/messages/A%2Bb%2Fc%3D/attachments?$select=" MSO_GRAPH_ATTACH_SELECT);
    ck_assert_str_eq(mso_graph_attachment_value_url(pool, ME, "M", "A/1"),
                     ME "/messages/M/attachments/A%2F1/$value");
    ck_assert_str_eq(mso_graph_attachment_link_url(pool, ME, "M", "A"),
                     ROOT "/beta/me/messages/M/attachments/A");
    ck_assert_str_eq(mso_graph_attachment_link_url(pool, ROOT "/v1.0/users/a%40b.com", "M",
                                                   "A"),
                     ROOT "/beta/users/a%40b.com/messages/M/attachments/A");
    ck_assert(mso_graph_id_ok("AAMkAGI2-_+/="));
    ck_assert(!mso_graph_id_ok("a b"));
    ck_assert(!mso_graph_id_ok(""));
    ck_assert(!mso_graph_id_ok(NULL));

    body = "{\"sourceUrl\":\"https://contoso.sharepoint.com/:w:/r/Doc.docx\"}";
    ck_assert_int_eq(mso_graph_parse_link(pool, body, strlen(body), &url, &err), APR_SUCCESS);
    ck_assert_str_eq(url, "https://contoso.sharepoint.com/:w:/r/Doc.docx");
    body = "{\"sourceUrl\":\"javascript:alert(1)\"}";
    ck_assert_int_eq(mso_graph_parse_link(pool, body, strlen(body), &url, &err), APR_EINVAL);
    body = "{\"sourceUrl\":\"https://x/\\r\\nSet-Cookie: a\"}";
    ck_assert_int_eq(mso_graph_parse_link(pool, body, strlen(body), &url, &err), APR_EINVAL);
    body = "{\"name\":\"no link\"}";
    ck_assert_int_eq(mso_graph_parse_link(pool, body, strlen(body), &url, &err), APR_EINVAL);
    ck_assert_ptr_null(url);
}
END_TEST

START_TEST(mailbox_urls)
{
    const char *shared = mso_graph_mailbox(pool, ROOT, "support+eu@contoso.com");
    mso_graph_request_t req;
    const char *err = NULL;

    ck_assert_str_eq(mso_graph_mailbox(pool, ROOT, NULL), ROOT "/v1.0/me");
    ck_assert_str_eq(shared, ROOT "/v1.0/users/support%2Beu%40contoso.com");
    ck_assert_str_eq(mso_graph_mailbox(pool, ROOT, "a/../b@x"), ROOT "/v1.0/users/a%2F..%2Fb%40x");
    ck_assert(!strncmp(mso_graph_delta_url(pool, shared, "inbox"),
                       ROOT "/v1.0/users/support%2Beu%40contoso.com/mailFolders/inbox/messages/"
                       "delta?", 84));
    ck_assert_int_eq(mso_graph_action_request(pool, shared, "delete", "A", NULL, &req, &err),
                     APR_SUCCESS);
    ck_assert_str_eq(req.url, ROOT "/v1.0/users/support%2Beu%40contoso.com/messages/A/move");
    ck_assert(mso_graph_link_ok(ROOT, req.url));
}
END_TEST

int main(void)
{
    Suite *s = suite_create("graph");
    TCase *tc = tcase_create("graph");
    int failed;

    apr_initialize();
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, page_entries);
    tcase_add_test(tc, page_refused);
    tcase_add_test(tc, page_hostile_strings);
    tcase_add_test(tc, page_through_the_clip);
    tcase_add_test(tc, times);
    tcase_add_test(tc, links);
    tcase_add_test(tc, headers);
    tcase_add_test(tc, errors);
    tcase_add_test(tc, action_requests);
    tcase_add_test(tc, write_scopes);
    tcase_add_test(tc, me_identity);
    tcase_add_test(tc, mailbox_urls);
    tcase_add_test(tc, attachment_lists);
    tcase_add_test(tc, attachment_urls_and_links);
    suite_add_tcase(s, tc);
    failed = mso_check_run(s);
    apr_terminate();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
