/* What modstub answers: the green-cip shaped bodies per Action, /echo,
 * /stats, the x-modstub-* knobs, and the HTTP framing of each answer. */
#include "conn.h"

#include <stdlib.h>
#include <strings.h>

#define MS_MAX_SIZE (64u << 20) /* largest x-modstub-size */
#define MS_MAX_DELAY 600000u    /* largest x-modstub-delay-ms */
#define MS_MAX_REQID 128        /* longer X-Request-Id values are not echoed */
#define MS_CHUNKS 4             /* x-modstub-chunked splits the body this often */

/* How one answer is framed and sent; filled from the request and knobs. */
struct answer {
  int status;
  int keep_alive;     /* else Connection: close and close after */
  int http10;         /* the request was HTTP/1.0 */
  int head;           /* HEAD: headers only */
  int chunked;        /* x-modstub-chunked */
  int close_delim;    /* x-modstub-close: no length, close after */
  int partial;        /* x-modstub-partial */
  int hangup;         /* x-modstub-hangup */
  uint64_t delay_ms;
  uint64_t size;      /* x-modstub-size, 0 when not asked */
  const char *rid;
  size_t rid_len;
};

static const char *reason(int status) {
  switch (status) {
  case 200: return "OK";
  case 201: return "Created";
  case 202: return "Accepted";
  case 204: return "No Content";
  case 301: return "Moved Permanently";
  case 302: return "Found";
  case 304: return "Not Modified";
  case 400: return "Bad Request";
  case 401: return "Unauthorized";
  case 403: return "Forbidden";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 408: return "Request Timeout";
  case 409: return "Conflict";
  case 413: return "Payload Too Large";
  case 414: return "URI Too Long";
  case 429: return "Too Many Requests";
  case 431: return "Request Header Fields Too Large";
  case 500: return "Internal Server Error";
  case 501: return "Not Implemented";
  case 502: return "Bad Gateway";
  case 503: return "Service Unavailable";
  case 504: return "Gateway Timeout";
  default: return status < 300 ? "OK" : status < 400 ? "Redirect" : status < 500 ? "Client Error" : "Server Error";
  }
}

/* The Message of an error body: a green-cip-like word. */
static const char *error_message(int status) {
  switch (status) {
  case 400: return "BadRequest";
  case 413: return "RequestEntityTooLarge";
  case 414: return "RequestURITooLong";
  case 431: return "RequestHeaderFieldsTooLarge";
  case 500: return "InternalError";
  case 503: return "ServiceUnavailable";
  default: return reason(status);
  }
}

/* ---- reading the request ---- */

/* Value of known header `k` of the request on c, or NULL. */
static const char *hdr_value(const struct ms_conn *c, enum ms_hdr_kind k, size_t *n) {
  const struct ms_hdr *h;

  if (c->known[k] < 0)
    return NULL;
  h = &c->hdr[c->known[k]];
  *n = h->val_len;
  return c->req.p + h->val_off;
}

static int hexval(char ch) {
  if (ch >= '0' && ch <= '9')
    return ch - '0';
  if (ch >= 'a' && ch <= 'f')
    return ch - 'a' + 10;
  if (ch >= 'A' && ch <= 'F')
    return ch - 'A' + 10;
  return -1;
}

/* Finds field `name` in the x-www-form-urlencoded string s[0..n) and decodes
 * its value into out (at most cap - 1 bytes, NUL-terminated). Returns the
 * decoded length, or -1 when the field is absent. */
static int form_get(const char *s, size_t n, const char *name, char *out, size_t cap) {
  size_t nl = strlen(name), i = 0;

  while (i < n) {
    size_t j = i, o = 0;

    while (j < n && s[j] != '&')
      j++;
    if (j - i > nl && memcmp(s + i, name, nl) == 0 && s[i + nl] == '=') {
      size_t k;

      for (k = i + nl + 1; k < j && o + 1 < cap; k++) {
        int hi, lo;

        if (s[k] == '+') {
          out[o++] = ' ';
        } else if (s[k] == '%' && k + 2 < j && (hi = hexval(s[k + 1])) >= 0 &&
                   (lo = hexval(s[k + 2])) >= 0) {
          out[o++] = (char)(hi * 16 + lo);
          k += 2;
        } else {
          out[o++] = s[k];
        }
      }
      out[o] = '\0';
      return (int)o;
    }
    i = j + 1;
  }
  return -1;
}

