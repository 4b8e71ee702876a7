/* Redis Cluster routing without I/O (cluster.h). */
#include "cluster.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "common.h"

/* CRC16-XMODEM by byte: the table of Redis's crc16.c, generated from the
 * polynomial 0x1021. */
static const uint16_t crc16tab[256] = {
    0x0000, 0x1021, 0x2042, 0x3063, 0x4084, 0x50a5, 0x60c6, 0x70e7,
    0x8108, 0x9129, 0xa14a, 0xb16b, 0xc18c, 0xd1ad, 0xe1ce, 0xf1ef,
    0x1231, 0x0210, 0x3273, 0x2252, 0x52b5, 0x4294, 0x72f7, 0x62d6,
    0x9339, 0x8318, 0xb37b, 0xa35a, 0xd3bd, 0xc39c, 0xf3ff, 0xe3de,
    0x2462, 0x3443, 0x0420, 0x1401, 0x64e6, 0x74c7, 0x44a4, 0x5485,
    0xa56a, 0xb54b, 0x8528, 0x9509, 0xe5ee, 0xf5cf, 0xc5ac, 0xd58d,
    0x3653, 0x2672, 0x1611, 0x0630, 0x76d7, 0x66f6, 0x5695, 0x46b4,
    0xb75b, 0xa77a, 0x9719, 0x8738, 0xf7df, 0xe7fe, 0xd79d, 0xc7bc,
    0x48c4, 0x58e5, 0x6886, 0x78a7, 0x0840, 0x1861, 0x2802, 0x3823,
    0xc9cc, 0xd9ed, 0xe98e, 0xf9af, 0x8948, 0x9969, 0xa90a, 0xb92b,
    0x5af5, 0x4ad4, 0x7ab7, 0x6a96, 0x1a71, 0x0a50, 0x3a33, 0x2a12,
    0xdbfd, 0xcbdc, 0xfbbf, 0xeb9e, 0x9b79, 0x8b58, 0xbb3b, 0xab1a,
    0x6ca6, 0x7c87, 0x4ce4, 0x5cc5, 0x2c22, 0x3c03, 0x0c60, 0x1c41,
    0xedae, 0xfd8f, 0xcdec, 0xddcd, 0xad2a, 0xbd0b, 0x8d68, 0x9d49,
    0x7e97, 0x6eb6, 0x5ed5, 0x4ef4, 0x3e13, 0x2e32, 0x1e51, 0x0e70,
    0xff9f, 0xefbe, 0xdfdd, 0xcffc, 0xbf1b, 0xaf3a, 0x9f59, 0x8f78,
    0x9188, 0x81a9, 0xb1ca, 0xa1eb, 0xd10c, 0xc12d, 0xf14e, 0xe16f,
    0x1080, 0x00a1, 0x30c2, 0x20e3, 0x5004, 0x4025, 0x7046, 0x6067,
    0x83b9, 0x9398, 0xa3fb, 0xb3da, 0xc33d, 0xd31c, 0xe37f, 0xf35e,
    0x02b1, 0x1290, 0x22f3, 0x32d2, 0x4235, 0x5214, 0x6277, 0x7256,
    0xb5ea, 0xa5cb, 0x95a8, 0x8589, 0xf56e, 0xe54f, 0xd52c, 0xc50d,
    0x34e2, 0x24c3, 0x14a0, 0x0481, 0x7466, 0x6447, 0x5424, 0x4405,
    0xa7db, 0xb7fa, 0x8799, 0x97b8, 0xe75f, 0xf77e, 0xc71d, 0xd73c,
    0x26d3, 0x36f2, 0x0691, 0x16b0, 0x6657, 0x7676, 0x4615, 0x5634,
    0xd94c, 0xc96d, 0xf90e, 0xe92f, 0x99c8, 0x89e9, 0xb98a, 0xa9ab,
    0x5844, 0x4865, 0x7806, 0x6827, 0x18c0, 0x08e1, 0x3882, 0x28a3,
    0xcb7d, 0xdb5c, 0xeb3f, 0xfb1e, 0x8bf9, 0x9bd8, 0xabbb, 0xbb9a,
    0x4a75, 0x5a54, 0x6a37, 0x7a16, 0x0af1, 0x1ad0, 0x2ab3, 0x3a92,
    0xfd2e, 0xed0f, 0xdd6c, 0xcd4d, 0xbdaa, 0xad8b, 0x9de8, 0x8dc9,
    0x7c26, 0x6c07, 0x5c64, 0x4c45, 0x3ca2, 0x2c83, 0x1ce0, 0x0cc1,
    0xef1f, 0xff3e, 0xcf5d, 0xdf7c, 0xaf9b, 0xbfba, 0x8fd9, 0x9ff8,
    0x6e17, 0x7e36, 0x4e55, 0x5e74, 0x2e93, 0x3eb2, 0x0ed1, 0x1ef0,
};

