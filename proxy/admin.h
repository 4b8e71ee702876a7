/* The admin listener: /healthz and /metrics (Prometheus text), served on the
 * main thread's loop so that a busy worker never delays a health check. */
#ifndef SL_ADMIN_H
#define SL_ADMIN_H

#include <uv.h>

#include "proxy.h"

struct sl_admin {
  uv_tcp_t tcp;
  struct sl_worker *workers;
  unsigned nworkers;
  struct sl_dirsync *dir;
  struct sl_flusher *flusher;
  struct lim_table *lim;
  struct sl_fleet *fleet; /* NULL: global limits off */
  int time_offset_s; /* the testing aid of the configuration, as admission applies it */
};

/* Binds and listens on cfg->admin; returns 0 or a negative libuv error. */
int sl_admin_start(struct sl_admin *a, uv_loop_t *loop, const struct sl_addr *addr);
void sl_admin_stop(struct sl_admin *a);

/* GET /explain?uid=&feature=&region=: what limit applies and the bucket's
 * state. Appends JSON to out; returns the HTTP status. Admin thread. */
int sl_admin_explain(struct sl_admin *a, const char *query, struct sl_buf *out);

/* Appends the Prometheus text for all workers to out. */
void sl_admin_metrics(struct sl_admin *a, struct sl_buf *out);

#endif
