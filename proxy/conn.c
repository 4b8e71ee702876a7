/* Client connections: read requests and parse them (reqparse.c), buffer the
 * body within the worker's budget, hand complete requests to admission or
 * the upstream side, relay responses in order (pipelining), and enforce the
 * header/body/time bounds. The request loop is flat: answering a request
 * synchronously returns to conn_parse's loop, never re-enters it. */
#include <arpa/inet.h>
#include <string.h>
#include <time.h>

#include "http_util.h"
#include "proxy.h"

static void conn_parse(struct sl_conn *c);
static void conn_flush(struct sl_conn *c);
static void conn_write_done(uv_write_t *req, int status);
static void read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *b);

static inline uint64_t now_ms(struct sl_conn *c) { return uv_now(&c->w->loop); }

/* ---- lifecycle ---- */

/* Returns this request's body bytes to the worker's budget. */
static void body_release(struct sl_conn *c) {
  c->w->body_buffered -= c->body_reserved;
  c->body_reserved = 0;
}

/* Counts `total` body bytes of this request against the worker's budget
 * (--max-body-buffer-bytes). Returns 0, or -1 when it does not fit. */
static int body_reserve(struct sl_conn *c, uint64_t total) {
  if (total <= c->body_reserved) return 0;
  uint64_t more = total - c->body_reserved;
  if (c->w->body_buffered + more > c->w->cfg->max_body_buffer_bytes) return -1;
  c->w->body_buffered += more;
  c->body_reserved = total;
  return 0;
}

static void conn_free_mem(struct sl_conn *c) {
  free(c->req.buf);
  free(c->req.hdrs.h);
  sl_buf_free(&c->out);
  sl_buf_free(&c->fwd);
  sl_buf_free(&c->inflight);
  sl_buf_free(&c->req.body);
  free(c);
}

static void conn_free(uv_handle_t *h) {
  struct sl_conn *c = sl_container_of(h, struct sl_conn, tcp);
  if (c->orphan) { /* the backend's answer is still due: freed when it comes (orphan_end) */
    c->tcp_closed = 1;
    return;
  }
  conn_free_mem(c);
}

static void conn_count(struct sl_conn *c);

/* An orphan's backend exchange ended (or was cut): its outcome is counted
 * and, once its socket is closed too, it is freed. */
static void orphan_end(struct sl_conn *c) {
  struct sl_worker *w = c->w;
  conn_count(c);
  c->orphan = 0;
  sl_list_remove(&c->link);
  w->norphans--;
  if (c->tcp_closed) conn_free_mem(c);
}

void sl_conn_close(struct sl_conn *c) {
  if (c->closing) return;
  c->closing = 1;
  sl_admit_unpark(c);
  /* A request dispatched and not counted yet ends here: every request ends
   * in one outcome (SPEC 6). One whose backend has not answered yet stays
   * an orphan: its exchange goes on without a client, so that a 200 is
   * counted ok (the moderation was done). */
  int dispatched = c->phase == SL_C_WAITING || c->phase == SL_C_SENDING;
  if (dispatched && !c->counted && c->up.conn && c->w->cfg->metering_on) {
    c->orphan = 1;
    sl_upstream_resume(&c->up); /* paused for a slow client: nobody waits for it now */
  } else {
    sl_upstream_cancel(&c->up);
    if (dispatched && !c->counted) conn_count(c);
  }
  body_release(c);
  sl_list_remove(&c->link);
  c->w->nconns--;
  sl_stat_dec(&c->w->stats.conns_open, 1);
  if (c->orphan) {
    sl_list_push(&c->w->orphans, &c->link);
    c->w->norphans++;
    sl_stat_inc(&c->w->stats.orphans, 1);
  }
  sl__close((uv_handle_t *)&c->tcp, conn_free);
}

void sl_conn_orphans_cut(struct sl_worker *w) {
  while (w->orphans.next != &w->orphans) {
    struct sl_conn *c = sl_container_of(w->orphans.next, struct sl_conn, link);
    sl_upstream_cancel(&c->up); /* no 200 came: counted as the failure it is to us */
    orphan_end(c);
  }
}