uint16_t sl_cluster_crc16(const void *p, size_t len) {
  const unsigned char *b = p;
  uint16_t crc = 0;
  for (size_t i = 0; i < len; i++) crc = (uint16_t)(crc << 8) ^ crc16tab[((crc >> 8) ^ b[i]) & 0xff];
  return crc;
}

unsigned sl_cluster_key_slot(const char *key, size_t len) {
  const char *open = len ? memchr(key, '{', len) : NULL;
  if (open) {
    size_t after = len - (size_t)(open - key) - 1;
    const char *close = after ? memchr(open + 1, '}', after) : NULL;
    if (close && close > open + 1) { /* "{}" is no tag: the whole key hashes */
      key = open + 1;
      len = (size_t)(close - key);
    }
  }
  return sl_cluster_crc16(key, len) & (SL_CLUSTER_SLOTS - 1);
}

/* Calls fn(t, its slot, arg) for each candidate tag t in the fixed order
 * (sl_cluster_slot_tags) until fn returns nonzero. */
static void each_tag(int (*fn)(const char *t, unsigned slot, void *arg), void *arg) {
  static const char abc[] = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
  enum { N = sizeof(abc) - 1 };
  for (unsigned len = 1; len < SL_CLUSTER_TAG_SIZE; len++) {
    unsigned total = 1;
    for (unsigned i = 0; i < len; i++) total *= N;
    for (unsigned v = 0; v < total; v++) { /* v's digits in base N, most significant first */
      char t[SL_CLUSTER_TAG_SIZE] = {0};
      for (unsigned i = len, x = v; i-- > 0; x /= N) t[i] = abc[x % N];
      if (fn(t, sl_cluster_crc16(t, len) & (SL_CLUSTER_SLOTS - 1), arg)) return;
    }
  }
}

struct tags_fill {
  char (*tags)[SL_CLUSTER_TAG_SIZE];
  unsigned left;
};

static int fill_tag(const char *t, unsigned slot, void *arg) {
  struct tags_fill *f = arg;
  if (!f->tags[slot][0]) {
    memcpy(f->tags[slot], t, SL_CLUSTER_TAG_SIZE);
    f->left--;
  }
  return f->left == 0;
}

void sl_cluster_slot_tags(char (*tags)[SL_CLUSTER_TAG_SIZE]) {
  for (unsigned s = 0; s < SL_CLUSTER_SLOTS; s++) tags[s][0] = '\0';
  struct tags_fill f = {tags, SL_CLUSTER_SLOTS};
  each_tag(fill_tag, &f);
}

struct tag_find {
  unsigned slot;
  char *out;
};

static int find_tag(const char *t, unsigned slot, void *arg) {
  struct tag_find *f = arg;
  if (slot != f->slot) return 0;
  memcpy(f->out, t, SL_CLUSTER_TAG_SIZE);
  return 1;
}

void sl_cluster_slot_tag(unsigned slot, char tag[SL_CLUSTER_TAG_SIZE]) {
  tag[0] = '\0';
  struct tag_find f = {slot & (SL_CLUSTER_SLOTS - 1), tag};
  each_tag(find_tag, &f);
}

/* ---- parsing helpers ---- */

/* Whether s[0..n) may be a node's host: 1..255 bytes of letters, digits and
 * ". : % _ -" (IPv4, IPv6 without brackets and with a zone, host names). */
static int host_ok(const char *s, size_t n) {
  if (n == 0 || n >= SL_CLUSTER_HOST_MAX) return 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == ':' ||
          c == '%' || c == '_' || c == '-'))
      return 0;
  }
  return 1;
}

/* s[0..n) as a decimal of 1..5 digits not above max; -1 otherwise. */
static long dec(const char *s, size_t n, long max) {
  if (n == 0 || n > 5) return -1;
  long v = 0;
  for (size_t i = 0; i < n; i++) {
    if (s[i] < '0' || s[i] > '9') return -1;
    v = v * 10 + (s[i] - '0');
  }
  return v <= max ? v : -1;
}

__attribute__((format(printf, 4, 5))) static int fail(char *err, size_t cap, int rc, const char *fmt, ...) {
  if (cap) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, cap, fmt, ap);
    va_end(ap);
  }
  return rc;
}

/* ---- the slot map ---- */

/* Reads node n (a CLUSTER SLOTS [endpoint, port, id?, metadata?...]) into
 * host/port. Returns 0 or UV_EINVAL with err set. */
