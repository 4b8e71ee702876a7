/* Fuzzes sluice's request parser (proxy/reqparse.c) the way a connection
 * drives it (proxy/conn.c): bytes arrive in reads of varying sizes into a
 * buffer that grows as alloc_cb grows it, sl_req_parse runs after each read,
 * every complete request is classified from exactly what would be forwarded
 * (sl_classify, as admit.c builds its input) and consumed, and the next
 * pipelined request starts at offset 0.
 *
 * Checked at each event: every offset lies inside the buffer; a head ends in
 * CRLF CRLF and every header line in CRLF; header names are tokens and no
 * recorded value holds CR or LF (so nothing the proxy forwards can start a
 * second request); a Content-Length body has its length; a chunked body is
 * within max_body_bytes; no trailer is recorded as a header.
 *
 * Input: one byte that seeds the read sizes (0: everything in one read),
 * then the stream. */
#include "classify.h"
#include "fuzz.h"
#include "reqparse.h"

#define CONN_BUF 16384

static const struct sl_req_limits limits = {.max_header_bytes = 4096, .max_body_bytes = 65536};

static int is_tchar(unsigned char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
         (c && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

static void value_of(const struct sl_req *r, int idx, const char **p, size_t *n) {
  *p = NULL;
  *n = 0;
  if (idx < 0) return;
  FZ_CHECK((unsigned)idx < r->hdrs.n);
  *p = r->buf + r->hdrs.h[idx].val_off;
  *n = r->hdrs.h[idx].val_len;
}

static void check_head(const struct sl_req *r) {
  FZ_CHECK(r->headers_done);
  FZ_CHECK(r->head_len >= 4 && r->head_len <= r->len && r->head_len <= limits.max_header_bytes);
  FZ_CHECK(memcmp(r->buf + r->head_len - 4, "\r\n\r\n", 4) == 0);
  for (uint32_t i = 0; i < r->head_len; i++)
    if (r->buf[i] == '\n') FZ_CHECK(i > 0 && r->buf[i - 1] == '\r');
  FZ_CHECK((size_t)r->url_off + r->url_len <= r->head_len && r->url_len > 0);
  FZ_CHECK(memchr(r->buf + r->url_off, '\r', r->url_len) == NULL);
  for (uint32_t i = 0; i < r->url_len; i++) { /* no control byte, space, DEL or fragment */
    unsigned char u = (unsigned char)r->buf[r->url_off + i];
    FZ_CHECK(u > 0x20 && u != 0x7f && u != '#');
  }
  for (unsigned i = 0; i < r->hdrs.n; i++) {
    const struct sl_hdr *h = &r->hdrs.h[i];
    FZ_CHECK((size_t)h->name_off + h->name_len <= r->head_len);
    FZ_CHECK((size_t)h->val_off + h->val_len <= r->head_len);
    FZ_CHECK(h->name_len > 0);
    for (uint32_t k = 0; k < h->name_len; k++) FZ_CHECK(is_tchar((unsigned char)r->buf[h->name_off + k]));
    FZ_CHECK(memchr(r->buf + h->val_off, '\r', h->val_len) == NULL);
    FZ_CHECK(memchr(r->buf + h->val_off, '\n', h->val_len) == NULL);
  }
  if (r->has_body && !r->chunked_req) {
    FZ_CHECK(r->body_off == r->head_len && r->body_len <= limits.max_body_bytes);
    FZ_CHECK(r->need_cap == r->head_len + r->body_len);
  }
}

static void check_done(const struct sl_req *r) {
  check_head(r);
  FZ_CHECK(r->parsed <= r->len);
  if (r->chunked_req) {
    FZ_CHECK(r->body.len <= limits.max_body_bytes);
    FZ_CHECK(r->parsed == r->head_len); /* the framing is gone, the next request follows the head */
  } else if (r->has_body) {
    FZ_CHECK(r->body_off + r->body_len == r->parsed);
  } else {
    FZ_CHECK(r->parsed == r->head_len);
  }
  /* Classify what would be forwarded, as admit.c does. */
  struct sl_class_input in = {.url = r->buf + r->url_off, .url_len = r->url_len, .default_region = "cn-shanghai",
                              .regions = "cn-shanghai,cn-beijing"};
  value_of(r, r->h_host, &in.host, &in.host_len);
  value_of(r, r->h_auth, &in.authorization, &in.auth_len);
  value_of(r, r->h_action, &in.acs_action, &in.acs_action_len);
  value_of(r, r->h_ctype, &in.content_type, &in.ct_len);
  if (r->chunked_req) {
    in.body = r->body.data;
    in.body_len = r->body.len;
  } else if (r->has_body) {
    in.body = r->buf + r->body_off;
    in.body_len = r->body_len;
  }
  struct sl_class c;
  (void)sl_classify(&in, &c);
  FZ_CHECK(c.action_len < sizeof(c.action) && c.ak_len < sizeof(c.ak) && c.service_len < sizeof(c.service) &&
           c.region_len < sizeof(c.region));
  FZ_CHECK(c.feature >= -1 && c.feature < (int)sl_nfeatures);
  FZ_CHECK(!fz_has_ctl(c.ak, c.ak_len) && !fz_has_ctl(c.region, c.region_len));
}

/* alloc_cb's growth rule (conn.c): room for a Content-Length request, one
 * byte past the head bound, or one more read of chunked framing. */
static void grow(struct sl_req *r) {
  size_t want = 0;
  if (r->need_cap > r->cap)
    want = r->need_cap;
  else if (!r->headers_done && r->cap <= limits.max_header_bytes)
    want = (size_t)limits.max_header_bytes + 1;
  else if (r->headers_done && r->chunked_req)
    want = r->cap + CONN_BUF;
  if (want > r->cap) {
    r->buf = realloc(r->buf, want);
    if (!r->buf) abort();
    r->cap = want;
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  unsigned seed = data[0];
  data++;
  size--;
  static struct sl_hdr store[32];
  struct sl_req r;
  memset(&r, 0, sizeof(r));
  sl_req_init(&r, &limits, store, 32);
  r.cap = CONN_BUF;
  r.buf = malloc(r.cap);
  if (!r.buf) abort();
  size_t off = 0;
  int dead = 0;
  while (!dead && (off < size || sl_req_pending(&r))) {
    if (r.len == r.cap) grow(&r);
    if (off < size && r.len < r.cap) {
      size_t n = size - off;
      if (seed) n = n < (seed % 61) + 1u ? n : (seed % 61) + 1u;
      if (n > r.cap - r.len) n = r.cap - r.len;
      memcpy(r.buf + r.len, data + off, n);
      r.len += n;
      off += n;
      seed = seed * 1103515245u + 12345u;
      seed = (seed >> 16) & 0xff;
    } else if (!sl_req_pending(&r)) {
      break; /* no room and nothing to parse: the connection would wait */
    }
    for (;;) {
      enum sl_req_event ev = sl_req_parse(&r);
      if (ev == SL_REQ_HEAD) {
        check_head(&r);
        continue;
      }
      if (ev == SL_REQ_DONE) {
        check_done(&r);
        sl_req_consume(&r);
        FZ_CHECK(r.parsed == 0);
        continue;
      }
      if (ev == SL_REQ_ERROR) {
        FZ_CHECK(r.err_status == 400 || r.err_status == 413 || r.err_status == 431);
        dead = 1; /* the connection is closed after the answer */
      } else {
        FZ_CHECK(r.parsed <= r.len);
        if (!r.headers_done) FZ_CHECK(r.len <= limits.max_header_bytes);
      }
      break;
    }
  }
  free(r.buf);
  sl_buf_free(&r.body);
  return 0;
}
