/* Header spans of a parsed HTTP head, recorded as offsets from the start of
 * the buffer that holds the head. Shared by the request parser (reqparse.c)
 * and the upstream response parser. */
#ifndef SL_HDRS_H
#define SL_HDRS_H

#include <stdint.h>

#include "http_util.h"

struct sl_hdr {
  uint32_t name_off, name_len, val_off, val_len;
  uint8_t kind; /* enum sl_hdr_kind, classified once when the name is complete */
};

/* llhttp hands a name or value over in pieces when the head spans several
 * reads; the buffer keeps the whole head contiguous, so a piece always
 * extends the span that is open. */
struct sl_hdrs {
  struct sl_hdr *h;
  unsigned n, max;
  unsigned field_open : 1;
  unsigned value_open : 1;
};

static inline void sl_hdrs_reset(struct sl_hdrs *r) {
  r->n = 0;
  r->field_open = r->value_open = 0;
}
/* A piece of a header name; returns -1 when a new header passes the bound. */
static inline int sl_hdrs_field(struct sl_hdrs *r, uint32_t off, uint32_t len) {
  if (!r->field_open) {
    if (r->n >= r->max) return -1;
    struct sl_hdr *h = &r->h[r->n++];
    h->name_off = off;
    h->name_len = h->val_off = h->val_len = 0;
    r->field_open = 1;
  }
  r->h[r->n - 1].name_len += len;
  return 0;
}
/* The name is complete: classify it once, for every later pass. Returns -1
 * for an empty name (llhttp 8.1 takes ": value"), which no side forwards. */
static inline int sl_hdrs_field_done(struct sl_hdrs *r, const char *base) {
  if (!r->field_open) return -1; /* no piece of a name was seen */
  struct sl_hdr *h = &r->h[r->n - 1];
  r->field_open = 0;
  h->kind = (uint8_t)sl_http_hdr_kind(base + h->name_off, h->name_len);
  return h->name_len ? 0 : -1;
}
/* A piece of a value. Returns -1 when it does not continue the open span:
 * llhttp reports an obs-fold continuation line as a second piece after the
 * line's CRLF, and forwarding the span would carry that CRLF along. */
static inline int sl_hdrs_value(struct sl_hdrs *r, uint32_t off, uint32_t len) {
  if (r->n == 0) return -1;
  struct sl_hdr *h = &r->h[r->n - 1];
  if (!r->value_open) {
    h->val_off = off;
    r->value_open = 1;
  } else if (off != h->val_off + h->val_len) {
    return -1;
  }
  h->val_len += len;
  return 0;
}

#endif
