/* The request side of HTTP/1.1: strict llhttp plus the checks llhttp 8.1
 * leaves out, over a buffer the connection owns. One request at a time; the
 * caller reads into buf[len..cap) and calls sl_req_parse, which reports the
 * head, the whole request, more needed, or an error with its status.
 *
 * Offsets into buf stay valid from the head event to the done event and
 * until sl_req_consume: a chunked body is decoded into `body` and its raw
 * framing dropped as it is parsed, so buf keeps only the head (and two
 * bytes of the framing just parsed, to check CRLFs across reads).
 *
 * Refused (err_status 400 unless said): a line ending in a bare LF, obs-fold,
 * a protocol other than HTTP/1.0 or HTTP/1.1, a request target with a
 * control byte, space, DEL or '#', CONNECT, a Transfer-Encoding other than
 * "chunked" alone, a header name that is empty or not a token, a name
 * that is one of the headers sluice reads with '_' for '-' (x_acs_action),
 * chunk data not followed by CRLF, a chunked message not ended by
 * CRLF; a head over max_header_bytes or max_headers (431), trailers over
 * max_header_bytes (431), a body over max_body_bytes (413). Trailer fields
 * are parsed and dropped: never recorded, so never forwarded or used.
 * No allocation but the chunked body's buffer; no I/O; any thread. */
#ifndef SL_REQPARSE_H
#define SL_REQPARSE_H

#include <llhttp.h>
#include <stddef.h>
#include <stdint.h>

#include "common.h"
#include "hdrs.h"

struct sl_req_limits {
  uint32_t max_header_bytes;
  uint64_t max_body_bytes;
};

enum sl_req_event {
  SL_REQ_MORE,  /* every byte parsed; read more */
  SL_REQ_HEAD,  /* the head is complete and valid; parsing may go on */
  SL_REQ_DONE,  /* the request is complete; buf[parsed..len) is the next one */
  SL_REQ_ERROR, /* refused: err_status is 400, 413 or 431 */
};

struct sl_req {
  llhttp_t parser;
  const struct sl_req_limits *lim;
  char *buf; /* raw bytes: [0, len) read, [parsed, len) unparsed; owned by the caller */
  size_t cap, len, parsed;
  struct sl_hdrs hdrs;
  struct sl_buf body;   /* decoded body of a chunked request */
  uint64_t need_cap;    /* buffer size a Content-Length request needs */
  uint64_t body_off, body_len; /* Content-Length body: offsets into buf */
  uint32_t url_off, url_len;
  uint32_t head_len;    /* request line + headers + the blank line */
  uint32_t trailer_bytes;
  unsigned conn_hdr[4]; /* indices of Connection headers, whose tokens are hop-by-hop too (more: refused) */
  unsigned nconn_hdr;
  int16_t h_host, h_auth, h_action, h_ctype; /* header indices, -1 when absent or Connection-listed */
  int err_status;
  uint8_t pause; /* why llhttp paused (reqparse.c) */
  unsigned headers_done : 1;
  unsigned chunked_req : 1;
  unsigned has_body : 1;
  unsigned keep_alive : 1;
  unsigned head_method : 1;
  unsigned expect_continue : 1;
  unsigned dup_ident : 1; /* Host, Authorization, x-acs-action or Content-Type given twice */
  unsigned resumed : 1;   /* llhttp was resumed and may have work without new bytes */
  unsigned last_chunk : 1;
  unsigned body_coded : 1; /* a Content-Encoding other than identity: the body's bytes are not its text */
};

/* store: room for max_headers header spans. buf/cap are set by the caller. */
void sl_req_init(struct sl_req *r, const struct sl_req_limits *lim, struct sl_hdr *store, unsigned max_headers);
/* Parses what buf holds past `parsed`. See enum sl_req_event. */
enum sl_req_event sl_req_parse(struct sl_req *r);
/* Whether sl_req_parse has anything to do without new bytes. */
static inline int sl_req_pending(const struct sl_req *r) { return r->parsed < r->len || r->resumed; }
/* After SL_REQ_DONE: drops the request, the next one starts at offset 0. */
void sl_req_consume(struct sl_req *r);
/* Whether header i is listed in a Connection header (so not forwarded). */
int sl_req_conn_listed(const struct sl_req *r, const struct sl_hdr *h);

#endif