static void alloc_cb(uv_handle_t *h, size_t hint, uv_buf_t *b) {
  (void)hint;
  struct sl_conn *c = sl_container_of(h, struct sl_conn, tcp);
  struct sl_req *r = &c->req;
  if (c->lingering) { /* what arrives now is discarded */
    *b = uv_buf_init(r->buf, (unsigned)r->cap);
    return;
  }
  if (r->len == r->cap && c->phase == SL_C_READING) {
    size_t want = 0;
    if (r->need_cap > r->cap)
      want = r->need_cap; /* a Content-Length body: room for exactly the request */
    else if (!r->headers_done && r->cap <= c->w->cfg->max_header_bytes)
      want = (size_t)c->w->cfg->max_header_bytes + 1; /* one byte past the bound detects 431 */
    else if (r->headers_done && r->chunked_req)
      want = r->cap + SL_CONN_BUF; /* framing is dropped as it is parsed: this stays near head + one read */
    if (want > r->cap) {
      r->buf = sl_realloc(r->buf, want);
      r->cap = want;
    }
  }
  *b = uv_buf_init(r->buf + r->len, (unsigned)(r->cap - r->len));
}

/* Sends a response the proxy makes itself; when a relayed response already
 * started, the connection is closed instead (nothing honest is left to say). */
void sl_conn_error(struct sl_conn *c, int status, const char *code, const char *msg, const char *extra, int close) {
  if (c->head_sent) {
    sl_conn_close(c);
    return;
  }
  if (!c->reqid[0]) sl_http_request_id(c->reqid, c->w->rid_hi, ++c->w->rid_seq);
  c->status = status;
  c->head_sent = 1;
  /* Answered before the request's end: the rest of it is never read, so
   * the connection ends with this answer, and says so. */
  if (c->phase == SL_C_READING) c->body_unread = 1;
  if (close || c->body_unread) c->close_after = 1;
  if (sl_http_error(&c->out, status, code, msg, c->reqid, extra, c->close_after) != 0) {
    sl_conn_close(c);
    return;
  }
  c->phase = SL_C_SENDING;
  c->resp_done = 1;
  conn_flush(c);
}

static void conn_start_request(struct sl_conn *c) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME_COARSE, &ts);
  c->call.arrival_s = (int64_t)ts.tv_sec + c->w->cfg->time_offset_s;
  c->call.day = sl_meter_worker_day(&c->w->meter, c->call.arrival_s);
  c->call.uid_len = 0;
  c->phase = SL_C_READING;
  c->deadline = now_ms(c) + c->w->cfg->header_timeout_ms;
  c->reqid[0] = '\0';
  c->status = 0;
  c->resp_bytes = 0;
  c->head_sent = c->resp_done = 0;
  c->body_unread = 0;
  c->call.decided = 0;
  c->call.cls.feature = -1;
  c->call.tier = SL_TIER_BASELINE;
  c->counted = 0;
}

/* The request is complete: hand it to the upstream side. */
static void conn_dispatch(struct sl_conn *c) {
  struct sl_worker *w = c->w;
  c->phase = SL_C_WAITING;
  c->deadline = 0;
  sl_stat_inc(&w->stats.requests, 1);
  sl_http_request_id(c->reqid, w->rid_hi, ++w->rid_seq);
  c->pool = SL_POOL_DEFAULT;
  if (w->cfg->admission_on)
    sl_admit(c);
  else
    sl_conn_forward(c);
}

/* Counts the request for billing: UID "-" when no account was found,
 * feature and region "-" when the request could not be classified. */
