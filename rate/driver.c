/* The helpers the parts of sluice-rate share: see driver.h. */
#include "driver.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

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

redisContext *connect_redis(const struct common_opts *co) {
  char err[600];
  /* Sentinel: the master the sentinels name, checked with ROLE (sentinel.h) */
  redisContext *c = sl_redis_connect_sync(&co->url, CONNECT_TIMEOUT_S * 1000, err, sizeof(err));
  if (c == NULL) {
    fprintf(stderr, "sluice-rate: cannot connect to Redis at %s: %s\n", co->redis, err);
    return NULL;
  }
  struct timeval ct = {.tv_sec = COMMAND_TIMEOUT_S};
  redisSetTimeout(c, ct);
  return c;
}

redisReply *command(redisContext *c, const struct strv *args, char *err, size_t errlen) {
  redisReply *rep = redisCommandArgv(c, (int)args->n, (const char **)args->v, NULL);
  if (rep == NULL) {
    snprintf(err, errlen, "redis: %s", c->errstr[0] ? c->errstr : "connection lost");
    return NULL;
  }
  if (rep->type == REDIS_REPLY_ERROR) {
    snprintf(err, errlen, "redis: %s: %s", args->v[0], rep->str);
    freeReplyObject(rep);
    return NULL;
  }
  return rep;
}

int has_nul(const redisReply *rep) { return strlen(rep->str) != rep->len; }
