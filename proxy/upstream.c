/* The upstream client (upstream.h): per-worker pools of keep-alive
 * connections, round-robin over the pool's addresses, passive health,
 * connect/response timeouts, retries, and the response parsed and handed
 * to the caller through its callbacks. */
#include "upstream.h"

#include <string.h>

#include "http_util.h"
#include "proxy.h" /* struct sl_worker: loop, configuration, statistics, pools */


static void up_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *b);
static void up_send_request(struct sl_upconn *u);
static int up_start_on(struct sl_worker *w, struct sl_upreq *r);
static void up_close(struct sl_upconn *u);

static inline uint64_t now_ms(struct sl_worker *w) { return uv_now(&w->loop); }

static void record_latency(struct sl_worker *w, uint64_t us) {
  unsigned i = 0;
  while (i < SL_LAT_BUCKETS && us > sl_lat_bounds_us[i]) i++;
  sl_stat_inc(&w->stats.lat_bucket[i], 1);
  sl_stat_inc(&w->stats.lat_count, 1);
  sl_stat_inc(&w->stats.lat_sum_us, us);
}

/* The parser's callbacks (ctx: the connection), passed on to the request's
 * owner with the latency recorded. */
static void resp_on_head(void *ctx, const struct sl_resp_head *h) {
  struct sl_upconn *u = ctx;
  record_latency(u->w, (uv_hrtime() - u->started_ns) / 1000);
  if (u->req) u->req->cbs->on_head(u->req->ctx, h);
}

static int resp_on_body(void *ctx, const char *p, size_t n) {
  struct sl_upconn *u = ctx;
  return u->req ? u->req->cbs->on_body(u->req->ctx, p, n) : -1;
}

static const struct sl_resp_cbs resp_cbs = {.on_head = resp_on_head, .on_body = resp_on_body};

/* ---- pools and health ---- */

static void pool_unref(struct sl_pool *p) {
  if (--p->refs == 0) free(p);
}

void sl_worker_pools_build(struct sl_worker *w) {
  const struct sl_config *cfg = w->cfg;
  for (int k = 0; k < SL_NPOOLS; k++) {
    const struct sl_addr *list = cfg->upstream;
    unsigned n = cfg->n_upstream;
    if (k == SL_POOL_LLM && cfg->n_upstream_llm) {
      list = cfg->upstream_llm;
      n = cfg->n_upstream_llm;
    }
    struct sl_pool *old = w->pools[k];
    if (old && old->n == n) { /* unchanged addresses keep their pool, health and connections */
      unsigned same = 0;
      for (unsigned i = 0; i < n; i++)
        same += old->addrs[i].addr.salen == list[i].salen && !memcmp(&old->addrs[i].addr.sa, &list[i].sa, list[i].salen);
      if (same == n) continue;
    }
    struct sl_pool *p = sl_calloc(1, sizeof(*p));
    p->refs = 1;
    p->n = n;
    for (unsigned i = 0; i < n; i++) {
      p->addrs[i].addr = list[i];
      sl_list_init(&p->addrs[i].idle);
    }
    w->pools[k] = p;
    if (old) {
      for (unsigned i = 0; i < old->n; i++)
        while (!sl_list_empty(&old->addrs[i].idle)) {
          struct sl_upconn *u = sl_container_of(old->addrs[i].idle.next, struct sl_upconn, link);
          up_close(u);
        }
      pool_unref(old);
    }
  }
}

static struct sl_upaddr *pool_pick(struct sl_pool *p, uint64_t now) {
  for (unsigned i = 0; i < p->n; i++) {
    unsigned idx = (p->rr + i) % p->n;
    if (p->addrs[idx].down_until <= now) {
      p->rr = idx + 1;
      return &p->addrs[idx];
    }
  }
  return NULL;
}

static void addr_failed(struct sl_worker *w, struct sl_upaddr *ua) {
  if (++ua->fails >= w->cfg->max_fails && ua->down_until <= now_ms(w)) {
    ua->down_until = now_ms(w) + w->cfg->fail_timeout_ms;
    sl_stat_inc(&w->stats.up_ejections, 1);
    fprintf(stderr, "sluice[%u]: upstream %s ejected for %u ms after %u failure(s)\n", w->id, ua->addr.text,
            w->cfg->fail_timeout_ms, ua->fails);
  }
}