/* Knob `k` as a number in [0, max]; returns 1 and sets *v when present and
 * valid, else 0. */
static int knob_u64(const struct ms_conn *c, enum ms_hdr_kind k, uint64_t max, uint64_t *v) {
  size_t n, i;
  const char *s = hdr_value(c, k, &n);
  uint64_t x = 0;

  if (s == NULL || n == 0 || n > 12)
    return 0;
  for (i = 0; i < n; i++) {
    if (s[i] < '0' || s[i] > '9')
      return 0;
    x = x * 10 + (uint64_t)(s[i] - '0');
  }
  if (x > max)
    return 0;
  *v = x;
  return 1;
}

/* Knob `k` as a switch: present and not "0", "false" or empty. */
static int knob_on(const struct ms_conn *c, enum ms_hdr_kind k) {
  size_t n;
  const char *s = hdr_value(c, k, &n);

  if (s == NULL || n == 0)
    return 0;
  if (n == 1 && s[0] == '0')
    return 0;
  return !(n == 5 && strncasecmp(s, "false", 5) == 0);
}

/* A UUID-shaped (version 4) id from w's generator, 36 chars + NUL. */
static void make_request_id(struct ms_worker *w, char out[37]) {
  static const char hex[] = "0123456789ABCDEF";
  uint64_t a = ms_rand(w), b = ms_rand(w);
  int i, o = 0;

  a = (a & ~0xf000ULL) | 0x4000ULL;
  b = (b & ~(3ULL << 62)) | (2ULL << 62);
  for (i = 0; i < 32; i++) {
    uint64_t v = i < 16 ? a >> (60 - 4 * i) : b >> (60 - 4 * (i - 16));

    if (i == 8 || i == 12 || i == 16 || i == 20)
      out[o++] = '-';
    out[o++] = hex[v & 15];
  }
  out[o] = '\0';
}

/* ---- bodies (built in w->scratch) ---- */

static void body_rid(struct ms_buf *b, const struct answer *a) {
  ms_buf_lit(b, "\"RequestId\":");
  ms_buf_put_json_str(b, a->rid, a->rid_len);
}

static void body_error(struct ms_buf *b, const struct answer *a) {
  ms_buf_lit(b, "{\"Code\":");
  ms_buf_put_u64(b, (uint64_t)a->status);
  ms_buf_lit(b, ",\"Message\":\"");
  ms_buf_puts(b, error_message(a->status));
  ms_buf_lit(b, "\",");
  body_rid(b, a);
  ms_buf_putc(b, '}');
}

static void body_action(struct ms_buf *b, const struct answer *a, const char *action) {
  if (strcmp(action, "TextModeration") == 0) {
    ms_buf_lit(b, "{\"Code\":200,\"Data\":{\"labels\":\"\",\"reason\":\"\",\"descriptions\":\"\"},"
                  "\"Message\":\"OK\",");
  } else if (strcmp(action, "TextModerationPlus") == 0) {
    ms_buf_lit(b, "{\"Code\":200,\"Data\":{\"labels\":\"\",\"reason\":\"\",\"descriptions\":\"\","
                  "\"RiskLevel\":\"none\",\"Result\":[{\"Label\":\"nonLabel\",\"Confidence\":0}]},"
                  "\"Message\":\"OK\",");
  } else if (strstr(action, "Image") != NULL) {
    /* ImageModeration, ImageBatchModeration, ImageAsyncModeration,
     * ImageQueueModeration and the image result queries. */
    ms_buf_lit(b, "{\"Msg\":\"OK\",\"Code\":200,\"Data\":{\"DataId\":\"\",\"Result\":"
                  "[{\"Label\":\"nonLabel\",\"Confidence\":99.91}],\"RiskLevel\":\"none\"},");
  } else {
    ms_buf_lit(b, "{\"Code\":200,\"Message\":\"OK\",\"Data\":{},");
  }
  body_rid(b, a);
  ms_buf_putc(b, '}');
}

