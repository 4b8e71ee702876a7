#include "http_util.h"

#include <stdio.h>
#include <string.h>

static inline char lower(char c) { return (c >= 'A' && c <= 'Z') ? (char)(c | 0x20) : c; }

int sl_http_ieq(const char *p, size_t n, const char *lc, size_t ln) {
  if (n != ln) return 0;
  for (size_t i = 0; i < n; i++)
    if (lower(p[i]) != lc[i]) return 0;
  return 1;
}

enum sl_hdr_kind sl_http_hdr_kind(const char *p, size_t n) {
  /* Dispatch on length first so most headers cost one or two compares. */
  switch (n) {
    case 2:
      if (SL_IEQ(p, n, "te")) return SL_H_HOP;
      break;
    case 4:
      if (SL_IEQ(p, n, "host")) return SL_H_HOST;
      break;
    case 6:
      if (SL_IEQ(p, n, "expect")) return SL_H_EXPECT;
      break;
    case 7:
      if (SL_IEQ(p, n, "upgrade")) return SL_H_HOP;
      if (SL_IEQ(p, n, "trailer")) return SL_H_HOP;
      break;
    case 10:
      if (SL_IEQ(p, n, "connection")) return SL_H_CONNECTION;
      if (SL_IEQ(p, n, "keep-alive")) return SL_H_HOP;
      break;
    case 12:
      if (SL_IEQ(p, n, "content-type")) return SL_H_CONTENT_TYPE;
      if (SL_IEQ(p, n, "x-request-id")) return SL_H_X_REQUEST_ID;
      if (SL_IEQ(p, n, "x-acs-action")) return SL_H_X_ACS_ACTION;
      break;
    case 13:
      if (SL_IEQ(p, n, "authorization")) return SL_H_AUTHORIZATION;
      break;
    case 14:
      if (SL_IEQ(p, n, "content-length")) return SL_H_CONTENT_LENGTH;
      break;
    case 15:
      if (SL_IEQ(p, n, "x-forwarded-for")) return SL_H_X_FORWARDED_FOR;
      break;
    case 16:
      if (SL_IEQ(p, n, "proxy-connection")) return SL_H_HOP;
      if (SL_IEQ(p, n, "content-encoding")) return SL_H_CONTENT_ENCODING;
      break;
    case 17:
      if (SL_IEQ(p, n, "transfer-encoding")) return SL_H_TRANSFER_ENCODING;
      break;
  }
  return SL_H_OTHER;
}

int sl_http_has_token(const char *v, size_t n, const char *tok, size_t tl) {
  size_t i = 0;
  while (i < n) {
    while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ',')) i++;
    size_t s = i;
    while (i < n && v[i] != ',') i++;
    size_t e = i;
    while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t')) e--;
    if (sl_http_ieq(v + s, e - s, tok, tl)) return 1;
  }
  return 0;
}

size_t sl_http_lower(const char *p, size_t n, char *out, size_t cap) {
  if (n > cap) return 0;
  for (size_t i = 0; i < n; i++) out[i] = lower(p[i]);
  return n;
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  c = lower(c);
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

int sl_http_urldecode(const char *in, size_t n, char *out, size_t cap) {
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    char c = in[i];
    if (c == '%') {
      int h, l;
      if (i + 2 >= n || (h = hexval(in[i + 1])) < 0 || (l = hexval(in[i + 2])) < 0) return -1;
      c = (char)(h << 4 | l);
      i += 2;
    } else if (c == '+') {
      c = ' ';
    }
    if (o >= cap) return -1;
    out[o++] = c;
  }
  return (int)o;
}

int sl_http_query_get(const char *q, size_t qn, const char *name, size_t nl, char *out, size_t cap) {
  size_t i = 0;
  while (i < qn) {
    size_t s = i;
    while (i < qn && q[i] != '&') i++;
    /* [s, i) is one key=value pair; names are matched before decoding, as
     * the API's parameter names are plain ASCII. */
    const char *eq = memchr(q + s, '=', i - s);
    size_t kl = eq ? (size_t)(eq - (q + s)) : i - s;
    if (kl == nl && memcmp(q + s, name, nl) == 0) {
      if (!eq) return 0;
      int r = sl_http_urldecode(eq + 1, (size_t)(q + i - eq - 1), out, cap);
      return r < 0 ? -2 : r;
    }
    i++;
  }
  return -1;
}

const char *sl_http_reason(int status) {
  switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 400: return "Bad Request";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 413: return "Content Too Large";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
  }
  return "Unknown";
}

int sl_http_error(struct sl_buf *out, int status, const char *code, const char *message, const char *rid,
                  const char *extra, int close) {
  /* Built with appends, not printf: the reject path (429s under overload)
   * is a hot path too. code and message are the proxy's own constants, so
   * they need no JSON escaping. */
  const char *reason = sl_http_reason(status);
  size_t cl = strlen(code), ml = strlen(message), rl = strlen(rid), el = extra ? strlen(extra) : 0;
  size_t body = sizeof("{\"RequestId\":\"\",\"Code\":\"\",\"Message\":\"\"}") - 1 + rl + cl + ml;
  size_t need = 160 + strlen(reason) + el + body;
  if (sl_buf_reserve(out, need) != 0) return -ENOBUFS;
  char num[24];
  num[0] = (char)('0' + status / 100 % 10);
  num[1] = (char)('0' + status / 10 % 10);
  num[2] = (char)('0' + status % 10);
  sl_buf_lit(out, "HTTP/1.1 ");
  sl_buf_append(out, num, 3);
  sl_buf_lit(out, " ");
  sl_buf_append(out, reason, strlen(reason));
  sl_buf_lit(out, "\r\nContent-Type: application/json;charset=utf-8\r\nContent-Length: ");
  sl_buf_append(out, num, sl_u64toa(body, num));
  sl_buf_lit(out, "\r\n");
  if (close) sl_buf_lit(out, "Connection: close\r\n");
  if (el) sl_buf_append(out, extra, el);
  sl_buf_lit(out, "\r\n{\"RequestId\":\"");
  sl_buf_append(out, rid, rl);
  sl_buf_lit(out, "\",\"Code\":\"");
  sl_buf_append(out, code, cl);
  sl_buf_lit(out, "\",\"Message\":\"");
  sl_buf_append(out, message, ml);
  sl_buf_lit(out, "\"}");
  return 0;
}

void sl_http_request_id(char out[37], uint64_t hi, uint64_t lo) {
  static const char hex[] = "0123456789ABCDEF";
  char raw[32];
  for (int i = 0; i < 16; i++) raw[i] = hex[(hi >> (60 - 4 * i)) & 15];
  for (int i = 0; i < 16; i++) raw[16 + i] = hex[(lo >> (60 - 4 * i)) & 15];
  /* 8-4-4-4-12, as Alibaba Cloud's RequestIds look. */
  size_t o = 0;
  for (int i = 0; i < 32; i++) {
    if (i == 8 || i == 12 || i == 16 || i == 20) out[o++] = '-';
    out[o++] = raw[i];
  }
  out[o] = '\0';
}
