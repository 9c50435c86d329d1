/* Attachments in the database (lib/mso_attach) and what the mirror does to
 * them (lib/mso_mirror), on SQLite and PostgreSQL: which messages are listed
 * and when again, lists stored, contents stored and read back in parts,
 * states, rows following their message out of the mirror, the work claim,
 * retention, the schema upgrade, and the header values served. */
#include "dbtest.h"

#include <string.h>

#include <apr_strings.h>
#include <apr_time.h>

#include "mso_attach.h"
#include "mso_graph.h"
#include "mso_mirror.h"
#include "mso_schema.h"

#define LINK "https://graph.microsoft.com/v1.0/me/mailFolders('i')/messages/delta"

/* A full delta entry: has_attachments, body type and body as given. */
#define ENTRY(id, when, att, type, body) "{\"id\":\"" id "\",\"subject\":\"S\",\"isRead\":false," \
    "\"receivedDateTime\":\"" when "\",\"hasAttachments\":" att ",\"body\":{\"contentType\":\"" \
    type "\",\"content\":\"" body "\"}}"

static mso_graph_page_t *page_of(const char *json)
{
    mso_graph_page_t *page = apr_palloc(pool, sizeof(*page));
    const char *err = NULL;

    ck_assert_msg(mso_graph_parse_page(pool, json, strlen(json), page, &err) == APR_SUCCESS,
                  "page: %s", err ? err : "");
    return page;
}

static mso_work_t *leased(mso_db_t *db, const char *mailbox, apr_int64_t now)
{
    apr_array_header_t *works = NULL;
    mso_connect_t a = sample("default", mailbox, apr_pstrcat(pool, "oid-", mailbox, NULL));

    a.access_expires_at = now + 3600;
    a.refresh_due_at = now + 3000;
    connect_ok(db, &a, "sealed-r", "sealed-a", now);
    ck_assert_int_eq(mso_mirror_claim(db, pool, "me", now, 45, 10, &works), APR_SUCCESS);
    ck_assert_int_eq(works->nelts, 1);
    return APR_ARRAY_IDX(works, 0, mso_work_t *);
}

static mso_folder_t *inbox_of(mso_db_t *db, apr_int64_t id)
{
    apr_array_header_t *names = apr_array_make(pool, 1, sizeof(const char *)), *out = NULL;

    APR_ARRAY_PUSH(names, const char *) = "inbox";
    ck_assert_int_eq(mso_mirror_folders(db, pool, id, names, &out), APR_SUCCESS);
    return APR_ARRAY_IDX(out, 0, mso_folder_t *);
}

static void apply_ok(mso_db_t *db, apr_int64_t id, mso_folder_t *f, const char *json)
{
    const char *err = NULL;
    int applied = -1;

    ck_assert_msg(mso_mirror_apply_page(db, pool, "me", id, f, page_of(json),
                                        apr_time_sec(apr_time_now()), &applied, &err)
                  == APR_SUCCESS, "apply: %s", err ? err : "");
}

static long long due_of(mso_db_t *db, const char *graph_id)
{
    return num(db, apr_psprintf(pool, "SELECT attach_due FROM msoauth_messages WHERE "
                                "graph_id = '%s'", graph_id));
}

static long long rows_of(mso_db_t *db, const char *where)
{
    return num(db, apr_psprintf(pool, "SELECT COUNT(*) FROM msoauth_attachments WHERE %s",
                                where));
}

/* The account's messages to list, as graph ids joined by spaces. */
static const char *due_list(mso_db_t *db, apr_int64_t id, apr_array_header_t **out)
{
    apr_array_header_t *ms = NULL;
    const char *s = "";
    int i;

    ck_assert_int_eq(mso_attach_due_messages(db, pool, id, 50, &ms), APR_SUCCESS);
    for (i = 0; i < ms->nelts; i++) {
        s = apr_pstrcat(pool, s, i ? " " : "", APR_ARRAY_IDX(ms, i, mso_attach_msg_t *)->graph_id,
                        NULL);
    }
    if (out) {
        *out = ms;
    }
    return s;
}

static mso_attach_msg_t *due_msg(mso_db_t *db, apr_int64_t id, const char *graph_id)
{
    apr_array_header_t *ms = NULL;
    int i;

    due_list(db, id, &ms);
    for (i = 0; i < ms->nelts; i++) {
        if (!strcmp(APR_ARRAY_IDX(ms, i, mso_attach_msg_t *)->graph_id, graph_id)) {
            return APR_ARRAY_IDX(ms, i, mso_attach_msg_t *);
        }
    }
    ck_abort_msg("%s is not due", graph_id);
    return NULL;
}

static apr_array_header_t *atts_of(const char *json)
{
    apr_array_header_t *atts = NULL;
    const char *next = NULL, *err = NULL;
    int skipped = 0;

    ck_assert_int_eq(mso_graph_parse_attachments(pool, json, strlen(json), &atts, &next,
                                                 &skipped, &err), APR_SUCCESS);
    return atts;
}

