/* Worker threads: one libuv loop each, its own SO_REUSEPORT listener, a
 * sweep timer for every timeout (one timer per worker instead of one per
 * connection keeps the request path free of timer-heap work), configuration
 * swaps and the SIGTERM drain. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "http_util.h"
#include "proxy.h"

const uint64_t sl_lat_bounds_us[SL_LAT_BUCKETS] = {250,   500,    1000,   2500,   5000,    10000,   25000,
                                                   50000, 100000, 250000, 500000, 1000000, 2500000, 10000000};

static void on_connection(uv_stream_t *s, int status) {
  struct sl_worker *w = sl_container_of(s, struct sl_worker, listener);
  if (status < 0) {
    fprintf(stderr, "sluice[%u]: accept: %s\n", w->id, uv_strerror(status));
    return;
  }
  sl_conn_accept(w);
}

static void log_open(struct sl_worker *w) {
  if (w->log_fd >= 0) close(w->log_fd);
  w->log_fd = -1;
  if (!w->cfg->access_log[0]) return;
  w->log_fd = open(w->cfg->access_log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
  if (w->log_fd < 0)
    fprintf(stderr, "sluice[%u]: access log %s: %s\n", w->id, w->cfg->access_log, strerror(errno));
}

void sl_log_flush(struct sl_worker *w) {
  if (w->log_fd >= 0 && w->log.len) {
    /* O_APPEND: each worker's block lands whole, never interleaved mid-line. */
    if (write(w->log_fd, w->log.data, w->log.len) < 0) { /* a full disk must not stop the proxy */
    }
  }
  w->log.len = 0;
}

void sl_log_access(struct sl_worker *w, struct sl_conn *c) {
  if (w->log_fd < 0) return;
  if (w->log.cap - w->log.len < 1024 + c->req.url_len) sl_log_flush(w);
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME_COARSE, &ts);
  char head[160];
  int n = snprintf(head, sizeof(head), "%lld.%03ld %s %s \"%s ", (long long)ts.tv_sec, ts.tv_nsec / 1000000, c->peer,
                   c->reqid[0] ? c->reqid : "-", llhttp_method_name(llhttp_get_method(&c->req.parser)));
  if (sl_buf_append(&w->log, head, (size_t)n) != 0) return;
  size_t url_len = c->req.url_len > 2048 ? 2048 : c->req.url_len;
  sl_buf_append(&w->log, c->req.buf + c->req.url_off, url_len);
  n = snprintf(head, sizeof(head), "\" %d %llu\n", c->status, (unsigned long long)c->resp_bytes);
  sl_buf_append(&w->log, head, (size_t)n);
}

/* The wake handle stays open (unreferenced, so the loop can end): other
 * threads may still send to it until sl_worker_destroy. */
static void worker_stop_handles(struct sl_worker *w) {
  sl_upstream_close_idle(w);
  sl__close((uv_handle_t *)&w->sweep, NULL);
  uv_unref((uv_handle_t *)&w->inbox.async);
}

static void on_sweep(uv_timer_t *t) {
  struct sl_worker *w = sl_container_of(t, struct sl_worker, sweep);
  uint64_t now = uv_now(&w->loop);
  struct sl_link *l, *next;
  for (l = w->conns.next; l != &w->conns; l = next) {
    next = l->next;
    struct sl_conn *c = sl_container_of(l, struct sl_conn, link);
    if (w->draining && now >= w->drain_deadline)
      sl_conn_close(c); /* drain bound reached: what is still open is cut */
    else
      sl_conn_sweep(c, now);
  }
  if (w->draining && now >= w->drain_deadline) sl_conn_orphans_cut(w);
  for (l = w->upconns.next; l != &w->upconns; l = next) {
    next = l->next;
    sl_upconn_sweep(sl_container_of(l, struct sl_upconn, all), now);
  }
  if (now / 1000 != (now - SL_SWEEP_MS) / 1000) sl_log_flush(w);
  sl_dirsync_quiescent(&w->shared->dir, w->id);
  if (w->draining && w->nconns == 0 && w->norphans == 0) worker_stop_handles(w);
}

/* The parser limits every connection of this worker reads (a reload
 * applies them to requests that start after it). */
static void worker_limits_set(struct sl_worker *w) {
  w->req_limits.max_header_bytes = w->cfg->max_header_bytes;
  w->req_limits.max_body_bytes = w->cfg->max_body_bytes;
}

/* ---- the inbox: one handler per message kind (base/inbox.h) ---- */

static void on_config(struct sl_worker *w) {
  /* acquire: pairs with the main thread's release store, so the snapshot's
   * contents are visible before we use the pointer. */
  const struct sl_config *next = atomic_load_explicit(&w->next_cfg, memory_order_acquire);
  if (!next || next == w->cfg) return;
  int log_changed = strcmp(next->access_log, w->cfg->access_log) != 0;
  w->cfg = next;
  worker_limits_set(w);
  sl_worker_pools_build(w);
  if (log_changed) {
    sl_log_flush(w);
    log_open(w);
  }
  /* release: the main thread frees older snapshots only after seeing this. */
  atomic_store_explicit(&w->cfg_seen, next->version, memory_order_release);
}

