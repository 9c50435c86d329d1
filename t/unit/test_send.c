/* Sending mail, the protocol side (lib/mso_graph.c, "Sending mail"): the
 * checks made before Graph, the draft and reply requests with the marker,
 * attachments in one POST or an upload session, Graph's answers; and
 * mso_sync_scopes_can_send. */
#include <stdlib.h>
#include <string.h>

#include <apr_base64.h>
#include <apr_general.h>
#include <apr_strings.h>
#include <check.h>
#include <jansson.h>

#include "mso_graph.h"
#include "mso_sync.h"
#include "unit.h"

static apr_pool_t *pool;

static void setup(void) { apr_pool_create(&pool, NULL); }
static void teardown(void) { apr_pool_destroy(pool); }

#define ROOT "https://graph.microsoft.com"
#define ME ROOT "/v1.0/me"

static json_t *parsed(const char *s)
{
    json_error_t e;
    json_t *j = json_loads(s, 0, &e);

    ck_assert_msg(j != NULL, "not JSON: %s (%s)", e.text, s);
    return j;
}

static mso_graph_mail_t mail(const char *to)
{
    mso_graph_mail_t m;

    memset(&m, 0, sizeof(m));
    m.to_json = to;
    m.subject = "Quote";
    m.body = "Hello";
    m.marker = "0123456789abcdef0123456789abcdef";
    return m;
}

static const char *check_err(mso_graph_mail_t m)
{
    const char *err = NULL;

    ck_assert_int_eq(mso_graph_mail_check(pool, &m, &err), APR_EINVAL);
    ck_assert_ptr_nonnull(err);
    return err;
}

START_TEST(mail_checks)
{
    mso_graph_mail_t m = mail("[{\"address\":\"chris@fabrikam.com\",\"name\":\"Chris\"},"
                              "\"dana@fabrikam.com\",{\"address\":\"e@x.com\",\"name\":null}]");
    apr_array_header_t *many = apr_array_make(pool, 501, sizeof(const char *));
    const char *err = NULL;
    int i;

    ck_assert_int_eq(mso_graph_mail_check(pool, &m, &err), APR_SUCCESS);
    m.body_type = "HTML";
    ck_assert_int_eq(mso_graph_mail_check(pool, &m, &err), APR_SUCCESS);
    m.body_type = "rtf";
    ck_assert_ptr_nonnull(strstr(check_err(m), "body_type"));
    m = mail("not json");
    ck_assert_ptr_nonnull(strstr(check_err(m), "to_json is not a JSON array"));
    m = mail("{\"address\":\"a@b.com\"}");
    ck_assert_ptr_nonnull(strstr(check_err(m), "to_json"));
    m = mail("[{\"address\":\"someone\"}]");
    ck_assert_ptr_nonnull(strstr(check_err(m), "to_json: recipient 1 has the address"));
    m = mail("[\"a@b.com\", {\"name\":\"x\"}]");
    ck_assert_ptr_nonnull(strstr(check_err(m), "recipient 2 has no \"address\""));
    m = mail("[\"a@b.com\", 7]");
    ck_assert_ptr_nonnull(strstr(check_err(m), "recipient 2 is neither"));
    m = mail("[{\"address\":\"a@b.com\",\"name\":\"line\\nbreak\"}]");
    ck_assert_ptr_nonnull(strstr(check_err(m), "control characters"));
    m = mail("[{\"address\":\"a@b.com\",\"name\":5}]");
    ck_assert_ptr_nonnull(strstr(check_err(m), "not a string"));
    m = mail("[\"a b@c.com\"]");
    ck_assert_ptr_nonnull(strstr(check_err(m), "not valid"));
    /* No recipient at all: refused, except for a reply (Outlook's reply goes
     * to the original sender). */
    m = mail("[]");
    ck_assert_ptr_nonnull(strstr(check_err(m), "no recipient"));
    m = mail(NULL);
    ck_assert_ptr_nonnull(strstr(check_err(m), "no recipient"));
    m.reply_to = "AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0A";
    ck_assert_int_eq(mso_graph_mail_check(pool, &m, &err), APR_SUCCESS);
    m.reply_to = "not an id!";
    ck_assert_ptr_nonnull(strstr(check_err(m), "reply_to_graph_id"));
    m = mail("[\"a@b.com\"]");
    m.subject = "two\r\nlines";
    ck_assert_ptr_nonnull(strstr(check_err(m), "subject"));
    m.subject = "tab\tis fine";
    ck_assert_int_eq(mso_graph_mail_check(pool, &m, &err), APR_SUCCESS);
    m.subject = "bad \xc3 utf-8";
    ck_assert_ptr_nonnull(strstr(check_err(m), "subject"));
    /* 500 over to, cc and bcc; 501 is one too many. */
    for (i = 0; i < 250; i++) {
        APR_ARRAY_PUSH(many, const char *) = apr_psprintf(pool, "\"r%d@example.com\"", i);
    }
    m = mail(apr_pstrcat(pool, "[", apr_array_pstrcat(pool, many, ','), "]", NULL));
    m.cc_json = m.to_json;
    ck_assert_int_eq(mso_graph_mail_check(pool, &m, &err), APR_SUCCESS);
    m.bcc_json = "[\"one.more@example.com\"]";
    ck_assert_ptr_nonnull(strstr(check_err(m), "501 recipients"));
}
END_TEST

