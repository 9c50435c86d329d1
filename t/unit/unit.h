/* What every unit test program's main does with its suite. */
#ifndef MSO_UNIT_H
#define MSO_UNIT_H

#include <check.h>

/* Runs the suite (forking per test unless CK_FORK=no) and returns how many
 * tests failed. */
static inline int mso_check_run(Suite *s)
{
    SRunner *sr = srunner_create(s);
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed;
}

#endif