static int parse_node(const redisReply *n, const char *origin, const char *what, size_t entry, char *host,
                      int *port, char *err, size_t cap) {
  if (n->type != REDIS_REPLY_ARRAY || n->elements < 2)
    return fail(err, cap, UV_EINVAL, "range %zu: %s is not an array of endpoint, port, id", entry, what);
  const redisReply *h = n->element[0], *p = n->element[1];
  if (p->type != REDIS_REPLY_INTEGER || p->integer < 1 || p->integer > 65535)
    return fail(err, cap, UV_EINVAL, "range %zu: %s's port is not an integer in 1..65535", entry, what);
  if (n->elements > 2 && n->element[2]->type != REDIS_REPLY_STRING)
    return fail(err, cap, UV_EINVAL, "range %zu: %s's id is not a string", entry, what);
  const char *hs;
  size_t hl;
  if (h->type == REDIS_REPLY_NIL || (h->type == REDIS_REPLY_STRING && h->len == 0)) {
    /* unknown endpoint: the client uses the address it asked */
    if (origin == NULL)
      return fail(err, cap, UV_EINVAL, "range %zu: %s has no endpoint and the reply's origin is unknown", entry,
                  what);
    hs = origin;
    hl = strlen(origin);
  } else if (h->type == REDIS_REPLY_STRING) {
    hs = h->str;
    hl = h->len;
  } else {
    return fail(err, cap, UV_EINVAL, "range %zu: %s's endpoint is not a string", entry, what);
  }
  if (!host_ok(hs, hl))
    return fail(err, cap, UV_EINVAL, "range %zu: %s's endpoint '%.*s' is not a host", entry, what,
                (int)(hl < 64 ? hl : 64), hs);
  memcpy(host, hs, hl);
  host[hl] = '\0';
  *port = (int)p->integer;
  return 0;
}

int sl_cluster_map_find(const struct sl_cluster_map *m, const char *host, int port) {
  for (unsigned i = 0; i < m->nnodes; i++)
    if (m->nodes[i].port == port && !strcmp(m->nodes[i].host, host)) return (int)i;
  return -1;
}

int sl_cluster_map_parse(struct sl_cluster_map *m, const redisReply *r, const char *origin, char *err,
                         size_t errcap) {
  if (r == NULL) return fail(err, errcap, UV_EINVAL, "no reply");
  if (r->type == REDIS_REPLY_ERROR)
    return fail(err, errcap, UV_EINVAL, "error reply: %.*s", (int)(r->len < 200 ? r->len : 200), r->str);
  if (r->type != REDIS_REPLY_ARRAY) return fail(err, errcap, UV_EINVAL, "not an array (type %d)", r->type);
  if (r->elements == 0) return fail(err, errcap, UV_EINVAL, "no slot is served (an empty array)");
  /* built aside: the caller's map stays as it was unless all of r is sound */
  struct sl_cluster_map *t = sl_malloc(sizeof *t);
  t->nnodes = 0;
  memset(t->slot, SL_CLUSTER_NO_NODE, sizeof t->slot);
  char host[SL_CLUSTER_HOST_MAX];
  int port = 0, rc = 0;
  for (size_t i = 0; i < r->elements; i++) {
    const redisReply *e = r->element[i];
    if (e->type != REDIS_REPLY_ARRAY || e->elements < 3) {
      rc = fail(err, errcap, UV_EINVAL, "range %zu is not an array of start, end, master", i);
      goto err;
    }
    const redisReply *s = e->element[0], *x = e->element[1];
    if (s->type != REDIS_REPLY_INTEGER || x->type != REDIS_REPLY_INTEGER) {
      rc = fail(err, errcap, UV_EINVAL, "range %zu: start or end is not an integer", i);
      goto err;
    }
    if (s->integer < 0 || x->integer >= SL_CLUSTER_SLOTS || s->integer > x->integer) {
      rc = fail(err, errcap, UV_EINVAL, "range %zu: %lld-%lld is not a range of slots 0..16383", i, s->integer,
                x->integer);
      goto err;
    }
    for (size_t k = 3; k < e->elements; k++)
      if ((rc = parse_node(e->element[k], origin, "a replica", i, host, &port, err, errcap)) != 0) goto err;
    if ((rc = parse_node(e->element[2], origin, "the master", i, host, &port, err, errcap)) != 0) goto err;
    int idx = sl_cluster_map_find(t, host, port);
    if (idx < 0) {
      if (t->nnodes == SL_CLUSTER_MAX_NODES) {
        rc = fail(err, errcap, UV_ENOSPC, "more than %d masters", SL_CLUSTER_MAX_NODES);
        goto err;
      }
      idx = (int)t->nnodes++;
      memcpy(t->nodes[idx].host, host, strlen(host) + 1);
      t->nodes[idx].port = port;
      t->nodes[idx].replicas = 0;
    }
    if (e->elements - 3 > t->nodes[idx].replicas) t->nodes[idx].replicas = (unsigned)(e->elements - 3);
    for (long long k = s->integer; k <= x->integer; k++) {
      if (t->slot[k] != SL_CLUSTER_NO_NODE) {
        rc = fail(err, errcap, UV_EINVAL, "range %zu: slot %lld is in an earlier range too", i, k);
        goto err;
      }
      t->slot[k] = (uint8_t)idx;
    }
  }
  memcpy(m, t, sizeof *m);
err:
  free(t);
  return rc;
}