START_TEST(mail_create_requests)
{
    mso_graph_mail_t m = mail("[{\"address\":\"chris@fabrikam.com\",\"name\":\"Chris\"}]");
    mso_graph_request_t req;
    const char *err = NULL;
    json_t *j, *ext, *msg;
    char *big;

    m.cc_json = "[\"dana@fabrikam.com\"]";
    ck_assert_int_eq(mso_graph_mail_create(pool, ME, &m, &req, &err), APR_SUCCESS);
    ck_assert_str_eq(req.method, "POST");
    ck_assert_str_eq(req.url, ME "/messages");
    j = parsed(req.body);
    ck_assert_str_eq(json_string_value(json_object_get(j, "subject")), "Quote");
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "body"),
                                                       "contentType")), "text");
    msg = json_object_get(json_array_get(json_object_get(j, "toRecipients"), 0),
                          "emailAddress");
    ck_assert_str_eq(json_string_value(json_object_get(msg, "name")), "Chris");
    ck_assert_str_eq(json_string_value(json_object_get(msg, "address")), "chris@fabrikam.com");
    ck_assert_int_eq(json_array_size(json_object_get(j, "ccRecipients")), 1);
    ck_assert_ptr_null(json_object_get(j, "bccRecipients"));
    /* The marker, in our property set, on the draft from its creation on. */
    ext = json_array_get(json_object_get(j, "singleValueExtendedProperties"), 0);
    ck_assert_str_eq(json_string_value(json_object_get(ext, "id")), MSO_GRAPH_MARKER_PROPERTY);
    ck_assert_str_eq(json_string_value(json_object_get(ext, "value")),
                     "0123456789abcdef0123456789abcdef");
    json_decref(j);

    /* A reply: createReply carries the application's fields as its message;
     * without recipients and subject Outlook's stay (the original sender,
     * "RE: ..."), and without a body of its own the quote stays. */
    m = mail(NULL);
    m.reply_to = "AAkAL-g_0=";
    m.subject = "";
    m.body = "";
    ck_assert_int_eq(mso_graph_mail_create(pool, ME, &m, &req, &err), APR_SUCCESS);
    ck_assert_str_eq(req.url, ME "/messages/AAkAL-g_0%3D/createReply");
    j = parsed(req.body);
    msg = json_object_get(j, "message");
    ck_assert_ptr_nonnull(msg);
    ck_assert_ptr_null(json_object_get(msg, "toRecipients"));
    ck_assert_ptr_null(json_object_get(msg, "subject"));
    ck_assert_ptr_null(json_object_get(msg, "body"));
    ck_assert_ptr_nonnull(json_object_get(msg, "singleValueExtendedProperties"));
    ck_assert_ptr_null(json_object_get(j, "comment"));
    json_decref(j);
    m.body = "<p>Thanks!</p>";
    m.body_type = "html";
    m.to_json = "[\"x@y.com\"]";
    ck_assert_int_eq(mso_graph_mail_create(pool, ME, &m, &req, &err), APR_SUCCESS);
    j = parsed(req.body);
    msg = json_object_get(j, "message");
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(msg, "body"),
                                                       "contentType")), "html");
    ck_assert_int_eq(json_array_size(json_object_get(msg, "toRecipients")), 1);
    json_decref(j);

    /* Over Graph's 4 MB request: refused here, with the way out. */
    m = mail("[\"a@b.com\"]");
    big = apr_palloc(pool, MSO_GRAPH_MAX_REQUEST + 1);
    memset(big, 'x', MSO_GRAPH_MAX_REQUEST);
    big[MSO_GRAPH_MAX_REQUEST] = '\0';
    m.body = big;
    ck_assert_int_eq(mso_graph_mail_create(pool, ME, &m, &req, &err), APR_EINVAL);
    ck_assert_ptr_nonnull(strstr(err, "as an attachment"));
    m.body = "invalid \xff utf-8";
    ck_assert_int_eq(mso_graph_mail_create(pool, ME, &m, &req, &err), APR_EINVAL);
    ck_assert_ptr_nonnull(strstr(err, "UTF-8"));
}
END_TEST