static void conn_meter(struct sl_conn *c) {
  struct sl_meter_key k; /* bytes past uid_len and region_len are never read */
  k.day = c->call.day;
  k.feature = c->call.cls.feature >= 0 ? (uint8_t)c->call.cls.feature : SL_METER_NO_FEATURE;
  k.tier = c->call.tier;
  k.outcome = c->call.outcome;
  if (c->call.uid_len) {
    k.uid_len = c->call.uid_len;
    memcpy(k.uid, c->call.uid, c->call.uid_len);
  } else {
    k.uid_len = 1;
    k.uid[0] = '-';
  }
  if (c->call.cls.feature >= 0 && c->call.cls.region_len) {
    k.region_len = c->call.cls.region_len;
    memcpy(k.region, c->call.cls.region, c->call.cls.region_len);
  } else {
    k.region_len = 1;
    k.region[0] = '-';
  }
  /* Unclassified (admission off): no catalogue verdict, billed as before. */
  k.billable = c->call.cls.feature >= 0 ? c->call.cls.billable : 1;
  k.service_len = 0;
  if (k.outcome == SL_OUT_OK && k.billable && c->call.cls.feature >= 0 && c->call.cls.service_len) {
    k.service_len = c->call.cls.service_len;
    memcpy(k.service, c->call.cls.service, k.service_len);
  }
  sl_meter_count(&c->w->meter, &k);
}

static void linger_shutdown_done(uv_shutdown_t *req, int status) {
  (void)req;
  (void)status; /* the deadline or the client's close ends the linger either way */
}

/* Answered before the request's end: send FIN, then read and discard what
 * the client still sends for a bounded time before closing. Closing at once
 * with unread bytes makes the kernel send RST, which can destroy the answer
 * before the client reads it. */
static void conn_linger(struct sl_conn *c) {
  c->lingering = 1;
  c->deadline = now_ms(c) + SL_LINGER_MS;
  if (uv_shutdown(&c->shutdown_req, (uv_stream_t *)&c->tcp, linger_shutdown_done) != 0) {
    sl_conn_close(c);
    return;
  }
  if (c->read_paused) {
    c->read_paused = 0;
    uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, read_cb);
  }
}

/* The request's outcome, counted once: in the metrics, for billing, in the
 * access log. At its end, or when its client went away first. */
static void conn_count(struct sl_conn *c) {
  struct sl_worker *w = c->w;
  c->counted = 1;
  if (c->status >= 100 && c->status < 600) sl_stat_inc(&w->stats.status_class[c->status / 100], 1);
  if (!c->call.decided) c->call.outcome = c->status == 200 ? SL_OUT_OK : SL_OUT_UPSTREAM_ERROR;
  sl_stat_inc(&w->stats.outcome[c->call.outcome][c->call.cls.feature + 1][c->call.tier & 1], 1);
  if (SL_LIKELY(w->cfg->metering_on)) conn_meter(c);
  sl_log_access(w, c);
}

static void conn_finish(struct sl_conn *c) {
  struct sl_worker *w = c->w;
  conn_count(c);
  body_release(c);
  int more = c->req.parsed < c->req.len;
  if (c->close_after || c->body_unread || !c->req.keep_alive || (c->eof && !more) || (w->draining && !more)) {
    if (c->body_unread && !c->eof)
      conn_linger(c);
    else
      sl_conn_close(c);
    return;
  }
  sl_req_consume(&c->req); /* the next request starts at offset 0 */
  if (c->req.cap > SL_CONN_BUF && c->req.len <= SL_CONN_BUF) {
    c->req.buf = sl_realloc(c->req.buf, SL_CONN_BUF);
    c->req.cap = SL_CONN_BUF;
  }
  sl_buf_shrink(&c->out, 4 * SL_RESP_BUF);
  sl_buf_shrink(&c->inflight, 4 * SL_RESP_BUF);
  sl_buf_shrink(&c->req.body, SL_CONN_BUF);
  c->phase = SL_C_IDLE;
  c->deadline = now_ms(c) + w->cfg->idle_timeout_ms;
  if (c->read_paused && !c->eof) {
    c->read_paused = 0;
    uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, read_cb);
  }
  conn_parse(c); /* inside conn_parse's loop this returns at once: the loop goes on */
}

