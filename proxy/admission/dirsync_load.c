/* The directory's loads from Redis: the two Lua scripts (accounts, and the
 * suspended set with the feature overrides), sending them, and reading
 * their replies into the directory builder. Each key stands alone: one
 * that cannot be used is named in the log (rate-limited) and counted, and
 * never stops the others. Directory thread only (or the fuzz harness's one
 * thread: dirsync_int.h). */
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdlib.h>
#include <string.h>

#include "client.h"
#include "db.h"
#include "dirsync_int.h"
#include "keys.h"

#include "catalog.h"
#include "common.h"
#include "stat.h"
#include "uv_util.h"

#define BATCH 100          /* accounts per EVAL */
#define LOG_EVERY_MS 10000 /* error lines: at most one per this */
#define BADKEY_LOG_MS 60000 /* a key that stays unusable is named again at most this often */
#define STR_(x) #x
#define STR(x) STR_(x)

/* One round trip per batch of accounts: the UID and every package of it,
 * read atomically (a script runs alone), so a record never mixes states.
 * A key starting with byte 0x01 is a UID given by a trusted header (no
 * AccessKeyId holds control bytes: the classifier refuses them).
 * Every read is a pcall: a key of the wrong type is reported for that key
 * alone instead of failing the whole batch. Per account:
 *   {}                                    no `ak:` key (the names: keys.h)
 *   {2, err}                              the `ak:` key cannot be read
 *   {1, uid, seterr, nids, pkg...}        seterr: '' or why `qpspkgs:<uid>`
 *                                         cannot be read; nids: its size
 *   pkg = {id, feature, region, qps, starts_at, expires_at} or {id, err} */
static const char account_script[] =
    "local function bad(r) return type(r) == 'table' and r.err end "
    "local p = ARGV[1] local out = {} "
    "for i = 2, #ARGV do "
    "  local a = ARGV[i] local uid, e "
    "  if string.byte(a, 1) == 1 then uid = string.sub(a, 2) "
    "  else uid = redis.pcall('GET', p .. '" SL_KEY_AK "' .. a) e = bad(uid) end "
    "  if e then out[i - 1] = {2, e} "
    "  elseif not uid then out[i - 1] = {} "
    "  else "
    "    local ids = redis.pcall('SMEMBERS', p .. '" SL_KEY_QPSPKGS "' .. uid) "
    "    local r = {1, uid, bad(ids) or '', 0} "
    "    if bad(ids) then ids = {} end "
    "    r[4] = #ids "
    "    for j = 1, math.min(#ids, " STR(SL_MAX_PKGS) ") do "
    "      local id = ids[j] "
    "      local h = redis.pcall('HMGET', p .. '" SL_KEY_QPSPKG "' .. uid .. ':' .. id, '" SL_FIELD_FEATURE "', "
    "                            '" SL_FIELD_REGION "', '" SL_FIELD_QPS "', '" SL_FIELD_STARTS_AT "', "
    "                            '" SL_FIELD_EXPIRES_AT "') "
    "      e = bad(h) "
    "      if e then r[#r + 1] = {id, e} "
    "      else r[#r + 1] = {id, h[1] or '', h[2] or '', h[3] or '', h[4] or '', h[5] or ''} end "
    "    end "
    "    out[i - 1] = r "
    "  end "
    "end "
    "return out";

/* In a Redis Cluster (SPEC 10) the `ak:` key is read on its own slot
 * first (GET), then this script on the UID's slot: KEYS[1] is
 * `qpspkgs:{<uid>}`, ARGV[1] `qpspkg:{<uid>}:` (prefixed), ARGV[2] the UID.
 * It answers one element of account_script's reply, {1, uid, ...}. */
/* pkgs(set, head, uid): the element for one UID, or -1 (grouped only)
 * when its set cannot be read on this node (another master's slot, or one
 * being migrated): that UID goes on its own. */
#define LUA_ACCOUNT_PKGS                                                                                               \
  "local function bad(r) return type(r) == 'table' and r.err end "                                                     \
  "local function pkgs(set, head, uid, grouped) "                                                                      \
  "  local ids = redis.pcall('SMEMBERS', set) "                                                                        \
  "  if grouped and bad(ids) and not string.find(bad(ids), '^WRONGTYPE') then return -1 end "                          \
  "  local r = {1, uid, bad(ids) or '', 0} "                                                                           \
  "  if bad(ids) then ids = {} end "                                                                                   \
  "  r[4] = #ids "                                                                                                     \
  "  for j = 1, math.min(#ids, " STR(SL_MAX_PKGS) ") do "                                                              \
  "    local id = ids[j] "                                                                                             \
  "    local h = redis.pcall('HMGET', head .. id, '" SL_FIELD_FEATURE "', '" SL_FIELD_REGION "', "                     \
  "                          '" SL_FIELD_QPS "', '" SL_FIELD_STARTS_AT "', '" SL_FIELD_EXPIRES_AT "') "               \
  "    local e = bad(h) "                                                                                              \
  "    if e then r[#r + 1] = {id, e} "                                                                                 \
  "    else r[#r + 1] = {id, h[1] or '', h[2] or '', h[3] or '', h[4] or '', h[5] or ''} end "                       \
  "  end "                                                                                                             \
  "  return r "                                                                                                        \
  "end "
static const char cluster_account_script[] = LUA_ACCOUNT_PKGS "return pkgs(KEYS[1], ARGV[1], ARGV[2], false)";

/* The lookups of one master at once (issue 14: a command per account and
 * step made a cluster's directory cost twice one server's). Keys of several
 * slots cannot be declared, so none is: allow-cross-slot-keys lets the
 * script touch any slot this node serves, and a key of another (or of one
 * half migrated, when missing) is an error, caught: that lookup goes on its
 * own, by slot, following MOVED and ASK. ak script: ARGV the `ak:` keys;
 * per key the GET's reply (nil, the UID, or an error). uid script: ARGV
 * triples (the packages set, the packages' head, the UID); per UID pkgs()'s
 * element or -1. */