/* ---- errors ---- */

/* Whether s[0..len) is the word w followed by a space or the end. */
static int word_is(const char *s, size_t len, const char *w) {
  size_t n = strlen(w);
  return len >= n && !memcmp(s, w, n) && (len == n || s[n] == ' ');
}

enum sl_cluster_err sl_cluster_error_kind(const char *s, size_t len) {
  if (s == NULL) return SL_CLUSTER_ERR_OTHER;
  if (word_is(s, len, "MOVED")) return SL_CLUSTER_ERR_MOVED;
  if (word_is(s, len, "ASK")) return SL_CLUSTER_ERR_ASK;
  if (word_is(s, len, "TRYAGAIN")) return SL_CLUSTER_ERR_TRYAGAIN;
  if (word_is(s, len, "CLUSTERDOWN")) return SL_CLUSTER_ERR_CLUSTERDOWN;
  return SL_CLUSTER_ERR_OTHER;
}

int sl_cluster_parse_redirect(const char *s, size_t len, struct sl_cluster_redirect *out) {
  size_t w;
  if (len >= 6 && !memcmp(s, "MOVED ", 6)) {
    out->kind = SL_CLUSTER_ERR_MOVED;
    w = 6;
  } else if (len >= 4 && !memcmp(s, "ASK ", 4)) {
    out->kind = SL_CLUSTER_ERR_ASK;
    w = 4;
  } else {
    return UV_EINVAL;
  }
  const char *p = s + w, *end = s + len;
  const char *sp = memchr(p, ' ', (size_t)(end - p));
  long slot = sp ? dec(p, (size_t)(sp - p), SL_CLUSTER_SLOTS - 1) : -1;
  if (slot < 0) return UV_EINVAL;
  const char *ep = sp + 1; /* the endpoint: the rest */
  size_t en = (size_t)(end - ep);
  const char *h = ep, *colon;
  size_t hl;
  if (en && ep[0] == '[') { /* [V6]:PORT */
    const char *rb = memchr(ep, ']', en);
    if (rb == NULL || rb + 1 == end || rb[1] != ':') return UV_EINVAL;
    h = ep + 1;
    hl = (size_t)(rb - h);
    colon = rb + 1;
    if (hl == 0) return UV_EINVAL;
  } else { /* HOST:PORT or V6:PORT: the last colon */
    colon = NULL;
    for (const char *c = ep; c < end; c++)
      if (*c == ':') colon = c;
    if (colon == NULL) return UV_EINVAL;
    hl = (size_t)(colon - ep);
  }
  long port = dec(colon + 1, (size_t)(end - colon - 1), 65535);
  if (port < 1 || (hl && !host_ok(h, hl))) return UV_EINVAL;
  memcpy(out->host, h, hl);
  out->host[hl] = '\0';
  out->slot = (unsigned)slot;
  out->port = (int)port;
  return 0;
}

/* ---- grouping ---- */

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

void sl_cluster_group_sort(uint64_t *keys, size_t n) {
  if (n > 1) qsort(keys, n, sizeof *keys, cmp_u64);
}

size_t sl_cluster_group_end(const uint64_t *keys, size_t n, size_t from, int by_slot) {
  uint64_t mask = by_slot ? ~(uint64_t)0xffff : ~(uint64_t)0xffffffff; /* node and slot, or node only */
  size_t e = from + 1;
  while (e < n && (keys[e] & mask) == (keys[from] & mask)) e++;
  return e;
}

/* ---- key names ---- */

int sl_cluster_uid_key(char *out, size_t cap, int cluster, const char *head, size_t headlen, const char *uid,
                       size_t uidlen, const char *tail, size_t taillen) {
  if (cluster && (uidlen == 0 || memchr(uid, '{', uidlen) || memchr(uid, '}', uidlen) ||
                  (headlen && memchr(head, '{', headlen))))
    return UV_EINVAL;
  size_t tag = cluster ? 2 : 0;
  size_t n = headlen + uidlen + taillen + tag;
  if (n >= cap || n > 0x7fffffff) return UV_ENOSPC;
  char *o = out;
  if (headlen) memcpy(o, head, headlen), o += headlen;
  if (cluster) *o++ = '{';
  if (uidlen) memcpy(o, uid, uidlen), o += uidlen;
  if (cluster) *o++ = '}';
  if (taillen) memcpy(o, tail, taillen), o += taillen;
  *o = '\0';
  return (int)n;
}
