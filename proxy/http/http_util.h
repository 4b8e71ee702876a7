/* HTTP helpers shared by the client and upstream sides: header
 * classification, token lists, query strings, error responses. All are pure
 * functions over byte ranges (no NUL terminators needed), unit-tested alone. */
#ifndef SL_HTTP_UTIL_H
#define SL_HTTP_UTIL_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"

/* Case-insensitive compare of a byte range with a lowercase literal. */
int sl_http_ieq(const char *p, size_t n, const char *lower, size_t lower_len);
#define SL_IEQ(p, n, lit) sl_http_ieq((p), (n), (lit), sizeof(lit) - 1)

/* Header kinds the proxy treats specially; everything else is SL_H_OTHER. */
enum sl_hdr_kind {
  SL_H_OTHER = 0,
  SL_H_HOP, /* hop-by-hop (RFC 9110 7.6.1): not forwarded */
  SL_H_CONNECTION,
  SL_H_CONTENT_LENGTH,
  SL_H_TRANSFER_ENCODING,
  SL_H_X_FORWARDED_FOR,
  SL_H_X_REQUEST_ID,
  SL_H_EXPECT,
  SL_H_HOST,
  SL_H_CONTENT_TYPE,
  SL_H_CONTENT_ENCODING,
  SL_H_AUTHORIZATION,
  SL_H_X_ACS_ACTION,
};
enum sl_hdr_kind sl_http_hdr_kind(const char *name, size_t len);

/* Whether the comma-separated token list `v` holds `token` (lowercase),
 * ignoring case and optional whitespace. */
int sl_http_has_token(const char *v, size_t n, const char *token, size_t token_len);

/* Finds query parameter `name` in `q` (the part after '?', without it) and
 * percent-decodes its value ('+' as space) into out. Returns the decoded
 * length, -1 when absent, -2 when malformed or longer than outcap. */
int sl_http_query_get(const char *q, size_t qn, const char *name, size_t name_len, char *out, size_t outcap);

/* Lowercases p[0..n) into out; returns n, or 0 when it does not fit in cap
 * (a header name that long is named by no Connection token we keep). */
size_t sl_http_lower(const char *p, size_t n, char *out, size_t cap);

/* Percent-decodes in[0..n) into out; returns the length, or -1 on a bad
 * escape or when it does not fit. */
int sl_http_urldecode(const char *in, size_t n, char *out, size_t outcap);

const char *sl_http_reason(int status);

/* Appends a complete JSON error response (status line, headers, body with
 * RequestId, Code, Message) to out. `extra_headers` (CRLF-terminated lines,
 * may be NULL) go before the body. Returns 0 or -ENOBUFS. */
int sl_http_error(struct sl_buf *out, int status, const char *code, const char *message, const char *request_id,
                  const char *extra_headers, int close);

/* Formats a UUID-shaped request id from two 64-bit values into out (37 bytes). */
void sl_http_request_id(char out[37], uint64_t hi, uint64_t lo);

#endif