static void conn_write_done(uv_write_t *req, int status) {
  struct sl_conn *c = sl_container_of(req, struct sl_conn, write_req);
  c->write_pending = 0;
  c->inflight.len = 0;
  if (c->closing) return;
  if (c->phase == SL_C_SENDING && !c->lingering) c->deadline = 0; /* progress: the send timeout starts again */
  if (status < 0) {
    sl_conn_close(c);
    return;
  }
  sl_upstream_resume(&c->up);
  conn_flush(c);
}

/* Writes c->out to the client: a direct write first; what the socket did not
 * take moves (by swapping buffers, not copying) to c->inflight for uv_write,
 * so c->out stays free for appends, and the upstream is held until the write
 * completes, which is the backpressure. */
static void conn_flush(struct sl_conn *c) {
  if (c->closing || c->write_pending) return;
  if (c->out.len) {
    uv_buf_t b = uv_buf_init(c->out.data, (unsigned)c->out.len);
    int n = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    if (n == UV_EAGAIN) n = 0;
    if (n < 0) {
      sl_conn_close(c);
      return;
    }
    c->resp_bytes += c->out.len;
    if ((size_t)n < c->out.len) {
      struct sl_buf t = c->inflight;
      c->inflight = c->out;
      c->out = t;
      c->out.len = 0;
      b = uv_buf_init(c->inflight.data + n, (unsigned)(c->inflight.len - (size_t)n));
      if (uv_write(&c->write_req, (uv_stream_t *)&c->tcp, &b, 1, conn_write_done) != 0) {
        sl_conn_close(c);
        return;
      }
      c->write_pending = 1;
      c->deadline = now_ms(c) + c->w->cfg->send_timeout_ms; /* a client that stops reading */
      return;
    }
    c->out.len = 0;
  }
  if (c->resp_done) conn_finish(c);
}

/* ---- forwarding: the request out, the response back (upstream.h) ---- */

static const struct sl_upstream_cbs up_cbs;

/* Whether a response header is named by a token of the response's own
 * Connection header(s) (hop-by-hop, so not relayed). */
static int head_conn_listed(const struct sl_resp_head *hd, const char *name, size_t n) {
  for (unsigned i = 0; i < hd->n; i++) {
    const struct sl_hdr *h = &hd->h[i];
    if (h->kind == SL_H_CONNECTION && sl_http_has_token(hd->base + h->val_off, h->val_len, name, n)) return 1;
  }
  return 0;
}

static void up_on_head(void *ctx, const struct sl_resp_head *hd) {
  struct sl_conn *c = ctx;
  struct sl_buf *o = &c->out;
  if (c->orphan) { /* no client: only the status matters (what is counted) */
    c->status = hd->status;
    return;
  }
  int no_body = c->req.head_method || hd->status == 204 || hd->status == 304;
  int http10 = c->req.parser.http_major == 1 && c->req.parser.http_minor == 0;
  if (no_body || hd->content_length)
    c->resp_mode = SL_RESP_LENGTH;
  else if (!http10)
    c->resp_mode = SL_RESP_CHUNKED;
  else
    c->resp_mode = SL_RESP_EOF;
  if (c->resp_mode == SL_RESP_EOF) c->close_after = 1; /* the body's end is our close */
  if (c->w->draining && c->req.parsed == c->req.len) c->close_after = 1;
  int closing = c->close_after || !c->req.keep_alive;

  /* Status codes are three digits (upstream.c refuses others): no printf on this path. */
  char line[13] = "HTTP/1.1 000 ";
  line[9] = (char)('0' + hd->status / 100 % 10);
  line[10] = (char)('0' + hd->status / 10 % 10);
  line[11] = (char)('0' + hd->status % 10);
  sl_buf_append(o, line, sizeof(line));
  sl_buf_append(o, hd->reason, hd->reason_len);
  sl_buf_lit(o, "\r\n");
  int has_conn_tokens = 0;
  for (unsigned i = 0; i < hd->n; i++)
    if (hd->h[i].kind == SL_H_CONNECTION) has_conn_tokens = 1;
  for (unsigned i = 0; i < hd->n; i++) {
    const struct sl_hdr *h = &hd->h[i];
    const char *name = hd->base + h->name_off;
    enum sl_hdr_kind k = (enum sl_hdr_kind)h->kind;
    if (k == SL_H_HOP || k == SL_H_CONNECTION || k == SL_H_TRANSFER_ENCODING) continue;
    if (has_conn_tokens) {
      char tmp[64];
      size_t ln = sl_http_lower(name, h->name_len, tmp, sizeof(tmp));
      if (ln && head_conn_listed(hd, tmp, ln)) continue;
    }
    sl_buf_append(o, name, h->name_len);
    sl_buf_lit(o, ": ");
    sl_buf_append(o, hd->base + h->val_off, h->val_len);
    sl_buf_lit(o, "\r\n");
  }
  if (c->resp_mode == SL_RESP_CHUNKED) sl_buf_lit(o, "Transfer-Encoding: chunked\r\n");
  if (closing)
    sl_buf_lit(o, "Connection: close\r\n");
  else if (http10)
    sl_buf_lit(o, "Connection: keep-alive\r\n");
  sl_buf_lit(o, "\r\n");
  c->status = hd->status;
  c->head_sent = 1;
  c->phase = SL_C_SENDING;
}

