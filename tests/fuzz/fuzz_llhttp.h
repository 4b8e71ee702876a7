/* The llhttp driver shared by fuzz_llhttp_request.c and
 * fuzz_llhttp_response.c: strict llhttp (no lenient flag) fed the way sluice
 * feeds it. The input is copied into one buffer, made "readable" in pieces
 * of pseudo-random sizes, and each llhttp_execute starts where the last one
 * stopped, so spans are offsets into a buffer that holds the whole stream
 * (as sluice's connection buffers do). on_message_complete pauses; the
 * driver then checks the message, resumes (or, on the response side,
 * re-initialises the parser, as a connection back in the pool does) and
 * goes on with the pipelined bytes that follow.
 *
 * The checks are what sluice relies on llhttp for: every span lies inside
 * the bytes read, a name or value arrives in pieces that extend one span
 * (a piece that does not is refused, as sluice refuses obs-fold), values
 * hold no CR, LF or NUL, no message has both
 * Content-Length and chunked framing or two Content-Lengths, and a
 * Content-Length body is exactly that long. */
#ifndef SL_FUZZ_LLHTTP_H
#define SL_FUZZ_LLHTTP_H

#include <llhttp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "fuzz.h"
#include "http_util.h"

#define FZ_MAX_HDRS 100        /* sluice's default max-headers */
#define FZ_MAX_BODY (1u << 20) /* refused (413-like) past this */

struct fz_span {
  uint32_t off, len;
};

struct fz_hdr {
  struct fz_span name, value;
  enum sl_hdr_kind kind;
};

struct fz_msg {
  const char *base; /* the stream buffer; [0, len) has been read */
  size_t len;
  struct fz_span url, status;
  unsigned url_open : 1, status_open : 1, field_open : 1, value_open : 1;
  unsigned headers_done : 1, has_cl : 1, head_request : 1;
  struct fz_hdr h[FZ_MAX_HDRS];
  unsigned n;
  uint64_t content_length;
  unsigned ncl;   /* Content-Length headers */
  uint16_t flags; /* llhttp's, at the end of the head */
  struct sl_buf body; /* every body byte, de-chunked */
  unsigned messages;
  int status_code;
};

/* Records a piece of a span; returns -1 when it is not in the bytes read or
 * does not extend the open span. */
static int fz_piece(const struct fz_msg *m, struct fz_span *s, unsigned open, const char *at, size_t n) {
  FZ_CHECK(at >= m->base && n <= m->len && (size_t)(at - m->base) <= m->len - n);
  uint32_t off = (uint32_t)(at - m->base);
  if (!open) {
    s->off = off;
    s->len = (uint32_t)n;
    return 0;
  }
  if (off != s->off + s->len) return -1;
  s->len += (uint32_t)n;
  return 0;
}

static int fz_on_message_begin(llhttp_t *p) {
  struct fz_msg *m = p->data;
  m->url_open = m->status_open = m->field_open = m->value_open = 0;
  m->headers_done = m->has_cl = 0;
  m->url.len = m->status.len = 0;
  m->n = 0;
  m->body.len = 0;
  m->content_length = 0;
  return 0;
}

static int fz_on_url(llhttp_t *p, const char *at, size_t n) {
  struct fz_msg *m = p->data;
  int r = fz_piece(m, &m->url, m->url_open, at, n);
  m->url_open = 1;
  return r;
}

static int fz_on_status(llhttp_t *p, const char *at, size_t n) {
  struct fz_msg *m = p->data;
  int r = fz_piece(m, &m->status, m->status_open, at, n);
  m->status_open = 1;
  return r;
}

static int fz_on_header_field(llhttp_t *p, const char *at, size_t n) {
  struct fz_msg *m = p->data;
  if (m->headers_done) { /* a trailer: checked, never recorded */
    FZ_CHECK(at >= m->base && (size_t)(at - m->base) + n <= m->len);
    return 0;
  }
  if (!m->field_open) {
    if (m->n >= FZ_MAX_HDRS) return -1;
    m->n++;
  }
  int r = fz_piece(m, &m->h[m->n - 1].name, m->field_open, at, n);
  m->field_open = 1;
  return r;
}