static void addr_ok(struct sl_upaddr *ua) {
  ua->fails = 0;
  ua->down_until = 0;
}

/* ---- connections ---- */

static void up_free(uv_handle_t *h) {
  struct sl_upconn *u = sl_container_of(h, struct sl_upconn, tcp);
  pool_unref(u->pool);
  free(u);
}

static void up_close(struct sl_upconn *u) {
  if (u->state == SL_UP_CLOSING) return;
  if (u->state == SL_UP_IDLE) u->ua->nidle--;
  u->state = SL_UP_CLOSING;
  sl_list_remove(&u->link);
  sl_list_remove(&u->all);
  u->w->nupconns--;
  if (u->req) u->req->conn = NULL;
  u->req = NULL;
  sl__close((uv_handle_t *)&u->tcp, up_free);
}

void sl_upstream_cancel(struct sl_upreq *r) {
  if (r->conn) up_close(r->conn);
}

/* Detaches the request from u and tells its caller that it failed. */
static void up_error(struct sl_upreq *r, int status, const char *code, const char *msg) {
  r->conn = NULL;
  r->cbs->on_error(r->ctx, status, code, msg);
}

static void up_alloc_cb(uv_handle_t *h, size_t hint, uv_buf_t *b) {
  (void)hint;
  struct sl_upconn *u = sl_container_of(h, struct sl_upconn, tcp);
  *b = uv_buf_init(u->resp.in + u->resp.in_len, (unsigned)sl_resp_room(&u->resp));
}

/* The request could not be completed on u. Retries on another connection
 * when nothing of the response arrived and either the connection was a
 * reused keep-alive one (the server may have closed it as we sent: the
 * classic race) or the connect itself failed; else answers the client. */
static void up_fail(struct sl_upconn *u, int connect_failed, int timed_out) {
  struct sl_worker *w = u->w;
  struct sl_upreq *r = u->req;
  int reused = u->requests > 0;
  if (!reused || timed_out) addr_failed(w, u->ua);
  if (timed_out)
    sl_stat_inc(&w->stats.up_timeouts, 1);
  else if (connect_failed)
    sl_stat_inc(&w->stats.up_connect_errors, 1);
  else
    sl_stat_inc(&w->stats.up_errors, 1);
  up_close(u); /* detaches r */
  if (!r) return;
  if (!u->got_bytes && !timed_out && (connect_failed || reused) && r->retries < 1 + u->pool->n) {
    r->retries++;
    sl_stat_inc(&w->stats.up_retries, 1);
    /* A retry that finds every member ejected reports the failure it met. */
    if (up_start_on(w, r) != 0) up_error(r, 502, "BadGateway", "The moderation backend failed.");
    return;
  }
  if (timed_out)
    up_error(r, 504, "GatewayTimeout", "The moderation backend did not answer in time.");
  else
    up_error(r, 502, "BadGateway", "The moderation backend failed.");
}

/* The response is complete: back to the pool when `reusable`. */
static void up_release(struct sl_upconn *u, int reusable) {
  struct sl_worker *w = u->w;
  if (u->req) u->req->conn = NULL;
  u->req = NULL;
  u->requests++;
  addr_ok(u->ua);
  int stale_pool = u->pool != w->pools[0] && u->pool != w->pools[1];
  if (!reusable || u->ua->nidle >= w->cfg->upstream_keepalive || w->draining || stale_pool) {
    up_close(u);
    return;
  }
  u->state = SL_UP_IDLE;
  u->deadline = 0;
  u->got_bytes = u->paused = 0;
  sl_list_push(&u->ua->idle, &u->link);
  u->ua->nidle++;
}

