/* The helpers the parts of sluice-rate share: see driver.h. */
#include "driver.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "keys.h"
#include "rating.h"

void strv_push(struct strv *s, char *owned) {
  s->v = rate__grow(s->v, s->n, &s->cap, sizeof(*s->v));
  s->v[s->n++] = owned;
}

static char *xvformat(const char *fmt, va_list ap) {
  char *out;
  if (vasprintf(&out, fmt, ap) < 0) {
    fprintf(stderr, "sluice-rate: out of memory\n");
    abort();
  }
  return out;
}

char *xformat(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  char *s = xvformat(fmt, ap);
  va_end(ap);
  return s;
}

void strv_pushf(struct strv *s, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  strv_push(s, xvformat(fmt, ap));
  va_end(ap);
}

void strv_push_dec(struct strv *s, int64_t v) {
  char buf[RATE_DEC_MAX];
  size_t n = rate_dec_format(v, buf);
  strv_push(s, rate__xstrndup(buf, n));
}

void strv_push_money(struct strv *s, int64_t v) {
  char buf[RATE_DEC_MAX];
  size_t n = rate_money_format(v, buf);
  strv_push(s, rate__xstrndup(buf, n));
}

void strv_free(struct strv *s) {
  for (size_t i = 0; i < s->n; i++) free(s->v[i]);
  free(s->v);
  memset(s, 0, sizeof(*s));
}

int parse_opts(int argc, char **argv, int first, const struct opt_spec *specs, struct common_opts *co, int tz) {
  *co = (struct common_opts){.redis = "127.0.0.1:6379", .prefix = "sluice:"};
  for (int i = first; i < argc; i++) {
    const char *arg = argv[i], *val = NULL;
    size_t nlen = strlen(arg);
    const char *eq = strchr(arg, '=');
    if (strncmp(arg, "--", 2) == 0 && eq) {
      nlen = (size_t)(eq - arg);
      val = eq + 1;
    }
#define IS(name) (nlen == strlen(name) && strncmp(arg, name, nlen) == 0)
    if (IS("--help") || IS("-h")) return 1;
    const struct opt_spec *s = NULL;
    for (const struct opt_spec *p = specs; p && p->name; p++)
      if (IS(p->name)) s = p;
    const char *tzval = NULL;
    const char **dst = s ? s->val
                       : IS("--redis") ? &co->redis
                       : IS("--redis-prefix") ? &co->prefix
                       : tz && IS("--tz-offset-min") ? &tzval
                       : NULL;
#undef IS
    if (s && s->flag) {
      if (val) {
        fprintf(stderr, "sluice-rate: %.*s takes no value\n", (int)nlen, arg);
        return -1;
      }
      *s->flag = 1;
      continue;
    }
    if (dst == NULL) {
      fprintf(stderr, "sluice-rate: unknown option '%s'\n", arg);
      return -1;
    }
    if (val == NULL) {
      if (i + 1 == argc) {
        fprintf(stderr, "sluice-rate: %s needs a value\n", arg);
        return -1;
      }
      val = argv[++i];
    }
    *dst = val;
    if (dst == &tzval) {
      int64_t n;
      if (rate_int_parse(val, strlen(val), &n) != 0 || n <= -1440 || n >= 1440) {
        fprintf(stderr, "sluice-rate: --tz-offset-min '%s' is not a number of minutes in (-1440, 1440)\n", val);
        return -1;
      }
      co->tz_offset_min = (int)n;
    }
  }
  char err[300];
  if (sl_redis_url_parse(&co->url, co->redis, err, sizeof(err)) != 0) { /* sluice's own parser (addr.h) */
    fprintf(stderr, "sluice-rate: --%s\n", err);
    return -1;
  }
  return 0;
}

int has_nul(const redisReply *rep) { return strlen(rep->str) != rep->len; }

int suspended_member(struct rconn *k, const struct common_opts *co, const char *uid, int *member, char *err,
                     size_t errlen) {
  struct strv a = {0};
  strv_pushf(&a, "SISMEMBER");
  strv_pushf(&a, "%s" SL_KEY_SUSPENDED, co->prefix);
  strv_pushf(&a, "%s", uid);
  redisReply *rep = command(k, &a, err, errlen);
  strv_free(&a);
  if (rep == NULL) return -1;
  *member = rep->type == REDIS_REPLY_INTEGER && rep->integer == 1;
  freeReplyObject(rep);
  return 0;
}

