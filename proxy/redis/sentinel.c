#include "sentinel.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>

/* At most 60 bytes of s, anything not printable ASCII shown as '?': reply
 * text from a peer goes into log lines and error messages. */
static const char *printable(char *out, size_t cap, const char *s, size_t n) {
  size_t i = 0;
  for (; i < n && i < 60 && i + 1 < cap; i++) out[i] = s[i] >= 0x20 && s[i] < 0x7f ? s[i] : '?';
  out[i] = '\0';
  return out;
}

static int is_str(const redisReply *r) { return r && (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS); }

/* A port's digits (1..65535) in s[0..n); 0 when they are not one. */
static int port_of(const char *s, size_t n) {
  long p = 0;
  if (n == 0 || n > 5) return 0;
  for (size_t i = 0; i < n; i++) {
    if (s[i] < '0' || s[i] > '9') return 0;
    p = p * 10 + (s[i] - '0');
  }
  return p >= 1 && p <= 65535 ? (int)p : 0;
}

static int set_host(struct sl_redis_hostport *out, const char *h, size_t hl, int port) {
  if (hl == 0 || hl >= sizeof(out->host) || memchr(h, '\0', hl)) return -1;
  memcpy(out->host, h, hl);
  out->host[hl] = '\0';
  out->port = port;
  return 0;
}

int sl_sentinel_master_reply(const redisReply *r, struct sl_redis_hostport *out, char *why, size_t whylen) {
  char w[64];
  if (!r) {
    snprintf(why, whylen, "no reply");
    return -1;
  }
  if (r->type == REDIS_REPLY_NIL) {
    snprintf(why, whylen, "the sentinel does not know the master");
    return -1;
  }
  if (r->type == REDIS_REPLY_ERROR) {
    snprintf(why, whylen, "the sentinel answered '%s'", printable(w, sizeof(w), r->str, r->len));
    return -1;
  }
  if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 || !is_str(r->element[0]) || !is_str(r->element[1])) {
    snprintf(why, whylen, "the sentinel's answer is not [ip, port] (not a sentinel?)");
    return -1;
  }
  int port = port_of(r->element[1]->str, r->element[1]->len);
  if (!port || set_host(out, r->element[0]->str, r->element[0]->len, port) != 0) {
    snprintf(why, whylen, "the sentinel named an unusable address");
    return -1;
  }
  return 0;
}

int sl_redis_role_reply(const redisReply *r, int *replicas, char *why, size_t whylen) {
  char w[64];
  if (r && r->type == REDIS_REPLY_ERROR) {
    snprintf(why, whylen, "ROLE answered '%s'", printable(w, sizeof(w), r->str, r->len));
    return -1;
  }
  if (!r || r->type != REDIS_REPLY_ARRAY || r->elements < 1 || !is_str(r->element[0])) {
    snprintf(why, whylen, "ROLE answered with a reply of another shape");
    return -1;
  }
  const redisReply *role = r->element[0];
  if (role->len == 6 && !strncasecmp(role->str, "master", 6)) {
    /* ["master", offset, [[ip, port, offset], ...]]: the replicas listed are the connected ones */
    if (r->elements < 3 || r->element[2]->type != REDIS_REPLY_ARRAY) {
      snprintf(why, whylen, "ROLE says master without its list of replicas");
      return -1;
    }
    *replicas = (int)r->element[2]->elements;
    return 1;
  }
  snprintf(why, whylen, "ROLE says %s", printable(w, sizeof(w), role->str, role->len));
  return 0;
}

