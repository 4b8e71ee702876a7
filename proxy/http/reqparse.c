/* Strict request parsing: llhttp with no lenient flag, plus the checks that
 * llhttp 8.1 does not make (see reqparse.h). Every offset comes from the
 * parser's own positions (spans and pause points), never from searching
 * the raw bytes again. */
#include "reqparse.h"

#include <string.h>
#include <strings.h>

enum { PAUSE_NONE, PAUSE_HEAD, PAUSE_CHUNK, PAUSE_DONE };

/* Two bytes of raw framing kept in front of unparsed bytes when a chunked
 * body's framing is dropped, so that the CRLF ending a chunk can be checked
 * even when it arrived at the end of the previous read. */
#define KEEP 2

static inline struct sl_req *req_of(llhttp_t *p) { return p->data; }
static inline uint32_t off_of(const struct sl_req *r, const char *at) { return (uint32_t)(at - r->buf); }

static int on_message_begin(llhttp_t *p) {
  struct sl_req *r = req_of(p);
  sl_hdrs_reset(&r->hdrs);
  r->nconn_hdr = 0;
  r->url_off = r->url_len = 0;
  r->head_len = r->trailer_bytes = 0;
  r->headers_done = r->chunked_req = r->has_body = r->expect_continue = r->dup_ident = 0;
  r->last_chunk = r->body_coded = 0;
  r->body_len = r->body_off = r->need_cap = 0;
  r->h_host = r->h_auth = r->h_action = r->h_ctype = -1;
  r->body.len = 0;
  r->err_status = 0;
  return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t n) {
  struct sl_req *r = req_of(p);
  if (r->url_len == 0) r->url_off = off_of(r, at);
  r->url_len += (uint32_t)n;
  return 0;
}

/* Trailer fields (after a chunked body) are only counted against the head
 * bound: recording them would point into framing that is dropped. */
static int trailer_piece(struct sl_req *r, size_t n) {
  r->trailer_bytes += (uint32_t)n;
  if (r->trailer_bytes > r->lim->max_header_bytes) {
    r->err_status = 431;
    return -1;
  }
  return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t n) {
  struct sl_req *r = req_of(p);
  if (r->headers_done) return trailer_piece(r, n);
  if (sl_hdrs_field(&r->hdrs, off_of(r, at), (uint32_t)n) != 0) {
    r->err_status = 431;
    return -1;
  }
  return 0;
}

static int on_header_field_complete(llhttp_t *p) {
  struct sl_req *r = req_of(p);
  return r->headers_done ? 0 : sl_hdrs_field_done(&r->hdrs, r->buf);
}

static int on_header_value(llhttp_t *p, const char *at, size_t n) {
  struct sl_req *r = req_of(p);
  if (r->headers_done) return trailer_piece(r, n);
  if (sl_hdrs_value(&r->hdrs, off_of(r, at), (uint32_t)n) != 0) return -1; /* obs-fold */
  return 0;
}

static int on_header_value_complete(llhttp_t *p) {
  struct sl_req *r = req_of(p);
  if (!r->headers_done) r->hdrs.value_open = 0;
  return 0;
}

static int on_headers_complete(llhttp_t *p) {
  req_of(p)->pause = PAUSE_HEAD; /* the head's end is the pause position */
  return HPE_PAUSED;
}

static int on_body(llhttp_t *p, const char *at, size_t n) {
  struct sl_req *r = req_of(p);
  if (!r->chunked_req) return 0; /* Content-Length bodies stay where they are in buf */
  if (sl_buf_append(&r->body, at, n) != 0) {
    r->err_status = 413;
    return -1;
  }
  return 0;
}

static int on_chunk_header(llhttp_t *p) {
  req_of(p)->last_chunk = p->content_length == 0;
  return 0;
}

/* After a data chunk and the CRLF llhttp 8.1 skips without looking at it:
 * pause, so the two bytes can be checked at the pause position. The last
 * chunk is checked at the message's end instead. */
static int on_chunk_complete(llhttp_t *p) {
  struct sl_req *r = req_of(p);
  if (r->last_chunk) return 0;
  r->pause = PAUSE_CHUNK;
  return HPE_PAUSED;
}