/* Applies one outbox entry's op (fields kv: op, then the alert's pairs).
 * Returns 0 or -1 with err set. */
static int outbox_apply(struct rconn *k, const struct common_opts *co, const char *uid, const redisReply *kv,
                        char *err, size_t errlen) {
  if (kv->type != REDIS_REPLY_ARRAY || kv->elements < 2 || strcmp(kv->element[0]->str, "op") != 0) {
    snprintf(err, errlen, "an outbox entry of uid %s without its op: dropped", uid);
    fprintf(stderr, "sluice-rate: %s\n", err);
    return 0;
  }
  const char *op = kv->element[1]->str;
  struct strv a = {0};
  int publish = 0;
  if (strcmp(op, "alert") == 0) {
    strv_pushf(&a, "XADD");
    strv_pushf(&a, "%s" SL_KEY_ALERTS, co->prefix);
    strv_pushf(&a, "*");
    for (size_t i = 2; i < kv->elements; i++) strv_push(&a, rate__xstrndup(kv->element[i]->str, kv->element[i]->len));
  } else if (strcmp(op, "suspend") == 0 || strcmp(op, "lift") == 0) {
    strv_pushf(&a, "%s", op[0] == 's' ? "SADD" : "SREM");
    strv_pushf(&a, "%s" SL_KEY_SUSPENDED, co->prefix);
    strv_pushf(&a, "%s", uid);
    publish = 1;
  } else {
    fprintf(stderr, "sluice-rate: an outbox entry of uid %s has the unknown op '%s': dropped\n", uid, op);
    return 0;
  }
  redisReply *rep = command(k, &a, err, errlen);
  strv_free(&a);
  if (rep == NULL) return -1;
  freeReplyObject(rep);
  if (publish) { /* the proxies read the set again (SPEC 5) */
    strv_pushf(&a, "PUBLISH");
    strv_pushf(&a, "%s" SL_CHANNEL_CHANGES, co->prefix);
    strv_pushf(&a, "%s" SL_KEY_SUSPENDED, co->prefix);
    rep = command(k, &a, err, errlen);
    strv_free(&a);
    if (rep == NULL) return -1;
    freeReplyObject(rep);
  }
  return 0;
}

int outbox_drain(struct rconn *k, const struct common_opts *co, const char *uid, char *err, size_t errlen) {
  char *box = acct_key(co, SL_KEY_OUTBOX, uid, "");
  int ret = -1;
  for (;;) {
    struct strv a = {0};
    strv_pushf(&a, "XRANGE");
    strv_pushf(&a, "%s", box);
    strv_pushf(&a, "-");
    strv_pushf(&a, "+");
    strv_pushf(&a, "COUNT");
    strv_pushf(&a, "100");
    redisReply *rep = command(k, &a, err, errlen);
    strv_free(&a);
    if (rep == NULL) break;
    size_t n = rep->type == REDIS_REPLY_ARRAY ? rep->elements : 0;
    int bad = 0;
    for (size_t i = 0; i < n && !bad; i++) {
      const redisReply *e = rep->element[i];
      if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 || outbox_apply(k, co, uid, e->element[1], err, errlen)) {
        bad = 1;
        break;
      }
      /* Applied, then deleted: a crash in between applies it again (SADD /
       * SREM change nothing the second time; an alert is sent twice). */
      strv_pushf(&a, "XDEL");
      strv_pushf(&a, "%s", box);
      strv_push(&a, rate__xstrndup(e->element[0]->str, e->element[0]->len));
      redisReply *d = command(k, &a, err, errlen);
      strv_free(&a);
      if (d == NULL) bad = 1;
      else freeReplyObject(d);
    }
    freeReplyObject(rep);
    if (bad) break;
    if (n == 0) {
      ret = 0;
      break;
    }
  }
  free(box);
  return ret;
}