static void on_meter_round(struct sl_worker *w) {
  /* acquire: pairs with the flusher's round store. */
  uint64_t round = atomic_load_explicit(&w->meter.round_req, memory_order_acquire);
  if (round == atomic_load_explicit(&w->meter.round_done, memory_order_relaxed)) return;
  sl_meter_handoff(&w->meter);
  /* release: the handed-off tables are in the ring before the flusher sees the round done. */
  atomic_store_explicit(&w->meter.round_done, round, memory_order_release);
  sl_flusher_notify(&w->shared->flusher);
}

static void on_drain(struct sl_worker *w) {
  if (!atomic_load_explicit(&w->drain, memory_order_acquire) || w->draining) return;
  w->draining = 1;
  w->drain_deadline = uv_now(&w->loop) + w->cfg->drain_timeout_ms;
  sl__close((uv_handle_t *)&w->listener, NULL);
  struct sl_link *l, *next_l;
  for (l = w->conns.next; l != &w->conns; l = next_l) {
    next_l = l->next;
    sl_conn_drain(sl_container_of(l, struct sl_conn, link));
  }
  sl_upstream_close_idle(w);
  if (w->nconns == 0 && w->norphans == 0) worker_stop_handles(w);
}

static void on_inbox(uv_async_t *a) {
  struct sl_worker *w = sl_container_of(a, struct sl_worker, inbox.async);
  uint32_t kinds = sl_inbox_take(&w->inbox);
  if (kinds & SL_MSG_CONFIG) on_config(w);
  if (kinds & SL_MSG_DIRECTORY) sl_admit_resume(w); /* parked requests whose account is now known */
  if (kinds & SL_MSG_METER_ROUND) on_meter_round(w);
  if (kinds & SL_MSG_DRAIN) on_drain(w);
  sl_dirsync_quiescent(&w->shared->dir, w->id); /* on every wake: older snapshots can go sooner */
}

static void worker_main(void *arg) {
  struct sl_worker *w = arg;
  char name[16];
  snprintf(name, sizeof(name), "sluice-w%u", w->id);
  (void)pthread_setname_np(pthread_self(), name); /* top -H, perf */
  uv_run(&w->loop, UV_RUN_DEFAULT);
  /* Everything is closed; let close callbacks run, then free what is left. */
  uv_run(&w->loop, UV_RUN_DEFAULT);
  sl_log_flush(w);
  if (w->log_fd >= 0) close(w->log_fd);
  sl_buf_free(&w->log);
  for (int k = 0; k < SL_NPOOLS; k++)
    if (w->pools[k] && --w->pools[k]->refs == 0) free(w->pools[k]);
}

uint64_t sl_workers_config_seen(struct sl_worker *w, unsigned n) {
  uint64_t min = UINT64_MAX;
  for (unsigned i = 0; i < n; i++) {
    /* acquire: pairs with the worker's release store after it switched. */
    uint64_t v = atomic_load_explicit(&w[i].cfg_seen, memory_order_acquire);
    if (v < min) min = v;
  }
  return min;
}

void sl_worker_destroy(struct sl_worker *w) {
  uv_close((uv_handle_t *)&w->inbox.async, NULL);
  uv_run(&w->loop, UV_RUN_DEFAULT);
  uv_loop_close(&w->loop);
  sl_meter_worker_free(&w->meter);
}

int sl_worker_run(struct sl_worker *w) { return uv_thread_create(&w->thread, worker_main, w); }

/* Returns 0, or a negative errno with everything it had set up undone
 * (listen_fd is closed with the listener once uv_tcp_open has taken it). */
int sl_worker_init(struct sl_worker *w, unsigned id, const struct sl_config *cfg, int listen_fd,
                   struct sl_shared *shared) {
  int r;
  w->id = id;
  w->shared = shared;
  sl_list_init(&w->parked);
  if ((r = sl_meter_worker_init(&w->meter, cfg->meter_keys, cfg->billing_tz_offset_min)) != 0) return r;
  w->cfg = cfg;
  worker_limits_set(w);
  atomic_store_explicit(&w->cfg_seen, cfg->version, memory_order_relaxed);
  w->log_fd = -1;
  w->log.max = 64 * 1024;
  sl_list_init(&w->conns);
  sl_list_init(&w->orphans);
  sl_list_init(&w->upconns);
  if (getrandom(&w->rid_hi, sizeof(w->rid_hi), 0) != sizeof(w->rid_hi)) w->rid_hi = (uint64_t)time(NULL);
  w->rid_hi = (w->rid_hi & ~0xffull) | id; /* ids stay unique across workers */
  if ((r = uv_loop_init(&w->loop)) != 0) goto err_meter;
  uv_tcp_init(&w->loop, &w->listener);
  if ((r = uv_tcp_open(&w->listener, listen_fd)) != 0 ||
      (r = uv_listen((uv_stream_t *)&w->listener, 1024, on_connection)) != 0)
    goto err_loop;
  uv_async_init(&w->loop, &w->inbox.async, on_inbox);
  uv_timer_init(&w->loop, &w->sweep);
  uv_timer_start(&w->sweep, on_sweep, SL_SWEEP_MS, SL_SWEEP_MS);
  sl_worker_pools_build(w);
  log_open(w);
  return 0;

err_loop:
  uv_close((uv_handle_t *)&w->listener, NULL);
  uv_run(&w->loop, UV_RUN_DEFAULT); /* runs the close */
  uv_loop_close(&w->loop);
err_meter:
  sl_meter_worker_free(&w->meter);
  return r;
}