static void body_echo(struct ms_buf *b, const struct ms_conn *c, const struct answer *a,
                      const char *action, int has_action, const char *service, int has_service) {
  const llhttp_t *p = &c->parser;
  size_t kept = c->req.len - c->body_off;
  unsigned i;

  ms_buf_lit(b, "{\"method\":\"");
  ms_buf_puts(b, llhttp_method_name((llhttp_method_t)p->method));
  ms_buf_lit(b, "\",\"url\":");
  ms_buf_put_json_str(b, c->req.p, c->url_len);
  ms_buf_lit(b, ",\"http_version\":\"");
  ms_buf_put_u64(b, p->http_major);
  ms_buf_putc(b, '.');
  ms_buf_put_u64(b, p->http_minor);
  ms_buf_lit(b, "\",\"headers\":[");
  for (i = 0; i < c->nhdr; i++) {
    const struct ms_hdr *h = &c->hdr[i];

    if (i)
      ms_buf_putc(b, ',');
    ms_buf_putc(b, '[');
    ms_buf_put_json_str(b, c->req.p + h->name_off, h->name_len);
    ms_buf_putc(b, ',');
    ms_buf_put_json_str(b, c->req.p + h->val_off, h->val_len);
    ms_buf_putc(b, ']');
  }
  ms_buf_lit(b, "],\"body_len\":");
  ms_buf_put_u64(b, c->body_len);
  ms_buf_lit(b, ",\"body_fnv1a64\":\"");
  ms_buf_put_hex(b, c->body_hash, 16);
  ms_buf_putc(b, '"');
  if (c->body_len <= MS_ECHO_BODY) {
    int utf8;

    ms_buf_lit(b, ",\"body\":");
    utf8 = ms_buf_put_json_str(b, c->req.p + c->body_off, kept);
    if (!utf8)
      ms_buf_lit(b, ",\"body_latin1\":true");
  }
  ms_buf_lit(b, ",\"conn_requests\":");
  ms_buf_put_u64(b, c->nreq);
  ms_buf_lit(b, ",\"conn_id\":");
  ms_buf_put_u64(b, c->id);
  ms_buf_lit(b, ",\"worker\":");
  ms_buf_put_u64(b, c->w->index);
  if (has_action) {
    ms_buf_lit(b, ",\"action\":");
    ms_buf_put_json_str(b, action, strlen(action));
  }
  if (has_service) {
    ms_buf_lit(b, ",\"service\":");
    ms_buf_put_json_str(b, service, strlen(service));
  }
  ms_buf_putc(b, ',');
  body_rid(b, a);
  ms_buf_putc(b, '}');
}

/* Grows a JSON object body to exactly `size` bytes when it is smaller: a
 * "Padding" string field when it fits, else trailing spaces (still JSON). */
static void body_pad(struct ms_buf *b, uint64_t size) {
  static const char field[] = ",\"Padding\":\"\"}";
  size_t extra = sizeof(field) - 1 - 1; /* replaces the closing brace */

  if (size <= b->len)
    return;
  if (size - b->len >= extra && b->len >= 2 && b->p[b->len - 1] == '}') {
    size_t pad = (size_t)size - b->len - extra;

    b->len--;
    ms_buf_lit(b, ",\"Padding\":\"");
    ms_buf_fill(b, 'x', pad);
    ms_buf_lit(b, "\"}");
  } else {
    ms_buf_fill(b, ' ', (size_t)size - b->len);
  }
}

/* ---- framing ---- */

