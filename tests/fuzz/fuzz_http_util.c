/* Fuzzes the helpers of proxy/http_util.h that read untrusted bytes, each
 * against a plain reference written here (differential checks).
 *
 * Input: two parameter bytes, then A (up to the first '\n') and B (the
 * rest). A serves as a header name, a token and a query parameter name; B
 * as a header value, a query string and an escaped value. The first byte
 * gives the output capacity (0..255), the second a split point for
 * sl_http_error's strings. */
#include <stdint.h>
#include <string.h>

#include "common.h"
#include "fuzz.h"
#include "http_util.h"

static char lc(char c) { return (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c; }

static int ref_ieq(const char *p, size_t n, const char *lower, size_t ln) {
  if (n != ln) return 0;
  for (size_t i = 0; i < n; i++)
    if (lc(p[i]) != lower[i]) return 0;
  return 1;
}

static const struct {
  const char *name;
  enum sl_hdr_kind kind;
} kinds[] = {
    {"te", SL_H_HOP},
    {"upgrade", SL_H_HOP},
    {"trailer", SL_H_HOP},
    {"keep-alive", SL_H_HOP},
    {"proxy-connection", SL_H_HOP},
    {"connection", SL_H_CONNECTION},
    {"content-length", SL_H_CONTENT_LENGTH},
    {"transfer-encoding", SL_H_TRANSFER_ENCODING},
    {"x-forwarded-for", SL_H_X_FORWARDED_FOR},
    {"x-request-id", SL_H_X_REQUEST_ID},
    {"expect", SL_H_EXPECT},
    {"host", SL_H_HOST},
    {"content-type", SL_H_CONTENT_TYPE},
    {"authorization", SL_H_AUTHORIZATION},
    {"x-acs-action", SL_H_X_ACS_ACTION},
};

static enum sl_hdr_kind ref_kind(const char *p, size_t n) {
  for (size_t i = 0; i < SL_ARRAY_SIZE(kinds); i++)
    if (ref_ieq(p, n, kinds[i].name, strlen(kinds[i].name))) return kinds[i].kind;
  return SL_H_OTHER;
}

/* A comma-separated list, each element trimmed of spaces and tabs. */
static int ref_has_token(const char *v, size_t n, const char *tok, size_t tl) {
  size_t s = 0;
  while (s <= n) {
    size_t e = s;
    while (e < n && v[e] != ',') e++;
    size_t a = s, b = e;
    while (a < b && (v[a] == ' ' || v[a] == '\t')) a++;
    while (b > a && (v[b - 1] == ' ' || v[b - 1] == '\t')) b--;
    if (b > a && ref_ieq(v + a, b - a, tok, tl)) return 1;
    s = e + 1;
  }
  return 0;
}

static int hexv(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* Decodes into a buffer of n bytes (always enough); -1 on a bad escape. */
static int ref_decode(const char *in, size_t n, char *out) {
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    if (in[i] == '%') {
      if (n - i < 3 || hexv(in[i + 1]) < 0 || hexv(in[i + 2]) < 0) return -1;
      out[o++] = (char)(hexv(in[i + 1]) << 4 | hexv(in[i + 2]));
      i += 2;
    } else {
      out[o++] = in[i] == '+' ? ' ' : in[i];
    }
  }
  return (int)o;
}

static void check_decode(const char *in, size_t n, size_t cap) {
  char *out = malloc(cap ? cap : 1); /* exactly cap bytes: ASan sees a write past it */
  char *ref = malloc(n ? n : 1);
  if (out == NULL || ref == NULL) abort();
  int r = sl_http_urldecode(in, n, out, cap);
  int rr = ref_decode(in, n, ref);
  if (rr < 0 || (size_t)rr > cap) {
    FZ_CHECK(r == -1);
  } else {
    FZ_CHECK(r == rr && memcmp(out, ref, (size_t)r) == 0);
  }
  free(ref);
  free(out);
}

/* The first value of parameter `name` in query q, by splitting on '&'. */
static int ref_query_get(const char *q, size_t qn, const char *name, size_t nl, const char **v, size_t *vn) {
  size_t s = 0;
  while (s < qn) {
    size_t e = s;
    while (e < qn && q[e] != '&') e++;
    const char *eq = memchr(q + s, '=', e - s);
    size_t kl = eq ? (size_t)(eq - (q + s)) : e - s;
    if (kl == nl && memcmp(q + s, name, nl) == 0) {
      *v = eq ? eq + 1 : q + e;
      *vn = eq ? (size_t)(q + e - eq - 1) : 0;
      return 1;
    }
    s = e + 1;
  }
  return 0;
}

static void check_query(const char *q, size_t qn, const char *name, size_t nl, size_t cap) {
  char *out = malloc(cap ? cap : 1);
  if (out == NULL) abort();
  int r = sl_http_query_get(q, qn, name, nl, out, cap);
  const char *v;
  size_t vn;
  if (!ref_query_get(q, qn, name, nl, &v, &vn)) {
    FZ_CHECK(r == -1);
  } else {
    char *ref = malloc(vn ? vn : 1);
    if (ref == NULL) abort();
    int rr = ref_decode(v, vn, ref);
    if (rr < 0 || (size_t)rr > cap)
      FZ_CHECK(r == -2);
    else
      FZ_CHECK(r == rr && memcmp(out, ref, (size_t)r) == 0);
    free(ref);
  }
  free(out);
}

static void check_error(const char *a, size_t an, const char *b, size_t bn, uint8_t split, size_t cap) {
  size_t k = bn ? split % (bn + 1) : 0;
  char *code = fz_cstr(a, an), *msg = fz_cstr(b, k), *rid = fz_cstr(b + k, bn - k);
  static const int statuses[] = {400, 403, 408, 413, 429, 431, 500, 502, 503, 504, 999};
  int status = statuses[split % SL_ARRAY_SIZE(statuses)];
  struct sl_buf out = {.max = 64 + cap * 8};
  int rc = sl_http_error(&out, status, code, msg, rid, (split & 1) ? "Retry-After: 1\r\n" : NULL, split & 2);
  if (rc == 0) {
    FZ_CHECK(out.len <= out.max && out.len >= 9 && memcmp(out.data, "HTTP/1.1 ", 9) == 0);
    const char *body = memmem(out.data, out.len, "\r\n\r\n", 4);
    FZ_CHECK(body != NULL);
    body += 4;
    size_t bl = (size_t)(out.data + out.len - body);
    const char *cl = memmem(out.data, (size_t)(body - out.data), "Content-Length: ", 16);
    FZ_CHECK(cl != NULL);
    FZ_CHECK(strtoull(cl + 16, NULL, 10) == bl);
  } else {
    FZ_CHECK(rc == -ENOBUFS && out.len == 0);
  }
  sl_buf_free(&out);
  free(rid);
  free(msg);
  free(code);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 2) return 0;
  size_t cap = data[0];
  uint8_t split = data[1];
  const uint8_t *p = data + 2, *fa;
  size_t n = size - 2, an;
  fz_field(&p, &n, '\n', &fa, &an);
  char *a = fz_dup(fa, an), *b = fz_dup(p, n);

  FZ_CHECK(sl_http_hdr_kind(a, an) == ref_kind(a, an));
  FZ_CHECK(sl_http_hdr_kind(b, n) == ref_kind(b, n));

  char *low = malloc(cap ? cap : 1);
  if (low == NULL) abort();
  size_t ln = sl_http_lower(b, n, low, cap);
  FZ_CHECK(ln == (n <= cap ? n : 0));
  for (size_t i = 0; i < ln; i++) FZ_CHECK(low[i] == lc(b[i]));
  FZ_CHECK(sl_http_ieq(b, n, low, ln) == (ln == n && ref_ieq(b, n, low, ln)));

  /* A as a token: lowercase it, as callers pass lowercase literals (never an
   * empty one, which sl_http_has_token finds in any non-empty list). */
  char *tok = fz_dup(a, an);
  for (size_t i = 0; i < an; i++) tok[i] = lc(a[i]);
  if (an > 0) FZ_CHECK(sl_http_has_token(b, n, tok, an) == ref_has_token(b, n, tok, an));
  static const char *const toks[] = {"close", "keep-alive", "chunked", "100-continue", "upgrade"};
  for (size_t i = 0; i < SL_ARRAY_SIZE(toks); i++)
    FZ_CHECK(sl_http_has_token(b, n, toks[i], strlen(toks[i])) == ref_has_token(b, n, toks[i], strlen(toks[i])));

  check_decode(b, n, cap);
  check_decode(b, n, n); /* always enough room */
  check_query(b, n, a, an, cap);
  static const char *const names[] = {"Action", "AccessKeyId", "Service"};
  for (size_t i = 0; i < SL_ARRAY_SIZE(names); i++) check_query(b, n, names[i], strlen(names[i]), cap);

  check_error(a, an, b, n, split, cap);

  free(tok);
  free(low);
  free(b);
  free(a);
  return 0;
}