int sl_sentinel_switch_msg(const redisReply *r, const char *master, struct sl_redis_hostport *out) {
  /* ["message", "+switch-master", "<name> <old ip> <old port> <new ip> <new port>"] */
  if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 3 || !is_str(r->element[0]) || !is_str(r->element[1]) ||
      !is_str(r->element[2]))
    return 0;
  if (r->element[0]->len != 7 || memcmp(r->element[0]->str, "message", 7)) return 0;
  size_t cl = strlen(SL_SENTINEL_SWITCH_CHANNEL);
  if (r->element[1]->len != cl || memcmp(r->element[1]->str, SL_SENTINEL_SWITCH_CHANNEL, cl)) return 0;
  const char *s = r->element[2]->str, *end = s + r->element[2]->len;
  const char *tok[5];
  size_t tl[5];
  int n = 0;
  for (const char *p = s; p < end && n < 6;) {
    const char *sp = memchr(p, ' ', (size_t)(end - p));
    if (!sp) sp = end;
    if (n == 5) return 0; /* a sixth word: not the format we know */
    tok[n] = p;
    tl[n++] = (size_t)(sp - p);
    p = sp + 1;
  }
  if (n != 5 || tl[0] != strlen(master) || memcmp(tok[0], master, tl[0])) return 0;
  int port = port_of(tok[4], tl[4]);
  if (!port) return 0;
  return set_host(out, tok[3], tl[3], port) == 0;
}

/* ---- sluice-rate's synchronous connect ---- */

static redisContext *open_one(const struct sl_redis_hostport *a, unsigned timeout_ms, char *err, size_t errlen) {
  struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};
  redisContext *c = a->port ? redisConnectWithTimeout(a->host, a->port, tv) : redisConnectUnixWithTimeout(a->host, tv);
  if (c == NULL || c->err) {
    if (a->port)
      snprintf(err, errlen, "cannot connect to %s:%d: %s", a->host, a->port, c ? c->errstr : "out of memory");
    else
      snprintf(err, errlen, "cannot connect to unix:%s: %s", a->host, c ? c->errstr : "out of memory");
    if (c) redisFree(c);
    return NULL;
  }
  redisSetTimeout(c, tv);
  return c;
}

/* The master sentinel s names, connected and checked; NULL with err. */
static redisContext *via_sentinel(const struct sl_redis_url *u, const struct sl_redis_hostport *s,
                                  unsigned timeout_ms, char *err, size_t errlen) {
  char why[200];
  redisContext *sc = open_one(s, timeout_ms, why, sizeof(why));
  if (!sc) {
    snprintf(err, errlen, "sentinel %s:%d: %s", s->host, s->port, why);
    return NULL;
  }
  redisReply *r = redisCommand(sc, "SENTINEL get-master-addr-by-name %s", u->master);
  struct sl_redis_hostport m;
  int bad = r ? sl_sentinel_master_reply(r, &m, why, sizeof(why)) : -1;
  if (!r) snprintf(why, sizeof(why), "%s", sc->errstr[0] ? sc->errstr : "connection lost");
  if (r) freeReplyObject(r);
  redisFree(sc);
  if (bad) {
    snprintf(err, errlen, "sentinel %s:%d, master '%s': %s", s->host, s->port, u->master, why);
    return NULL;
  }
  redisContext *c = open_one(&m, timeout_ms, why, sizeof(why));
  if (!c) {
    snprintf(err, errlen, "master '%s' (%s:%d, named by sentinel %s:%d): %s", u->master, m.host, m.port, s->host,
             s->port, why);
    return NULL;
  }
  int replicas;
  r = redisCommand(c, "ROLE");
  int role = r ? sl_redis_role_reply(r, &replicas, why, sizeof(why)) : -1;
  if (!r) snprintf(why, sizeof(why), "%s", c->errstr[0] ? c->errstr : "connection lost");
  if (r) freeReplyObject(r);
  if (role != 1) {
    snprintf(err, errlen, "master '%s' (%s:%d, named by sentinel %s:%d) is not a master: %s", u->master, m.host,
             m.port, s->host, s->port, why);
    redisFree(c);
    return NULL;
  }
  return c;
}

redisContext *sl_redis_connect_sync(const struct sl_redis_url *u, unsigned timeout_ms, char *err, size_t errlen) {
  if (u->kind == SL_REDIS_SERVER) return open_one(&u->server, timeout_ms, err, errlen);
  if (u->kind == SL_REDIS_CLUSTER) {
    snprintf(err, errlen, "a cluster:// URL names seeds, not one server (connect to each node instead)");
    return NULL;
  }
  for (unsigned i = 0; i < u->n_hosts; i++) {
    redisContext *c = via_sentinel(u, &u->hosts[i], timeout_ms, err, errlen);
    if (c) return c;
  }
  return NULL; /* err: the last sentinel's failure */
}