static void list_ok(mso_db_t *db, apr_int64_t id, const mso_attach_msg_t *m, const char *json,
                    apr_int64_t cap, int want_stale)
{
    const char *err = NULL;
    int stale = -1;

    ck_assert_msg(mso_attach_store_list(db, pool, "me", id, m, atts_of(json), cap,
                                        apr_time_sec(apr_time_now()), &stale, &err)
                  == APR_SUCCESS, "store list: %s", err ? err : "");
    ck_assert_int_eq(stale, want_stale);
}

#define FILE_ATT(id, name, size, lm) "{\"@odata.type\":\"#microsoft.graph.fileAttachment\"," \
    "\"id\":\"" id "\",\"name\":\"" name "\",\"contentType\":\"application/pdf\",\"size\":" \
    size ",\"isInline\":false,\"lastModifiedDateTime\":\"" lm "\"}"
#define INLINE_ATT(id, cid) "{\"@odata.type\":\"#microsoft.graph.fileAttachment\",\"id\":\"" \
    id "\",\"name\":\"logo.png\",\"contentType\":\"image/png\",\"size\":10,\"isInline\":true," \
    "\"contentId\":\"" cid "\"}"
#define ITEM_ATT(id) "{\"@odata.type\":\"#microsoft.graph.itemAttachment\",\"id\":\"" id "\"," \
    "\"name\":\"Fwd: hello\",\"contentType\":null,\"size\":2000}"
#define REF_ATT(id) "{\"@odata.type\":\"#microsoft.graph.referenceAttachment\",\"id\":\"" id \
    "\",\"name\":\"Plan.docx\",\"size\":512}"

START_TEST(which_messages_are_listed)
{
    mso_db_t *db = fresh_db(_i);
    apr_int64_t now = apr_time_sec(apr_time_now());
    mso_work_t *w;
    mso_folder_t *f;
    mso_attach_msg_t *m;

    migrate_ok(db);
    w = leased(db, "list@example.com", now);
    f = inbox_of(db, w->acct->id);
    /* With attachments; an HTML body showing an inline part (hasAttachments
     * false: Graph does not count inline ones); plain ones. */
    apply_ok(db, w->acct->id, f, "{\"value\":["
             ENTRY("A", "2026-11-23T10:00:00Z", "true", "text", "see attached") ","
             ENTRY("B", "2026-11-23T12:00:00Z", "false", "html", "<img src=\\\"CID:logo@x\\\">") ","
             ENTRY("C", "2026-11-23T11:00:00Z", "false", "html", "<p>cid is no url</p>") ","
             ENTRY("D", "2026-11-23T09:00:00Z", "false", "text", "cid:plain") "],"
             "\"@odata.nextLink\":\"" LINK "?$skiptoken=1\"}");
    ck_assert_int_eq(due_of(db, "A"), 1);
    ck_assert_int_eq(due_of(db, "B"), 1);
    ck_assert_int_eq(due_of(db, "C"), 0);
    ck_assert_int_eq(due_of(db, "D"), 0);
    ck_assert_str_eq(due_list(db, w->acct->id, NULL), "B A");      /* newest first */

    /* Listed: current. A change of the message (read in Outlook) lists it
     * again; a change while a listing is under way makes that listing stale. */
    m = due_msg(db, w->acct->id, "A");
    list_ok(db, w->acct->id, m, "{\"value\":[" FILE_ATT("a1", "x.pdf", "100", "t1") "]}",
            1000, 0);
    ck_assert_int_eq(due_of(db, "A"), 0);
    ck_assert_str_eq(due_list(db, w->acct->id, NULL), "B");
    m = due_msg(db, w->acct->id, "B");
    apply_ok(db, w->acct->id, f, "{\"value\":["
             ENTRY("A", "2026-11-23T10:00:00Z", "true", "text", "see attached") ","
             ENTRY("B", "2026-11-23T12:00:00Z", "false", "html", "<img src=\\\"cid:logo@x\\\">")
             "],\"@odata.nextLink\":\"" LINK "?$skiptoken=2\"}");
    ck_assert_int_eq(due_of(db, "A"), 1);
    ck_assert_int_eq(due_of(db, "B"), 2);
    list_ok(db, w->acct->id, m, "{\"value\":[" INLINE_ATT("b1", "logo@x") "]}", 1000, 1);
    ck_assert_int_eq(rows_of(db, "graph_id = 'B'"), 0);
    ck_assert_int_eq(due_of(db, "B"), 2);
    list_ok(db, w->acct->id, due_msg(db, w->acct->id, "B"),
            "{\"value\":[" INLINE_ATT("b1", "logo@x") "]}", 1000, 0);
    ck_assert_int_eq(rows_of(db, "graph_id = 'B' AND is_inline = 1 AND content_id = 'logo@x' "
                                 "AND state = 'pending'"), 1);

    /* All attachments removed in Outlook: hasAttachments false, yet its rows
     * make it listed again, and the empty list removes them. */
    list_ok(db, w->acct->id, due_msg(db, w->acct->id, "A"),
            "{\"value\":[" FILE_ATT("a1", "x.pdf", "100", "t1") "]}", 1000, 0);
    apply_ok(db, w->acct->id, f, "{\"value\":["
             ENTRY("A", "2026-11-23T10:00:00Z", "false", "text", "see attached") "],"
             "\"@odata.nextLink\":\"" LINK "?$skiptoken=3\"}");
    ck_assert_int_eq(due_of(db, "A"), 1);
    list_ok(db, w->acct->id, due_msg(db, w->acct->id, "A"), "{\"value\":[]}", 1000, 0);
    ck_assert_int_eq(rows_of(db, "graph_id = 'A'"), 0);
    apply_ok(db, w->acct->id, f, "{\"value\":["
             ENTRY("A", "2026-11-23T10:00:00Z", "false", "text", "see attached") "],"
             "\"@odata.nextLink\":\"" LINK "?$skiptoken=4\"}");
    ck_assert_int_eq(due_of(db, "A"), 0);
    /* A partial update that does not say keeps the row's own flag. */
    apply_ok(db, w->acct->id, f, "{\"value\":[{\"id\":\"C\",\"subject\":\"new\"}],"
             "\"@odata.nextLink\":\"" LINK "?$skiptoken=5\"}");
    ck_assert_int_eq(due_of(db, "C"), 0);
    /* Without the lease nothing is stored. */
    {
        mso_attach_msg_t b = {"B", 0, 0, 0};
        const char *err = NULL;
        int stale = 0;

        ck_assert_int_eq(mso_attach_store_list(db, pool, "other", w->acct->id, &b,
                                               atts_of("{\"value\":[]}"), 10, now, &stale, &err),
                         APR_EBUSY);
    }
}
END_TEST

