/* sluice-rate: the rating job and the billing loop (SPEC section 8).
 *
 * `--day D` rates one ended day, `--due` every ended day not yet rated (and
 * re-examines the last few rated ones for late usage); `topup` (topup.c)
 * and `statement` (statement.c) are the rest of the loop.
 *
 * Rating one account: one pipelined round trip reads its usage, its bill
 * (if any), its package list, balance and alert threshold; one more reads
 * its packages; rating.c computes what is new since the bill (all of the
 * usage when there is none: late usage becomes an adjustment); one Lua
 * script (apply_lua) writes the bill, the packages, the balance, the
 * suspension and the alerts, all or nothing, after checking that nothing it
 * read has changed ("retry": read and compute again, MAX_ATTEMPTS at most).
 * On a Redis Cluster the script touches only the account's slot and leaves
 * the alerts and the suspended set's change in the account's outbox, drained
 * after it (outbox_drain). See docs/rating.md. Single-threaded; synchronous
 * hiredis (rconn.c). */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <hiredis/hiredis.h>

#include "driver.h"
#include "keys.h" /* proxy/redis/keys.h: the key names sluice shares */
#include "rating.h"

#define MAX_ATTEMPTS 5
#define BILL_FORMAT "2"        /* bills with per-service lines and a usage snapshot */
#define DUE_LOOKBACK_DAYS 0    /* --due: every day with usage (SCAN); N > 0: N days back at most */
#define DUE_RECHECK_DAYS 3     /* --due re-examines the last rated days for late usage */
#define DUE_GRACE_HOURS 10

/* KEYS: 1 bill, 2 alerts stream, 3 package set or list, 4 balance,
 * 5 suspended set, 6 suspension hash, 7.. the packages. In a Redis Cluster
 * (SPEC 10) every key must be in the account's slot: 2 and 5 are then both
 * the account's outbox stream (P outbox:{uid}), where the script leaves
 * what it would write to the global keys (op alert: the alert's fields;
 * op suspend), for the driver to apply after it (outbox_drain).
 * ARGV: 1 uid, 2 day, 3 the bill's rev as read ("" when there was no bill),
 * 4 the balance as read ("=value", "!" when absent), 5 the new balance,
 * 6 now (unix seconds), 7 the changes channel (one server), or in a cluster
 * '1' / '0': whether the UID was in P suspended when last read (the script
 * cannot read that set there), 8 n packages; then 6 per
 * package: id, its four fields as read ("=value" or "!"), the new remaining
 * ("" when untouched); then n alerts and 4 per alert: package, remaining,
 * quota, threshold; then 3 for late usage (units, amount, calls; "" when
 * this is no adjustment); then the bill's field/value pairs.
 * Every check comes before the first write, and no write can fail on a type
 * the checks have not seen, so the script changes all or nothing. A
 * negative balance suspends the account for overdue unless it is suspended
 * already (whatever the reason: a manual suspension keeps its reason). */
static const char apply_lua[] =
    "local cl = ARGV[7] == '0' or ARGV[7] == '1'\n"
    "local rev = ARGV[3]\n"
    "if rev == '' then\n"
    "  if redis.call('EXISTS', KEYS[1]) == 1 then return 'retry' end\n"
    "elseif redis.call('HGET', KEYS[1], 'rev') ~= rev then return 'retry' end\n"
    "local function want(k, ok1, ok2)\n"
    "  local t = redis.call('TYPE', KEYS[k])['ok']\n"
    "  if t ~= 'none' and t ~= ok1 and t ~= ok2 then\n"
    "    return redis.error_reply('ERR ' .. KEYS[k] .. ' is a ' .. t .. ', not a ' .. ok1)\n"
    "  end\n"
    "end\n"
    "local e = want(2, 'stream') or want(5, cl and 'stream' or 'set') or want(6, 'hash') or want(4, 'string')\n"
    "if e then return e end\n"
    "local b = redis.call('GET', KEYS[4])\n"
    "if (b and ('=' .. b) or '!') ~= ARGV[4] then return 'retry' end\n"
    "local t = redis.call('TYPE', KEYS[3])['ok']\n"
    "local ids = {}\n"
    "if t == 'set' then ids = redis.call('SMEMBERS', KEYS[3])\n"
    "elseif t == 'list' then ids = redis.call('LRANGE', KEYS[3], 0, -1)\n"
    "elseif t ~= 'none' then return redis.error_reply('ERR ' .. KEYS[3] .. ' is neither a set nor a list') end\n"
    "local n = tonumber(ARGV[8])\n"
    "local seen, distinct = {}, 0\n"
    "for _, id in ipairs(ids) do if not seen[id] then seen[id] = true; distinct = distinct + 1 end end\n"
    "if distinct ~= n then return 'retry' end\n"
    "for i = 1, n do\n"
    "  local a = 8 + (i - 1) * 6\n"
    "  if not seen[ARGV[a + 1]] then return 'retry' end\n"
    "  local cur = redis.call('HMGET', KEYS[6 + i], '" SL_FIELD_QUOTA "', '" SL_FIELD_REMAINING "', '"
    SL_FIELD_PURCHASED_AT "', '" SL_FIELD_EXPIRES_AT "')\n"
    "  for j = 1, 4 do\n"
    "    if (cur[j] and ('=' .. cur[j]) or '!') ~= ARGV[a + 1 + j] then return 'retry' end\n"
    "  end\n"
    "end\n"
    /* Writes. */
    "for i = 1, n do\n"
    "  local a = 8 + (i - 1) * 6\n"
    "  if ARGV[a + 6] ~= '' then redis.call('HSET', KEYS[6 + i], '" SL_FIELD_REMAINING "', ARGV[a + 6]) end\n"
    "end\n"
    "local k = 9 + n * 6\n"
    "local nalerts = tonumber(ARGV[k])\n"
    "local late = k + 1 + nalerts * 4\n"
    "local bill = {}\n"
    "for j = late + 3, #ARGV do bill[#bill + 1] = ARGV[j] end\n"
    "redis.call('HSET', KEYS[1], unpack(bill))\n"
    "redis.call('SET', KEYS[4], ARGV[5])\n"
    "local function alert(...)\n"
    "  if cl then redis.call('XADD', KEYS[2], '*', 'op', 'alert', ...)\n"
    "  else redis.call('XADD', KEYS[2], '*', ...) end\n"
    "end\n"
    "for j = 1, nalerts do\n"
    "  local a = k + 1 + (j - 1) * 4\n"
    "  alert('type', 'quota_low', 'uid', ARGV[1], 'package', ARGV[a], 'remaining', ARGV[a + 1], 'quota', ARGV[a + 2],\n"
    "        'threshold_pct', ARGV[a + 3], 'day', ARGV[2])\n"
    "end\n"
    "if ARGV[late] ~= '' then\n"
    "  alert('type', 'late_usage', 'uid', ARGV[1], 'day', ARGV[2], 'calls', ARGV[late + 2], 'units', ARGV[late],\n"
    "        'amount', ARGV[late + 1])\n"
    "end\n"
    "local member\n"
    "if cl then member = ARGV[7] == '1' else member = redis.call('SISMEMBER', KEYS[5], ARGV[1]) == 1 end\n"
    "if string.sub(ARGV[5], 1, 1) == '-' and not member then\n"
    "  redis.call('DEL', KEYS[6])\n"
    "  redis.call('HSET', KEYS[6], '" SL_FIELD_REASON "', '" SL_REASON_OVERDUE "', '" SL_FIELD_SINCE "', ARGV[6],\n"
    "              'day', ARGV[2], 'balance', ARGV[5])\n"
    "  if cl then redis.call('XADD', KEYS[5], '*', 'op', 'suspend')\n"
    "  else\n"
    "    redis.call('SADD', KEYS[5], ARGV[1])\n"
    "    redis.call('PUBLISH', ARGV[7], KEYS[5])\n"
    "  end\n"
    "  return 'suspended'\n"
    "end\n"
    "return 'ok'\n";