static int on_message_complete(llhttp_t *p) {
  req_of(p)->pause = PAUSE_DONE; /* one request at a time: responses go out in order */
  return HPE_PAUSED;
}

/* Read-only from the start: every parser shares them, from any thread. */
static const llhttp_settings_t settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_field_complete = on_header_field_complete,
    .on_header_value = on_header_value,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_chunk_header = on_chunk_header,
    .on_chunk_complete = on_chunk_complete,
    .on_message_complete = on_message_complete,
};

void sl_req_init(struct sl_req *r, const struct sl_req_limits *lim, struct sl_hdr *store, unsigned max_headers) {
  llhttp_init(&r->parser, HTTP_REQUEST, &settings);
  r->parser.data = r;
  r->lim = lim;
  r->hdrs.h = store;
  r->hdrs.max = max_headers;
  r->body.max = lim->max_body_bytes;
  r->h_host = r->h_auth = r->h_action = r->h_ctype = -1;
}

/* A header value without its optional whitespace (RFC 9110 5.5). */
static void trim_ows(const char **v, size_t *n) {
  while (*n && (**v == ' ' || **v == '\t')) ++*v, --*n;
  while (*n && ((*v)[*n - 1] == ' ' || (*v)[*n - 1] == '\t')) --*n;
}