static const char cluster_ak_group_script[] =
    "#!lua flags=allow-cross-slot-keys\n"
    "local out = {} "
    "for i = 1, #ARGV do out[i] = redis.pcall('GET', ARGV[i]) end "
    "return out";
static const char cluster_uid_group_script[] =
    "#!lua flags=allow-cross-slot-keys\n" LUA_ACCOUNT_PKGS
    "local out = {} "
    "for i = 1, #ARGV, 3 do out[#out + 1] = pkgs(ARGV[i], ARGV[i + 1], ARGV[i + 2], true) end "
    "return out";

/* The suspended set and every feature override, in one reply: first the
 * set (an array), or why it cannot be read (a string); then per feature
 * default_qps and tier, or nil and why `feature:<f>` cannot be read. */
static const char state_script[] =
    "local function bad(r) return type(r) == 'table' and r.err end "
    "local p = ARGV[1] local s = redis.pcall('SMEMBERS', p .. '" SL_KEY_SUSPENDED "') "
    "local out = {bad(s) or s} "
    "for i = 2, #ARGV do "
    "  local h = redis.pcall('HMGET', p .. '" SL_KEY_FEATURE "' .. ARGV[i], '" SL_FIELD_DEFAULT_QPS "', "
    "                        '" SL_FIELD_TIER "') "
    "  if bad(h) then out[#out + 1] = false out[#out + 1] = bad(h) "
    "  else out[#out + 1] = h[1] or '' out[#out + 1] = h[2] or '' end "
    "end "
    "return out";

/* The scripts, called by their SHA-1 (db.h: EVALSHA, EVAL after NOSCRIPT). */
enum { SC_ACCOUNT, SC_CLUSTER_ACCOUNT, SC_AK_GROUP, SC_UID_GROUP, SC_STATE, SC_N };

void sl__dirsync_scripts_init(struct sl_dirsync *d) {
  static const char *const text[SC_N] = {account_script, cluster_account_script, cluster_ak_group_script,
                                         cluster_uid_group_script, state_script};
  static const size_t len[SC_N] = {sizeof(account_script) - 1, sizeof(cluster_account_script) - 1,
                                   sizeof(cluster_ak_group_script) - 1, sizeof(cluster_uid_group_script) - 1,
                                   sizeof(state_script) - 1};
  _Static_assert(SL_ARRAY_SIZE(d->scripts) == SC_N, "a slot per script");
  for (int i = 0; i < SC_N; i++) sl_db_script_init(&d->scripts[i], text[i], len[i]);
}

/* ---- logging what Redis holds or says (bounded, rate-limited) ---- */

/* Appends s (n bytes) to a key name of `at` bytes, cut at the bound;
 * returns the new length. */
static size_t key_cat(char *name, size_t at, const char *s, size_t n) {
  size_t room = SL_DIR_BADKEY_NAME - at;
  if (n > room) n = room;
  memcpy(name + at, s, n);
  return at + n;
}

static struct sl_dirsync_badkey *badkey_find(struct sl_dirsync *d, const char *name, size_t len, uint64_t h) {
  for (unsigned i = 0; i < d->nbad; i++)
    if (d->bad[i].hash == h && d->bad[i].len == len && !memcmp(d->bad[i].name, name, len)) return &d->bad[i];
  return NULL;
}

/* Key `name` (without the prefix) could not be used: `why` (wl bytes),
 * and sluice does `instead`. Counted at every read; named in the log at
 * first sight, then at most every BADKEY_LOG_MS while it stays so. */
static void bad_key(struct sl_dirsync *d, const char *name, size_t len, const char *why, size_t wl,
                    const char *instead) {
  uint64_t now = sl_mono_ms();
  sl_stat_inc(&d->stats.bad_key_reads, 1);
  if (len > SL_DIR_BADKEY_NAME) len = SL_DIR_BADKEY_NAME;
  uint64_t h = sl_dir_hash(name, len);
  struct sl_dirsync_badkey *k = badkey_find(d, name, len, h);
  char kn[256], w[200];
  if (!k) {
    if (d->nbad == SL_DIR_BADKEYS) { /* the table is full: one line per period for all the others */
      uint32_t held;
      if (sl_ratelog_ok(&d->log_badfull, now, LOG_EVERY_MS, &held))
        fprintf(stderr,
                "sluice: redis: key '%s%s' cannot be used (%s): %s; more than %u keys are unusable, the others "
                "are counted in sluice_redis_bad_keys_total but not named (%u reads)\n",
                d->prefix, sl_printable(kn, sizeof(kn), name, len), sl_printable(w, sizeof(w), why, wl), instead,
                SL_DIR_BADKEYS, held + 1);
      return;
    }
    k = &d->bad[d->nbad++];
    memset(k, 0, sizeof(*k));
    k->hash = h;
    k->len = (uint16_t)len;
    memcpy(k->name, name, len);
    atomic_store_explicit(&d->stats.bad_keys, d->nbad, memory_order_relaxed);
  }
  k->last_seen_ms = now;
  if (now < k->next_log_ms) {
    k->unlogged++;
    return;
  }
  if (k->unlogged)
    fprintf(stderr, "sluice: redis: key '%s%s' still cannot be used (%s): %s (read %u times since the last line)\n",
            d->prefix, sl_printable(kn, sizeof(kn), name, len), sl_printable(w, sizeof(w), why, wl), instead,
            k->unlogged + 1);
  else
    fprintf(stderr, "sluice: redis: key '%s%s' cannot be used (%s): %s\n", d->prefix,
            sl_printable(kn, sizeof(kn), name, len), sl_printable(w, sizeof(w), why, wl), instead);
  k->unlogged = 0;
  k->next_log_ms = now + BADKEY_LOG_MS;
}

/* Key `name` was read and is usable: if it was not before, say so once. */
static void key_ok(struct sl_dirsync *d, const char *name, size_t len) {
  if (!d->nbad) return;
  if (len > SL_DIR_BADKEY_NAME) len = SL_DIR_BADKEY_NAME;
  struct sl_dirsync_badkey *k = badkey_find(d, name, len, sl_dir_hash(name, len));
  if (!k) return;
  char kn[256];
  fprintf(stderr, "sluice: redis: key '%s%s' is usable again\n", d->prefix, sl_printable(kn, sizeof(kn), name, len));
  *k = d->bad[--d->nbad];
  atomic_store_explicit(&d->stats.bad_keys, d->nbad, memory_order_relaxed);
}

