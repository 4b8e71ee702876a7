/* sluice-rate: the daily rating job (SPEC section 8).
 *
 * Reads one ended day's usage from Redis, rates each account with rating.c
 * and applies each account's result with ONE Lua script (apply_lua), so an
 * account is billed all or nothing: the script refuses when the bill already
 * exists ("already") or when a package changed since it was read ("retry",
 * and the account is read and computed again, MAX_ATTEMPTS times at most).
 * A rerun after a crash therefore rates only the accounts not yet billed.
 * See docs/rating.md. Single-threaded; synchronous hiredis. */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <hiredis/hiredis.h>

#include "keys.h" /* proxy/redis/keys.h: the key names sluice shares */
#include "rating.h"

#define MAX_ATTEMPTS 5
#define CONNECT_TIMEOUT_S 5
#define COMMAND_TIMEOUT_S 30
#define EXIT_USAGE 2

/* KEYS: 1 bill hash, 2 alerts stream, 3 package list, 4.. the packages in
 * list order. ARGV: 1 uid, 2 day, 3 n packages, then 7 per package: id, the
 * four fields as read ("=value", or "!" when absent), the new remaining (""
 * when untouched), the quota for an alert ("" when none); then the bill's
 * field/value pairs. Every check comes before the first write, and no write
 * can fail on a type the checks have not seen, so the script changes all or
 * nothing. */
static const char apply_lua[] =
    "if redis.call('EXISTS', KEYS[1]) == 1 then return 'already' end\n"
    "local t = redis.call('TYPE', KEYS[2])['ok']\n"
    "if t ~= 'none' and t ~= 'stream' then\n"
    "  return redis.error_reply('ERR ' .. KEYS[2] .. ' is not a stream')\n"
    "end\n"
    "local n = tonumber(ARGV[3])\n"
    "local ids = redis.call('LRANGE', KEYS[3], 0, -1)\n"
    "if #ids ~= n then return 'retry' end\n"
    "for i = 1, n do\n"
    "  local a = 3 + (i - 1) * 7\n"
    "  if ids[i] ~= ARGV[a + 1] then return 'retry' end\n"
    "  local cur = redis.call('HMGET', KEYS[3 + i], '" SL_FIELD_QUOTA "', '" SL_FIELD_REMAINING "', '"
    SL_FIELD_PURCHASED_AT "', '" SL_FIELD_EXPIRES_AT "')\n"
    "  for j = 1, 4 do\n"
    "    local want = ARGV[a + 1 + j]\n"
    "    if cur[j] then\n"
    "      if want ~= '=' .. cur[j] then return 'retry' end\n"
    "    elseif want ~= '!' then return 'retry' end\n"
    "  end\n"
    "end\n"
    "for i = 1, n do\n"
    "  local a = 3 + (i - 1) * 7\n"
    "  if ARGV[a + 6] ~= '' then redis.call('HSET', KEYS[3 + i], '" SL_FIELD_REMAINING "', ARGV[a + 6]) end\n"
    "end\n"
    "local bill = {}\n"
    "for k = 4 + n * 7, #ARGV do bill[#bill + 1] = ARGV[k] end\n"
    "redis.call('HSET', KEYS[1], unpack(bill))\n"
    "for i = 1, n do\n"
    "  local a = 3 + (i - 1) * 7\n"
    "  if ARGV[a + 7] ~= '' then\n"
    "    redis.call('XADD', KEYS[2], '*', 'type', 'quota_low', 'uid', ARGV[1], 'package', ARGV[a + 1],\n"
    "                'remaining', ARGV[a + 6], 'quota', ARGV[a + 7], 'day', ARGV[2])\n"
    "  end\n"
    "end\n"
    "return 'ok'\n";

struct opts {
  const char *day;
  const char *redis; /* as given; host and port split out, port 0 for unix: */
  char host[256];
  int port;
  const char *prefix;
  int tz_offset_min;
  int dry_run, force;
};

/* A growable vector of owned NUL-terminated strings. */
struct strv {
  char **v;
  size_t n, cap;
};

