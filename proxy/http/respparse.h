/* The response side of HTTP/1.1 as an upstream speaks it: strict llhttp
 * plus what llhttp 8.1 leaves out (no body for 1xx, 204, 304 or the answer
 * to HEAD; a status under 100, an empty header name or obs-fold refused).
 * Interim responses are dropped; the final head goes to on_head as spans,
 * the body to on_body in pieces. The caller reads into in[in_len..SL_RESP_BUF)
 * and calls sl_resp_feed; body bytes are handed over as parsed, so only a
 * head needs the whole buffer. No allocation, no I/O; any thread. */
#ifndef SL_RESPPARSE_H
#define SL_RESPPARSE_H

#include <llhttp.h>
#include <stddef.h>
#include <stdint.h>

#include "hdrs.h"

#define SL_RESP_BUF 16384        /* a response head must fit */
#define SL_RESP_MAX_HEADERS 100 /* else the response is refused */

/* A final response head, valid during on_head only. */
struct sl_resp_head {
  int status;
  const char *reason;
  size_t reason_len;
  const char *base; /* header spans are offsets into base */
  const struct sl_hdr *h;
  unsigned n;
  unsigned content_length : 1; /* framed by Content-Length */
};

struct sl_resp_cbs {
  void (*on_head)(void *ctx, const struct sl_resp_head *head);
  /* A piece of the body; -1 stops the parse (SL_RESP_ERROR). */
  int (*on_body)(void *ctx, const char *p, size_t n);
};

enum sl_resp_event {
  SL_RESP_MORE,  /* every byte taken; read more */
  SL_RESP_DONE,  /* the response is complete (keep_alive says if the connection can serve another) */
  SL_RESP_ERROR, /* malformed, a head over SL_RESP_BUF, or on_body said stop */
};

struct sl_resp {
  llhttp_t parser;
  char in[SL_RESP_BUF];
  size_t in_len;
  struct sl_hdr hdr_store[SL_RESP_MAX_HEADERS];
  struct sl_hdrs hdrs;
  uint32_t reason_off, reason_len;
  int status;
  const struct sl_resp_cbs *cbs;
  void *ctx;
  unsigned head_method : 1;  /* the request was HEAD: no body whatever the head says */
  unsigned headers_done : 1; /* the final head was handed over */
  unsigned keep_alive : 1;   /* after SL_RESP_DONE */
};

/* Makes r ready for the response to one request. */
void sl_resp_start(struct sl_resp *r, int head_method, const struct sl_resp_cbs *cbs, void *ctx);
/* n more bytes were read into in[in_len..). */
enum sl_resp_event sl_resp_feed(struct sl_resp *r, size_t n);
/* The connection closed: SL_RESP_DONE when that ends a close-delimited
 * body, else SL_RESP_ERROR (a response cut short). */
enum sl_resp_event sl_resp_eof(struct sl_resp *r);
/* Whether the next read must wait (no room: only before the head's end). */
static inline size_t sl_resp_room(const struct sl_resp *r) { return SL_RESP_BUF - r->in_len; }

#endif