/* RFC 9110 5.6.2 tchar. */
static int fz_tchar(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
         (c && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

static int fz_on_header_field_complete(llhttp_t *p) {
  struct fz_msg *m = p->data;
  if (m->headers_done) return 0;
  struct fz_hdr *h = &m->h[m->n - 1];
  /* llhttp 8.1 takes a space inside a name ("Transfer Encoding: chunked")
   * and an empty name (": x"): a name that is not a token is refused here,
   * as sluice must. */
  if (h->name.len == 0) return -1;
  for (uint32_t k = 0; k < h->name.len; k++)
    if (!fz_tchar((unsigned char)m->base[h->name.off + k])) return -1;
  m->field_open = 0;
  m->value_open = 0;
  h->value.off = h->value.len = 0;
  h->kind = sl_http_hdr_kind(m->base + h->name.off, h->name.len);
  return 0;
}

static int fz_on_header_value(llhttp_t *p, const char *at, size_t n) {
  struct fz_msg *m = p->data;
  FZ_CHECK(at >= m->base && (size_t)(at - m->base) + n <= m->len);
  for (size_t i = 0; i < n; i++) FZ_CHECK(at[i] != '\r' && at[i] != '\n' && at[i] != '\0');
  if (m->headers_done) return 0;
  FZ_CHECK(m->n > 0);
  int r = fz_piece(m, &m->h[m->n - 1].value, m->value_open, at, n);
  m->value_open = 1;
  return r;
}

static int fz_on_header_value_complete(llhttp_t *p) {
  ((struct fz_msg *)p->data)->value_open = 0;
  return 0;
}

/* The checks of a complete head; returns what on_headers_complete returns. */
static int fz_check_head(llhttp_t *p, int request) {
  struct fz_msg *m = p->data;
  unsigned ncl = 0;
  FZ_CHECK(!m->field_open);
  for (unsigned i = 0; i < m->n; i++) {
    const struct fz_hdr *h = &m->h[i];
    FZ_CHECK(h->name.len > 0);
    for (uint32_t k = 0; k < h->name.len; k++) FZ_CHECK(fz_tchar((unsigned char)m->base[h->name.off + k]));
    for (uint32_t k = 0; k < h->value.len; k++) {
      char c = m->base[h->value.off + k];
      FZ_CHECK(c != '\r' && c != '\n' && c != '\0');
    }
    if (h->kind == SL_H_CONTENT_LENGTH) ncl++;
  }
  if (p->flags & F_CONTENT_LENGTH) FZ_CHECK(ncl >= 1);
  if (request) FZ_CHECK(m->url.len > 0);
  m->ncl = ncl;
  m->flags = p->flags;
  m->headers_done = 1;
  m->has_cl = (p->flags & F_CONTENT_LENGTH) != 0;
  m->content_length = p->content_length;
  return 0;
}

static int fz_on_body(llhttp_t *p, const char *at, size_t n) {
  struct fz_msg *m = p->data;
  FZ_CHECK(m->headers_done);
  FZ_CHECK(at >= m->base && (size_t)(at - m->base) + n <= m->len);
  return sl_buf_append(&m->body, at, n) == 0 ? 0 : -1;
}

/* The framing checks of a message llhttp accepted (at its completion: some
 * refusals, such as a request's Transfer-Encoding that does not end in
 * chunked, come after on_headers_complete). */
static void fz_check_framing(const struct fz_msg *m, int request) {
  FZ_CHECK(m->headers_done);
  FZ_CHECK(!((m->flags & F_CHUNKED) && (m->flags & F_CONTENT_LENGTH)));
  FZ_CHECK(m->ncl <= 1);
  if (request && (m->flags & F_TRANSFER_ENCODING)) FZ_CHECK(m->flags & F_CHUNKED);
}

/* Settings with the callbacks above; the caller adds on_headers_complete
 * and on_message_complete. */
static void fz_settings(llhttp_settings_t *s) {
  llhttp_settings_init(s);
  s->on_message_begin = fz_on_message_begin;
  s->on_url = fz_on_url;
  s->on_status = fz_on_status;
  s->on_header_field = fz_on_header_field;
  s->on_header_field_complete = fz_on_header_field_complete;
  s->on_header_value = fz_on_header_value;
  s->on_header_value_complete = fz_on_header_value_complete;
  s->on_body = fz_on_body;
}

/* Size of the next piece made readable: all of it when seed is 0, else
 * 1..64 bytes from a xorshift over the seed (deterministic). */
static size_t fz_next_piece(uint32_t *st, size_t left) {
  if (*st == 0) return left;
  *st ^= *st << 13;
  *st ^= *st >> 17;
  *st ^= *st << 5;
  size_t k = 1 + *st % 64;
  return k < left ? k : left;
}

/* Runs the stream through parser p (initialised, p->data = m). done() is
 * called at every pause (a message is complete); it returns 0 to go on.
 * With `eof`, the end of the input is a close: a close-delimited message is
 * finished there (llhttp_finish), as the upstream side does. Returns the
 * last llhttp error. */
static llhttp_errno_t fz_run(llhttp_t *p, struct fz_msg *m, const uint8_t *data, size_t size, uint32_t seed,
                             int eof, int (*done)(llhttp_t *, struct fz_msg *)) {
  char *buf = fz_dup(data, size);
  size_t parsed = 0;
  llhttp_errno_t err = HPE_OK;
  m->base = buf;
  m->len = 0;
  m->body.max = FZ_MAX_BODY;
  uint32_t st = seed;
  for (;;) {
    if (parsed == m->len) {
      if (m->len == size) break;
      m->len += fz_next_piece(&st, size - m->len);
    }
    err = llhttp_execute(p, buf + parsed, m->len - parsed);
    if (err == HPE_OK) {
      parsed = m->len;
      continue;
    }
    if (err != HPE_PAUSED) {
      FZ_CHECK(llhttp_get_error_reason(p) != NULL);
      break;
    }
    const char *pos = llhttp_get_error_pos(p);
    FZ_CHECK(pos >= buf + parsed && pos <= buf + m->len);
    m->messages++;
    if (done(p, m) != 0) break;
    parsed = (size_t)(pos - buf);
    err = HPE_OK;
  }
  if (eof && err == HPE_OK && m->headers_done && llhttp_message_needs_eof(p)) {
    /* HPE_INVALID_EOF_STATE: the close came inside a chunked message whose
     * trailers said Transfer-Encoding again (llhttp then drops F_CHUNKED,
     * so the message "needs EOF"); the message is not complete. */
    err = llhttp_finish(p);
    FZ_CHECK(err == HPE_OK || err == HPE_PAUSED || err == HPE_INVALID_EOF_STATE);
    if (err == HPE_PAUSED) {
      m->messages++;
      (void)done(p, m);
    }
  }
  sl_buf_free(&m->body);
  free(buf);
  return err;
}

#endif