static int up_on_body(void *ctx, const char *p, size_t n) {
  struct sl_conn *c = ctx;
  if (c->req.head_method || c->orphan) return 0; /* an orphan's body is read and dropped */
  if (c->resp_mode == SL_RESP_CHUNKED) {
    static const char digits[] = "0123456789abcdef";
    char hex[20]; /* chunk size line: hex digits + CRLF, built from the end */
    size_t i = sizeof(hex);
    hex[--i] = '\n';
    hex[--i] = '\r';
    size_t v = n;
    do hex[--i] = digits[v & 15]; while (v >>= 4);
    if (sl_buf_append(&c->out, hex + i, sizeof(hex) - i) || sl_buf_append(&c->out, p, n) ||
        sl_buf_lit(&c->out, "\r\n"))
      return -1;
    return 0;
  }
  return sl_buf_append(&c->out, p, n);
}

/* After a read's worth of body: out to the client; 1 (pause the backend)
 * while the client has not taken it. */
static int up_on_flush(void *ctx) {
  struct sl_conn *c = ctx;
  if (!c->orphan) conn_flush(c); /* which may make it one (the client is gone) */
  if (c->orphan) return 0;       /* its answer is read to the end, and dropped */
  return c->closing || c->write_pending;
}

static void up_on_done(void *ctx) {
  struct sl_conn *c = ctx;
  if (c->orphan) {
    orphan_end(c);
    return;
  }
  if (c->resp_mode == SL_RESP_CHUNKED && !c->req.head_method) sl_buf_lit(&c->out, "0\r\n\r\n");
  c->resp_done = 1;
  conn_flush(c);
}

static void up_on_error(void *ctx, int status, const char *code, const char *msg) {
  struct sl_conn *c = ctx;
  if (c->orphan) { /* a 200 head already seen still counts ok (c->status) */
    orphan_end(c);
    return;
  }
  sl_conn_error(c, status, code, msg, NULL, 0);
}

static const struct sl_upstream_cbs up_cbs = {
    .on_head = up_on_head, .on_body = up_on_body, .on_flush = up_on_flush, .on_done = up_on_done,
    .on_error = up_on_error,
};

/* Serialises the request for the backend: the client's headers less the
 * hop-by-hop ones (and those Connection names), X-Forwarded-For with the
 * client's address appended, sluice's X-Request-Id, the body de-chunked
 * with a Content-Length. Built once; a retry sends the same bytes. */