/* Forgets keys not seen unusable for a while (an account no longer asked
 * for is not read again): the gauge counts keys seen bad lately. A key is
 * read again at a full reread, at least every SL_DIR_FULL_EVERY intervals. */
void sl__dirsync_badkey_sweep(struct sl_dirsync *d, uint64_t now) {
  uint64_t full = (uint64_t)SL_DIR_FULL_EVERY * d->resync_ms;
  uint64_t keep = 2 * full > 60000 ? 2 * full : 60000;
  for (unsigned i = 0; i < d->nbad;) {
    if (now - d->bad[i].last_seen_ms > keep)
      d->bad[i] = d->bad[--d->nbad];
    else
      i++;
  }
  atomic_store_explicit(&d->stats.bad_keys, d->nbad, memory_order_relaxed);
}

/* A load that Redis refused as a whole (script error, OOM, BUSY...): what
 * it was to bring is reread at the next interval, whatever notified it. */
static void reply_error(struct sl_dirsync *d, const char *what, const redisReply *r) {
  uint32_t held;
  d->force_full = 1;
  if (!sl_ratelog_ok(&d->log_reply, sl_mono_ms(), LOG_EVERY_MS, &held)) return;
  char w[200];
  fprintf(stderr, "sluice: redis: %s failed: %s", what,
          r->type == REDIS_REPLY_ERROR ? sl_printable(w, sizeof(w), r->str, r->len) : "an unexpected reply");
  if (held) fprintf(stderr, " (%u similar failures not logged)", held);
  fputc('\n', stderr);
}

/* ---- parsing replies ---- */

static int parse_i64(const char *s, size_t n, int64_t *out) {
  if (n == 0 || n > 19) return -1;
  int neg = s[0] == '-';
  int64_t v = 0;
  for (size_t i = neg; i < n; i++) {
    if (s[i] < '0' || s[i] > '9') return -1;
    v = v * 10 + (s[i] - '0');
  }
  if (neg && n == 1) return -1;
  *out = neg ? -v : v;
  return 0;
}

static int str_of(const redisReply *r, const char **s, size_t *n) {
  if (r->type != REDIS_REPLY_STRING && r->type != REDIS_REPLY_STATUS && r->type != REDIS_REPLY_ERROR) return -1;
  *s = r->str;
  *n = r->len;
  return 0;
}

/* An unknown AccessKeyId (also what an unusable `ak:` key answers). */
static struct sl_acct *acct_negative(struct sl_dirsync *d, const char *ak, size_t len, uint64_t now) {
  struct sl_acct *a = sl_acct_new(ak, len, 0);
  a->kind = SL_ACCT_NOT_FOUND;
  a->loaded_ms = now;
  a->valid_until_ms = now + d->negative_ttl_ms;
  return a;
}

/* Fills p from a package's fields e[1..5] (feature, region, qps,
 * starts_at, expires_at). Returns NULL, or why the package cannot be used
 * (in wb, wl bytes). */
static const char *pkg_parse(redisReply *const *e, struct sl_pkg *p, char *wb, size_t wl) {
  const char *feat, *region, *qps, *start, *exp;
  size_t fl, rl, ql, sl, el;
  int64_t q, st = 0, ex;
  if (str_of(e[1], &feat, &fl) || str_of(e[2], &region, &rl) || str_of(e[3], &qps, &ql) ||
      str_of(e[4], &start, &sl) || str_of(e[5], &exp, &el))
    return "a field is not a string";
  if (rl == 0 || rl > SL_REGION_MAX) {
    snprintf(wb, wl, "region '%.*s' is empty or over %d bytes", (int)(rl > 32 ? 32 : rl), region, SL_REGION_MAX);
    return wb;
  }
  if (parse_i64(qps, ql, &q) || q < 0 || q > UINT32_MAX) {
    snprintf(wb, wl, "qps '%.*s' is not a number from 0 to %u", (int)(ql > 32 ? 32 : ql), qps, UINT32_MAX);
    return wb;
  }
  if (sl && parse_i64(start, sl, &st)) {
    snprintf(wb, wl, "starts_at '%.*s' is not unix seconds", (int)(sl > 32 ? 32 : sl), start);
    return wb;
  }
  if (parse_i64(exp, el, &ex)) {
    snprintf(wb, wl, "expires_at '%.*s' is not unix seconds", (int)(el > 32 ? 32 : el), exp);
    return wb;
  }
  p->feature = sl_feature_id(feat, fl);
  p->qps = (uint32_t)q;
  p->starts_at = st;
  p->expires_at = ex;
  memcpy(p->region, region, rl);
  p->region_len = (uint8_t)rl;
  return NULL;
}

/* Builds the record for ak from its element of the account script's reply.
 * Each key stands alone: an unusable `ak:` key (wrong type, an empty UID,
 * a UID over SL_UID_MAX bytes) answers like an unknown AccessKeyId; an
 * unusable package set leaves the account without packages; an unusable
 * package is left out. Each is named (bad_key). Returns the record (the
 * caller owns it), or NULL when the element is not what the script makes
 * (the caller answers "unavailable"). */
