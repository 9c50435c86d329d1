/* The metrics handler (msoauth-metrics): Prometheus text exposition. */
#ifndef MOD_MSOAUTH_METRICS_H
#define MOD_MSOAUTH_METRICS_H

#include <httpd.h>

int msoauth_metrics_handler(request_rec *r);

#endif