static inline int tchar_hex(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* RFC 9110 5.6.2 tchar. */
static const uint8_t tchar[256] = {
    ['!'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1, ['*'] = 1, ['+'] = 1, ['-'] = 1,
    ['.'] = 1, ['^'] = 1, ['_'] = 1, ['`'] = 1, ['|'] = 1, ['~'] = 1,
    ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1, ['7'] = 1, ['8'] = 1, ['9'] = 1,
    ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1, ['F'] = 1, ['G'] = 1, ['H'] = 1, ['I'] = 1,
    ['J'] = 1, ['K'] = 1, ['L'] = 1, ['M'] = 1, ['N'] = 1, ['O'] = 1, ['P'] = 1, ['Q'] = 1, ['R'] = 1,
    ['S'] = 1, ['T'] = 1, ['U'] = 1, ['V'] = 1, ['W'] = 1, ['X'] = 1, ['Y'] = 1, ['Z'] = 1,
    ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1, ['e'] = 1, ['f'] = 1, ['g'] = 1, ['h'] = 1, ['i'] = 1,
    ['j'] = 1, ['k'] = 1, ['l'] = 1, ['m'] = 1, ['n'] = 1, ['o'] = 1, ['p'] = 1, ['q'] = 1, ['r'] = 1,
    ['s'] = 1, ['t'] = 1, ['u'] = 1, ['v'] = 1, ['w'] = 1, ['x'] = 1, ['y'] = 1, ['z'] = 1,
};

/* Every line of the head ends in CRLF, none starts with whitespace
 * (obs-fold), and the head ends with the blank line. llhttp 8.1 accepts a
 * bare LF ending the request line or the blank line. */
static int head_lines_ok(const char *p, size_t n) {
  const char *s = p, *end = p + n;
  if (n < 4 || memcmp(end - 4, "\r\n\r\n", 4) != 0) return 0;
  while ((s = memchr(s, '\n', (size_t)(end - s))) != NULL) {
    if (s == p || s[-1] != '\r') return 0;
    if (++s < end && (*s == ' ' || *s == '\t')) return 0;
  }
  return 1;
}

/* " HTTP/1.0" or " HTTP/1.1" and the line's end right after the target:
 * llhttp also takes RTSP/, ICE/ and HTTP/0.9 to 2.x. */
static int protocol_ok(const struct sl_req *r) {
  const llhttp_t *p = &r->parser;
  size_t at = (size_t)r->url_off + r->url_len;
  if (p->http_major != 1 || p->http_minor > 1 || at + 11 > r->head_len) return 0;
  return memcmp(r->buf + at, " HTTP/1.", 8) == 0 && (r->buf[at + 8] == '0' || r->buf[at + 8] == '1') &&
         r->buf[at + 9] == '\r' && r->buf[at + 10] == '\n';
}

int sl_req_conn_listed(const struct sl_req *r, const struct sl_hdr *h) {
  char tmp[64];
  size_t n = sl_http_lower(r->buf + h->name_off, h->name_len, tmp, sizeof(tmp));
  for (unsigned j = 0; n && j < r->nconn_hdr; j++) {
    const struct sl_hdr *ch = &r->hdrs.h[r->conn_hdr[j]];
    if (sl_http_has_token(r->buf + ch->val_off, ch->val_len, tmp, n)) return 1;
  }
  return 0;
}

/* Whether a header name that holds '_' reads, with '-' for '_', as one of
 * the headers sluice interprets (x_acs_action, Content_Type,
 * X_Forwarded_For...): CGI, WSGI and PHP backends map both spellings to
 * one variable (HTTP_X_ACS_ACTION), so the alias would be that header,
 * given twice or in place of the one sluice read. nginx drops such names. */
static int underscore_alias(const char *name, size_t n) {
  char tmp[24]; /* longer than every name sl_http_hdr_kind knows */
  if (n > sizeof(tmp) || memchr(name, '_', n) == NULL) return 0;
  for (size_t k = 0; k < n; k++) tmp[k] = name[k] == '_' ? '-' : name[k];
  return sl_http_hdr_kind(tmp, n) != SL_H_OTHER;
}

static void note_ident(struct sl_req *r, int16_t *slot, unsigned i) {
  if (*slot >= 0) r->dup_ident = 1;
  *slot = (int16_t)i;
}

/* The request target holds no control byte, space, DEL or '#': llhttp
 * 8.1 takes a tab and a fragment, which a backend could read otherwise
 * (a tab as the end of the target, a fragment as more query). */
static int target_ok(const struct sl_req *r) {
  const unsigned char *u = (const unsigned char *)r->buf + r->url_off;
  for (uint32_t i = 0; i < r->url_len; i++)
    if (u[i] <= 0x20 || u[i] == 0x7f || u[i] == '#') return 0;
  return 1;
}

/* A Host value sluice and a backend read alike (RFC 9112 3.2: any other
 * is answered 400): empty, an IPv6 literal "[...]", or a name of letters,
 * digits, '-', '_' and '.' with no empty label (one trailing dot allowed),
 * then an optional ":port" of digits. Stricter than RFC 3986's reg-name,
 * which also takes sub-delims such as ',', and than nginx, which takes
 * anything but '/', '\\' and "..": a Host such as "a.com,b.com", "a.com x"
 * or "u@a.com" would name one region here and maybe another there. */
static int host_ok(const char *p, size_t n) {
  size_t i = 0;
  trim_ows(&p, &n);
  if (n == 0) return 1;
  if (p[0] == '[') {
    for (i = 1; i < n && p[i] != ']'; i++)
      if (!(tchar_hex(p[i]) || p[i] == ':' || p[i] == '.')) return 0;
    if (i == n || i == 1) return 0;
    i++;
  } else {
    size_t label = 0;
    for (; i < n && p[i] != ':'; i++) {
      char ch = p[i];
      if (ch == '.') {
        if (label == 0) return 0; /* "..", or a leading '.' */
        label = 0;
      } else if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '-' ||
                 ch == '_') {
        label++;
      } else {
        return 0;
      }
    }
    if (i == 0) return 0; /* ":80" */
  }
  if (i == n) return 1;
  if (p[i] != ':') return 0;
  for (i++; i < n; i++)
    if (p[i] < '0' || p[i] > '9') return 0;
  return 1;
}

/* The request target's form (RFC 9112 3.2): origin-form "/...", "*" for
 * OPTIONS, or absolute-form "http[s]://authority[/...]" whose authority
 * is the Host that is forwarded (RFC 9112 3.2.2 has a server read the
 * target's authority in place of Host: another one would be classified
 * by one region here and served in another; HAProxy refuses the
 * mismatch too). CONNECT's authority-form is refused before. */
static int target_form_ok(const struct sl_req *r) {
  const char *u = r->buf + r->url_off;
  size_t n = r->url_len, s;
  if (n > 0 && u[0] == '/') return 1;
  if (n == 1 && u[0] == '*') return r->parser.method == HTTP_OPTIONS;
  if (n >= 7 && SL_IEQ(u, 7, "http://"))
    s = 7;
  else if (n >= 8 && SL_IEQ(u, 8, "https://"))
    s = 8;
  else
    return 0;
  size_t e = s;
  while (e < n && u[e] != '/' && u[e] != '?') e++;
  if (e == s || r->h_host < 0) return 0;
  const struct sl_hdr *h = &r->hdrs.h[r->h_host];
  const char *hv = r->buf + h->val_off;
  size_t hn = h->val_len;
  trim_ows(&hv, &hn);
  return hn == e - s && strncasecmp(u + s, hv, hn) == 0;
}

/* The head ends at `pos`. Returns 0, or -1 with err_status set. */
static int head_done(struct sl_req *r, size_t pos) {
  r->head_len = (uint32_t)pos;
  if (r->head_len > r->lim->max_header_bytes) {
    r->err_status = 431;
    return -1;
  }
  if (!head_lines_ok(r->buf, pos) || !protocol_ok(r) || !target_ok(r)) return -1;
  /* CONNECT asks for a tunnel: nothing a moderation API is called with. */
  if (llhttp_get_method(&r->parser) == HTTP_CONNECT) return -1;
  r->headers_done = 1;
  r->head_method = llhttp_get_method(&r->parser) == HTTP_HEAD;
  r->keep_alive = llhttp_should_keep_alive(&r->parser) != 0;
  int te_seen = 0;
  for (unsigned i = 0; i < r->hdrs.n; i++) {
    const struct sl_hdr *h = &r->hdrs.h[i];
    for (uint32_t k = 0; k < h->name_len; k++)
      if (!tchar[(unsigned char)r->buf[h->name_off + k]]) return -1; /* "Host :" or "Ho st" */
    if (underscore_alias(r->buf + h->name_off, h->name_len)) return -1;
    switch (h->kind) {
      case SL_H_CONNECTION:
        /* Past the bound, the tokens of the rest would be forwarded as
         * headers while hop-by-hop: refused rather than half read. */
        if (r->nconn_hdr >= SL_ARRAY_SIZE(r->conn_hdr)) return -1;
        r->conn_hdr[r->nconn_hdr++] = i;
        break;
      case SL_H_CONTENT_ENCODING: {
        const char *v = r->buf + h->val_off;
        size_t n = h->val_len;
        trim_ows(&v, &n);
        if (!SL_IEQ(v, n, "identity")) r->body_coded = 1;
        break;
      }
      case SL_H_EXPECT:
        if (SL_IEQ(r->buf + h->val_off, h->val_len, "100-continue")) r->expect_continue = 1;
        break;
      case SL_H_TRANSFER_ENCODING: {
        /* Only "chunked" alone: llhttp 8.1 takes "gzip, chunked", whose
         * body would be forwarded de-chunked but still gzip-coded. */
        const char *v = r->buf + h->val_off;
        size_t n = h->val_len;
        trim_ows(&v, &n);
        if (!SL_IEQ(v, n, "chunked")) return -1;
        te_seen = 1;
        break;
      }
      case SL_H_HOST:
        if (!host_ok(r->buf + h->val_off, h->val_len)) return -1;
        note_ident(r, &r->h_host, i);
        break;
      case SL_H_AUTHORIZATION: note_ident(r, &r->h_auth, i); break;
      case SL_H_X_ACS_ACTION: note_ident(r, &r->h_action, i); break;
      case SL_H_CONTENT_TYPE: note_ident(r, &r->h_ctype, i); break;
      default: break;
    }
  }
  /* Given twice, the proxy and the backend could each read another one. */
  if (r->dup_ident) return -1;
  /* Transfer-Encoding in HTTP/1.0: RFC 9112 6.1 calls its framing faulty;
   * an HTTP/1.0 hop before sluice may not de-chunk it (nginx answers 400
   * too). */
  if (te_seen && r->parser.http_minor == 0) return -1;
  /* Classification sees exactly what is forwarded: a header the
   * Connection header lists is dropped on the way, so it does not count. */
  if (r->nconn_hdr) {
    int16_t *slots[] = {&r->h_host, &r->h_auth, &r->h_action, &r->h_ctype};
    for (size_t k = 0; k < SL_ARRAY_SIZE(slots); k++)
      if (*slots[k] >= 0 && sl_req_conn_listed(r, &r->hdrs.h[*slots[k]])) *slots[k] = -1;
  }
  if (!target_form_ok(r)) return -1; /* after the Connection step: the Host compared is the one forwarded */
  if (r->parser.flags & F_CHUNKED) {
    r->has_body = r->chunked_req = 1;
  } else if (r->parser.flags & F_CONTENT_LENGTH) {
    r->has_body = 1;
    if (r->parser.content_length > r->lim->max_body_bytes) {
      r->err_status = 413;
      return -1;
    }
    r->body_off = r->head_len;
    r->body_len = r->parser.content_length;
    r->need_cap = r->head_len + r->parser.content_length;
  }
  return 0;
}

/* Drops the chunked framing parsed up to `upto`, keeping KEEP bytes of it. */
static void chunk_discard(struct sl_req *r, size_t upto) {
  r->parsed = upto;
  if (upto < (size_t)r->head_len + 2 * KEEP) return; /* too little to be worth a move */
  size_t rest = r->len - upto + KEEP;
  memmove(r->buf + r->head_len, r->buf + upto - KEEP, rest);
  r->len = r->head_len + rest;
  r->parsed = (size_t)r->head_len + KEEP;
}

static int crlf_before(const struct sl_req *r, size_t pos) {
  return pos >= 2 && r->buf[pos - 2] == '\r' && r->buf[pos - 1] == '\n';
}

enum sl_req_event sl_req_parse(struct sl_req *r) {
  while (sl_req_pending(r)) {
    r->resumed = 0;
    r->pause = PAUSE_NONE;
    llhttp_errno_t err = llhttp_execute(&r->parser, r->buf + r->parsed, r->len - r->parsed);
    if (err == HPE_OK) {
      if (r->headers_done && r->chunked_req) {
        chunk_discard(r, r->len);
      } else {
        r->parsed = r->len;
        if (!r->headers_done && r->len > r->lim->max_header_bytes) {
          r->err_status = 431;
          return SL_REQ_ERROR;
        }
      }
      return SL_REQ_MORE;
    }
    if (err == HPE_PAUSED_UPGRADE) {
      /* After a request with "Connection: upgrade" and Upgrade, llhttp
       * stops before the next bytes as if they were another protocol.
       * sluice switches to none (Upgrade is hop-by-hop, never forwarded,
       * so no backend answers 101): they are the next request. */
      r->parsed = (size_t)(llhttp_get_error_pos(&r->parser) - r->buf);
      llhttp_resume_after_upgrade(&r->parser);
      continue;
    }
    if (err != HPE_PAUSED) {
      if (!r->err_status) r->err_status = 400;
      return SL_REQ_ERROR;
    }
    size_t pos = (size_t)(llhttp_get_error_pos(&r->parser) - r->buf);
    llhttp_resume(&r->parser);
    r->resumed = 1;
    switch (r->pause) {
      case PAUSE_HEAD:
        r->parsed = pos;
        if (head_done(r, pos) != 0) {
          if (!r->err_status) r->err_status = 400;
          return SL_REQ_ERROR;
        }
        return SL_REQ_HEAD;
      case PAUSE_CHUNK:
        if (!crlf_before(r, pos)) {
          r->err_status = 400;
          return SL_REQ_ERROR;
        }
        chunk_discard(r, pos);
        break;
      default: /* PAUSE_DONE */
        r->resumed = 0; /* the next request needs bytes of its own */
        if (r->chunked_req) {
          if (!crlf_before(r, pos)) {
            r->err_status = 400;
            return SL_REQ_ERROR;
          }
          memmove(r->buf + r->head_len, r->buf + pos, r->len - pos); /* the decoded body is in r->body */
          r->len = r->head_len + (r->len - pos);
          pos = r->head_len;
        }
        r->parsed = pos;
        return SL_REQ_DONE;
    }
  }
  return SL_REQ_MORE;
}

void sl_req_consume(struct sl_req *r) {
  size_t rest = r->len - r->parsed;
  if (rest) memmove(r->buf, r->buf + r->parsed, rest);
  r->len = rest;
  r->parsed = 0;
  r->headers_done = 0;
}