struct sl_acct *sl__dirsync_acct_from_reply(struct sl_dirsync *d, const char *ak, size_t ak_len, const redisReply *r) {
  uint64_t now = sl_mono_ms();
  char kn[SL_DIR_BADKEY_NAME], wb[128];
  size_t kl = key_cat(kn, key_cat(kn, 0, SL_KEY_AK, SL_KEYLEN(SL_KEY_AK)), ak, ak_len);
  if (r->type != REDIS_REPLY_ARRAY) return NULL;
  if (r->elements == 0) {
    key_ok(d, kn, kl); /* gone is not bad */
    return acct_negative(d, ak, ak_len, now);
  }
  const redisReply *k0 = r->element[0];
  if (k0->type != REDIS_REPLY_INTEGER) return NULL;
  if (k0->integer == 2) {
    const char *why = "unreadable";
    size_t wl = strlen(why);
    if (r->elements >= 2) str_of(r->element[1], &why, &wl);
    bad_key(d, kn, kl, why, wl, "answered as an unknown AccessKeyId");
    return acct_negative(d, ak, ak_len, now);
  }
  if (k0->integer != 1 || r->elements < 4) return NULL;
  const char *uid, *se;
  size_t uid_len, sel;
  if (str_of(r->element[1], &uid, &uid_len) || str_of(r->element[2], &se, &sel)) return NULL;
  if (uid_len == 0 || uid_len > SL_UID_MAX) {
    int wl = uid_len ? snprintf(wb, sizeof(wb), "its UID is %zu bytes, over %d", uid_len, SL_UID_MAX)
                     : snprintf(wb, sizeof(wb), "its UID is empty");
    bad_key(d, kn, kl, wb, (size_t)wl, "answered as an unknown AccessKeyId");
    return acct_negative(d, ak, ak_len, now);
  }
  key_ok(d, kn, kl);
  /* the package set */
  kl = key_cat(kn, key_cat(kn, 0, SL_KEY_QPSPKGS, SL_KEYLEN(SL_KEY_QPSPKGS)), uid, uid_len);
  long long nids = r->element[3]->type == REDIS_REPLY_INTEGER ? r->element[3]->integer : 0;
  if (sel) {
    bad_key(d, kn, kl, se, sel, "the account counts no package");
  } else if (nids > SL_MAX_PKGS) {
    int wl = snprintf(wb, sizeof(wb), "it lists %lld packages", nids);
    bad_key(d, kn, kl, wb, (size_t)wl, "only " STR(SL_MAX_PKGS) " of them count");
  } else {
    key_ok(d, kn, kl);
  }
  size_t npk = r->elements - 4;
  if (npk > SL_MAX_PKGS) npk = SL_MAX_PKGS;
  struct sl_acct *a = sl_acct_new(ak, ak_len, (uint32_t)npk);
  a->kind = SL_ACCT_FOUND;
  a->loaded_ms = now;
  a->valid_until_ms = UINT64_MAX;
  memcpy(a->uid, uid, uid_len);
  a->uid_len = (uint8_t)uid_len;
  uint32_t used = 0;
  for (size_t k = 0; k < npk; k++) {
    const redisReply *e = r->element[4 + k];
    const char *id, *why = NULL;
    size_t idl, wl = 0;
    if (e->type != REDIS_REPLY_ARRAY || e->elements < 2 || str_of(e->element[0], &id, &idl)) {
      sl_stat_inc(&d->stats.invalid_packages, 1); /* not what the script makes */
      continue;
    }
    kl = key_cat(kn, key_cat(kn, key_cat(kn, key_cat(kn, 0, SL_KEY_QPSPKG, SL_KEYLEN(SL_KEY_QPSPKG)), uid, uid_len), ":", 1), id, idl);
    struct sl_pkg *p = &a->pkgs[used];
    if (e->elements == 2) {
      if (str_of(e->element[1], &why, &wl)) why = "unreadable";
    } else if (e->elements != 6) {
      why = "an unexpected reply";
    } else if (idl > SL_PKGID_MAX) {
      snprintf(wb, sizeof(wb), "its id is over %d bytes", SL_PKGID_MAX);
      why = wb;
    } else {
      why = pkg_parse(e->element, p, wb, sizeof(wb));
    }
    if (why) {
      sl_stat_inc(&d->stats.invalid_packages, 1);
      bad_key(d, kn, kl, why, wl ? wl : strlen(why), "the package is ignored");
      continue;
    }
    memcpy(p->id, id, idl);
    p->id_len = (uint8_t)idl;
    used++;
    if (p->feature < 0) { /* kept (it shows in /explain) but never counts */
      sl_stat_inc(&d->stats.invalid_packages, 1);
      const char *fs = "";
      size_t fsl = 0;
      str_of(e->element[1], &fs, &fsl);
      int n = snprintf(wb, sizeof(wb), "feature '%.*s' is not a known feature", (int)(fsl > 32 ? 32 : fsl), fs);
      bad_key(d, kn, kl, wb, (size_t)n, "the package never counts");
    } else {
      key_ok(d, kn, kl);
    }
  }
  a->npkgs = used;
  return a;
}

struct batch {
  unsigned n;
  int first; /* counted in lookup_calls */
  uint8_t len[BATCH];
  char ak[BATCH][SL_AK_MAX + 1];
};

void sl__dirsync_accounts_reply(struct sl_dirsync *d, unsigned n, const char (*aks)[SL_AK_MAX + 1],
                                const uint8_t *lens, const redisReply *r) {
  int ok = r && r->type == REDIS_REPLY_ARRAY && r->elements == n;
  if (r && !ok) reply_error(d, "account load", r);
  if (ok && !d->suspended_known) {
    /* Never fail open on suspension: with no suspended set read yet, an
     * account found could be a suspended one. */
    uint32_t held;
    if (sl_ratelog_ok(&d->log_nosusp, sl_mono_ms(), LOG_EVERY_MS, &held))
      fprintf(stderr,
              "sluice: redis: the suspended set '%s" SL_KEY_SUSPENDED "' has not been read: accounts are answered "
              "'unavailable' until it is\n",
              d->prefix);
    ok = 0;
  }
  for (unsigned i = 0; i < n; i++) {
    uint64_t h = sl_dir_hash(aks[i], lens[i]);
    int p = sl__dirsync_pending_find(d, aks[i], lens[i], h);
    struct sl_acct *a = ok ? sl__dirsync_acct_from_reply(d, aks[i], lens[i], r->element[i]) : NULL;
    if (a) {
      sl_dir_put(&d->b, a);
    } else if (p >= 0) { /* a first lookup that failed: say so, do not guess */
      sl__dirsync_unavailable(d, aks[i], lens[i]);
    }
    if (p >= 0) sl__dirsync_pending_drop(d, (unsigned)p);
  }
  sl__dirsync_publish(d);
}