static void up_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *b) {
  (void)b;
  struct sl_upconn *u = sl_container_of(s, struct sl_upconn, tcp);
  if (u->state == SL_UP_CLOSING) return;
  if (u->state == SL_UP_IDLE) { /* the server closed (or spoke out of turn on) an idle connection */
    up_close(u);
    return;
  }
  struct sl_upreq *r = u->req;
  if (nread == 0) return;
  if (nread < 0) {
    /* A close-delimited body ends here (sl_resp_eof says whether the close
     * was a valid end: not inside trailers, say). */
    if (nread == UV_EOF && sl_resp_eof(&u->resp) == SL_RESP_DONE) {
      addr_ok(u->ua);
      up_close(u); /* detaches r */
      if (r) r->cbs->on_done(r->ctx);
      return;
    }
    up_fail(u, 0, 0);
    return;
  }
  u->got_bytes = 1;
  u->deadline = now_ms(u->w) + u->w->cfg->response_timeout_ms;
  switch (sl_resp_feed(&u->resp, (size_t)nread)) {
    case SL_RESP_DONE:
      /* Back to the pool first (detaching r), so that the caller's next
       * request, started from on_done, can reuse it. */
      up_release(u, u->resp.keep_alive);
      if (r) r->cbs->on_done(r->ctx);
      return;
    case SL_RESP_ERROR:
      if (!u->resp.headers_done && u->resp.in_len == SL_RESP_BUF)
        fprintf(stderr, "sluice[%u]: upstream %s: response head over %d bytes\n", u->w->id, u->ua->addr.text,
                SL_RESP_BUF);
      else if (r)
        fprintf(stderr, "sluice[%u]: upstream %s: bad response: %s\n", u->w->id, u->ua->addr.text,
                llhttp_get_error_reason(&u->resp.parser));
      up_fail(u, 0, 0);
      return;
    case SL_RESP_MORE:
      if (!r) {
        up_fail(u, 0, 0);
        return;
      }
      if (u->resp.headers_done && r->cbs->on_flush(r->ctx) && u->state == SL_UP_BUSY) {
        u->paused = 1;
        uv_read_stop(s); /* until sl_upstream_resume */
      }
      return;
  }
}

void sl_upstream_resume(struct sl_upreq *r) {
  struct sl_upconn *u = r->conn;
  if (!u || !u->paused || u->state != SL_UP_BUSY) return;
  u->paused = 0;
  uv_read_start((uv_stream_t *)&u->tcp, up_alloc_cb, up_read_cb);
}

static void up_write_done(uv_write_t *req, int status) {
  struct sl_upconn *u = sl_container_of(req, struct sl_upconn, write_req);
  u->write_pending = 0;
  if (u->state == SL_UP_CLOSING) return;
  if (status < 0) up_fail(u, 0, 0);
}

static void up_connect_cb(uv_connect_t *req, int status) {
  struct sl_upconn *u = sl_container_of(req, struct sl_upconn, connect_req);
  if (u->state == SL_UP_CLOSING) return;
  if (status < 0) {
    fprintf(stderr, "sluice[%u]: upstream %s: connect: %s\n", u->w->id, u->ua->addr.text, uv_strerror(status));
    up_fail(u, 1, 0);
    return;
  }
  uv_tcp_nodelay(&u->tcp, 1);
  sl_stat_inc(&u->w->stats.up_connects, 1);
  uv_read_start((uv_stream_t *)&u->tcp, up_alloc_cb, up_read_cb);
  u->state = SL_UP_BUSY;
  if (u->req) up_send_request(u);
  else up_release(u, 0); /* cancelled while connecting */
}

/* A new connection to ua in *out (always set). Returns 0, or the libuv
 * error of a connect that failed at once (the caller fails it then). */
static int up_connect(struct sl_worker *w, struct sl_pool *pool, struct sl_upaddr *ua, struct sl_upconn **out) {
  struct sl_upconn *u = sl_calloc(1, sizeof(*u));
  *out = u;
  u->w = w;
  u->pool = pool;
  pool->refs++;
  u->ua = ua;
  sl_list_init(&u->link);
  sl_list_push(&w->upconns, &u->all);
  w->nupconns++;
  u->state = SL_UP_CONNECTING;
  u->deadline = now_ms(w) + w->cfg->connect_timeout_ms;
  uv_tcp_init(&w->loop, &u->tcp);
  int r = uv_tcp_connect(&u->connect_req, &u->tcp, (const struct sockaddr *)&ua->addr.sa, up_connect_cb);
  if (r != 0) fprintf(stderr, "sluice[%u]: upstream %s: connect: %s\n", w->id, ua->addr.text, uv_strerror(r));
  return r;
}