START_TEST(items_and_urls)
{
    apr_array_header_t *items = NULL;
    const char *err = NULL, *u;
    const char *one = "{\"id\":\"AAA=\",\"isDraft\":true,\"internetMessageId\":\"<a@b>\","
                      "\"parentFolderId\":\"DRAFTS\"}";
    const char *list = "{\"value\":[{\"id\":\"A\",\"isDraft\":false},{\"id\":\"bad id!\"},"
                       "{\"isDraft\":true},{\"id\":\"B\"}]}";
    mso_graph_item_t *it;

    ck_assert_int_eq(mso_graph_parse_items(pool, one, strlen(one), &items, &err), APR_SUCCESS);
    ck_assert_int_eq(items->nelts, 1);
    it = &APR_ARRAY_IDX(items, 0, mso_graph_item_t);
    ck_assert_str_eq(it->id, "AAA=");
    ck_assert_int_eq(it->is_draft, 1);
    ck_assert_str_eq(it->internet_message_id, "<a@b>");
    ck_assert_str_eq(it->parent_folder_id, "DRAFTS");
    ck_assert_int_eq(mso_graph_parse_items(pool, list, strlen(list), &items, &err), APR_SUCCESS);
    ck_assert_int_eq(items->nelts, 2);
    ck_assert_int_eq(APR_ARRAY_IDX(items, 0, mso_graph_item_t).is_draft, 0);
    ck_assert_int_eq(APR_ARRAY_IDX(items, 1, mso_graph_item_t).is_draft, -1);
    ck_assert_int_eq(mso_graph_parse_items(pool, "[]", 2, &items, &err), APR_EINVAL);
    ck_assert_int_eq(mso_graph_parse_items(pool, "{\"x\":1}", 7, &items, &err), APR_EINVAL);

    /* The look-up by marker: anywhere in the mailbox, the filter encoded. */
    u = mso_graph_marker_url(pool, ME, "00ff");
    ck_assert(!strncmp(u, ME "/messages?$filter=singleValueExtendedProperties%2FAny%28ep%3A%20"
                       "ep%2Fid%20eq%20%27String%20%7B4959df50-", 105));
    ck_assert_ptr_nonnull(strstr(u, "ep%2Fvalue%20eq%20%2700ff%27%29&$select=id,isDraft,"
                                    "internetMessageId,parentFolderId&$top=50"));
    ck_assert(mso_graph_link_ok(ROOT, u));
    ck_assert_str_eq(mso_graph_item_url(pool, ME, "A/B"), ME "/messages/A%2FB?$select=id,"
                     "isDraft,internetMessageId,parentFolderId");
    ck_assert_str_eq(mso_graph_send_url(pool, ME, "A="), ME "/messages/A%3D/send");
    ck_assert_str_eq(mso_graph_message_url(pool, ME, "A"), ME "/messages/A");
}
END_TEST

START_TEST(attachment_checks)
{
    ck_assert_ptr_null(mso_graph_attachment_check(pool, "quote.pdf", "application/pdf", NULL,
                                                  1000));
    ck_assert_ptr_null(mso_graph_attachment_check(pool, "logo.png", "image/png", "logo@x", 10));
    ck_assert_ptr_null(mso_graph_attachment_check(pool, "a.txt", "text/plain; charset=utf-8",
                                                  NULL, 0));
    ck_assert_ptr_null(mso_graph_attachment_check(pool, "Übersicht.txt", NULL, NULL, 1));
    ck_assert_ptr_nonnull(strstr(mso_graph_attachment_check(pool, NULL, NULL, NULL, 1),
                                 "no name"));
    ck_assert_ptr_nonnull(strstr(mso_graph_attachment_check(pool, "../etc/passwd", NULL, NULL,
                                                            1), "path separator"));
    ck_assert_ptr_nonnull(strstr(mso_graph_attachment_check(pool, "a\\b", NULL, NULL, 1),
                                 "path separator"));
    ck_assert_ptr_nonnull(strstr(mso_graph_attachment_check(pool, "a\nb", NULL, NULL, 1),
                                 "control"));
    ck_assert_ptr_nonnull(strstr(mso_graph_attachment_check(pool, "a\xff", NULL, NULL, 1),
                                 "UTF-8"));
    ck_assert_ptr_nonnull(strstr(mso_graph_attachment_check(pool, "a", "pdf", NULL, 1),
                                 "content_type"));
    ck_assert_ptr_nonnull(strstr(mso_graph_attachment_check(pool, "a", "image/", NULL, 1),
                                 "content_type"));
    ck_assert_ptr_nonnull(strstr(mso_graph_attachment_check(pool, "a", "text/plain\r\nX: y",
                                                            NULL, 1), "content_type"));
    ck_assert_ptr_nonnull(strstr(mso_graph_attachment_check(pool, "a", NULL, "<logo@x>", 1),
                                 "angle brackets"));
    ck_assert_ptr_nonnull(strstr(mso_graph_attachment_check(pool, "a", NULL, "a b", 1),
                                 "content_id"));
    ck_assert_ptr_nonnull(strstr(mso_graph_attachment_check(pool, "a", NULL, NULL,
                                                            MSO_GRAPH_MAX_MESSAGE + 1),
                                 "150 MB"));
}
END_TEST