static void on_accounts(void *owner, void *priv, const redisReply *reply) {
  struct sl_dirsync *d = owner;
  struct batch *bt = priv;
  if (d) sl__dirsync_accounts_reply(d, bt->n, (const char(*)[SL_AK_MAX + 1])bt->ak, bt->len, reply);
  /* else a context we dropped: its lookups time out into "unavailable"
   * (on_redis_down zeroed lookup_calls) */
  if (d && bt->first && d->lookup_calls && --d->lookup_calls == 0) sl__dirsync_request_unsent(d);
  free(bt);
}

/* The suspended set's part of the state: m, the set (an array) or why it
 * cannot be read. */
static void state_suspended(struct sl_dirsync *d, const redisReply *m) {
  if (m->type == REDIS_REPLY_ARRAY) {
    const char **strs = sl_calloc(m->elements + 1, sizeof(char *));
    size_t *lens = sl_calloc(m->elements + 1, sizeof(size_t));
    size_t n = 0;
    for (size_t i = 0; i < m->elements; i++)
      if (str_of(m->element[i], &strs[n], &lens[n]) == 0) n++;
    sl_dir_set_suspended(&d->b, sl_strset_new(strs, lens, n));
    free(strs);
    free(lens);
    d->suspended_known = 1;
    key_ok(d, SL_KEY_SUSPENDED, SL_KEYLEN(SL_KEY_SUSPENDED));
  } else {
    /* Never "nobody is suspended" for "could not read": keep what we had. */
    const char *why = "an unexpected reply";
    size_t wl = strlen(why);
    str_of(m, &why, &wl);
    bad_key(d, SL_KEY_SUSPENDED, SL_KEYLEN(SL_KEY_SUSPENDED), why, wl,
            d->suspended_known ? "the set read last stays in force"
                               : "no account is admitted until it can be read");
  }
}

/* Feature f's override: qr, tr its default_qps and tier ('' when absent),
 * or qr nil and tr why `feature:<f>` cannot be read. */
static void state_feature(struct sl_dirsync *d, unsigned f, const redisReply *qr, const redisReply *tr) {
  char kn[SL_DIR_BADKEY_NAME], wb[128];
  const char *fname = sl_features[f].name;
  size_t kl = key_cat(kn, key_cat(kn, 0, SL_KEY_FEATURE, SL_KEYLEN(SL_KEY_FEATURE)), fname, strlen(fname));
  const char *qs, *ts, *why = NULL;
  size_t ql, tl;
  int64_t q;
  uint32_t qps = sl_features[f].default_qps;
  uint8_t tier = (uint8_t)sl_features[f].tier;
  int over = 0;
  if (qr->type == REDIS_REPLY_NIL) { /* the key cannot be read: as if absent */
    size_t wl;
    if (str_of(tr, &why, &wl)) why = "unreadable", wl = strlen(why);
    bad_key(d, kn, kl, why, wl, "the built-in default applies");
    sl_dir_set_feature(&d->b, f, qps, tier, 0);
    return;
  }
  if (str_of(qr, &qs, &ql) == 0 && ql) {
    if (parse_i64(qs, ql, &q) == 0 && q >= 0 && q <= UINT32_MAX) {
      qps = (uint32_t)q;
      over = 1;
    } else {
      snprintf(wb, sizeof(wb), "default_qps '%.*s' is not a number", (int)(ql > 32 ? 32 : ql), qs);
      why = wb;
    }
  }
  if (str_of(tr, &ts, &tl) == 0 && tl) {
    if (tl == 3 && !memcmp(ts, "llm", 3)) {
      tier = SL_TIER_LLM;
      over = 1;
    } else if (tl == 8 && !memcmp(ts, "baseline", 8)) {
      tier = SL_TIER_BASELINE;
      over = 1;
    } else if (!why) {
      snprintf(wb, sizeof(wb), "tier '%.*s' is neither llm nor baseline", (int)(tl > 32 ? 32 : tl), ts);
      why = wb;
    }
  }
  if (why)
    bad_key(d, kn, kl, why, strlen(why), "that field's built-in default applies");
  else
    key_ok(d, kn, kl);
  sl_dir_set_feature(&d->b, f, qps, tier, over);
}

void sl__dirsync_state_reply(struct sl_dirsync *d, const redisReply *r) {
  if (r->type != REDIS_REPLY_ARRAY || r->elements != 1 + 2 * sl_nfeatures) {
    reply_error(d, "state load", r);
    return;
  }
  state_suspended(d, r->element[0]);
  for (unsigned f = 0; f < sl_nfeatures; f++) state_feature(d, f, r->element[1 + 2 * f], r->element[2 + 2 * f]);
  sl__dirsync_publish(d);
}

static void on_state(void *owner, void *priv, const redisReply *reply) {
  (void)priv;
  struct sl_dirsync *d = owner;
  if (d && reply) sl__dirsync_state_reply(d, reply);
}

/* A key's own error (WRONGTYPE...) rather than the cluster's or the
 * server's (CLUSTERDOWN, LOADING, OOM...): the key is named as bad. */
static int key_error(const redisReply *r) {
  return r->type == REDIS_REPLY_ERROR && r->len >= 9 && !memcmp(r->str, "WRONGTYPE", 9);
}

/* A cluster: the suspended set, read on its slot. The first read lets the
 * lookups that waited for it go. */
static void on_cluster_suspended(void *owner, void *priv, const redisReply *reply) {
  (void)priv;
  struct sl_dirsync *d = owner;
  if (!d || !reply) return;
  if (reply->type == REDIS_REPLY_ERROR && !key_error(reply)) {
    reply_error(d, "state load", reply);
    return;
  }
  int first = !d->suspended_known;
  state_suspended(d, reply);
  sl__dirsync_publish(d);
  if (first && d->suspended_known) sl__dirsync_request_pending(d);
}