static void strv_push(struct strv *s, char *owned) {
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

/* A newly allocated formatted string; the caller frees it. */
static char *xformat(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  char *s = xvformat(fmt, ap);
  va_end(ap);
  return s;
}

static void strv_pushf(struct strv *s, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  strv_push(s, xvformat(fmt, ap));
  va_end(ap);
}

static void strv_push_dec(struct strv *s, int64_t v) {
  char buf[RATE_DEC_MAX];
  size_t n = rate_dec_format(v, buf);
  strv_push(s, rate__xstrndup(buf, n));
}

static void strv_free(struct strv *s) {
  for (size_t i = 0; i < s->n; i++) free(s->v[i]);
  free(s->v);
  memset(s, 0, sizeof(*s));
}

/* A feature's coefficient as read once per run, so every account of the
 * run is rated with the same one. */
struct coef {
  char *feature;
  int err;      /* 0, or why the value cannot be used */
  char *raw;    /* the value as read (NULL: absent) */
  int64_t coef; /* micro-units */
};

struct rater {
  redisContext *c;
  const struct opts *o;
  int64_t day_start, day_end;
  struct coef *coefs;
  size_t ncoefs, coefs_cap;
  const char *interfere; /* test hook: SLUICE_RATE_TEST_BEFORE_APPLY */
  char err[512];         /* why the current account failed */
  unsigned rated, already, failed;
};

static void fail(struct rater *r, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(r->err, sizeof(r->err), fmt, ap);
  va_end(ap);
}

/* Runs one command (argv of NUL-terminated strings). Returns the reply, or
 * NULL with r->err set when the connection failed or Redis answered an
 * error. The caller frees the reply. */
static redisReply *command(struct rater *r, const struct strv *args) {
  redisReply *rep = redisCommandArgv(r->c, (int)args->n, (const char **)args->v, NULL);
  if (rep == NULL) {
    fail(r, "redis: %s", r->c->errstr[0] ? r->c->errstr : "connection lost");
    return NULL;
  }
  if (rep->type == REDIS_REPLY_ERROR) {
    fail(r, "redis: %s: %s", args->v[0], rep->str);
    freeReplyObject(rep);
    return NULL;
  }
  return rep;
}

/* command() with the arguments given inline, NULL-terminated. */
static redisReply *commandv(struct rater *r, const char *arg0, ...) {
  struct strv args = {0};
  va_list ap;
  va_start(ap, arg0);
  for (const char *a = arg0; a != NULL; a = va_arg(ap, const char *))
    strv_push(&args, rate__xstrndup(a, strlen(a)));
  va_end(ap);
  redisReply *rep = command(r, &args);
  strv_free(&args);
  return rep;
}

static int has_nul(const redisReply *rep) { return strlen(rep->str) != rep->len; }

/* The coefficient of `feature`, read on first use. Returns the entry. */
static const struct coef *coef_get(struct rater *r, const char *feature) {
  for (size_t i = 0; i < r->ncoefs; i++)
    if (strcmp(r->coefs[i].feature, feature) == 0) return &r->coefs[i];
  char *key = xformat("%s" SL_KEY_COEF "%s", r->o->prefix, feature);
  redisReply *rep = commandv(r, "GET", key, NULL);
  free(key);
  if (rep == NULL) return NULL; /* not cached: a later account tries again */
  r->coefs = rate__grow(r->coefs, r->ncoefs, &r->coefs_cap, sizeof(*r->coefs));
  struct coef *c = &r->coefs[r->ncoefs++];
  memset(c, 0, sizeof(*c));
  c->feature = rate__xstrndup(feature, strlen(feature));
  c->coef = RATE_SCALE;
  if (rep->type == REDIS_REPLY_STRING) {
    c->raw = rate__xstrndup(rep->str, rep->len);
    c->err = rate_dec_parse(rep->str, rep->len, &c->coef);
    if (c->err == 0 && c->coef < 0) c->err = -EDOM;
  }
  freeReplyObject(rep);
  return c;
}

/* Reads one account's usage, coefficients and packages into a. Returns 0,
 * or -1 with r->err set. */
static int read_account(struct rater *r, const char *uid, struct rate_account *a) {
  const char *p = r->o->prefix;
  int ret = -1;
  char *key = xformat("%s" SL_KEY_USAGE "%s:%s", p, r->o->day, uid);
  redisReply *rep = commandv(r, "HGETALL", key, NULL), *list = NULL;
  free(key);
  if (rep == NULL) goto err;
  for (size_t i = 0; i + 1 < rep->elements; i += 2) {
    const redisReply *f = rep->element[i], *v = rep->element[i + 1];
    int e = rate_account_add_usage(a, f->str, f->len, v->str, v->len);
    if (e != 0) {
      fail(r, "usage field '%s' = '%s': %s", f->str, v->str,
           e == -ERANGE ? "the sum of calls overflows" : "not a count of calls");
      goto err;
    }
  }
  for (size_t i = 0; i < a->nfeatures; i++) {
    const struct coef *c = coef_get(r, a->features[i].name);
    if (c == NULL) goto err;
    if (c->err != 0) {
      fail(r, "%s" SL_KEY_COEF "%s = '%s' is %s", p, c->feature, c->raw,
           c->err == -EDOM ? "negative" : c->err == -ERANGE ? "too large" : "not a decimal number");
      goto err;
    }
    a->features[i].coef = c->coef;
  }
  key = xformat("%s" SL_KEY_RESPKGS "%s", p, uid);
  list = commandv(r, "LRANGE", key, "0", "-1", NULL);
  free(key);
  if (list == NULL) goto err;
  /* One round trip for all the packages: pipeline the HMGETs. */
  for (size_t i = 0; i < list->elements; i++) {
    const redisReply *id = list->element[i];
    if (has_nul(id)) {
      fail(r, "%s" SL_KEY_RESPKGS "%s holds an id with a NUL byte", p, uid);
      goto err;
    }
    key = xformat("%s" SL_KEY_RESPKG "%s:%s", p, uid, id->str);
    const char *argv[] = {"HMGET", key, rate_pkg_fields[0], rate_pkg_fields[1], rate_pkg_fields[2],
                          rate_pkg_fields[3]};
    int e = redisAppendCommandArgv(r->c, 6, argv, NULL);
    free(key);
    if (e != REDIS_OK) {
      fail(r, "redis: %s", r->c->errstr);
      goto err;
    }
  }
  int bad = 0;
  for (size_t i = 0; i < list->elements; i++) {
    redisReply *h;
    if (redisGetReply(r->c, (void **)&h) != REDIS_OK) {
      fail(r, "redis: %s", r->c->errstr);
      goto err; /* the connection is broken: the other replies are lost anyway */
    }
    if (h->type == REDIS_REPLY_ERROR && !bad) {
      fail(r, "package %s: redis: %s", list->element[i]->str, h->str);
      bad = 1;
    } else if (h->type == REDIS_REPLY_ARRAY && h->elements == RATE_PF_N) {
      const char *raw[RATE_PF_N];
      for (int f = 0; f < RATE_PF_N; f++) {
        const redisReply *v = h->element[f];
        raw[f] = v->type == REDIS_REPLY_STRING ? v->str : NULL;
        if (raw[f] && has_nul(v) && !bad) {
          /* The apply script could never match it: fail rather than retry. */
          fail(r, "package %s: field %s holds a NUL byte", list->element[i]->str, rate_pkg_fields[f]);
          bad = 1;
        }
      }
      rate_account_add_pkg(a, list->element[i]->str, raw);
    }
    freeReplyObject(h);
  }
  if (bad) goto err;
  int e = rate_account_compute(a, r->day_start, r->day_end);
  if (e != 0) {
    fail(r, "%s", e == -ERANGE ? "overflow: the units do not fit 64-bit micro-units"
                               : "a coefficient is negative");
    goto err;
  }
  ret = 0;
err:
  if (list) freeReplyObject(list);
  if (rep) freeReplyObject(rep);
  return ret;
}

/* Runs the test hook once per run: the Redis command in
 * $SLUICE_RATE_TEST_BEFORE_APPLY (words split on spaces) just before the
 * first apply, so tests can change a package between read and apply. */
static void test_interfere(struct rater *r) {
  if (r->interfere == NULL) return;
  struct strv args = {0};
  char *copy = rate__xstrndup(r->interfere, strlen(r->interfere)), *save = NULL;
  for (char *w = strtok_r(copy, " ", &save); w; w = strtok_r(NULL, " ", &save))
    strv_push(&args, rate__xstrndup(w, strlen(w)));
  free(copy);
  r->interfere = NULL;
  if (args.n > 0) {
    redisReply *rep = command(r, &args);
    if (rep) freeReplyObject(rep);
  }
  strv_free(&args);
}

/* Applies a computed account with apply_lua. Returns the script's outcome;
 * RATE_FAILED with r->err set on errors. */
static enum rate_outcome apply_account(struct rater *r, const char *uid, const struct rate_account *a) {
  const char *p = r->o->prefix, *day = r->o->day;
  struct strv keys = {0}, args = {0};
  strv_pushf(&keys, "%s" SL_KEY_BILL "%s:%s", p, day, uid);
  strv_pushf(&keys, "%s" SL_KEY_ALERTS, p);
  strv_pushf(&keys, "%s" SL_KEY_RESPKGS "%s", p, uid);
  strv_pushf(&args, "%s", uid);
  strv_pushf(&args, "%s", day);
  strv_pushf(&args, "%zu", a->npkgs);
  for (size_t i = 0; i < a->npkgs; i++) {
    const struct rate_pkg *k = &a->pkgs[i];
    strv_pushf(&keys, "%s" SL_KEY_RESPKG "%s:%s", p, uid, k->id);
    strv_pushf(&args, "%s", k->id);
    for (int f = 0; f < RATE_PF_N; f++)
      strv_push(&args, k->raw[f] ? xformat("=%s", k->raw[f]) : xformat("!"));
    if (k->drawn > 0) strv_push_dec(&args, k->remaining_after);
    else strv_pushf(&args, "%s", "");
    if (k->alert) strv_push_dec(&args, k->quota);
    else strv_pushf(&args, "%s", "");
  }
  /* The bill. */
  strv_pushf(&args, "day");
  strv_pushf(&args, "%s", day);
  strv_pushf(&args, "tz_offset_min");
  strv_pushf(&args, "%d", r->o->tz_offset_min);
  strv_pushf(&args, "rated_at");
  strv_pushf(&args, "%lld", (long long)time(NULL));
  strv_pushf(&args, "units_total");
  strv_push_dec(&args, a->units_total);
  strv_pushf(&args, "units_from_packages");
  strv_push_dec(&args, a->units_from_packages);
  strv_pushf(&args, "payg_units");
  strv_push_dec(&args, a->payg_units);
  for (size_t i = 0; i < a->nfeatures; i++) {
    const struct rate_feature *f = &a->features[i];
    strv_pushf(&args, "calls:%s", f->name);
    strv_pushf(&args, "%" PRId64, f->calls);
    strv_pushf(&args, "coef:%s", f->name);
    strv_push_dec(&args, f->coef);
    strv_pushf(&args, "units:%s", f->name);
    strv_push_dec(&args, f->units);
    strv_pushf(&args, "units_from_packages:%s", f->name);
    strv_push_dec(&args, f->from_packages);
    strv_pushf(&args, "payg_units:%s", f->name);
    strv_push_dec(&args, f->payg_units);
    strv_pushf(&args, "payg_calls:%s", f->name);
    strv_push_dec(&args, f->payg_calls);
  }
  for (size_t i = 0; i < a->npkgs; i++) {
    if (a->pkgs[i].drawn == 0) continue;
    strv_pushf(&args, "drawn:%s", a->pkgs[i].id);
    strv_push_dec(&args, a->pkgs[i].drawn);
  }

  struct strv eval = {0};
  strv_pushf(&eval, "EVAL");
  strv_pushf(&eval, "%s", apply_lua);
  strv_pushf(&eval, "%zu", keys.n);
  for (size_t i = 0; i < keys.n; i++) strv_push(&eval, keys.v[i]);
  for (size_t i = 0; i < args.n; i++) strv_push(&eval, args.v[i]);
  keys.n = args.n = 0; /* their strings now belong to eval */
  strv_free(&keys);
  strv_free(&args);

  test_interfere(r);
  enum rate_outcome o = RATE_FAILED;
  redisReply *rep = command(r, &eval);
  if (rep != NULL) {
    if (rep->type == REDIS_REPLY_STRING || rep->type == REDIS_REPLY_STATUS)
      o = rate_outcome_parse(rep->str, rep->len);
    if (o == RATE_FAILED) fail(r, "unexpected reply from the apply script");
    freeReplyObject(rep);
  }
  strv_free(&eval);
  return o;
}

struct job {
  struct rater *r;
  const char *uid;
  struct rate_account acct;
};

/* One attempt at an account, for rate_attempts: read, compute, apply. */
static enum rate_outcome attempt(void *arg, unsigned n) {
  struct job *j = arg;
  struct rater *r = j->r;
  rate_account_free(&j->acct);
  if (read_account(r, j->uid, &j->acct) != 0) return RATE_FAILED;
  if (r->o->dry_run) return RATE_RATED;
  enum rate_outcome o = apply_account(r, j->uid, &j->acct);
  if (o == RATE_RETRY) {
    fail(r, "its packages changed between read and apply in each of %u attempts", n);
    fprintf(stderr, "sluice-rate: uid=%s: a package changed while rating; computing again\n", j->uid);
  }
  return o;
}

/* Rates one account and reports it: a line on stdout, notes and reasons on
 * stderr. */
static void rate_one(struct rater *r, const char *uid) {
  struct job j = {.r = r, .uid = uid};
  rate_account_init(&j.acct);
  r->err[0] = '\0';
  enum rate_outcome o;
  char *key = xformat("%s" SL_KEY_BILL "%s:%s", r->o->prefix, r->o->day, uid);
  redisReply *rep = commandv(r, "EXISTS", key, NULL);
  free(key);
  if (rep == NULL) {
    o = RATE_FAILED;
  } else {
    o = rep->type == REDIS_REPLY_INTEGER && rep->integer == 1 ? RATE_ALREADY : RATE_RETRY;
    freeReplyObject(rep);
    if (o == RATE_RETRY) o = rate_attempts(attempt, &j, MAX_ATTEMPTS);
  }
  const struct rate_account *a = &j.acct;
  if (o == RATE_RATED) {
    for (size_t i = 0; i < a->npkgs; i++) {
      const struct rate_pkg *k = &a->pkgs[i];
      if (k->state == RATE_PKG_MISSING || k->state == RATE_PKG_MALFORMED ||
          k->state == RATE_PKG_DUPLICATE || k->state == RATE_PKG_EXHAUSTED)
        fprintf(stderr, "sluice-rate: uid=%s: package %s skipped (%s)\n", uid, k->id,
                rate_pkg_state_name(k->state));
      if (k->alert)
        fprintf(stderr, "sluice-rate: uid=%s: package %s fell under 10%% of its quota%s\n", uid, k->id,
                r->o->dry_run ? " (dry run: no alert sent)" : "");
    }
    char t[RATE_DEC_MAX], f[RATE_DEC_MAX], g[RATE_DEC_MAX];
    rate_dec_format(a->units_total, t);
    rate_dec_format(a->units_from_packages, f);
    rate_dec_format(a->payg_units, g);
    printf("uid=%s status=%s units_total=%s units_from_packages=%s payg_units=%s\n", uid,
           r->o->dry_run ? "dry_run" : "rated", t, f, g);
    r->rated++;
  } else if (o == RATE_ALREADY) {
    printf("uid=%s status=already_rated\n", uid);
    fprintf(stderr, "sluice-rate: uid=%s: already rated for %s, skipped\n", uid, r->o->day);
    r->already++;
  } else {
    printf("uid=%s status=failed\n", uid);
    fprintf(stderr, "sluice-rate: uid=%s: not rated: %s\n", uid, r->err[0] ? r->err : "unknown error");
    r->failed++;
  }
  fflush(stdout);
  rate_account_free(&j.acct);
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* The day's UIDs, sorted and unique, from SSCAN of P usage:<day>. Returns 0
 * or -1 with r->err set. */
static int read_uids(struct rater *r, struct strv *uids) {
  char *key = xformat("%s" SL_KEY_USAGE "%s", r->o->prefix, r->o->day);
  char cursor[32] = "0";
  int ret = -1;
  do {
    redisReply *rep = commandv(r, "SSCAN", key, cursor, "COUNT", "1000", NULL);
    if (rep == NULL) goto err;
    if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 2) {
      fail(r, "unexpected SSCAN reply");
      freeReplyObject(rep);
      goto err;
    }
    snprintf(cursor, sizeof(cursor), "%s", rep->element[0]->str);
    const redisReply *m = rep->element[1];
    for (size_t i = 0; i < m->elements; i++) {
      if (has_nul(m->element[i])) {
        fprintf(stderr, "sluice-rate: a UID in %s has a NUL byte: skipped\n", key);
        continue;
      }
      strv_push(uids, rate__xstrndup(m->element[i]->str, m->element[i]->len));
    }
    freeReplyObject(rep);
  } while (strcmp(cursor, "0") != 0);
  /* SSCAN may return a member twice. */
  qsort(uids->v, uids->n, sizeof(*uids->v), cmp_str);
  size_t w = 0;
  for (size_t i = 0; i < uids->n; i++) {
    if (w > 0 && strcmp(uids->v[w - 1], uids->v[i]) == 0) free(uids->v[i]);
    else uids->v[w++] = uids->v[i];
  }
  uids->n = w;
  ret = 0;
err:
  free(key);
  return ret;
}

static void usage(FILE *f) {
  fprintf(f,
          "usage: sluice-rate --day yyyymmdd [options]\n"
          "Rates one ended day: draws each account's usage from its resource packages,\n"
          "writes P bill:<day>:<uid>, updates the packages and sends quota alerts.\n"
          "  --day yyyymmdd        the day to rate (required)\n"
          "  --redis HOST:PORT     or unix:PATH (default 127.0.0.1:6379)\n"
          "  --redis-prefix P      key prefix (default sluice:)\n"
          "  --tz-offset-min N     billing time zone, minutes east of UTC (default 0)\n"
          "  --dry-run             compute and print, write nothing\n"
          "  --force               rate a day that has not ended yet\n"
          "  --help                this text\n"
          "Exit status: 0 every account rated or already rated, 1 an account failed or\n"
          "Redis is unreachable, 2 usage error.\n");
}

/* Parses the command line. Returns 0, 1 when --help was given, or -1 after
 * printing the error. */
static int parse_args(int argc, char **argv, struct opts *o) {
  *o = (struct opts){.redis = "127.0.0.1:6379", .prefix = "sluice:"};
  for (int i = 1; i < argc; i++) {
    const char *arg = argv[i], *val = NULL;
    size_t nlen = strlen(arg);
    const char *eq = strchr(arg, '=');
    if (strncmp(arg, "--", 2) == 0 && eq) {
      nlen = (size_t)(eq - arg);
      val = eq + 1;
    }
#define IS(name) (nlen == sizeof(name) - 1 && strncmp(arg, name, nlen) == 0)
    if (IS("--help") || IS("-h")) return 1;
    if (IS("--dry-run") || IS("--force")) {
      if (val) {
        fprintf(stderr, "sluice-rate: %.*s takes no value\n", (int)nlen, arg);
        return -1;
      }
      if (IS("--dry-run")) o->dry_run = 1;
      else o->force = 1;
      continue;
    }
    const char **dst = IS("--day") ? &o->day
                       : IS("--redis") ? &o->redis
                       : IS("--redis-prefix") ? &o->prefix
                       : NULL;
    int tz = IS("--tz-offset-min");
#undef IS
    if (dst == NULL && !tz) {
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
    if (dst) {
      *dst = val;
      continue;
    }
    int64_t n;
    if (rate_int_parse(val, strlen(val), &n) != 0 || n <= -1440 || n >= 1440) {
      fprintf(stderr, "sluice-rate: --tz-offset-min '%s' is not a number of minutes in (-1440, 1440)\n", val);
      return -1;
    }
    o->tz_offset_min = (int)n;
  }
  if (o->day == NULL) {
    fprintf(stderr, "sluice-rate: --day yyyymmdd is required\n");
    return -1;
  }
  if (strncmp(o->redis, "unix:", 5) == 0 && o->redis[5] != '\0') return 0;
  const char *colon = strrchr(o->redis, ':');
  int64_t port;
  size_t hl = colon ? (size_t)(colon - o->redis) : 0;
  const char *h = o->redis;
  if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') h++, hl -= 2; /* [::1]:6379 */
  if (hl == 0 || hl >= sizeof(o->host) || rate_int_parse(colon + 1, strlen(colon + 1), &port) != 0 ||
      port < 1 || port > 65535) {
    fprintf(stderr, "sluice-rate: --redis '%s' is neither HOST:PORT nor unix:PATH\n", o->redis);
    return -1;
  }
  memcpy(o->host, h, hl);
  o->host[hl] = '\0';
  o->port = (int)port;
  return 0;
}

/* Connects to Redis at the address parse_args checked. Returns the
 * context, or NULL after printing why. */
static redisContext *connect_redis(const struct opts *o) {
  struct timeval tv = {.tv_sec = CONNECT_TIMEOUT_S};
  redisContext *c = o->port ? redisConnectWithTimeout(o->host, o->port, tv)
                            : redisConnectUnixWithTimeout(o->redis + 5, tv);
  if (c == NULL || c->err) {
    fprintf(stderr, "sluice-rate: cannot connect to Redis at %s: %s\n", o->redis,
            c ? c->errstr : "out of memory");
    if (c) redisFree(c);
    return NULL;
  }
  struct timeval ct = {.tv_sec = COMMAND_TIMEOUT_S};
  redisSetTimeout(c, ct);
  return c;
}

int main(int argc, char **argv) {
  struct opts o;
  int a = parse_args(argc, argv, &o);
  if (a == 1) {
    usage(stdout);
    return 0;
  }
  if (a < 0) {
    usage(stderr);
    return EXIT_USAGE;
  }
  struct rater r = {.o = &o, .interfere = getenv("SLUICE_RATE_TEST_BEFORE_APPLY")};
  if (rate_day_bounds(o.day, o.tz_offset_min, &r.day_start, &r.day_end) != 0) {
    fprintf(stderr, "sluice-rate: --day '%s' is not a date yyyymmdd (from 19700101)\n", o.day);
    return EXIT_USAGE;
  }
  time_t now = time(NULL);
  if (now < r.day_end && !o.force) {
    time_t end = (time_t)r.day_end;
    struct tm tm;
    char when[64];
    gmtime_r(&end, &tm);
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
    fprintf(stderr,
            "sluice-rate: day %s has not ended yet in the billing time zone (UTC%c%02d:%02d): it ends at "
            "%s; give --force to rate it anyway\n",
            o.day, o.tz_offset_min < 0 ? '-' : '+', abs(o.tz_offset_min) / 60, abs(o.tz_offset_min) % 60, when);
    return EXIT_USAGE;
  }
  r.c = connect_redis(&o);
  if (r.c == NULL) return 1;

  int status = 1;
  struct strv uids = {0};
  if (read_uids(&r, &uids) != 0) {
    fprintf(stderr, "sluice-rate: cannot read the accounts of %s: %s\n", o.day, r.err);
    goto out;
  }
  size_t i;
  for (i = 0; i < uids.n && r.c->err == 0; i++) rate_one(&r, uids.v[i]);
  if (i < uids.n) {
    fprintf(stderr, "sluice-rate: Redis connection lost (%s): %zu accounts not rated; run again to rate them\n",
            r.c->errstr, uids.n - i);
    r.failed += (unsigned)(uids.n - i);
  }
  fprintf(stderr, "sluice-rate: day %s: %zu accounts: %u %s, %u already rated, %u failed\n", o.day, uids.n,
          r.rated, o.dry_run ? "computed (dry run)" : "rated", r.already, r.failed);
  status = r.failed ? 1 : 0;
out:
  strv_free(&uids);
  for (size_t k = 0; k < r.ncoefs; k++) {
    free(r.coefs[k].feature);
    free(r.coefs[k].raw);
  }
  free(r.coefs);
  redisFree(r.c);
  return status;
}