/* Writes the request (head + body, as the caller serialised it). */
static void up_send_request(struct sl_upconn *u) {
  struct sl_upreq *r = u->req;
  uv_buf_t bufs[2] = {r->bufs[0], r->bufs[1]};
  unsigned nb = r->nbufs;
  u->state = SL_UP_BUSY;
  u->got_bytes = u->paused = 0;
  sl_resp_start(&u->resp, r->head_method, &resp_cbs, u);
  u->started_ns = uv_hrtime();
  u->deadline = now_ms(u->w) + u->w->cfg->response_timeout_ms;
  int n = uv_try_write((uv_stream_t *)&u->tcp, bufs, nb);
  if (n == UV_EAGAIN) n = 0;
  if (n < 0) {
    up_fail(u, 0, 0);
    return;
  }
  size_t left = (size_t)n;
  unsigned i = 0;
  while (i < nb && left >= bufs[i].len) left -= bufs[i++].len;
  if (i == nb) return;
  bufs[i].base += left;
  bufs[i].len -= left;
  if (uv_write(&u->write_req, (uv_stream_t *)&u->tcp, bufs + i, nb - i, up_write_done) != 0) {
    up_fail(u, 0, 0);
    return;
  }
  u->write_pending = 1;
}

/* Puts r on an idle connection of a usable member, or a new one. Returns
 * 0, UV_EAGAIN when no member is usable, or the error of the last connect
 * that failed at once (each such failure counts, and the next member is
 * tried, as a retry would). */
static int up_start_on(struct sl_worker *w, struct sl_upreq *r) {
  struct sl_pool *pool = w->pools[r->pool];
  for (;;) {
    struct sl_upaddr *ua = pool_pick(pool, now_ms(w));
    if (!ua) return UV_EAGAIN;
    struct sl_upconn *u;
    if (!sl_list_empty(&ua->idle)) {
      u = sl_container_of(ua->idle.next, struct sl_upconn, link);
      sl_list_remove(&u->link);
      ua->nidle--;
      sl_stat_inc(&w->stats.up_reused, 1);
      u->req = r;
      r->conn = u;
      up_send_request(u);
      return 0;
    }
    int e = up_connect(w, pool, ua, &u);
    if (e == 0) {
      u->req = r;
      r->conn = u;
      return 0;
    }
    /* Refused at once: counted like a failed connect, then the next member. */
    addr_failed(w, ua);
    sl_stat_inc(&w->stats.up_connect_errors, 1);
    up_close(u);
    if (r->retries >= 1 + pool->n) return e;
    r->retries++;
    sl_stat_inc(&w->stats.up_retries, 1);
  }
}

int sl_upstream_start(struct sl_worker *w, struct sl_upreq *r) {
  r->conn = NULL;
  r->retries = 0;
  return up_start_on(w, r);
}

void sl_upconn_sweep(struct sl_upconn *u, uint64_t now) {
  if (!u->deadline || now < u->deadline || u->state == SL_UP_CLOSING) return;
  if (u->state == SL_UP_CONNECTING) {
    fprintf(stderr, "sluice[%u]: upstream %s: connect timed out\n", u->w->id, u->ua->addr.text);
    up_fail(u, 1, 1);
  } else if (u->state == SL_UP_BUSY) {
    if (u->paused) { /* the caller's client is slow, not the upstream */
      u->deadline = now + u->w->cfg->response_timeout_ms;
      return;
    }
    up_fail(u, 0, 1);
  }
}

void sl_upstream_close_idle(struct sl_worker *w) {
  for (int k = 0; k < SL_NPOOLS; k++) {
    struct sl_pool *p = w->pools[k];
    if (!p) continue;
    for (unsigned i = 0; i < p->n; i++)
      while (!sl_list_empty(&p->addrs[i].idle))
        up_close(sl_container_of(p->addrs[i].idle.next, struct sl_upconn, link));
  }
}