START_TEST(attachment_requests)
{
    const unsigned char bytes[] = {0, 1, 2, 0xff, 'x'};
    mso_graph_request_t req;
    apr_size_t len = 0;
    apr_int64_t n;
    json_t *j;
    const char *b64;
    unsigned char back[8];

    ck_assert_int_eq(mso_graph_attachment_post(pool, ME, "D=", "lo\"go.png", "image/png", 1,
                                               "logo@x", bytes, sizeof(bytes), &req, &len),
                     APR_SUCCESS);
    ck_assert_str_eq(req.url, ME "/messages/D%3D/attachments");
    ck_assert_uint_eq(len, strlen(req.body));
    ck_assert_uint_eq(len, mso_graph_attachment_post_len(pool, "lo\"go.png", "image/png", 1,
                                                         "logo@x", sizeof(bytes)));
    j = parsed(req.body);
    ck_assert_str_eq(json_string_value(json_object_get(j, "@odata.type")),
                     "#microsoft.graph.fileAttachment");
    ck_assert_str_eq(json_string_value(json_object_get(j, "name")), "lo\"go.png");
    ck_assert(json_is_true(json_object_get(j, "isInline")));
    ck_assert_str_eq(json_string_value(json_object_get(j, "contentId")), "logo@x");
    b64 = json_string_value(json_object_get(j, "contentBytes"));
    ck_assert_int_eq(apr_base64_decode_binary(back, b64), (int)sizeof(bytes));
    ck_assert_int_eq(memcmp(back, bytes, sizeof(bytes)), 0);
    json_decref(j);
    ck_assert_int_eq(mso_graph_attachment_post(pool, ME, "D", "a", NULL, 0, NULL, bytes, 0,
                                               &req, &len), APR_SUCCESS);
    j = parsed(req.body);
    ck_assert_str_eq(json_string_value(json_object_get(j, "contentType")),
                     "application/octet-stream");
    ck_assert_str_eq(json_string_value(json_object_get(j, "contentBytes")), "");
    ck_assert_ptr_null(json_object_get(j, "contentId"));
    json_decref(j);
    /* The split: what fits a 4 MB request goes in one POST; just over it
     * (still under 3 MB) fits neither; 3 MB and more go to an upload session. */
    n = (apr_int64_t)(MSO_GRAPH_MAX_REQUEST - 200) / 4 * 3;
    ck_assert(mso_graph_attachment_post_len(pool, "a.bin", NULL, 0, NULL, n)
              <= MSO_GRAPH_MAX_REQUEST);
    ck_assert(mso_graph_attachment_post_len(pool, "a.bin", NULL, 0, NULL,
                                            MSO_GRAPH_UPLOAD_MIN - 1) > MSO_GRAPH_MAX_REQUEST);

    mso_graph_upload_session(pool, ME, "D", "big.zip", NULL, 0, NULL, 5000000, &req);
    ck_assert_str_eq(req.url, ME "/messages/D/attachments/createUploadSession");
    j = parsed(req.body);
    ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(j, "AttachmentItem"),
                                                        "size")), 5000000);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "AttachmentItem"),
                                                       "attachmentType")), "file");
    json_decref(j);
    ck_assert_str_eq(mso_graph_draft_attachments_url(pool, ME, "D"),
                     ME "/messages/D/attachments?$select=id,name,isInline,contentId");
    ck_assert_str_eq(mso_graph_draft_attachment_url(pool, ME, "D", "A/1"),
                     ME "/messages/D/attachments/A%2F1");
}
END_TEST

