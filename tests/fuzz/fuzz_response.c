/* Fuzzes sluice's response parser (proxy/http/respparse.c) the way an
 * upstream connection drives it (proxy/upstream.c): bytes arrive in reads
 * of varying sizes into the parser's buffer, sl_resp_feed runs after each,
 * a complete response sends the connection back to the pool only when
 * nothing followed it in the same read (then the next response starts), and
 * the end of the input is a close (sl_resp_eof).
 *
 * Checked: on_head comes once per response, for a final status of three
 * digits, with spans inside the buffer, non-empty names and values free of
 * CR and LF; no body piece before the head, nor for a HEAD request or a 204
 * or 304; a Content-Length body never longer than its length.
 *
 * Input: one byte, whose bit 7 says the request was HEAD and whose low bits
 * seed the read sizes (0: as much as fits), then the stream (the format of
 * fuzz_llhttp_response, so the two share seeds and regress inputs). */
#include "fuzz.h"
#include "respparse.h"

struct state {
  const struct sl_resp *r;
  int heads;
  int no_body;
  int has_cl;
  uint64_t cl, body;
};

static void on_head(void *ctx, const struct sl_resp_head *h) {
  struct state *st = ctx;
  FZ_CHECK(st->heads == 0);
  st->heads++;
  FZ_CHECK(h->status >= 200 && h->status <= 999);
  FZ_CHECK(h->base == st->r->in);
  FZ_CHECK(h->reason >= h->base && h->reason + h->reason_len <= h->base + st->r->in_len);
  for (unsigned i = 0; i < h->n; i++) {
    const struct sl_hdr *x = &h->h[i];
    FZ_CHECK(x->name_len > 0);
    FZ_CHECK((size_t)x->name_off + x->name_len <= st->r->in_len && (size_t)x->val_off + x->val_len <= st->r->in_len);
    FZ_CHECK(memchr(h->base + x->val_off, '\r', x->val_len) == NULL);
    FZ_CHECK(memchr(h->base + x->val_off, '\n', x->val_len) == NULL);
  }
  st->no_body = st->r->head_method || h->status == 204 || h->status == 304;
  st->has_cl = h->content_length;
  st->cl = st->r->parser.content_length;
}

static int on_body(void *ctx, const char *p, size_t n) {
  struct state *st = ctx;
  (void)p;
  FZ_CHECK(st->heads == 1 && !st->no_body);
  st->body += n;
  if (st->has_cl) FZ_CHECK(st->body <= st->cl);
  return 0;
}

static const struct sl_resp_cbs cbs = {.on_head = on_head, .on_body = on_body};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  int head = data[0] >> 7;
  unsigned seed = data[0] & 0x7f;
  data++;
  size--;
  static struct sl_resp r;
  struct state st = {.r = &r};
  sl_resp_start(&r, head, &cbs, &st);
  size_t off = 0;
  while (off < size) {
    size_t n = sl_resp_room(&r);
    FZ_CHECK(n > 0);
    if (n > size - off) n = size - off;
    if (seed && n > seed % 53 + 1) n = seed % 53 + 1;
    seed = (seed * 1103515245u + 12345u) >> 16 & 0x7f;
    memcpy(r.in + r.in_len, data + off, n);
    off += n;
    enum sl_resp_event ev = sl_resp_feed(&r, n);
    if (ev == SL_RESP_ERROR) return 0; /* the connection fails */
    if (ev == SL_RESP_DONE) {
      FZ_CHECK(st.heads == 1);
      if (st.has_cl && !st.no_body) FZ_CHECK(st.body == st.cl);
      if (!r.keep_alive) return 0; /* closed */
      memset(&st, 0, sizeof(st));
      st.r = &r;
      sl_resp_start(&r, head, &cbs, &st); /* back to the pool: the next response */
    }
  }
  if (sl_resp_eof(&r) == SL_RESP_DONE) FZ_CHECK(st.heads == 1);
  return 0;
}