/* A cluster: feature:<f> (f in priv), read on its slot. */
static void on_cluster_feature(void *owner, void *priv, const redisReply *reply) {
  struct sl_dirsync *d = owner;
  unsigned f = (unsigned)(uintptr_t)priv;
  if (!d || !reply || f >= sl_nfeatures) return;
  redisReply empty = {.type = REDIS_REPLY_STRING, .str = (char *)"", .len = 0};
  redisReply nil = {.type = REDIS_REPLY_NIL};
  if (key_error(reply)) {
    state_feature(d, f, &nil, reply);
  } else if (reply->type == REDIS_REPLY_ARRAY && reply->elements == 2) {
    const redisReply *q = reply->element[0], *t = reply->element[1];
    state_feature(d, f, q->type == REDIS_REPLY_NIL ? &empty : q, t->type == REDIS_REPLY_NIL ? &empty : t);
  } else {
    reply_error(d, "state load", reply);
    return;
  }
  sl__dirsync_publish(d);
}

/* A cluster: the keys without a UID each on its own slot. */
static void request_state_cluster(struct sl_dirsync *d) {
  char k[200];
  const char *argv[4];
  size_t lens[4];
  int n = snprintf(k, sizeof(k), "%s" SL_KEY_SUSPENDED, d->prefix);
  argv[0] = "SMEMBERS", lens[0] = 8;
  argv[1] = k, lens[1] = (size_t)n;
  sl_db_command(d->db, sl_db_key_slot(k, (size_t)n), on_cluster_suspended, NULL, 2, argv, lens);
  for (unsigned f = 0; f < sl_nfeatures; f++) {
    n = snprintf(k, sizeof(k), "%s" SL_KEY_FEATURE "%s", d->prefix, sl_features[f].name);
    argv[0] = "HMGET", lens[0] = 5;
    argv[1] = k, lens[1] = (size_t)n;
    argv[2] = SL_FIELD_DEFAULT_QPS, lens[2] = SL_KEYLEN(SL_FIELD_DEFAULT_QPS);
    argv[3] = SL_FIELD_TIER, lens[3] = SL_KEYLEN(SL_FIELD_TIER);
    sl_db_command(d->db, sl_db_key_slot(k, (size_t)n), on_cluster_feature, (void *)(uintptr_t)f, 4, argv, lens);
  }
}

/* ---- a cluster's account lookups: `ak:` on its slot, then the UID's ---- */

struct ak_lookup {
  uint8_t len;
  char ak[SL_AK_MAX + 1];
  uint8_t uid_len;            /* the UID found, for its packages' step */
  char uid[SL_UID_MAX + 1];
};

#define GROUP_MAX 100 /* lookups in one master's script */

/* One master's script of lookups in flight. */
struct lookup_group {
  unsigned n;
  struct ak_lookup *l[GROUP_MAX];
};

/* The account's element (r: NULL when not known) for one AccessKeyId:
 * as sl__dirsync_accounts_reply does for a batch of one. */
static void cluster_account_done(struct sl_dirsync *d, struct ak_lookup *l, const redisReply *r) {
  redisReply *one[1] = {(redisReply *)r};
  redisReply arr = {.type = REDIS_REPLY_ARRAY, .elements = 1, .element = one};
  sl__dirsync_accounts_reply(d, 1, (const char(*)[SL_AK_MAX + 1])l->ak, &l->len, r ? &arr : NULL);
  free(l);
}

static void on_cluster_account(void *owner, void *priv, const redisReply *reply) {
  struct sl_dirsync *d = owner;
  struct ak_lookup *l = priv;
  if (!d) {
    free(l); /* its lookup times out into "unavailable" */
    return;
  }
  if (reply && reply->type == REDIS_REPLY_ERROR) {
    reply_error(d, "account load", reply);
    reply = NULL;
  }
  cluster_account_done(d, l, reply);
}

/* The account's packages on its UID's slot (uid: uid_len bytes, 1 to
 * SL_UID_MAX). Returns 0, or not 0 when nothing was sent. */
#define UID_KEY_MAX 400 /* a prefix (< 64), a key name, a tagged UID (< 66), a package's ':' */

/* The account's packages set and the head of its packages' names, into
 * set and pkg (UID_KEY_MAX each); *n1, *n2 their lengths. Returns 0, or -1
 * for a UID that cannot name keys (empty, too long, a brace in a cluster). */
static int uid_keys(struct sl_dirsync *d, const char *uid, size_t uid_len, char *set, int *n1, char *pkg, int *n2) {
  if (uid_len == 0 || uid_len > SL_UID_MAX) return -1;
  char head[128];
  int hn = snprintf(head, sizeof(head), "%s" SL_KEY_QPSPKGS, d->prefix);
  *n1 = sl_db_uid_key(d->db, set, UID_KEY_MAX, head, (size_t)hn, uid, uid_len, "", 0);
  hn = snprintf(head, sizeof(head), "%s" SL_KEY_QPSPKG, d->prefix);
  *n2 = sl_db_uid_key(d->db, pkg, UID_KEY_MAX, head, (size_t)hn, uid, uid_len, ":", 1);
  return *n1 < 0 || *n2 < 0 ? -1 : 0;
}

static int uid_usable(struct sl_dirsync *d, const char *uid, size_t uid_len) {
  char set[UID_KEY_MAX], pkg[UID_KEY_MAX];
  int n1, n2;
  return uid_keys(d, uid, uid_len, set, &n1, pkg, &n2) == 0;
}

static int request_uid(struct sl_dirsync *d, struct ak_lookup *l, const char *uid, size_t uid_len) {
  char set[UID_KEY_MAX], pkg[UID_KEY_MAX];
  int n1, n2;
  if (uid_keys(d, uid, uid_len, set, &n1, pkg, &n2) != 0) return -1;
  const char *argv[] = {"1", set, pkg, uid};
  size_t lens[] = {1, (size_t)n1, (size_t)n2, uid_len};
  return sl_db_eval(d->db, sl_db_uid_slot(uid, uid_len), &d->scripts[SC_CLUSTER_ACCOUNT], on_cluster_account, l, 4,
                    argv, lens);
}

/* The `ak:` key's GET answered (reply not NULL): the lookup ends here (no
 * such key, a wrong type, an unusable UID) or *uid is set (1) for the
 * packages' step. */