START_TEST(lists_contents_and_states)
{
    mso_db_t *db = fresh_db(_i);
    apr_int64_t now = apr_time_sec(apr_time_now()), id;
    apr_array_header_t *items = NULL;
    mso_attach_item_t *it;
    mso_attach_t *t = NULL;
    mso_work_t *w;
    mso_folder_t *f;
    const unsigned char *part;
    const char *err = NULL;
    unsigned char *big;
    apr_size_t got, off, n = 1000003;
    int stored = 0, gave_up = 0, i;

    migrate_ok(db);
    w = leased(db, "contents@example.com", now);
    id = w->acct->id;
    f = inbox_of(db, id);
    apply_ok(db, id, f, "{\"value\":["
             ENTRY("OLD", "2026-11-20T10:00:00Z", "true", "text", "x") ","
             ENTRY("NEW", "2026-11-23T10:00:00Z", "true", "text", "y") "],"
             "\"@odata.deltaLink\":\"" LINK "?$deltatoken=1\"}");
    list_ok(db, id, due_msg(db, id, "OLD"), "{\"value\":[" FILE_ATT("o1", "old.pdf", "50", "t")
            "]}", 1000, 0);
    /* Cap 1000: within it pending; above it large; a link and an item are
     * fetched whatever their size says (an item's MIME is capped on download). */
    list_ok(db, id, due_msg(db, id, "NEW"), "{\"value\":["
            FILE_ATT("n1", "small.pdf", "1000", "t1") "," FILE_ATT("n2", "big.pdf", "1001", "t1")
            "," ITEM_ATT("n3") "," REF_ATT("n4") "]}", 1000, 0);
    ck_assert_int_eq(rows_of(db, "graph_id = 'NEW' AND state = 'pending'"), 2);
    ck_assert_int_eq(rows_of(db, "attachment_id = 'n2' AND state = 'large'"), 1);
    ck_assert_int_eq(rows_of(db, "attachment_id = 'n3' AND state = 'large' AND kind = 'item' "
                                 "AND content_type = 'message/rfc822'"), 1);
    ck_assert_int_eq(rows_of(db, "attachment_id = 'n4' AND state = 'pending' "
                                 "AND kind = 'reference'"), 1);
    /* The newest message's first. */
    ck_assert_int_eq(mso_attach_pending(db, pool, id, 10, &items), APR_SUCCESS);
    ck_assert_int_eq(items->nelts, 3);
    ck_assert_str_eq(APR_ARRAY_IDX(items, 0, mso_attach_item_t *)->graph_id, "NEW");
    ck_assert_str_eq(APR_ARRAY_IDX(items, 2, mso_attach_item_t *)->graph_id, "OLD");
    it = APR_ARRAY_IDX(items, 0, mso_attach_item_t *);
    ck_assert_str_eq(it->attachment_id, "n1");
    ck_assert_int_eq(it->size, 1000);
    ck_assert_str_eq(it->last_modified, "t1");

    /* A megabyte with every byte value, NUL included, stored and read back
     * piece by piece. */
    big = apr_palloc(pool, n);
    for (off = 0; off < n; off++) {
        big[off] = (unsigned char)(off * 7 + off / 251);
    }
    ck_assert_int_eq(mso_attach_store_content(db, pool, "me", id, "NEW", "n1", "t1", big, n,
                                              now, &stored, &err), APR_SUCCESS);
    ck_assert_int_eq(stored, 1);
    /* Stored once: a second store (a replay, a handler) changes nothing. */
    ck_assert_int_eq(mso_attach_store_content(db, pool, NULL, id, "NEW", "n1", "t1", "x", 1,
                                              now, &stored, &err), APR_SUCCESS);
    ck_assert_int_eq(stored, 0);
    ck_assert_int_eq(mso_attach_get(db, pool, id, "NEW", "n1", &t), APR_SUCCESS);
    ck_assert_str_eq(t->state, "stored");
    ck_assert_int_eq(t->length, (apr_int64_t)n);
    ck_assert_int_ge(t->fetched_at, now);
    ck_assert_str_eq(t->name, "small.pdf");
    for (off = 0; off < n; off += got) {
        ck_assert_int_eq(mso_attach_read(db, pool, id, "NEW", "n1", (apr_int64_t)off, 65536,
                                         &part, &got), APR_SUCCESS);
        ck_assert_uint_gt(got, 0);
        ck_assert_int_eq(memcmp(part, big + off, got), 0);
    }
    ck_assert_int_eq(mso_attach_read(db, pool, id, "NEW", "n1", (apr_int64_t)n, 10, &part,
                                     &got), APR_SUCCESS);
    ck_assert_uint_eq(got, 0);
    ck_assert_int_eq(mso_attach_read(db, pool, id, "NEW", "n2", 0, 10, &part, &got),
                     APR_NOTFOUND);
    ck_assert_int_eq(mso_attach_get(db, pool, id, "NEW", "nope", &t), APR_NOTFOUND);
    /* An empty file is zero bytes, not NULL. */
    ck_assert_int_eq(mso_attach_store_content(db, pool, "me", id, "NEW", "n4", NULL, NULL, 0,
                                              now, &stored, &err), APR_SUCCESS);
    ck_assert_int_eq(stored, 1);
    ck_assert_int_eq(mso_attach_get(db, pool, id, "NEW", "n4", &t), APR_SUCCESS);
    ck_assert_int_eq(t->length, 0);

    /* Listed again unchanged: the content stays. Changed (another
     * lastModifiedDateTime): it goes and is fetched again. */
    apply_ok(db, id, f, "{\"value\":[" ENTRY("NEW", "2026-11-23T10:00:00Z", "true", "text", "y")
             "],\"@odata.deltaLink\":\"" LINK "?$deltatoken=2\"}");
    list_ok(db, id, due_msg(db, id, "NEW"), "{\"value\":["
            FILE_ATT("n1", "small.pdf", "1000", "t1") "," FILE_ATT("n2", "big.pdf", "1001", "t1")
            "," ITEM_ATT("n3") "," REF_ATT("n4") "]}", 1000, 0);
    ck_assert_int_eq(rows_of(db, "attachment_id = 'n1' AND state = 'stored' AND content "
                                 "IS NOT NULL"), 1);
    apply_ok(db, id, f, "{\"value\":[" ENTRY("NEW", "2026-11-23T10:00:00Z", "true", "text", "y")
             "],\"@odata.deltaLink\":\"" LINK "?$deltatoken=3\"}");
    list_ok(db, id, due_msg(db, id, "NEW"), "{\"value\":["
            FILE_ATT("n1", "small.pdf", "900", "t2") "," ITEM_ATT("n3") "]}", 1000, 0);
    ck_assert_int_eq(rows_of(db, "attachment_id = 'n1' AND state = 'pending' AND content "
                                 "IS NULL AND fetched_at IS NULL AND size = 900"), 1);
    ck_assert_int_eq(rows_of(db, "graph_id = 'NEW'"), 2);    /* n2, n4 removed in Outlook */
    /* A content fetched for the old version is not stored for the new one. */
    ck_assert_int_eq(mso_attach_store_content(db, pool, "me", id, "NEW", "n1", "t1", "old", 3,
                                              now, &stored, &err), APR_SUCCESS);
    ck_assert_int_eq(stored, 0);

    /* Several in one transaction: each stored or not on its own terms. */
    {
        mso_attach_content_t c[2];

        memset(c, 0, sizeof(c));
        c[0].graph_id = "NEW";
        c[0].attachment_id = "n1";
        c[0].last_modified = "t2";
        c[0].data = "new bytes";
        c[0].len = 9;
        c[1] = c[0];
        c[1].attachment_id = "n3";      /* not pending: large */
        ck_assert_int_eq(mso_attach_store_contents(db, pool, "me", id, c, 2, now, &err),
                         APR_SUCCESS);
        ck_assert_int_eq(c[0].stored, 1);
        ck_assert_int_eq(c[1].stored, 0);
        ck_assert_int_eq(rows_of(db, "attachment_id = 'n1' AND state = 'stored'"), 1);
        ck_assert_int_eq(mso_attach_store_contents(db, pool, "other", id, c, 2, now, &err),
                         APR_EBUSY);
        exec_ok(db, "UPDATE msoauth_attachments SET state = 'pending', content = NULL, "
                    "fetched_at = NULL WHERE attachment_id = 'n1'");
    }
    /* States: above the limit found on download, refused, failing. */
    ck_assert_int_eq(mso_attach_set_state(db, pool, "me", id, "NEW", "n1", "large", NULL, now),
                     APR_SUCCESS);
    ck_assert_int_eq(rows_of(db, "attachment_id = 'n1' AND state = 'large'"), 1);
    ck_assert_int_eq(mso_attach_set_state(db, pool, "me", id, "OLD", "o1", "failed",
                                          "HTTP 403", now), APR_SUCCESS);
    ck_assert_int_eq(rows_of(db, "attachment_id = 'o1' AND state = 'failed' "
                                 "AND error = 'HTTP 403'"), 1);

    /* Failing downloads: given up after MSO_ATTACH_TRIES; failing listings too. */
    apply_ok(db, id, f, "{\"value\":[" ENTRY("NEW", "2026-11-23T10:00:00Z", "true", "text", "y")
             "],\"@odata.deltaLink\":\"" LINK "?$deltatoken=31\"}");
    list_ok(db, id, due_msg(db, id, "NEW") , "{\"value\":[" FILE_ATT("n5", "f.pdf", "10", "t")
            "]}", 1000, 0);
    for (i = 1; i <= MSO_ATTACH_TRIES; i++) {
        ck_assert_int_eq(mso_attach_fetch_failed(db, pool, "me", id, "NEW", "n5", "HTTP 500",
                                                 now, &gave_up), APR_SUCCESS);
        ck_assert_int_eq(gave_up, i == MSO_ATTACH_TRIES);
    }
    ck_assert_int_eq(rows_of(db, "attachment_id = 'n5' AND state = 'failed' AND tries = 3"), 1);
    apply_ok(db, id, f, "{\"value\":[" ENTRY("NEW", "2026-11-23T10:00:00Z", "true", "text", "y")
             "],\"@odata.deltaLink\":\"" LINK "?$deltatoken=4\"}");
    for (i = 1; i <= MSO_ATTACH_TRIES; i++) {
        ck_assert_int_eq(mso_attach_list_failed(db, pool, "me", id, due_msg(db, id, "NEW"), 0,
                                                &gave_up), APR_SUCCESS);
        ck_assert_int_eq(gave_up, i == MSO_ATTACH_TRIES);
    }
    ck_assert_int_eq(due_of(db, "NEW"), 0);
    /* A message Graph no longer has is given up at once. */
    apply_ok(db, id, f, "{\"value\":[" ENTRY("NEW", "2026-11-23T10:00:00Z", "true", "text", "y")
             "],\"@odata.deltaLink\":\"" LINK "?$deltatoken=5\"}");
    ck_assert_int_eq(mso_attach_list_failed(db, pool, "me", id, due_msg(db, id, "NEW"), 1,
                                            &gave_up), APR_SUCCESS);
    ck_assert_int_eq(gave_up, 1);
}
END_TEST