static int fwd_build(struct sl_conn *c) {
  const struct sl_req *r = &c->req;
  struct sl_buf *o = &c->fwd;
  o->len = 0;
  const char *method = llhttp_method_name((llhttp_method_t)r->parser.method);
  sl_buf_append(o, method, strlen(method));
  sl_buf_lit(o, " ");
  sl_buf_append(o, r->buf + r->url_off, r->url_len);
  sl_buf_lit(o, " HTTP/1.1\r\n");
  unsigned nxff = 0;
  for (unsigned i = 0; i < r->hdrs.n; i++) {
    const struct sl_hdr *h = &r->hdrs.h[i];
    switch ((enum sl_hdr_kind)h->kind) {
      case SL_H_HOP:
      case SL_H_CONNECTION:
      case SL_H_CONTENT_LENGTH:
      case SL_H_TRANSFER_ENCODING:
      case SL_H_EXPECT:
      case SL_H_X_REQUEST_ID:
        continue;
      case SL_H_X_FORWARDED_FOR:
        nxff++; /* merged below, with the client's address */
        continue;
      default:
        break;
    }
    if (r->nconn_hdr && sl_req_conn_listed(r, h)) continue;
    sl_buf_append(o, r->buf + h->name_off, h->name_len);
    sl_buf_lit(o, ": ");
    sl_buf_append(o, r->buf + h->val_off, h->val_len);
    sl_buf_lit(o, "\r\n");
  }
  sl_buf_lit(o, "X-Forwarded-For: ");
  /* Several lines are one list (RFC 9110 5.3), in their order; one the
   * Connection header lists is hop-by-hop and dropped. */
  for (unsigned i = 0; nxff && i < r->hdrs.n; i++) {
    const struct sl_hdr *h = &r->hdrs.h[i];
    if (h->kind != SL_H_X_FORWARDED_FOR) continue;
    nxff--;
    if (!h->val_len || (r->nconn_hdr && sl_req_conn_listed(r, h))) continue;
    sl_buf_append(o, r->buf + h->val_off, h->val_len);
    sl_buf_lit(o, ", ");
  }
  sl_buf_append(o, c->peer, strlen(c->peer));
  sl_buf_lit(o, "\r\nX-Request-Id: ");
  sl_buf_append(o, c->reqid, 36);
  c->up.nbufs = 1;
  if (r->has_body) {
    char num[24];
    sl_buf_lit(o, "\r\nContent-Length: ");
    if (r->chunked_req)
      c->up.bufs[1] = uv_buf_init(r->body.data, (unsigned)r->body.len);
    else
      c->up.bufs[1] = uv_buf_init(r->buf + r->body_off, (unsigned)r->body_len);
    sl_buf_append(o, num, sl_u64toa(c->up.bufs[1].len, num));
    c->up.nbufs = c->up.bufs[1].len ? 2 : 1;
  }
  if (sl_buf_lit(o, "\r\n\r\n") != 0) return -1;
  c->up.bufs[0] = uv_buf_init(o->data, (unsigned)o->len);
  return 0;
}

void sl_conn_forward(struct sl_conn *c) {
  if (fwd_build(c) != 0) {
    sl_conn_error(c, 502, "BadGateway", "The request could not be forwarded.", NULL, 0);
    return;
  }
  c->up.pool = c->pool;
  c->up.head_method = c->req.head_method;
  c->up.cbs = &up_cbs;
  c->up.ctx = c;
  int r = sl_upstream_start(c->w, &c->up);
  if (r == UV_EAGAIN)
    sl_conn_error(c, 503, "ServiceUnavailable", "No moderation backend is available; retry later.",
                  "Retry-After: 1\r\n", 0);
  else if (r != 0)
    sl_conn_error(c, 502, "BadGateway", "The moderation backend failed.", NULL, 0);
}

/* ---- reading ---- */

static void conn_reject(struct sl_conn *c, int status) {
  sl_stat_inc(&c->w->stats.refused_malformed, 1);
  c->call.outcome = SL_OUT_BAD_REQUEST;
  c->call.decided = 1;
  switch (status) {
    case 408: sl_conn_error(c, 408, "RequestTimeout", "The request was not received in time.", NULL, 1); break;
    case 413: sl_conn_error(c, 413, "RequestTooLarge", "The request body is larger than allowed.", NULL, 1); break;
    case 431:
      sl_conn_error(c, 431, "RequestHeaderTooLarge", "The request header is larger than allowed.", NULL, 1);
      break;
    default: sl_conn_error(c, 400, "BadRequest", "The request is not valid HTTP/1.1.", NULL, 1); break;
  }
}