/* Queues the answer `a` with body `body` on c. */
static void emit(struct ms_conn *c, const struct answer *a, const struct ms_buf *body) {
  struct ms_buf *o = &c->out;
  struct ms_reply *r = ms_conn_push(c);
  int no_body = a->status == 204 || a->status == 304;
  int chunked = a->chunked && !a->close_delim && !a->http10 && !no_body;
  int close_delim = a->close_delim || (a->chunked && a->http10);
  int close = !a->keep_alive || close_delim || a->partial || a->hangup;
  size_t head_len;

  ms_buf_lit(o, "HTTP/1.1 ");
  ms_buf_put_u64(o, (uint64_t)a->status);
  ms_buf_putc(o, ' ');
  ms_buf_puts(o, reason(a->status));
  ms_buf_lit(o, "\r\nServer: modstub\r\nContent-Type: application/json;charset=utf-8\r\n");
  if (chunked) {
    ms_buf_lit(o, "Transfer-Encoding: chunked\r\n");
  } else if (!close_delim && !no_body) {
    ms_buf_lit(o, "Content-Length: ");
    ms_buf_put_u64(o, body->len);
    ms_buf_lit(o, "\r\n");
  }
  ms_buf_lit(o, "x-acs-request-id: ");
  ms_buf_put(o, a->rid, a->rid_len);
  if (close)
    ms_buf_lit(o, "\r\nConnection: close\r\n\r\n");
  else if (a->http10)
    ms_buf_lit(o, "\r\nConnection: keep-alive\r\n\r\n");
  else
    ms_buf_lit(o, "\r\n\r\n");
  head_len = o->len - r->off;

  if (a->head || no_body) {
    /* headers only */
  } else if (chunked) {
    size_t step = body->len / MS_CHUNKS + 1, at;

    for (at = 0; at < body->len; at += step) {
      size_t n = body->len - at < step ? body->len - at : step;

      ms_buf_put_hex(o, n, 1);
      ms_buf_lit(o, "\r\n");
      ms_buf_put(o, body->p + at, n);
      ms_buf_lit(o, "\r\n");
    }
    ms_buf_lit(o, "0\r\n\r\n");
  } else {
    ms_buf_put(o, body->p, body->len);
  }
  r->len = o->len - r->off;
  r->send = a->partial ? head_len + (r->len - head_len) / 2 : r->len;
  r->due = uv_now(&c->w->loop) + a->delay_ms;
  r->close = close;
  r->hangup = a->hangup;
  if (close)
    c->state = MS_CONN_DRAIN;
}

static void count(struct ms_conn *c, int status, int action_idx) {
  struct ms_stats *s = &c->w->stats;

  ms_count(&s->requests);
  ms_count(&s->by_status[status >= 0 && status < MS_STATUS_SLOTS ? status : 0]);
  if (action_idx >= 0)
    ms_count(&s->by_action[action_idx]);
}

static void answer_init(struct ms_conn *c, struct answer *a, char rid_buf[37]) {
  const llhttp_t *p = &c->parser;
  size_t n;
  const char *rid = hdr_value(c, MS_H_REQID, &n);

  memset(a, 0, sizeof(*a));
  a->status = 200;
  a->http10 = p->http_major == 1 && p->http_minor == 0;
  if (rid != NULL && n > 0 && n <= MS_MAX_REQID) {
    a->rid = rid;
    a->rid_len = n;
  } else {
    make_request_id(c->w, rid_buf);
    a->rid = rid_buf;
    a->rid_len = 36;
  }
}

void ms_reply_error(struct ms_conn *c, int status) {
  struct ms_buf *b = &c->w->scratch;
  struct answer a;
  char rid[37];

  /* The request may be half parsed: use none of its headers. */
  c->nhdr = 0;
  for (int i = 0; i < MS_H_COUNT; i++)
    c->known[i] = -1;
  answer_init(c, &a, rid);
  a.http10 = 0;
  a.status = status;
  b->len = 0;
  body_error(b, &a);
  emit(c, &a, b);
  count(c, status, -1);
}