START_TEST(rows_follow_their_message)
{
    mso_db_t *db = fresh_db(_i);
    apr_int64_t now = apr_time_sec(apr_time_now()), id;
    apr_array_header_t *works = NULL;
    mso_work_t *w;
    mso_folder_t *f;
    mso_action_t act;
    mso_work_done_t d;
    const char *err = NULL;
    int stored = 0, purged = -1;

    migrate_ok(db);
    w = leased(db, "follow@example.com", now);
    id = w->acct->id;
    f = inbox_of(db, id);
    apply_ok(db, id, f, "{\"value\":["
             ENTRY("M1", "2026-11-23T10:00:00Z", "true", "text", "x") ","
             ENTRY("M2", "2026-11-23T11:00:00Z", "true", "text", "x") ","
             ENTRY("M3", "2026-11-23T12:00:00Z", "true", "text", "x") ","
             ENTRY("M4", "2026-11-23T13:00:00Z", "true", "text", "x") "],"
             "\"@odata.deltaLink\":\"" LINK "?$deltatoken=1\"}");
    list_ok(db, id, due_msg(db, id, "M1"), "{\"value\":[" FILE_ATT("a", "a", "1", "t") ","
            FILE_ATT("b", "b", "1", "t") "]}", 10, 0);
    list_ok(db, id, due_msg(db, id, "M2"), "{\"value\":[" FILE_ATT("a", "a", "1", "t") "]}",
            10, 0);
    list_ok(db, id, due_msg(db, id, "M3"), "{\"value\":[" FILE_ATT("a", "a", "1", "t") "]}",
            10, 0);
    list_ok(db, id, due_msg(db, id, "M4"), "{\"value\":[" FILE_ATT("a", "a", "1", "t") "]}",
            10, 0);
    ck_assert_int_eq(mso_attach_store_content(db, pool, "me", id, "M1", "a", "t", "1", 1, now,
                                              &stored, &err), APR_SUCCESS);
    ck_assert_int_eq(rows_of(db, "1 = 1"), 5);

    /* Removed from the folder (@removed): its rows go in the same page. */
    apply_ok(db, id, f, "{\"value\":[{\"id\":\"M1\",\"@removed\":{}}],"
             "\"@odata.deltaLink\":\"" LINK "?$deltatoken=2\"}");
    ck_assert_int_eq(rows_of(db, "graph_id = 'M1'"), 0);
    ck_assert_int_eq(rows_of(db, "1 = 1"), 3);
    /* Moved to another mirrored folder by an action: they stay (same id);
     * moved out of the mirror: they go. */
    memset(&act, 0, sizeof(act));
    act.account_id = id;
    act.graph_id = "M2";
    act.action = "move";
    exec_ok(db, apr_psprintf(pool, "INSERT INTO msoauth_actions (account_id, graph_id, action, "
                             "destination) VALUES (%" APR_INT64_T_FMT ", 'M2', 'move', 'x')",
                             id));
    act.id = num(db, "SELECT MAX(id) FROM msoauth_actions");
    ck_assert_int_eq(mso_mirror_action_done(db, pool, "me", &act, "archive", 0, now),
                     APR_SUCCESS);
    ck_assert_int_eq(rows_of(db, "graph_id = 'M2'"), 1);
    exec_ok(db, apr_psprintf(pool, "INSERT INTO msoauth_actions (account_id, graph_id, action, "
                             "destination) VALUES (%" APR_INT64_T_FMT ", 'M2', 'move', 'x')",
                             id));
    act.id = num(db, "SELECT MAX(id) FROM msoauth_actions");
    ck_assert_int_eq(mso_mirror_action_done(db, pool, "me", &act, "junkemail", 1, now),
                     APR_SUCCESS);
    ck_assert_int_eq(rows_of(db, "graph_id = 'M2'"), 0);
    /* A full round that no longer sees M3: swept, with its rows. */
    ck_assert_int_eq(mso_mirror_restart_folder(db, pool, "me", id, f, LINK "?$deltatoken=",
                                               now), APR_SUCCESS);
    apply_ok(db, id, f, "{\"value\":[" ENTRY("M4", "2026-11-23T13:00:00Z", "true", "text", "x")
             "],\"@odata.deltaLink\":\"" LINK "?$deltatoken=3\"}");
    ck_assert_int_eq(num(db, "SELECT removed FROM msoauth_messages WHERE graph_id = 'M3'"), 1);
    ck_assert_int_eq(rows_of(db, "graph_id = 'M3'"), 0);
    ck_assert_int_eq(rows_of(db, "graph_id = 'M4'"), 1);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_messages WHERE attach_due > 0 "
                             "AND removed = 1"), 0);

    /* The claim: a mailbox not due is claimed for attachment work. */
    memset(&d, 0, sizeof(d));
    d.sync_due_at = now + 3600;
    d.sync_phase = "idle";
    ck_assert_int_eq(mso_mirror_release(db, pool, id, "me", &d, now), APR_SUCCESS);
    exec_ok(db, "UPDATE msoauth_messages SET attach_due = 0");
    exec_ok(db, "UPDATE msoauth_attachments SET state = 'stored'");
    ck_assert_int_eq(mso_mirror_claim(db, pool, "me", now, 45, 10, &works), APR_SUCCESS);
    ck_assert_int_eq(works->nelts, 0);
    exec_ok(db, "UPDATE msoauth_attachments SET state = 'pending'");
    ck_assert_int_eq(mso_mirror_claim(db, pool, "me", now, 45, 10, &works), APR_SUCCESS);
    ck_assert_int_eq(works->nelts, 1);
    ck_assert_int_eq(APR_ARRAY_IDX(works, 0, mso_work_t *)->attach_work, 1);
    ck_assert_int_eq(mso_mirror_release(db, pool, id, "me", &d, now), APR_SUCCESS);
    /* Work nobody can do (a row left behind by a message gone from the
     * mirror) never makes the mailbox due. */
    exec_ok(db, "UPDATE msoauth_messages SET removed = 1 WHERE graph_id = 'M4'");
    ck_assert_int_eq(mso_mirror_claim(db, pool, "me", now, 45, 10, &works), APR_SUCCESS);
    ck_assert_int_eq(works->nelts, 0);
    exec_ok(db, "UPDATE msoauth_messages SET removed = 0 WHERE graph_id = 'M4'");
    exec_ok(db, "UPDATE msoauth_attachments SET state = 'large'");
    exec_ok(db, "UPDATE msoauth_messages SET attach_due = 1 WHERE graph_id = 'M4'");
    ck_assert_int_eq(mso_mirror_claim(db, pool, "me", now, 45, 10, &works), APR_SUCCESS);
    ck_assert_int_eq(works->nelts, 1);

    /* Retention: rows whose message left the mirror (purged, or removed). */
    exec_ok(db, apr_psprintf(pool, "INSERT INTO msoauth_attachments (account_id, graph_id, "
                             "attachment_id, kind, updated_at) VALUES (%" APR_INT64_T_FMT
                             ", 'PURGED', 'p', 'file', 1)", id));
    exec_ok(db, apr_psprintf(pool, "INSERT INTO msoauth_attachments (account_id, graph_id, "
                             "attachment_id, kind, updated_at) VALUES (%" APR_INT64_T_FMT
                             ", 'M3', 'p', 'file', 1)", id));
    ck_assert_int_eq(mso_attach_purge(db, pool, id + 1, &purged, &err), APR_SUCCESS);
    ck_assert_int_eq(purged, 0);
    ck_assert_int_eq(mso_attach_purge(db, pool, id, &purged, &err), APR_SUCCESS);
    ck_assert_int_eq(purged, 2);
    ck_assert_int_eq(rows_of(db, "1 = 1"), 1);
    ck_assert_int_eq(mso_attach_purge(db, pool, 0, &purged, &err), APR_SUCCESS);
    ck_assert_int_eq(purged, 0);
    ck_assert_int_eq(rows_of(db, "graph_id = 'M4'"), 1);
}
END_TEST

