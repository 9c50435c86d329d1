/* lib/ must build and be tested without httpd: no httpd header may be included there. */
#include <check.h>

#include "unit.h"
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const httpd_headers[] = {
    "httpd.h", "http_config.h", "http_log.h", "http_protocol.h", "http_request.h",
    "http_core.h", "ap_config.h", "mod_dbd.h", "mod_watchdog.h", "ap_mpm.h", NULL
};

START_TEST(lib_has_no_httpd_includes)
{
    char path[4096], line[4096];
    DIR *d = opendir(SRCDIR "/lib");
    struct dirent *e;
    int files = 0;

    ck_assert_ptr_nonnull(d);
    while ((e = readdir(d)) != NULL) {
        size_t n = strlen(e->d_name);
        FILE *f;
        if (n < 3 || (strcmp(e->d_name + n - 2, ".c") && strcmp(e->d_name + n - 2, ".h"))) {
            continue;
        }
        snprintf(path, sizeof(path), "%s/lib/%s", SRCDIR, e->d_name);
        f = fopen(path, "r");
        ck_assert_ptr_nonnull(f);
        files++;
        while (fgets(line, sizeof(line), f)) {
            int i;
            if (!strstr(line, "#include")) {
                continue;
            }
            for (i = 0; httpd_headers[i]; i++) {
                ck_assert_msg(!strstr(line, httpd_headers[i]), "%s includes %s", path,
                              httpd_headers[i]);
            }
        }
        fclose(f);
    }
    closedir(d);
    ck_assert_int_ge(files, 8);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("layout");
    TCase *tc = tcase_create("lib");
    int failed;

    tcase_add_test(tc, lib_has_no_httpd_includes);
    suite_add_tcase(s, tc);
    failed = mso_check_run(s);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