/* More request bodies than the worker's budget allows are being received. */
static void conn_busy(struct sl_conn *c) {
  sl_stat_inc(&c->w->stats.body_budget_full, 1);
  c->call.outcome = SL_OUT_UNAVAILABLE;
  c->call.decided = 1;
  sl_conn_error(c, 503, "ServiceUnavailable", "Too many request bodies are being received; retry later.",
                "Retry-After: 1\r\n", 1);
}

/* The head is complete and valid. Identity and suspension are decided now,
 * before a body is read (admission answers and closes), then the body is
 * counted against the worker's budget. */
static void conn_head(struct sl_conn *c) {
  struct sl_req *r = &c->req;
  if (!r->has_body) return;
  /* A body that is already in (the usual small call, read with its head)
   * costs nothing more to read: the full decision comes at once, without
   * classifying twice on the hot path. */
  int body_here = !r->chunked_req && r->need_cap <= r->len;
  if (c->w->cfg->admission_on && !body_here && sl_admit_head(c)) {
    sl_stat_inc(&c->w->stats.early_answers, 1);
    return;
  }
  if (!r->chunked_req && body_reserve(c, r->body_len) != 0) {
    conn_busy(c);
    return;
  }
  /* An account asked for at the head: the 100 waits for its answer (a
   * refusal goes instead of it; sl_admit_resume). */
  if (!c->call.head_asked) sl_conn_send_continue(c);
}

void sl_conn_send_continue(struct sl_conn *c) {
  struct sl_req *r = &c->req;
  if (r->expect_continue && !(r->need_cap && r->need_cap <= r->len)) {
    static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
    uv_buf_t b = uv_buf_init((char *)cont, sizeof(cont) - 1);
    (void)uv_try_write((uv_stream_t *)&c->tcp, &b, 1); /* best effort: the client sends the body anyway after a while */
  }
}

/* The request loop: parses and answers every whole request the buffer
 * holds. Requests answered at once (rejections) finish inside the loop
 * (conn_finish does not call back in), so a pipelined burst of any length
 * takes constant stack. */
static void conn_parse(struct sl_conn *c) {
  struct sl_req *r = &c->req;
  if (c->in_parse) return;
  c->in_parse = 1;
  while (!c->closing && !c->lingering && (c->phase == SL_C_IDLE || c->phase == SL_C_READING) &&
         sl_req_pending(r)) {
    if (c->phase == SL_C_IDLE) conn_start_request(c);
    switch (sl_req_parse(r)) {
      case SL_REQ_HEAD:
        conn_head(c);
        break;
      case SL_REQ_DONE:
        if (r->chunked_req && body_reserve(c, r->body.len) != 0)
          conn_busy(c);
        else
          conn_dispatch(c);
        break;
      case SL_REQ_ERROR:
        conn_reject(c, r->err_status);
        break;
      case SL_REQ_MORE:
        if (r->chunked_req && r->headers_done && body_reserve(c, r->body.len) != 0)
          conn_busy(c);
        else if (c->eof && c->phase == SL_C_READING)
          sl_conn_close(c); /* the client stopped sending half-way through a request */
        goto out;
    }
  }
out:
  c->in_parse = 0;
}

static void read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *b) {
  (void)b;
  struct sl_conn *c = sl_container_of(s, struct sl_conn, tcp);
  if (c->closing) return;
  if (c->lingering) { /* discarded; the client's close or the deadline ends it */
    if (nread < 0) sl_conn_close(c);
    return;
  }
  if (nread < 0) {
    if (nread == UV_ENOBUFS) { /* buffer full while a response is pending: wait */
      uv_read_stop(s);
      c->read_paused = 1;
      return;
    }
    uv_read_stop(s);
    c->eof = 1;
    /* A half-closed client still gets the answers to what it sent. */
    if (nread != UV_EOF || c->phase == SL_C_IDLE || c->phase == SL_C_READING) sl_conn_close(c);
    return;
  }
  if (nread == 0) return;
  c->req.len += (size_t)nread;
  if (c->phase == SL_C_IDLE || c->phase == SL_C_READING) {
    conn_parse(c);
  } else if (c->req.len == c->req.cap) { /* pipelined bytes fill the buffer: stop reading */
    uv_read_stop(s);
    c->read_paused = 1;
  }
}