static int path_is(const char *path, size_t n, const char *want) {
  return n == strlen(want) && memcmp(path, want, n) == 0;
}

void ms_reply_request(struct ms_conn *c) {
  struct ms_worker *w = c->w;
  const struct ms_opts *opts = w->opts;
  struct ms_buf *b = &w->scratch;
  const char *url = c->req.p, *q, *hv;
  size_t path_len, qlen = 0, n;
  struct answer a;
  char rid[37], action[256], service[256];
  int has_action, has_service = 0, action_idx = -1, knob_status = 0;
  int is_echo, is_stats;
  uint64_t v;

  answer_init(c, &a, rid);
  a.keep_alive = llhttp_should_keep_alive(&c->parser);
  a.head = c->parser.method == HTTP_HEAD;

  q = memchr(url, '?', c->url_len);
  path_len = q ? (size_t)(q - url) : c->url_len;
  if (q) {
    q++;
    qlen = c->url_len - path_len - 1;
  }

  has_action = q && form_get(q, qlen, "Action", action, sizeof(action)) >= 0;
  if (!has_action && (hv = hdr_value(c, MS_H_ACTION, &n)) != NULL) {
    if (n >= sizeof(action))
      n = sizeof(action) - 1;
    memcpy(action, hv, n);
    action[n] = '\0';
    has_action = 1;
  }
  if (!has_action)
    action[0] = '\0';
  else
    action_idx = ms_action_index(action, strlen(action));

  is_stats = path_is(url, path_len, "/stats") || path_is(url, path_len, "/stats/reset");
  is_echo = path_len >= 5 && memcmp(url, "/echo", 5) == 0 &&
            (path_len == 5 || url[5] == '/');

  b->len = 0;
  if (is_stats) {
    /* Not counted, never delayed, no knobs: the test's view of the stub. */
    if (path_len == 6) {
      ms_stats_json(b);
    } else if (c->parser.method == HTTP_POST) {
      ms_stats_reset();
      ms_buf_lit(b, "{\"Code\":200,\"Message\":\"OK\"}");
    } else {
      a.status = 405;
      body_error(b, &a);
    }
    emit(c, &a, b);
    return;
  }

  if (knob_u64(c, MS_H_STATUS, 599, &v) && v >= 200) {
    a.status = (int)v;
    knob_status = 1;
  }
  if (!knob_u64(c, MS_H_DELAY, MS_MAX_DELAY, &a.delay_ms)) {
    a.delay_ms = opts->latency_ms;
    if (opts->jitter_ms)
      a.delay_ms += ms_rand(w) % (opts->jitter_ms + 1);
  }
  a.chunked = knob_on(c, MS_H_CHUNKED);
  a.close_delim = knob_on(c, MS_H_CLOSE);
  a.partial = knob_on(c, MS_H_PARTIAL);
  a.hangup = knob_on(c, MS_H_HANGUP);
  knob_u64(c, MS_H_SIZE, MS_MAX_SIZE, &a.size);

  if (!is_echo && !knob_status && opts->error_rate > 0 &&
      (double)(ms_rand(w) >> 11) * 0x1.0p-53 < opts->error_rate)
    a.status = 500;

  if (is_echo) {
    size_t kept = c->req.len - c->body_off;

    hv = hdr_value(c, MS_H_CTYPE, &n);
    if (hv && n >= 33 && strncasecmp(hv, "application/x-www-form-urlencoded", 33) == 0)
      has_service = form_get(c->req.p + c->body_off, kept, "Service", service,
                             sizeof(service)) >= 0;
    if (!has_service && q)
      has_service = form_get(q, qlen, "Service", service, sizeof(service)) >= 0;
    body_echo(b, c, &a, action, has_action, service, has_service);
  } else if (a.status == 200) {
    body_action(b, &a, action);
  } else {
    body_error(b, &a);
  }
  body_pad(b, a.size);
  emit(c, &a, b);
  if (!a.hangup)
    count(c, a.status, action_idx);
}
