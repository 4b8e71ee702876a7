#include "respparse.h"

#include <string.h>

static inline struct sl_resp *resp_of(llhttp_t *p) { return p->data; }

static int resp_message_begin(llhttp_t *p) {
  struct sl_resp *r = resp_of(p);
  sl_hdrs_reset(&r->hdrs);
  r->reason_off = r->reason_len = 0;
  return 0;
}

static int resp_status(llhttp_t *p, const char *at, size_t n) {
  struct sl_resp *r = resp_of(p);
  if (r->reason_len == 0) r->reason_off = (uint32_t)(at - r->in);
  r->reason_len += (uint32_t)n;
  return 0;
}

static int resp_header_field(llhttp_t *p, const char *at, size_t n) {
  struct sl_resp *r = resp_of(p);
  return sl_hdrs_field(&r->hdrs, (uint32_t)(at - r->in), (uint32_t)n);
}

static int resp_header_field_complete(llhttp_t *p) {
  struct sl_resp *r = resp_of(p);
  return sl_hdrs_field_done(&r->hdrs, r->in); /* an empty name: refused */
}

static int resp_header_value(llhttp_t *p, const char *at, size_t n) {
  struct sl_resp *r = resp_of(p);
  return sl_hdrs_value(&r->hdrs, (uint32_t)(at - r->in), (uint32_t)n); /* obs-fold: refused */
}

static int resp_header_value_complete(llhttp_t *p) {
  resp_of(p)->hdrs.value_open = 0;
  return 0;
}

/* Return 1 tells llhttp the message has no body: 1xx, 204 and 304 have
 * none whatever their headers say (RFC 9110 6.4.1), nor does the answer to
 * HEAD; llhttp 8.1 would otherwise read a Content-Length body for them. */
static int resp_headers_complete(llhttp_t *p) {
  struct sl_resp *r = resp_of(p);
  r->status = llhttp_get_status_code(p);
  if (r->status < 100) return -1; /* llhttp takes "HTTP/1.1 20 OK" */
  if (r->status < 200) return 1;  /* interim (100, 103): dropped, the final answer follows */
  r->headers_done = 1;
  struct sl_resp_head h = {
      .status = r->status,
      .reason = r->in + r->reason_off,
      .reason_len = r->reason_len,
      .base = r->in,
      .h = r->hdrs.h,
      .n = r->hdrs.n,
      .content_length = (p->flags & F_CONTENT_LENGTH) != 0,
  };
  r->cbs->on_head(r->ctx, &h);
  return r->head_method || r->status == 204 || r->status == 304 ? 1 : 0;
}

static int resp_body(llhttp_t *p, const char *at, size_t n) {
  struct sl_resp *r = resp_of(p);
  return r->cbs->on_body(r->ctx, at, n) == 0 ? 0 : -1;
}

static int resp_message_complete(llhttp_t *p) {
  return resp_of(p)->status < 200 ? 0 : HPE_PAUSED; /* one final response per request */
}

/* Read-only from the start: every parser shares them, from any thread. */
static const llhttp_settings_t settings = {
    .on_message_begin = resp_message_begin,
    .on_status = resp_status,
    .on_header_field = resp_header_field,
    .on_header_field_complete = resp_header_field_complete,
    .on_header_value = resp_header_value,
    .on_header_value_complete = resp_header_value_complete,
    .on_headers_complete = resp_headers_complete,
    .on_body = resp_body,
    .on_message_complete = resp_message_complete,
};

void sl_resp_start(struct sl_resp *r, int head_method, const struct sl_resp_cbs *cbs, void *ctx) {
  llhttp_init(&r->parser, HTTP_RESPONSE, &settings);
  r->parser.data = r;
  r->hdrs.h = r->hdr_store;
  r->hdrs.max = SL_RESP_MAX_HEADERS;
  sl_hdrs_reset(&r->hdrs);
  r->in_len = 0;
  r->status = 0;
  r->cbs = cbs;
  r->ctx = ctx;
  r->head_method = head_method != 0;
  r->headers_done = r->keep_alive = 0;
}

enum sl_resp_event sl_resp_feed(struct sl_resp *r, size_t n) {
  size_t from = r->in_len;
  r->in_len += n;
  llhttp_errno_t err = llhttp_execute(&r->parser, r->in + from, r->in_len - from);
  if (err == HPE_PAUSED) {
    /* Reusable only when nothing followed the response in this read. */
    r->keep_alive = llhttp_should_keep_alive(&r->parser) && llhttp_get_error_pos(&r->parser) == r->in + r->in_len;
    return SL_RESP_DONE;
  }
  if (err != HPE_OK) return SL_RESP_ERROR;
  if (r->headers_done)
    r->in_len = 0; /* every body byte was handed over */
  else if (r->in_len == SL_RESP_BUF)
    return SL_RESP_ERROR; /* a head over the bound */
  return SL_RESP_MORE;
}

enum sl_resp_event sl_resp_eof(struct sl_resp *r) {
  if (!r->headers_done || !llhttp_message_needs_eof(&r->parser)) return SL_RESP_ERROR;
  /* HPE_PAUSED is our resp_message_complete's answer: the message did end. */
  llhttp_errno_t e = llhttp_finish(&r->parser);
  r->keep_alive = 0;
  return e == HPE_OK || e == HPE_PAUSED ? SL_RESP_DONE : SL_RESP_ERROR;
}