static int ak_answered(struct sl_dirsync *d, struct ak_lookup *l, const redisReply *reply) {
  /* what account_script answers for this `ak:` key */
  redisReply el = {.type = REDIS_REPLY_ARRAY};
  redisReply two = {.type = REDIS_REPLY_INTEGER, .integer = 2}, one = {.type = REDIS_REPLY_INTEGER, .integer = 1};
  redisReply blank = {.type = REDIS_REPLY_STRING, .str = (char *)"", .len = 0};
  redisReply zero = {.type = REDIS_REPLY_INTEGER, .integer = 0};
  redisReply *els[4];
  if (reply->type == REDIS_REPLY_NIL) {
    cluster_account_done(d, l, &el); /* {}: no such key */
    return 0;
  }
  if (key_error(reply)) {
    els[0] = &two, els[1] = (redisReply *)reply;
    el.elements = 2, el.element = els;
    cluster_account_done(d, l, &el);
    return 0;
  }
  if (reply->type != REDIS_REPLY_STRING) {
    reply_error(d, "account load", reply);
    cluster_account_done(d, l, NULL);
    return 0;
  }
  if (!uid_usable(d, reply->str, reply->len)) {
    /* an unusable UID: the element says so (acct_from_reply names the key) */
    els[0] = &one, els[1] = (redisReply *)reply, els[2] = &blank, els[3] = &zero;
    el.elements = 4, el.element = els;
    cluster_account_done(d, l, &el);
    return 0;
  }
  memcpy(l->uid, reply->str, reply->len);
  l->uid_len = (uint8_t)reply->len;
  return 1;
}

static void on_cluster_ak(void *owner, void *priv, const redisReply *reply) {
  struct sl_dirsync *d = owner;
  struct ak_lookup *l = priv;
  if (!d || !reply) {
    if (d) cluster_account_done(d, l, NULL);
    else free(l);
    return;
  }
  if (ak_answered(d, l, reply) && request_uid(d, l, l->uid, l->uid_len) != 0) cluster_account_done(d, l, NULL);
}

/* The `ak:` key's GET on its own slot. */
static void request_ak(struct sl_dirsync *d, struct ak_lookup *l) {
  char k[200];
  int kn = snprintf(k, sizeof(k), "%s" SL_KEY_AK "%.*s", d->prefix, (int)l->len, l->ak);
  const char *argv[] = {"GET", k};
  size_t lens[] = {3, (size_t)kn};
  if (sl_db_command(d->db, sl_db_key_slot(k, (size_t)kn), on_cluster_ak, l, 2, argv, lens) != 0) free(l);
}

/* Sends ls[0..n) in groups of one master (the map's; a slot no master
 * serves, or no map yet: each alone), step 0 the `ak:` keys, 1 the UIDs'
 * packages (l->uid set). */
static void request_grouped(struct sl_dirsync *d, struct ak_lookup **ls, unsigned n, int step);

static void on_group(struct sl_dirsync *d, struct lookup_group *g, const redisReply *r, int step) {
  if (!d) {
    for (unsigned i = 0; i < g->n; i++) free(g->l[i]);
    free(g);
    return;
  }
  if (r && r->type == REDIS_REPLY_ERROR) reply_error(d, "account load (a master's group)", r);
  int whole = r && r->type == REDIS_REPLY_ARRAY && r->elements == g->n;
  struct ak_lookup *next[GROUP_MAX];
  unsigned nn = 0;
  for (unsigned i = 0; i < g->n; i++) {
    struct ak_lookup *l = g->l[i];
    const redisReply *e = whole ? r->element[i] : NULL;
    if (!r) {
      cluster_account_done(d, l, NULL); /* its fate unknown: unavailable, as a lone lookup's */
    } else if (!e || (e->type == REDIS_REPLY_ERROR && !key_error(e)) || (e->type == REDIS_REPLY_INTEGER && step == 1)) {
      /* refused here (another master's slot, a migration) or the whole
       * script refused: this one on its own, by slot */
      if (step == 0) request_ak(d, l);
      else if (request_uid(d, l, l->uid, l->uid_len) != 0) cluster_account_done(d, l, NULL);
    } else if (step == 0) {
      if (ak_answered(d, l, e)) next[nn++] = l;
    } else if (e->type == REDIS_REPLY_ARRAY) {
      cluster_account_done(d, l, e);
    } else {
      reply_error(d, "account load", e);
      cluster_account_done(d, l, NULL);
    }
  }
  free(g);
  if (nn) request_grouped(d, next, nn, 1);
}

static void on_group_ak(void *owner, void *priv, const redisReply *reply) { on_group(owner, priv, reply, 0); }
static void on_group_uid(void *owner, void *priv, const redisReply *reply) { on_group(owner, priv, reply, 1); }

/* One master's group: its script, or each alone when it cannot be sent. */
static void send_group(struct sl_dirsync *d, struct lookup_group *g, unsigned slot, int step) {
  enum { KEY_MAX = UID_KEY_MAX };
  const unsigned per = step ? 3 : 1;
  const char **argv = sl_malloc((1 + per * g->n) * sizeof *argv);
  size_t *lens = sl_malloc((1 + per * g->n) * sizeof *lens);
  char *buf = sl_malloc((size_t)g->n * 2 * KEY_MAX), *p = buf;
  int argc = 0;
  argv[argc] = "0", lens[argc++] = 1;
  for (unsigned i = 0; i < g->n; i++) {
    struct ak_lookup *l = g->l[i];
    if (step == 0) {
      int kn = snprintf(p, KEY_MAX, "%s" SL_KEY_AK "%.*s", d->prefix, (int)l->len, l->ak);
      argv[argc] = p, lens[argc++] = (size_t)kn;
      p += KEY_MAX;
      continue;
    }
    int n1, n2;
    if (uid_keys(d, l->uid, l->uid_len, p, &n1, p + KEY_MAX, &n2) != 0) n1 = n2 = 0; /* checked when found */
    argv[argc] = p, lens[argc++] = (size_t)n1;
    argv[argc] = p + KEY_MAX, lens[argc++] = (size_t)n2;
    argv[argc] = l->uid, lens[argc++] = l->uid_len;
    p += 2 * KEY_MAX;
  }
  if (sl_db_eval(d->db, slot, &d->scripts[step ? SC_UID_GROUP : SC_AK_GROUP], step ? on_group_uid : on_group_ak, g,
                 argc, argv, lens) != 0) {
    for (unsigned i = 0; i < g->n; i++) cluster_account_done(d, g->l[i], NULL);
    free(g);
  }
  free(buf);
  free(argv);
  free(lens);
}