void sl_conn_accept(struct sl_worker *w) {
  struct sl_conn *c = sl_calloc(1, sizeof(*c));
  c->w = w;
  uv_tcp_init(&w->loop, &c->tcp);
  if (uv_accept((uv_stream_t *)&w->listener, (uv_stream_t *)&c->tcp) != 0) {
    uv_close((uv_handle_t *)&c->tcp, conn_free);
    return;
  }
  sl_list_init(&c->link);
  sl_list_init(&c->call.park);
  c->out.max = c->inflight.max = c->fwd.max = 1u << 20;
  if (w->nconns >= w->cfg->max_conns || w->draining) {
    /* Refused cleanly: a JSON 503 the client can read, then close. */
    char rid[37];
    sl_http_request_id(rid, w->rid_hi, ++w->rid_seq);
    sl_http_error(&c->out, 503, "ServiceUnavailable.TooManyConnections",
                  "The proxy has reached its connection limit; retry later.", rid, "Retry-After: 1\r\n", 1);
    uv_buf_t b = uv_buf_init(c->out.data, (unsigned)c->out.len);
    (void)uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    sl_stat_inc(&w->stats.conns_refused, 1);
    c->closing = 1;
    uv_close((uv_handle_t *)&c->tcp, conn_free);
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  struct sockaddr_storage ss;
  int sl = sizeof(ss);
  if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &sl) == 0) {
    if (ss.ss_family == AF_INET)
      uv_ip4_name((struct sockaddr_in *)&ss, c->peer, sizeof(c->peer));
    else
      uv_ip6_name((struct sockaddr_in6 *)&ss, c->peer, sizeof(c->peer));
  }
  sl_req_init(&c->req, &w->req_limits, sl_malloc(w->cfg->max_headers * sizeof(struct sl_hdr)), w->cfg->max_headers);
  c->req.cap = SL_CONN_BUF;
  c->req.buf = sl_malloc(c->req.cap);
  sl_list_push(&w->conns, &c->link);
  w->nconns++;
  sl_stat_inc(&w->stats.conns_open, 1);
  sl_stat_inc(&w->stats.conns_accepted, 1);
  c->phase = SL_C_IDLE;
  c->deadline = uv_now(&w->loop) + w->cfg->idle_timeout_ms;
  uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, read_cb);
}

void sl_conn_sweep(struct sl_conn *c, uint64_t now) {
  if (!c->deadline || now < c->deadline) return;
  if (c->lingering) {
    sl_conn_close(c);
  } else if (c->phase == SL_C_SENDING && c->write_pending) {
    sl_stat_inc(&c->w->stats.send_timeouts, 1);
    sl_conn_close(c); /* the client stopped reading for --send-timeout-ms: free it and its backend */
  } else if (c->phase == SL_C_IDLE)
    sl_conn_close(c); /* idle keep-alive: close quietly */
  else if (c->phase == SL_C_READING)
    conn_reject(c, 408);
  else if (c->call.parked) { /* the directory never answered: do not guess */
    sl_admit_unpark(c);
    c->call.outcome = SL_OUT_UNAVAILABLE;
    c->call.decided = 1;
    sl_conn_error(c, 503, "ServiceUnavailable", "The account lookup timed out; retry later.", "Retry-After: 1\r\n", 0);
  }
}

void sl_conn_drain(struct sl_conn *c) {
  if (c->phase == SL_C_IDLE && c->req.parsed == c->req.len) sl_conn_close(c);
}