START_TEST(upload_answers)
{
    const char *err = NULL, *u;
    const char *ok = "{\"uploadUrl\":\"https://outlook.office.com/api/v2.0/Users('a')/Messages('"
                     "m')/AttachmentSessions('s')?authtoken=abc\",\"nextExpectedRanges\":[\"0-\"]}";
    const char *sim = "{\"uploadUrl\":\"http://127.0.0.1:8081/api/v2.0/x?authtoken=1\"}";
    const char *plain = "{\"uploadUrl\":\"http://evil.example/api\"}";
    const char *spaced = "{\"uploadUrl\":\"https://x/a b\"}";
    apr_array_header_t *items = NULL;
    const char *list = "{\"value\":[{\"id\":\"A1\",\"name\":\"a.pdf\",\"isInline\":false},"
                       "{\"id\":\"A2\",\"name\":\"logo.png\",\"isInline\":true,"
                       "\"contentId\":\"logo\"},{\"name\":\"no id\"}]}";

    u = mso_graph_parse_upload_url(pool, ROOT, ok, strlen(ok), &err);
    ck_assert_ptr_nonnull(u);
    ck_assert_ptr_nonnull(strstr(u, "authtoken=abc"));
    ck_assert_ptr_nonnull(mso_graph_parse_upload_url(pool, "http://127.0.0.1:8081", sim,
                                                     strlen(sim), &err));
    ck_assert_ptr_null(mso_graph_parse_upload_url(pool, ROOT, sim, strlen(sim), &err));
    ck_assert_ptr_null(mso_graph_parse_upload_url(pool, "http://127.0.0.1:8081", plain,
                                                  strlen(plain), &err));
    ck_assert_ptr_nonnull(strstr(err, "not https"));
    ck_assert_ptr_null(mso_graph_parse_upload_url(pool, ROOT, spaced, strlen(spaced), &err));
    ck_assert_ptr_null(mso_graph_parse_upload_url(pool, ROOT, "{}", 2, &err));

    ck_assert_str_eq(mso_graph_location_attachment_id(pool, "https://outlook.office.com/api/"
                     "v2.0/Users('a@b')/Messages('M')/Attachments('AAMk-1=')"), "AAMk-1=");
    ck_assert_ptr_null(mso_graph_location_attachment_id(pool, NULL));
    ck_assert_ptr_null(mso_graph_location_attachment_id(pool, "https://x/Attachments('a b')"));
    ck_assert_ptr_null(mso_graph_location_attachment_id(pool, "https://x/Attachments('open"));

    ck_assert_int_eq(mso_graph_parse_draft_attachments(pool, list, strlen(list), &items, &err),
                     APR_SUCCESS);
    ck_assert_int_eq(items->nelts, 2);
    ck_assert_str_eq(APR_ARRAY_IDX(items, 1, mso_graph_att_item_t).content_id, "logo");
    ck_assert_int_eq(APR_ARRAY_IDX(items, 1, mso_graph_att_item_t).is_inline, 1);
    ck_assert_int_eq(APR_ARRAY_IDX(items, 0, mso_graph_att_item_t).is_inline, 0);
    ck_assert_int_eq(mso_graph_parse_draft_attachments(pool, "{}", 2, &items, &err), APR_EINVAL);
}
END_TEST

START_TEST(send_scopes)
{
    ck_assert(mso_sync_scopes_can_send("Mail.ReadWrite Mail.Send User.Read openid"));
    ck_assert(mso_sync_scopes_can_send("openid https://graph.microsoft.com/Mail.Send"));
    ck_assert(mso_sync_scopes_can_send("Mail.Send"));
    ck_assert(!mso_sync_scopes_can_send("Mail.Send.Shared Mail.ReadWrite"));
    ck_assert(!mso_sync_scopes_can_send("XMail.Send Mail.Sender"));
    ck_assert(!mso_sync_scopes_can_send("Mail.ReadWrite"));
    ck_assert(!mso_sync_scopes_can_send(NULL));
    ck_assert(!mso_sync_scopes_can_send(""));
}
END_TEST

int main(void)
{
    Suite *s = suite_create("send");
    TCase *tc = tcase_create("send");
    int failed;

    apr_initialize();
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, mail_checks);
    tcase_add_test(tc, mail_create_requests);
    tcase_add_test(tc, items_and_urls);
    tcase_add_test(tc, attachment_checks);
    tcase_add_test(tc, attachment_requests);
    tcase_add_test(tc, upload_answers);
    tcase_add_test(tc, send_scopes);
    suite_add_tcase(s, tc);
    failed = mso_check_run(s);
    apr_terminate();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