static void request_grouped(struct sl_dirsync *d, struct ak_lookup **ls, unsigned n, int step) {
  /* A group key holds a 16-bit index: a resync of more accounts goes in parts. */
  enum { PART = 4096 };
  _Static_assert(PART <= 0xffff + 1, "sl_cluster_group_key keeps 16 bits of the index");
  for (; n > PART; ls += PART, n -= PART) request_grouped(d, ls, PART, step);
  const struct sl_cluster_map *m = sl_db_map(d->db);
  uint64_t *keys = sl_malloc((n ? n : 1) * sizeof *keys);
  for (unsigned i = 0; i < n; i++) {
    unsigned slot;
    if (step == 0) {
      char k[200];
      int kn = snprintf(k, sizeof(k), "%s" SL_KEY_AK "%.*s", d->prefix, (int)ls[i]->len, ls[i]->ak);
      slot = sl_db_key_slot(k, (size_t)kn);
    } else {
      slot = sl_db_uid_slot(ls[i]->uid, ls[i]->uid_len);
    }
    keys[i] = sl_cluster_group_key(m, slot, i);
  }
  sl_cluster_group_sort(keys, n);
  for (size_t from = 0; from < n;) {
    size_t end = sl_cluster_group_end(keys, n, from, 0);
    if (sl_cluster_group_node(keys[from]) == SL_CLUSTER_NO_NODE || end - from == 1) {
      for (size_t i = from; i < end; i++) { /* alone: by slot, as before */
        struct ak_lookup *l = ls[sl_cluster_group_index(keys[i])];
        if (step == 0) request_ak(d, l);
        else if (request_uid(d, l, l->uid, l->uid_len) != 0) cluster_account_done(d, l, NULL);
      }
      from = end;
      continue;
    }
    for (; from < end;) {
      struct lookup_group *g = sl_malloc(sizeof *g);
      g->n = 0;
      unsigned slot = sl_cluster_group_slot(keys[from]);
      while (from < end && g->n < GROUP_MAX) g->l[g->n++] = ls[sl_cluster_group_index(keys[from++])];
      send_group(d, g, slot, step);
    }
  }
  free(keys);
}

static void request_accounts_cluster(struct sl_dirsync *d, char (*aks)[SL_AK_MAX + 1], const uint8_t *akl,
                                     unsigned n) {
  struct ak_lookup **by_ak = sl_malloc((n ? n : 1) * sizeof *by_ak), **by_uid = sl_malloc((n ? n : 1) * sizeof *by_uid);
  unsigned na = 0, nu = 0;
  for (unsigned i = 0; i < n; i++) {
    struct ak_lookup *l = sl_malloc(sizeof(*l));
    l->len = akl[i];
    memcpy(l->ak, aks[i], akl[i]);
    if (akl[i] && aks[i][0] == 1) { /* a UID from a trusted header: no `ak:` key */
      if (!uid_usable(d, aks[i] + 1, akl[i] - 1u)) {
        cluster_account_done(d, l, NULL);
        continue;
      }
      l->uid_len = (uint8_t)(akl[i] - 1u);
      memcpy(l->uid, aks[i] + 1, l->uid_len);
      by_uid[nu++] = l;
      continue;
    }
    by_ak[na++] = l;
  }
  request_grouped(d, by_ak, na, 0);
  request_grouped(d, by_uid, nu, 1);
  free(by_ak);
  free(by_uid);
}

void sl__dirsync_request_state(struct sl_dirsync *d) {
  if (!sl__dirsync_cmd_ready(d)) return;
  if (d->cluster) {
    request_state_cluster(d);
    return;
  }
  const char *argv[2 + SL_MAX_FEATURES];
  size_t lens[2 + SL_MAX_FEATURES];
  int argc = 0;
  argv[argc] = "0", lens[argc++] = 1;
  argv[argc] = d->prefix, lens[argc++] = d->prefix_len;
  for (unsigned f = 0; f < sl_nfeatures && argc < (int)SL_ARRAY_SIZE(argv); f++) {
    argv[argc] = sl_features[f].name;
    lens[argc++] = strlen(sl_features[f].name);
  }
  sl_db_eval(d->db, 0, &d->scripts[SC_STATE], on_state, NULL, argc, argv, lens);
}

void sl__dirsync_request_accounts(struct sl_dirsync *d, char (*aks)[SL_AK_MAX + 1], const uint8_t *akl, unsigned n,
                                  int first) {
  if (!sl__dirsync_cmd_ready(d)) return; /* the callers ask only while ready */
  if (d->cluster) {
    request_accounts_cluster(d, aks, akl, n);
    return;
  }
  for (unsigned off = 0; off < n; off += BATCH) {
    unsigned k = n - off < BATCH ? n - off : BATCH;
    struct batch *bt = sl_calloc(1, sizeof(*bt));
    bt->n = k;
    bt->first = first;
    const char *argv[2 + BATCH];
    size_t lens[2 + BATCH];
    int argc = 0;
    argv[argc] = "0", lens[argc++] = 1;
    argv[argc] = d->prefix, lens[argc++] = d->prefix_len;
    for (unsigned i = 0; i < k; i++) {
      memcpy(bt->ak[i], aks[off + i], akl[off + i]);
      bt->len[i] = akl[off + i];
      argv[argc] = bt->ak[i];
      lens[argc++] = bt->len[i];
    }
    if (sl_db_eval(d->db, 0, &d->scripts[SC_ACCOUNT], on_accounts, bt, argc, argv, lens) != 0) free(bt);
    else if (first) d->lookup_calls++;
  }
}