/* A coefficient and a price of one name (a service or a feature), read
 * once per run so that every account of a run is rated with the same. */
struct named {
  char *name;
  char *raw[2]; /* coef:<name>, price:<name> as read; NULL: absent */
  int err[2];   /* 0, or why the value cannot be used */
  int64_t v[2]; /* micro-units */
};
enum { N_COEF, N_PRICE };

struct run {
  struct rconn *c;
  struct common_opts co;
  const char *day;
  int64_t day_start, day_end, now;
  int dry_run, due;
  char sha[48]; /* the apply script's SHA1 once loaded */
  struct named *names;
  size_t nnames, names_cap;
  const char *interfere; /* test hook: SLUICE_RATE_TEST_BEFORE_APPLY */
  char err[512];         /* why the current account failed */
  unsigned rated, adjusted, already, failed, suspended;
};

static void fail(struct run *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail(struct run *r, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(r->err, sizeof(r->err), fmt, ap);
  va_end(ap);
}

/* field/value pairs of an HGETALL reply, looked up linearly (an account's
 * usage and bill hold tens of fields). */
static const redisReply *hget(const redisReply *h, const char *field) {
  if (h == NULL || h->type != REDIS_REPLY_ARRAY) return NULL;
  for (size_t i = 0; i + 1 < h->elements; i += 2)
    if (strcmp(h->element[i]->str, field) == 0) return h->element[i + 1];
  return NULL;
}

/* <prefix><name><day>:<uid> (usage, bill), the UID in braces in a cluster.
 * The caller frees it. */
static char *day_key(const struct run *r, const char *name, const char *uid) {
  char *head = xformat("%s%s:", name, r->day);
  char *k = acct_key(&r->co, head, uid, "");
  free(head);
  return k;
}

/* <prefix>respkg:<uid>:<id>, the UID in braces in a cluster. */
static char *pkg_key(const struct run *r, const char *uid, const char *id) {
  char *tail = xformat(":%s", id);
  char *k = acct_key(&r->co, SL_KEY_RESPKG, uid, tail);
  free(tail);
  return k;
}

/* The entry of `name`, read on first use (two GETs pipelined). Returns
 * NULL with r->err set when Redis fails. */
static const struct named *named_get(struct run *r, const char *name) {
  for (size_t i = 0; i < r->nnames; i++)
    if (strcmp(r->names[i].name, name) == 0) return &r->names[i];
  static const char *const kp[2] = {SL_KEY_COEF, SL_KEY_PRICE};
  for (int k = 0; k < 2; k++) {
    char *key = xformat("%s%s%s", r->co.prefix, kp[k], name);
    const char *argv[] = {"GET", key};
    rconn_append(r->c, 2, argv);
    free(key);
  }
  redisReply *rep[2] = {NULL, NULL};
  for (int k = 0; k < 2; k++) {
    if (rconn_get_reply(r->c, &rep[k]) != REDIS_OK) {
      fail(r, "redis: %s", rconn_errstr(r->c));
      if (k) freeReplyObject(rep[0]);
      return NULL;
    }
  }
  r->names = rate__grow(r->names, r->nnames, &r->names_cap, sizeof(*r->names));
  struct named *n = &r->names[r->nnames++];
  memset(n, 0, sizeof(*n));
  n->name = rate__xstrndup(name, strlen(name));
  for (int k = 0; k < 2; k++) {
    if (rep[k]->type == REDIS_REPLY_STRING) {
      n->raw[k] = rate__xstrndup(rep[k]->str, rep[k]->len);
      n->err[k] = rate_dec_parse(rep[k]->str, rep[k]->len, &n->v[k]);
      if (n->err[k] == 0 && n->v[k] < 0) n->err[k] = -EDOM;
    } else if (rep[k]->type == REDIS_REPLY_ERROR) {
      n->raw[k] = rate__xstrndup(rep[k]->str, rep[k]->len);
      n->err[k] = -EPROTO;
    }
    freeReplyObject(rep[k]);
  }
  return n;
}

/* Sets an item's coefficient and price: <service> first, else <feature>.
 * Returns 0, or -1 with r->err set. */
static int item_rates(struct run *r, struct rate_item *it) {
  const struct named *byname[2] = {NULL, NULL};
  int has_service = strcmp(it->service, RATE_NO_SERVICE) != 0;
  if (has_service && (byname[0] = named_get(r, it->service)) == NULL) return -1;
  if ((byname[1] = named_get(r, it->feature)) == NULL) return -1;
  static const char *const what[2] = {SL_KEY_COEF, SL_KEY_PRICE};
  for (int k = 0; k < 2; k++) {
    const struct named *n = byname[0] && byname[0]->raw[k] ? byname[0] : byname[1]->raw[k] ? byname[1] : NULL;
    if (n == NULL) continue;
    if (n->err[k]) {
      fail(r, "%s%s%s = '%s' is %s", r->co.prefix, what[k], n->name, n->raw[k],
           n->err[k] == -EDOM ? "negative" : n->err[k] == -ERANGE ? "too large"
           : n->err[k] == -EPROTO ? "not a string" : "not a decimal number");
      return -1;
    }
    if (k == N_COEF) {
      it->coef = n->v[k];
      it->coef_default = 0;
    } else {
      it->price = n->v[k];
      it->price_set = 1;
    }
  }
  return 0;
}

/* One account being rated. */
struct acct {
  const char *uid;
  struct rate_account a;
  redisReply *usage, *bill, *pkgs; /* HGETALL, HGETALL, SMEMBERS or LRANGE */
  const char *rev;                 /* the bill's rev as read; "" when no bill */
  char *balance_raw;               /* NULL: absent */
  int64_t balance, balance_after;
  int64_t late_calls;              /* > 0: an adjustment of a bill */
  struct strv snap;                /* u:<field>, value pairs to write */
};

static void acct_reset(struct acct *x) {
  rate_account_free(&x->a);
  if (x->usage) freeReplyObject(x->usage);
  if (x->bill) freeReplyObject(x->bill);
  if (x->pkgs) freeReplyObject(x->pkgs);
  free(x->balance_raw);
  strv_free(&x->snap);
  const char *uid = x->uid;
  memset(x, 0, sizeof(*x));
  x->uid = uid;
  rate_account_init(&x->a);
}

/* Reads one account and computes what there is to bill. Returns RATE_RATED
 * (something to apply), RATE_ALREADY (the bill holds all the usage), or
 * RATE_FAILED with r->err set. */
static enum rate_outcome read_account(struct run *r, struct acct *x) {
  const char *p = r->co.prefix, *uid = x->uid;
  char *keys[6] = {day_key(r, SL_KEY_USAGE, uid), day_key(r, SL_KEY_BILL, uid),
                   acct_key(&r->co, SL_KEY_RESPKGS, uid, ""), acct_key(&r->co, SL_KEY_RESPKGS, uid, ""),
                   acct_key(&r->co, SL_KEY_BALANCE, uid, ""), acct_key(&r->co, SL_KEY_ALERTPCT, uid, "")};
  static const char *const cmds[6] = {"HGETALL", "HGETALL", "SMEMBERS", "LRANGE", "GET", "GET"};
  int sent = 0;
  for (int i = 0; i < 6; i++) {
    const char *argv[] = {cmds[i], keys[i], "0", "-1"};
    if (rconn_append(r->c, i == 3 ? 4 : 2, argv) == REDIS_OK) sent++;
    free(keys[i]);
  }
  redisReply *rep[6] = {0};
  enum rate_outcome o = RATE_FAILED;
  for (int i = 0; i < sent; i++) {
    if (rconn_get_reply(r->c, &rep[i]) != REDIS_OK) {
      fail(r, "redis: %s", rconn_errstr(r->c));
      goto out;
    }
  }
  if (sent < 6) {
    fail(r, "redis: %s", rconn_errstr(r->c));
    goto out;
  }
  static const char *const names[6] = {SL_KEY_USAGE "<day>:<uid>", SL_KEY_BILL "<day>:<uid>", "", "",
                                       SL_KEY_BALANCE "<uid>", SL_KEY_ALERTPCT "<uid>"};
  for (int i = 0; i < 6; i++) {
    if (i == 2 || i == 3 || rep[i]->type != REDIS_REPLY_ERROR) continue;
    fail(r, "%s%s is of the wrong type (%s)", p, names[i], rep[i]->str);
    goto out;
  }
  x->usage = rep[0], x->bill = rep[1];
  rep[0] = rep[1] = NULL;
  if (rep[2]->type == REDIS_REPLY_ERROR && rep[3]->type == REDIS_REPLY_ERROR) {
    fail(r, "%s" SL_KEY_RESPKGS "%s is neither a set nor a list", p, uid);
    goto out;
  }
  int which = rep[2]->type == REDIS_REPLY_ERROR ? 3 : 2;
  x->pkgs = rep[which];
  rep[which] = NULL;

  /* The bill, if any: what it holds already. */
  x->rev = "";
  if (x->bill->elements > 0) {
    const redisReply *rv = hget(x->bill, "rev");
    if (rv == NULL) {
      /* A bill of the first format has no usage snapshot: leave it. */
      o = RATE_ALREADY;
      goto out;
    }
    x->rev = rv->str;
  }
  /* The usage not billed yet: all of it, or what came since the bill. */
  for (size_t i = 0; i + 1 < x->usage->elements; i += 2) {
    const redisReply *f = x->usage->element[i], *v = x->usage->element[i + 1];
    int64_t calls, billed = 0;
    if (has_nul(f) || rate_int_parse(v->str, v->len, &calls) != 0 || calls < 0) {
      fail(r, "usage field '%s' = '%s' is not a count of calls", f->str, v->str);
      goto out;
    }
    char *sf = xformat("u:%s", f->str);
    const redisReply *b = hget(x->bill, sf);
    if (b && (rate_int_parse(b->str, b->len, &billed) != 0 || billed < 0)) {
      fail(r, "the bill's %s = '%s' is not a count of calls", sf, b->str);
      free(sf);
      goto out;
    }
    if (calls < billed) {
      fail(r, "usage field '%s' went down from %" PRId64 " billed to %" PRId64 ": not rated, check it by hand",
           f->str, billed, calls);
      free(sf);
      goto out;
    }
    if (calls == billed && b != NULL) {
      free(sf);
      continue;
    }
    strv_push(&x->snap, sf);
    strv_pushf(&x->snap, "%" PRId64, calls);
    if (rate_account_add_usage(&x->a, f->str, f->len, calls - billed) != 0) {
      fail(r, "%s", x->a.why);
      goto out;
    }
    x->late_calls += calls - billed;
  }
  for (size_t i = 0; i + 1 < x->bill->elements; i += 2) {
    const redisReply *f = x->bill->element[i];
    if (strncmp(f->str, "u:", 2) != 0) continue;
    if (hget(x->usage, f->str + 2) == NULL && strcmp(x->bill->element[i + 1]->str, "0") != 0) {
      fail(r, "usage field '%s' billed %s is gone: not rated, check it by hand", f->str + 2,
           x->bill->element[i + 1]->str);
      goto out;
    }
  }
  if (x->rev[0] != '\0' && x->snap.n == 0) {
    o = RATE_ALREADY;
    goto out;
  }
  if (x->rev[0] == '\0') x->late_calls = 0;

  for (size_t i = 0; i < x->a.nitems; i++)
    if (item_rates(r, &x->a.items[i]) != 0) goto out;

  /* The alert threshold and the balance. */
  if (rep[5]->type == REDIS_REPLY_STRING) {
    int64_t pct;
    if (rate_dec_parse(rep[5]->str, rep[5]->len, &pct) != 0 || pct < 0 || pct > 100 * RATE_SCALE) {
      fail(r, "%s" SL_KEY_ALERTPCT "%s = '%s' is not a percentage from 0 to 100", p, uid, rep[5]->str);
      goto out;
    }
    x->a.alert_pct = pct;
  }
  if (rep[4]->type == REDIS_REPLY_STRING) {
    x->balance_raw = rate__xstrndup(rep[4]->str, rep[4]->len);
    if (has_nul(rep[4]) || rate_int_parse(rep[4]->str, rep[4]->len, &x->balance) != 0) {
      fail(r, "%s" SL_KEY_BALANCE "%s = '%s' is not an integer of micro-units", p, uid, rep[4]->str);
      goto out;
    }
  }

  /* The packages: one round trip for all the HMGETs. */
  const redisReply *ids = x->pkgs;
  for (size_t i = 0; i < ids->elements; i++) {
    if (has_nul(ids->element[i])) {
      fail(r, "%s" SL_KEY_RESPKGS "%s holds an id with a NUL byte", p, uid);
      goto out;
    }
    char *key = pkg_key(r, uid, ids->element[i]->str);
    const char *argv[] = {"HMGET", key, rate_pkg_fields[0], rate_pkg_fields[1], rate_pkg_fields[2],
                          rate_pkg_fields[3]};
    int e = rconn_append(r->c, 6, argv);
    free(key);
    if (e != REDIS_OK) {
      fail(r, "redis: %s", rconn_errstr(r->c));
      goto out;
    }
  }
  int bad = 0;
  for (size_t i = 0; i < ids->elements; i++) {
    redisReply *h;
    if (rconn_get_reply(r->c, &h) != REDIS_OK) {
      fail(r, "redis: %s", rconn_errstr(r->c));
      goto out; /* the connection is broken: the other replies are lost anyway */
    }
    const char *id = ids->element[i]->str;
    if (bad) {
      /* reported already */
    } else if (h->type == REDIS_REPLY_ERROR) {
      fail(r, "package %s: %s" SL_KEY_RESPKG "%s:%s is not a hash", id, p, uid, id);
      bad = 1;
    } else if (h->type == REDIS_REPLY_ARRAY && h->elements == RATE_PF_N) {
      const char *raw[RATE_PF_N];
      for (int f = 0; f < RATE_PF_N; f++) {
        const redisReply *v = h->element[f];
        raw[f] = v->type == REDIS_REPLY_STRING ? v->str : NULL;
        if (raw[f] && has_nul(v) && !bad) {
          fail(r, "package %s: field %s holds a NUL byte", id, rate_pkg_fields[f]);
          bad = 1;
        }
      }
      if (!bad && rate_account_add_pkg(&x->a, id, raw) < 0) {
        fail(r, "%s", x->a.why);
        bad = 1;
      }
    }
    freeReplyObject(h);
  }
  if (bad) goto out;
  if (rate_account_compute(&x->a, r->day_start, r->day_end) != 0) {
    fail(r, "%s", x->a.why);
    goto out;
  }
  if (__builtin_sub_overflow(x->balance, x->a.amount, &x->balance_after)) {
    fail(r, "overflow: the balance does not fit 64-bit micro-units");
    goto out;
  }
  o = RATE_RATED;
out:
  for (int i = 0; i < 6; i++)
    if (rep[i]) freeReplyObject(rep[i]);
  return o;
}

/* Pushes `field` and the bill's value of it plus delta (kind: 'i' integer,
 * 'd' decimal, 'm' money). Returns 0, or -1 with r->err set when the
 * bill's value is not a number or the sum overflows. */
static int push_sum(struct run *r, struct strv *args, const redisReply *bill, char *field, int64_t delta,
                    char kind) {
  const redisReply *old = hget(bill, field);
  int64_t v = 0, s;
  if (old) {
    int e = kind == 'i' ? rate_int_parse(old->str, old->len, &v) : rate_dec_parse(old->str, old->len, &v);
    if (e != 0) {
      fail(r, "the bill's %s = '%s' is not a number", field, old->str);
      free(field);
      return -1;
    }
  }
  if (__builtin_add_overflow(v, delta, &s)) {
    fail(r, "overflow: the bill's %s", field);
    free(field);
    return -1;
  }
  strv_push(args, field);
  if (kind == 'i') strv_pushf(args, "%" PRId64, s);
  else if (kind == 'm') strv_push_money(args, s);
  else strv_push_dec(args, s);
  return 0;
}

/* Appends the bill's field/value pairs: the rating of x added to the bill
 * read (when this is an adjustment). Returns 0 or -1 with r->err set. */
static int bill_fields(struct run *r, struct acct *x, struct strv *args) {
  const struct rate_account *a = &x->a;
  const redisReply *old = x->rev[0] ? x->bill : NULL;
  int64_t rev = 0;
  if (old && (rate_int_parse(x->rev, strlen(x->rev), &rev) != 0 || rev < 1)) {
    fail(r, "the bill's rev '%s' is not a positive integer", x->rev);
    return -1;
  }
  char money[RATE_DEC_MAX];
  rate_money_format(x->balance_after, money);
  strv_pushf(args, "rev");
  strv_pushf(args, "%" PRId64, rev + 1);
  strv_pushf(args, "balance_after");
  strv_pushf(args, "%s", money);
  if (old) {
    strv_pushf(args, "adjustments");
    strv_pushf(args, "%" PRId64, rev);
    strv_pushf(args, "adjusted_at");
    strv_pushf(args, "%" PRId64, r->now);
  } else {
    strv_pushf(args, "format");
    strv_pushf(args, BILL_FORMAT);
    strv_pushf(args, "day");
    strv_pushf(args, "%s", r->day);
    strv_pushf(args, "tz_offset_min");
    strv_pushf(args, "%d", r->co.tz_offset_min);
    strv_pushf(args, "rated_at");
    strv_pushf(args, "%" PRId64, r->now);
  }
  if (push_sum(r, args, old, xformat("units_total"), a->units_total, 'd') ||
      push_sum(r, args, old, xformat("units_from_packages"), a->units_from_packages, 'd') ||
      push_sum(r, args, old, xformat("payg_units"), a->payg_units, 'd') ||
      push_sum(r, args, old, xformat("amount"), a->amount, 'm'))
    return -1;
  /* The services named at the default coefficient, with those of the bill. */
  const redisReply *od = hget(old, "default_coef");
  char *defaults = xformat("%s", od ? od->str : "");
  /* Items of one name (the same service under two features) are one line. */
  for (size_t i = 0; i < a->nitems;) {
    const struct rate_item *first = &a->items[i];
    int64_t calls = 0, units = 0, fromp = 0, pu = 0, pc = 0, amount = 0;
    int is_default = 0;
    size_t j = i;
    for (; j < a->nitems && strcmp(a->items[j].name, first->name) == 0; j++) {
      const struct rate_item *it = &a->items[j];
      if (__builtin_add_overflow(calls, it->calls, &calls) || __builtin_add_overflow(units, it->units, &units) ||
          __builtin_add_overflow(fromp, it->from_packages, &fromp) ||
          __builtin_add_overflow(pu, it->payg_units, &pu) || __builtin_add_overflow(pc, it->payg_calls, &pc) ||
          __builtin_add_overflow(amount, it->amount, &amount)) {
        fail(r, "overflow: the line of %s", first->name);
        free(defaults);
        return -1;
      }
      is_default |= it->coef_default;
    }
    const char *n = first->name;
    if (push_sum(r, args, old, xformat("calls:%s", n), calls, 'i') ||
        push_sum(r, args, old, xformat("units:%s", n), units, 'd') ||
        push_sum(r, args, old, xformat("units_from_packages:%s", n), fromp, 'd') ||
        push_sum(r, args, old, xformat("payg_units:%s", n), pu, 'd') ||
        push_sum(r, args, old, xformat("payg_calls:%s", n), pc, 'd') ||
        push_sum(r, args, old, xformat("amount:%s", n), amount, 'm')) {
      free(defaults);
      return -1;
    }
    strv_pushf(args, "coef:%s", n);
    strv_push_dec(args, first->coef);
    if (first->price_set) {
      strv_pushf(args, "price:%s", n);
      strv_push_dec(args, first->price);
    }
    if (is_default) {
      /* Add n to the comma-separated list unless it is there. */
      size_t nl = strlen(n);
      int there = 0;
      for (const char *s = defaults; *s;) {
        const char *c = strchr(s, ',');
        size_t l = c ? (size_t)(c - s) : strlen(s);
        if (l == nl && memcmp(s, n, nl) == 0) there = 1;
        s += l + (c != NULL);
      }
      if (!there) {
        char *d = xformat("%s%s%s", defaults, defaults[0] ? "," : "", n);
        free(defaults);
        defaults = d;
      }
    }
    i = j;
  }
  if (defaults[0]) {
    strv_pushf(args, "default_coef");
    strv_push(args, defaults);
  } else {
    free(defaults);
  }
  for (size_t i = 0; i < a->npkgs; i++)
    if (a->pkgs[i].drawn > 0 && push_sum(r, args, old, xformat("drawn:%s", a->pkgs[i].id), a->pkgs[i].drawn, 'd'))
      return -1;
  for (size_t i = 0; i < x->snap.n; i++) strv_pushf(args, "%s", x->snap.v[i]);
  return 0;
}

/* Runs the test hook once per run: the Redis command in
 * $SLUICE_RATE_TEST_BEFORE_APPLY (words split on spaces) just before the
 * first apply, so tests can change something between read and apply. */
static void test_interfere(struct run *r) {
  if (r->interfere == NULL) return;
  struct strv args = {0};
  char *copy = rate__xstrndup(r->interfere, strlen(r->interfere)), *save = NULL;
  for (char *w = strtok_r(copy, " ", &save); w; w = strtok_r(NULL, " ", &save))
    strv_push(&args, rate__xstrndup(w, strlen(w)));
  free(copy);
  r->interfere = NULL;
  if (args.n > 0) {
    char err[256];
    redisReply *rep = command(r->c, &args, err, sizeof(err));
    if (rep) freeReplyObject(rep);
  }
  strv_free(&args);
}

/* Loads apply_lua (SCRIPT LOAD) into r->sha. Returns 0 or -1 with r->err. */
static int load_script(struct run *r) {
  struct strv args = {0};
  strv_pushf(&args, "SCRIPT");
  strv_pushf(&args, "LOAD");
  strv_pushf(&args, "%s", apply_lua);
  redisReply *rep = command(r->c, &args, r->err, sizeof(r->err));
  strv_free(&args);
  if (rep == NULL) return -1;
  int ok = rep->type == REDIS_REPLY_STRING && rep->len < sizeof(r->sha);
  if (ok) memcpy(r->sha, rep->str, rep->len + 1);
  else fail(r, "unexpected reply to SCRIPT LOAD");
  freeReplyObject(rep);
  return ok ? 0 : -1;
}

/* Applies a computed account with apply_lua. Returns the script's outcome
 * (*suspended set when it suspended the account); RATE_FAILED with r->err
 * set on errors. */
static enum rate_outcome apply_account(struct run *r, struct acct *x, int *suspended) {
  const char *p = r->co.prefix, *uid = x->uid;
  const struct rate_account *a = &x->a;
  struct strv keys = {0}, args = {0};
  int cl = rconn_cluster(r->c);
  enum rate_outcome o = RATE_FAILED;
  int member = 0;
  if (cl && suspended_member(r->c, &r->co, uid, &member, r->err, sizeof(r->err)) != 0) return o;
  strv_push(&keys, day_key(r, SL_KEY_BILL, uid));
  strv_push(&keys, cl ? acct_key(&r->co, SL_KEY_OUTBOX, uid, "") : xformat("%s" SL_KEY_ALERTS, p));
  strv_push(&keys, acct_key(&r->co, SL_KEY_RESPKGS, uid, ""));
  strv_push(&keys, acct_key(&r->co, SL_KEY_BALANCE, uid, ""));
  strv_push(&keys, cl ? acct_key(&r->co, SL_KEY_OUTBOX, uid, "") : xformat("%s" SL_KEY_SUSPENDED, p));
  strv_push(&keys, acct_key(&r->co, SL_KEY_SUSPENSION, uid, ""));
  strv_pushf(&args, "%s", uid);
  strv_pushf(&args, "%s", r->day);
  strv_pushf(&args, "%s", x->rev);
  if (x->balance_raw) strv_pushf(&args, "=%s", x->balance_raw);
  else strv_pushf(&args, "!");
  strv_pushf(&args, "%" PRId64, x->balance_after);
  strv_pushf(&args, "%" PRId64, r->now);
  if (cl) strv_pushf(&args, "%d", member);
  else strv_pushf(&args, "%s" SL_CHANNEL_CHANGES, p);
  strv_pushf(&args, "%zu", a->npkgs);
  size_t nalerts = 0;
  for (size_t i = 0; i < a->npkgs; i++) {
    const struct rate_pkg *k = &a->pkgs[i];
    strv_push(&keys, pkg_key(r, uid, k->id));
    strv_pushf(&args, "%s", k->id);
    for (int f = 0; f < RATE_PF_N; f++) strv_push(&args, k->raw[f] ? xformat("=%s", k->raw[f]) : xformat("!"));
    if (k->drawn > 0) strv_push_dec(&args, k->remaining_after);
    else strv_pushf(&args, "%s", "");
    nalerts += k->alert != 0;
  }
  strv_pushf(&args, "%zu", nalerts);
  for (size_t i = 0; i < a->npkgs; i++) {
    const struct rate_pkg *k = &a->pkgs[i];
    if (!k->alert) continue;
    strv_pushf(&args, "%s", k->id);
    strv_push_dec(&args, k->remaining_after);
    strv_push_dec(&args, k->quota);
    strv_push_dec(&args, a->alert_pct);
  }
  if (x->late_calls > 0) {
    strv_push_dec(&args, a->units_total);
    strv_push_money(&args, a->amount);
    strv_pushf(&args, "%" PRId64, x->late_calls);
  } else {
    for (int i = 0; i < 3; i++) strv_pushf(&args, "%s", "");
  }
  struct strv eval = {0};
  if (bill_fields(r, x, &args) != 0) goto out;
  strv_pushf(&eval, "EVALSHA");
  strv_pushf(&eval, "%s", r->sha);
  strv_pushf(&eval, "%zu", keys.n);
  for (size_t i = 0; i < keys.n; i++) strv_push(&eval, keys.v[i]);
  for (size_t i = 0; i < args.n; i++) strv_push(&eval, args.v[i]);
  keys.n = args.n = 0; /* their strings now belong to eval */

  test_interfere(r);
  redisReply *rep = command(r->c, &eval, r->err, sizeof(r->err));
  if (rep == NULL && strstr(r->err, "NOSCRIPT") != NULL && load_script(r) == 0) {
    free(eval.v[1]);
    eval.v[1] = xformat("%s", r->sha);
    rep = command(r->c, &eval, r->err, sizeof(r->err));
  }
  if (rep != NULL) {
    if (rep->type == REDIS_REPLY_STRING || rep->type == REDIS_REPLY_STATUS) {
      *suspended = rep->len == 9 && memcmp(rep->str, "suspended", 9) == 0;
      o = *suspended ? RATE_RATED : rate_outcome_parse(rep->str, rep->len);
    }
    if (o == RATE_FAILED) fail(r, "unexpected reply from the apply script");
    freeReplyObject(rep);
  }
out:
  strv_free(&keys);
  strv_free(&args);
  strv_free(&eval);
  return o;
}

struct job {
  struct run *r;
  struct acct x;
  int suspended;
};

/* One attempt at an account, for rate_attempts: read, compute, apply. */
static enum rate_outcome attempt(void *arg, unsigned n) {
  struct job *j = arg;
  struct run *r = j->r;
  acct_reset(&j->x);
  enum rate_outcome o = read_account(r, &j->x);
  if (o != RATE_RATED || r->dry_run) return o;
  o = apply_account(r, &j->x, &j->suspended);
  if (o == RATE_RETRY) {
    fail(r, "what it read changed before it was applied, in each of %u attempts", n);
    fprintf(stderr, "sluice-rate: uid=%s: changed while rating; computing again\n", j->x.uid);
  }
  return o;
}

/* Rates one account and reports it: a line on stdout, notes and reasons on
 * stderr. */
static void rate_one(struct run *r, const char *uid) {
  struct job j = {.r = r, .x = {.uid = uid}};
  rate_account_init(&j.x.a);
  r->err[0] = '\0';
  /* A cluster: what an earlier run left in the outbox goes first (its
   * suspension decides what the script is told), what this one leaves after. */
  int drain = rconn_cluster(r->c) && !r->dry_run;
  enum rate_outcome o = RATE_FAILED;
  if (!drain || outbox_drain(r->c, &r->co, uid, r->err, sizeof(r->err)) == 0)
    o = rate_attempts(attempt, &j, MAX_ATTEMPTS);
  if (drain && o != RATE_FAILED && outbox_drain(r->c, &r->co, uid, r->err, sizeof(r->err)) != 0) {
    fprintf(stderr, "sluice-rate: uid=%s: applied, but its alerts or suspension are not out yet (run again): %s\n",
            uid, r->err);
    o = RATE_FAILED; /* no rated marker: --due comes back to the day */
  }
  const struct rate_account *a = &j.x.a;
  char lead[64] = "";
  if (r->due) snprintf(lead, sizeof(lead), "day=%s ", r->day);
  if (o == RATE_RATED) {
    int adj = j.x.late_calls > 0;
    for (size_t i = 0; i < a->npkgs; i++)
      if (a->pkgs[i].alert)
        fprintf(stderr, "sluice-rate: uid=%s: package %s fell under its alert threshold%s\n", uid, a->pkgs[i].id,
                r->dry_run ? " (dry run: no alert sent)" : "");
    if (adj)
      fprintf(stderr, "sluice-rate: uid=%s: %" PRId64 " calls arrived after %s was rated: rated as an adjustment%s\n",
              uid, j.x.late_calls, r->day, r->dry_run ? " (dry run)" : "");
    char t[RATE_DEC_MAX], f[RATE_DEC_MAX], g[RATE_DEC_MAX], m[RATE_DEC_MAX], b[RATE_DEC_MAX];
    rate_dec_format(a->units_total, t);
    rate_dec_format(a->units_from_packages, f);
    rate_dec_format(a->payg_units, g);
    rate_money_format(a->amount, m);
    rate_money_format(j.x.balance_after, b);
    printf("%suid=%s status=%s units_total=%s units_from_packages=%s payg_units=%s amount=%s balance=%s%s\n", lead,
           uid, r->dry_run ? "dry_run" : adj ? "adjusted" : "rated", t, f, g, m, b,
           j.suspended ? " suspended=overdue" : "");
    if (adj) r->adjusted++;
    else r->rated++;
    r->suspended += j.suspended != 0;
  } else if (o == RATE_ALREADY) {
    if (!r->due) printf("uid=%s status=already_rated\n", uid);
    r->already++;
  } else {
    printf("%suid=%s status=failed\n", lead, uid);
    fprintf(stderr, "sluice-rate: %suid=%s: not rated: %s\n", lead, uid, r->err[0] ? r->err : "unknown error");
    r->failed++;
  }
  fflush(stdout);
  acct_reset(&j.x);
  rate_account_free(&j.x.a);
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* The day's UIDs, sorted and unique, from SSCAN of P usage:<day>. Returns 0
 * or -1 with r->err set. */
static int read_uids(struct run *r, struct strv *uids) {
  char *key = xformat("%s" SL_KEY_USAGE "%s", r->co.prefix, r->day);
  char cursor[32] = "0";
  int ret = -1;
  do {
    struct strv args = {0};
    strv_pushf(&args, "SSCAN");
    strv_pushf(&args, "%s", key);
    strv_pushf(&args, "%s", cursor);
    strv_pushf(&args, "COUNT");
    strv_pushf(&args, "1000");
    redisReply *rep = command(r->c, &args, r->err, sizeof(r->err));
    strv_free(&args);
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
  if (uids->n > 1) qsort(uids->v, uids->n, sizeof(*uids->v), cmp_str);
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

/* Rates r->day: every account of its usage set. Returns the number of
 * accounts that failed, or -1 when the day could not be read. */
static long rate_day(struct run *r) {
  if (rate_day_bounds(r->day, r->co.tz_offset_min, &r->day_start, &r->day_end) != 0) return -1;
  unsigned before_failed = r->failed, before_rated = r->rated, before_adj = r->adjusted, before_al = r->already;
  struct strv uids = {0};
  long failed = -1;
  if (read_uids(r, &uids) != 0) {
    fprintf(stderr, "sluice-rate: cannot read the accounts of %s: %s\n", r->day, r->err);
    goto out;
  }
  size_t i;
  for (i = 0; i < uids.n && !rconn_broken(r->c); i++) rate_one(r, uids.v[i]);
  if (i < uids.n) {
    fprintf(stderr, "sluice-rate: Redis connection lost (%s): %zu accounts not rated; run again to rate them\n",
            rconn_errstr(r->c), uids.n - i);
    r->failed += (unsigned)(uids.n - i);
  }
  failed = (long)(r->failed - before_failed);
  fprintf(stderr, "sluice-rate: day %s: %zu accounts: %u %s, %u adjusted, %u already rated, %ld failed\n", r->day,
          uids.n, r->rated - before_rated, r->dry_run ? "computed (dry run)" : "rated", r->adjusted - before_adj,
          r->already - before_al, failed);
  if (failed == 0 && !r->dry_run && !rconn_broken(r->c)) {
    /* The day's marker: --due rates a day without one. Written once, so
     * that a rerun changes nothing. */
    struct strv args = {0};
    strv_pushf(&args, "HSETNX");
    strv_pushf(&args, "%s" SL_KEY_RATED "%s", r->co.prefix, r->day);
    strv_pushf(&args, "at");
    strv_pushf(&args, "%" PRId64, r->now);
    redisReply *rep = command(r->c, &args, r->err, sizeof(r->err));
    strv_free(&args);
    if (rep) freeReplyObject(rep);
    else fprintf(stderr, "sluice-rate: day %s: cannot mark it rated: %s\n", r->day, r->err);
  }
out:
  strv_free(&uids);
  return failed;
}

/* The days of the `P usage:<day>` sets a SCAN finds (prefix_len: where the
 * day starts in a key). */
struct day_scan {
  size_t prefix_len;
  struct strv days;
};

static void found_usage_set(const char *key, size_t len, void *arg) {
  struct day_scan *ds = arg;
  if (len != ds->prefix_len + 8) return;
  for (size_t i = ds->prefix_len; i < len; i++)
    if (key[i] < '0' || key[i] > '9') return;
  strv_pushf(&ds->days, "%.8s", key + ds->prefix_len);
}

static int newest_first(const void *a, const void *b) { return strcmp(*(char *const *)b, *(char *const *)a); }

/* Finds the days --due rates: those ended at least grace_h hours ago (at
 * most lookback days back when lookback > 0; else every day with a usage
 * set, found by SCAN) that have usage and either no rated marker or one
 * among the `recheck` most recent such days. Pushes them oldest first.
 * Returns 0 or -1 with r->err set. */
static int due_days(struct run *r, int64_t grace_h, int64_t lookback, int64_t recheck, struct strv *days) {
  struct strv cand = {0};
  if (lookback == 0) {
    /* SPEC 8: every ended day not yet rated. The usage sets' names, the
     * prefix's glob characters escaped for MATCH. */
    struct day_scan ds = {.prefix_len = strlen(r->co.prefix) + strlen(SL_KEY_USAGE)};
    char *head = xformat("%s" SL_KEY_USAGE, r->co.prefix);
    size_t hl = strlen(head);
    char *match = rate__xrealloc(NULL, 2 * hl + 9);
    size_t m = 0;
    for (size_t i = 0; i < hl; i++) {
      if (strchr("*?[]\\", head[i])) match[m++] = '\\';
      match[m++] = head[i];
    }
    memcpy(match + m, "????????", 9);
    int rc = rconn_scan(r->c, match, "set", found_usage_set, &ds);
    free(head);
    free(match);
    if (rc != 0) {
      fail(r, "redis: %s", rconn_errstr(r->c));
      strv_free(&ds.days);
      return -1;
    }
    qsort(ds.days.v, ds.days.n, sizeof(ds.days.v[0]), newest_first);
    for (size_t i = 0; i < ds.days.n; i++) {
      int64_t s, e;
      if (i && !strcmp(ds.days.v[i], ds.days.v[i - 1])) continue;
      if (rate_day_bounds(ds.days.v[i], r->co.tz_offset_min, &s, &e) != 0 || e + grace_h * 3600 > r->now) continue;
      strv_pushf(&cand, "%s", ds.days.v[i]);
    }
    strv_free(&ds.days);
  }
  /* The newest day that may be due: the one that holds now - grace - 1 day
   * ends at or before now - grace at the latest. */
  for (int64_t k = 0; lookback > 0 && k <= lookback; k++) {
    char d[9];
    int64_t s, e;
    rate_day_of(r->now - grace_h * 3600 - k * RATE_DAY_SECONDS, r->co.tz_offset_min, d);
    if (rate_day_bounds(d, r->co.tz_offset_min, &s, &e) != 0 || e + grace_h * 3600 > r->now) continue;
    if ((int64_t)cand.n >= lookback) break;
    strv_pushf(&cand, "%s", d);
  }
  for (size_t i = 0; i < cand.n; i++) {
    char *u = xformat("%s" SL_KEY_USAGE "%s", r->co.prefix, cand.v[i]);
    char *m = xformat("%s" SL_KEY_RATED "%s", r->co.prefix, cand.v[i]);
    const char *a1[] = {"EXISTS", u}, *a2[] = {"EXISTS", m};
    rconn_append(r->c, 2, a1);
    rconn_append(r->c, 2, a2);
    free(u);
    free(m);
  }
  int ret = -1;
  int64_t rated_seen = 0;
  /* cand is newest first; keep the picks in that order, reverse at the end. */
  struct strv picks = {0};
  for (size_t i = 0; i < cand.n; i++) {
    redisReply *ru = NULL, *rm = NULL;
    if (rconn_get_reply(r->c, &ru) != REDIS_OK || rconn_get_reply(r->c, &rm) != REDIS_OK) {
      fail(r, "redis: %s", rconn_errstr(r->c));
      if (ru) freeReplyObject(ru);
      goto out;
    }
    int has_usage = ru->type == REDIS_REPLY_INTEGER && ru->integer == 1;
    int marked = rm->type == REDIS_REPLY_INTEGER && rm->integer == 1;
    freeReplyObject(ru);
    freeReplyObject(rm);
    if (!has_usage) continue;
    if (!marked || rated_seen++ < recheck) strv_pushf(&picks, "%s", cand.v[i]);
  }
  for (size_t i = picks.n; i > 0; i--) strv_pushf(days, "%s", picks.v[i - 1]);
  ret = 0;
out:
  strv_free(&picks);
  strv_free(&cand);
  return ret;
}

static void usage(FILE *f) {
  fprintf(f,
          "usage: sluice-rate --day yyyymmdd [options]   rate one ended day\n"
          "       sluice-rate --due [--grace-hours H] [--lookback-days N] [--recheck-days N] [options]\n"
          "       sluice-rate topup --uid U --amount A [--ref R] [--redis ...] [--redis-prefix P]\n"
          "       sluice-rate statement --uid U --from D1 --to D2 [--format json|csv] [options]\n"
          "Rates billable calls: draws units from resource packages in purchase order,\n"
          "bills the rest at the price per 1,000 calls, deducts it from the balance and\n"
          "suspends overdue accounts (docs/rating.md).\n"
          "  --day yyyymmdd        the day to rate (it must have ended)\n"
          "  --due                 rate every ended day not yet rated, oldest first\n"
          "  --grace-hours H       --due: rate a day H hours after it ends (default %d)\n"
          "  --lookback-days N     --due: look N days back at most (default %d: every day with usage, by SCAN)\n"
          "  --recheck-days N      --due: re-examine the N latest rated days for late usage (default %d)\n"
          "  --redis HOST:PORT     or unix:PATH or sentinel://HOST:PORT[,...]/MASTER or cluster://HOST:PORT[,...]\n"
          "                        (default 127.0.0.1:6379)\n"
          "  --redis-prefix P      key prefix (default sluice:)\n"
          "  --tz-offset-min N     billing time zone, minutes east of UTC (default 0)\n"
          "  --dry-run             compute and print, write nothing\n"
          "  --help                this text\n"
          "Exit status: 0 every account rated or already rated, 1 an account failed or\n"
          "Redis is unreachable, 2 usage error.\n",
          DUE_GRACE_HOURS, DUE_LOOKBACK_DAYS, DUE_RECHECK_DAYS);
}

/* Parses a non-negative integer option into *out (kept when s is NULL).
 * Returns 0 or -1 after printing the error. */
static int int_opt(const char *name, const char *s, int64_t max, int64_t *out) {
  if (s == NULL) return 0;
  if (rate_int_parse(s, strlen(s), out) != 0 || *out < 0 || *out > max) {
    fprintf(stderr, "sluice-rate: %s '%s' is not an integer from 0 to %" PRId64 "\n", name, s, max);
    return -1;
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "topup") == 0) return topup_main(argc, argv);
  if (argc > 1 && strcmp(argv[1], "statement") == 0) return statement_main(argc, argv);
  struct run r = {.interfere = getenv("SLUICE_RATE_TEST_BEFORE_APPLY")};
  int force = 0;
  const char *grace_s = NULL, *lookback_s = NULL, *recheck_s = NULL;
  const struct opt_spec specs[] = {{"--day", NULL, &r.day},
                                   {"--due", &r.due, NULL},
                                   {"--dry-run", &r.dry_run, NULL},
                                   {"--force", &force, NULL},
                                   {"--grace-hours", NULL, &grace_s},
                                   {"--lookback-days", NULL, &lookback_s},
                                   {"--recheck-days", NULL, &recheck_s},
                                   {NULL, NULL, NULL}};
  int a = parse_opts(argc, argv, 1, specs, &r.co, 1);
  if (a == 1) {
    usage(stdout);
    return 0;
  }
  int64_t grace = DUE_GRACE_HOURS, lookback = DUE_LOOKBACK_DAYS, recheck = DUE_RECHECK_DAYS;
  if (a == 0 && force) {
    fprintf(stderr, "sluice-rate: --force is not accepted: a day is rated only once it has ended (usage that "
                    "comes later is rated as an adjustment)\n");
    a = -1;
  }
  if (a == 0 && (r.day == NULL) == !r.due) {
    fprintf(stderr, "sluice-rate: give either --day yyyymmdd or --due\n");
    a = -1;
  }
  if (a == 0 && !r.due && (grace_s || lookback_s || recheck_s)) {
    fprintf(stderr, "sluice-rate: --grace-hours, --lookback-days and --recheck-days go with --due\n");
    a = -1;
  }
  if (a == 0 && (int_opt("--grace-hours", grace_s, 24 * 366, &grace) || int_opt("--lookback-days", lookback_s, 3660,
                                                                                &lookback) ||
                 int_opt("--recheck-days", recheck_s, 3660, &recheck)))
    a = -1;
  if (a < 0) {
    usage(stderr);
    return EXIT_USAGE;
  }
  r.now = (int64_t)time(NULL);
  if (r.day) {
    if (rate_day_bounds(r.day, r.co.tz_offset_min, &r.day_start, &r.day_end) != 0) {
      fprintf(stderr, "sluice-rate: --day '%s' is not a date yyyymmdd (from 19700101)\n", r.day);
      return EXIT_USAGE;
    }
    if (r.now < r.day_end) {
      time_t end = (time_t)r.day_end;
      struct tm tm;
      char when[64];
      gmtime_r(&end, &tm);
      strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
      fprintf(stderr,
              "sluice-rate: day %s has not ended yet in the billing time zone (UTC%c%02d:%02d): it ends at %s; "
              "it cannot be rated before\n",
              r.day, r.co.tz_offset_min < 0 ? '-' : '+', abs(r.co.tz_offset_min) / 60, abs(r.co.tz_offset_min) % 60,
              when);
      return EXIT_USAGE;
    }
  }
  r.c = connect_redis(&r.co);
  if (r.c == NULL) return 1;
  int status = 1;
  struct strv days = {0};
  if (!r.dry_run && load_script(&r) != 0) {
    fprintf(stderr, "sluice-rate: cannot load the apply script: %s\n", r.err);
    goto out;
  }
  if (r.day) {
    status = rate_day(&r) == 0 ? 0 : 1;
    goto out;
  }
  if (due_days(&r, grace, lookback, recheck, &days) != 0) {
    fprintf(stderr, "sluice-rate: cannot find the due days: %s\n", r.err);
    goto out;
  }
  status = 0;
  for (size_t i = 0; i < days.n && !rconn_broken(r.c); i++) {
    r.day = days.v[i];
    if (rate_day(&r) != 0) status = 1;
  }
  if (rconn_broken(r.c)) status = 1;
  fprintf(stderr, "sluice-rate: --due: %zu days looked at: %u accounts rated, %u adjusted, %u failed, %u suspended\n",
          days.n, r.rated, r.adjusted, r.failed, r.suspended);
out:
  strv_free(&days);
  for (size_t k = 0; k < r.nnames; k++) {
    free(r.names[k].name);
    free(r.names[k].raw[0]);
    free(r.names[k].raw[1]);
  }
  free(r.names);
  rconn_free(r.c);
  return status;
}