static apr_status_t purge_in_tx(mso_tx_t *tx, void *baton)
{
    apr_status_t rv;

    if (MSO_OK(mso_tx_exec_sql(tx, "DELETE FROM msoauth_messages WHERE graph_id = 'OLD'"))) {
        rv = mso_attach_purge_tx(tx, 0, baton);
    }
    return rv;
}

START_TEST(purge_with_the_messages)
{
    mso_db_t *db = fresh_db(_i);
    apr_int64_t now = apr_time_sec(apr_time_now()), id;
    mso_work_t *w;
    mso_folder_t *f;
    const char *err = NULL;
    int purged = -1;

    migrate_ok(db);
    w = leased(db, "purge@example.com", now);
    id = w->acct->id;
    f = inbox_of(db, id);
    apply_ok(db, id, f, "{\"value\":["
             ENTRY("OLD", "2026-11-20T10:00:00Z", "true", "text", "x") ","
             ENTRY("NEW", "2026-11-23T10:00:00Z", "true", "text", "y") "],"
             "\"@odata.deltaLink\":\"" LINK "?$deltatoken=1\"}");
    list_ok(db, id, due_msg(db, id, "OLD"), "{\"value\":[" FILE_ATT("a", "a", "1", "t") "]}",
            10, 0);
    list_ok(db, id, due_msg(db, id, "NEW"), "{\"value\":[" FILE_ATT("a", "a", "1", "t") "]}",
            10, 0);
    /* A retention sweep purges a message and its attachments in one go. */
    ck_assert_int_eq(mso_db_tx(db, pool, NULL, purge_in_tx, &purged, &err), APR_SUCCESS);
    ck_assert_int_eq(purged, 1);
    ck_assert_int_eq(rows_of(db, "1 = 1"), 1);
    ck_assert_int_eq(rows_of(db, "graph_id = 'NEW'"), 1);
}
END_TEST

START_TEST(upgrade_lists_what_was_mirrored)
{
    mso_db_t *db = fresh_db(_i);
    int from = -1, to = -1;
    const char *err = NULL;

    /* A version 4 mirror: one message with attachments, one HTML body with
     * an inline image, one plain, one removed. */
    ck_assert_int_eq(mso_schema_migrate_to(db, pool, 4, &from, &to, &err), APR_SUCCESS);
    {
        /* A row as version 4 knows it (this build's account code expects the
         * latest schema). */
        const char *rows[][4] = {{"H", "1", "text", "x"}, {"I", "0", "html", "<img src=\"Cid:x\">"},
                                 {"P", "0", "html", "<p>plain</p>"}, {"R", "1", "text", "x"}};
        int k;

        exec_ok(db, "INSERT INTO msoauth_accounts (company, mailbox, created_at, updated_at) "
                    "VALUES ('default', 'up@example.com', 1700000000, 1700000000)");
        for (k = 0; k < 4; k++) {
            exec_ok(db, apr_psprintf(pool, "INSERT INTO msoauth_messages (account_id, graph_id, "
                                     "folder, has_attachments, body_type, body, removed, "
                                     "updated_at) VALUES ((SELECT MAX(id) FROM msoauth_accounts), "
                                     "'%s', 'inbox', %s, '%s', '%s', %d, 1)", rows[k][0], rows[k][1],
                                     rows[k][2], rows[k][3], k == 3));
        }
    }
    ck_assert_int_eq(mso_schema_migrate(db, pool, &from, &to, &err), APR_SUCCESS);
    ck_assert_int_eq(from, 4);
    ck_assert_int_eq(to, mso_schema_latest());
    ck_assert_int_eq(due_of(db, "H"), 1);
    ck_assert_int_eq(due_of(db, "I"), 1);
    ck_assert_int_eq(due_of(db, "P"), 0);
    ck_assert_int_eq(due_of(db, "R"), 0);
    /* The kinds are Graph's three. */
    ck_assert_int_ne(pexec(db, "INSERT INTO msoauth_attachments (account_id, graph_id, "
                               "attachment_id, kind, updated_at) VALUES (1, 'H', 'x', 'other', 1)",
                           NULL), 0);
}
END_TEST

START_TEST(served_headers)
{
    apr_pool_t *p = pool;

    (void)_i;
    /* Content types: Graph's is hostile. */
    ck_assert_str_eq(mso_attach_safe_type(p, "file", "application/PDF"), "application/pdf");
    ck_assert_str_eq(mso_attach_safe_type(p, "file", " image/png ; name=\"a.png\""), "image/png");
    ck_assert_str_eq(mso_attach_safe_type(p, "file", "text/html\r\nSet-Cookie: a=b"),
                     "application/octet-stream");
    ck_assert_str_eq(mso_attach_safe_type(p, "file", "text/html, text/plain"),
                     "application/octet-stream");
    ck_assert_str_eq(mso_attach_safe_type(p, "file", "image/"), "application/octet-stream");
    ck_assert_str_eq(mso_attach_safe_type(p, "file", "/png"), "application/octet-stream");
    ck_assert_str_eq(mso_attach_safe_type(p, "file", "image png"), "application/octet-stream");
    ck_assert_str_eq(mso_attach_safe_type(p, "file", "a/b/c"), "application/octet-stream");
    ck_assert_str_eq(mso_attach_safe_type(p, "file", "t\xc3\xa9xt/plain"),
                     "application/octet-stream");
    ck_assert_str_eq(mso_attach_safe_type(p, "file", ""), "application/octet-stream");
    ck_assert_str_eq(mso_attach_safe_type(p, "file", NULL), "application/octet-stream");
    ck_assert_str_eq(mso_attach_safe_type(p, "item", "text/html"), "message/rfc822");
    ck_assert_str_eq(mso_attach_safe_type(p, "reference", NULL),
                     "text/uri-list; charset=utf-8");

    /* File names. */
    ck_assert_str_eq(mso_attach_disposition(p, "report.pdf"),
                     "attachment; filename=\"report.pdf\"; filename*=UTF-8''report.pdf");
    ck_assert_str_eq(mso_attach_disposition(p, "../../etc/passwd"),
                     "attachment; filename=\"passwd\"; filename*=UTF-8''passwd");
    ck_assert_str_eq(mso_attach_disposition(p, "C:\\Users\\x\\..\\evil.exe"),
                     "attachment; filename=\"evil.exe\"; filename*=UTF-8''evil.exe");
    ck_assert_str_eq(mso_attach_disposition(p, "a\"b\r\nSet-Cookie: x.txt"),
                     "attachment; filename=\"a_bSet-Cookie_ x.txt\"; "
                     "filename*=UTF-8''a_bSet-Cookie_%20x.txt");
    ck_assert_str_eq(mso_attach_disposition(p, "R\xc3\xa9sum\xc3\xa9 \xe2\x82\xac.pdf"),
                     "attachment; filename=\"R_sum_ _.pdf\"; "
                     "filename*=UTF-8''R%C3%A9sum%C3%A9%20%E2%82%AC.pdf");
    /* U+202E (right-to-left override) would show "invoice\u202Efdp.exe" as
     * "invoiceexe.pdf". */
    ck_assert_str_eq(mso_attach_disposition(p, "invoice\xe2\x80\xae" "fdp.exe"),
                     "attachment; filename=\"invoicefdp.exe\"; filename*=UTF-8''invoicefdp.exe");
    ck_assert_str_eq(mso_attach_disposition(p, "bad\xff\xfe.txt"),
                     "attachment; filename=\"bad__.txt\"; filename*=UTF-8''bad__.txt");
    ck_assert_str_eq(mso_attach_disposition(p, "100%;x=1.txt"),
                     "attachment; filename=\"100__x=1.txt\"; filename*=UTF-8''100__x%3D1.txt");
    ck_assert_str_eq(mso_attach_disposition(p, " ..hidden. "),
                     "attachment; filename=\"hidden\"; filename*=UTF-8''hidden");
    ck_assert_str_eq(mso_attach_disposition(p, ".."),
                     "attachment; filename=\"attachment\"; filename*=UTF-8''attachment");
    ck_assert_str_eq(mso_attach_disposition(p, "dir/"),
                     "attachment; filename=\"attachment\"; filename*=UTF-8''attachment");
    ck_assert_str_eq(mso_attach_disposition(p, NULL),
                     "attachment; filename=\"attachment\"; filename*=UTF-8''attachment");
    {
        char longname[1000];
        const char *d, *q;

        memset(longname, 'n', sizeof(longname) - 1);
        longname[sizeof(longname) - 1] = '\0';
        d = mso_attach_disposition(p, longname);
        q = strstr(d, "filename*=UTF-8''");
        ck_assert_ptr_nonnull(q);
        ck_assert_uint_eq(strlen(q + 17), 200);
    }
}
END_TEST

static void add_tests(TCase *tc, int backend)
{
    ADD_BOTH(tc, which_messages_are_listed, backend);
    ADD_BOTH(tc, lists_contents_and_states, backend);
    ADD_BOTH(tc, rows_follow_their_message, backend);
    ADD_BOTH(tc, purge_with_the_messages, backend);
    ADD_BOTH(tc, upgrade_lists_what_was_mirrored, backend);
    if (backend == BACKEND_SQLITE) {
        tcase_add_test(tc, served_headers);
    }
}

int main(void)
{
    return dbtest_main("attach", add_tests);
}
