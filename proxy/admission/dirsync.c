#include "dirsync.h"

#include <errno.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "dirsync_int.h"
#include "redis_uv.h"

#include "catalog.h"
#include "common.h"
#include "uv_util.h"

#define BATCH 100          /* accounts per EVAL */
#define LOG_EVERY_MS 10000 /* "down" and error lines: at most one per this */
#define BADKEY_LOG_MS 60000 /* a key that stays unusable is named again at most this often */
#define STATE_RETRY_MS 1000 /* the suspended set never read yet: ask again this often */
#define STR_(x) #x
#define STR(x) STR_(x)

/* One round trip per batch of accounts: the UID and every package of it,
 * read atomically (a script runs alone), so a record never mixes states.
 * A key starting with byte 0x01 is a UID given by a trusted header (no
 * AccessKeyId holds control bytes: the classifier refuses them).
 * Every read is a pcall: a key of the wrong type is reported for that key
 * alone instead of failing the whole batch. Per account:
 *   {}                                    no `ak:` key
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
    "  else uid = redis.pcall('GET', p .. 'ak:' .. a) e = bad(uid) end "
    "  if e then out[i - 1] = {2, e} "
    "  elseif not uid then out[i - 1] = {} "
    "  else "
    "    local ids = redis.pcall('SMEMBERS', p .. 'qpspkgs:' .. uid) "
    "    local r = {1, uid, bad(ids) or '', 0} "
    "    if bad(ids) then ids = {} end "
    "    r[4] = #ids "
    "    for j = 1, math.min(#ids, " STR(SL_MAX_PKGS) ") do "
    "      local id = ids[j] "
    "      local h = redis.pcall('HMGET', p .. 'qpspkg:' .. uid .. ':' .. id, "
    "                            'feature', 'region', 'qps', 'starts_at', 'expires_at') "
    "      e = bad(h) "
    "      if e then r[#r + 1] = {id, e} "
    "      else r[#r + 1] = {id, h[1] or '', h[2] or '', h[3] or '', h[4] or '', h[5] or ''} end "
    "    end "
    "    out[i - 1] = r "
    "  end "
    "end "
    "return out";

/* The suspended set and every feature override, in one reply: first the
 * set (an array), or why it cannot be read (a string); then per feature
 * default_qps and tier, or nil and why `feature:<f>` cannot be read. */
static const char state_script[] =
    "local function bad(r) return type(r) == 'table' and r.err end "
    "local p = ARGV[1] local s = redis.pcall('SMEMBERS', p .. 'suspended') "
    "local out = {bad(s) or s} "
    "for i = 2, #ARGV do "
    "  local h = redis.pcall('HMGET', p .. 'feature:' .. ARGV[i], 'default_qps', 'tier') "
    "  if bad(h) then out[#out + 1] = false out[#out + 1] = bad(h) "
    "  else out[#out + 1] = h[1] or '' out[#out + 1] = h[2] or '' end "
    "end "
    "return out";



/* The directory thread is each counter's only writer. */
static inline void sl_stat_add_dir(_Atomic uint64_t *c) { atomic_fetch_add_explicit(c, 1, memory_order_relaxed); }

static void connect_redis(struct sl_dirsync *d);
static void request_state(struct sl_dirsync *d);
static void request_accounts(struct sl_dirsync *d, char (*aks)[SL_AK_MAX + 1], const uint8_t *lens, unsigned n);

/* ---- logging what Redis holds or says (bounded, rate-limited) ---- */

/* s (n bytes) as a NUL-terminated printable string in out (cap >= 8):
 * bytes outside printable ASCII and backslashes as \xHH (a value read from
 * Redis must not forge log lines); cut with "..." at cap. Returns out. */
static const char *printable(char *out, size_t cap, const char *s, size_t n) {
  static const char hex[] = "0123456789abcdef";
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)s[i];
    size_t need = ch >= 0x20 && ch < 0x7f && ch != '\\' ? 1 : 4;
    if (o + need + 4 > cap) { /* keep room for "..." and the NUL */
      memcpy(out + o, "...", 3);
      o += 3;
      break;
    }
    if (need == 1) {
      out[o++] = (char)ch;
    } else {
      out[o++] = '\\';
      out[o++] = 'x';
      out[o++] = hex[ch >> 4];
      out[o++] = hex[ch & 15];
    }
  }
  out[o] = '\0';
  return out;
}

/* Returns 1 when a line may be written now (*held: lines held back since
 * the last one), else counts this one as held back and returns 0. */
static int ratelog_ok(struct sl_dirsync_ratelog *r, uint64_t now, uint32_t *held) {
  if (now < r->next_ms) {
    r->held++;
    return 0;
  }
  *held = r->held;
  r->held = 0;
  r->next_ms = now + LOG_EVERY_MS;
  return 1;
}

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
  sl_stat_add_dir(&d->stats.bad_key_reads);
  if (len > SL_DIR_BADKEY_NAME) len = SL_DIR_BADKEY_NAME;
  uint64_t h = sl_dir_hash(name, len);
  struct sl_dirsync_badkey *k = badkey_find(d, name, len, h);
  char kn[256], w[200];
  if (!k) {
    if (d->nbad == SL_DIR_BADKEYS) { /* the table is full: one line per period for all the others */
      uint32_t held;
      if (ratelog_ok(&d->log_badfull, now, &held))
        fprintf(stderr,
                "sluice: redis: key '%s%s' cannot be used (%s): %s; more than %u keys are unusable, the others "
                "are counted in sluice_redis_bad_keys_total but not named (%u reads)\n",
                d->prefix, printable(kn, sizeof(kn), name, len), printable(w, sizeof(w), why, wl), instead,
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
            d->prefix, printable(kn, sizeof(kn), name, len), printable(w, sizeof(w), why, wl), instead,
            k->unlogged + 1);
  else
    fprintf(stderr, "sluice: redis: key '%s%s' cannot be used (%s): %s\n", d->prefix,
            printable(kn, sizeof(kn), name, len), printable(w, sizeof(w), why, wl), instead);
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
  fprintf(stderr, "sluice: redis: key '%s%s' is usable again\n", d->prefix, printable(kn, sizeof(kn), name, len));
  *k = d->bad[--d->nbad];
  atomic_store_explicit(&d->stats.bad_keys, d->nbad, memory_order_relaxed);
}

/* Forgets keys not seen unusable for a while (an account no longer asked
 * for is not read again): the gauge counts keys seen bad lately. */
static void badkey_sweep(struct sl_dirsync *d, uint64_t now) {
  uint64_t keep = 2ull * d->resync_ms > 60000 ? 2ull * d->resync_ms : 60000;
  for (unsigned i = 0; i < d->nbad;) {
    if (now - d->bad[i].last_seen_ms > keep)
      d->bad[i] = d->bad[--d->nbad];
    else
      i++;
  }
  atomic_store_explicit(&d->stats.bad_keys, d->nbad, memory_order_relaxed);
}

/* A load that Redis refused as a whole (script error, OOM, BUSY...). */
static void reply_error(struct sl_dirsync *d, const char *what, const redisReply *r) {
  uint32_t held;
  if (!ratelog_ok(&d->log_reply, sl_mono_ms(), &held)) return;
  char w[200];
  fprintf(stderr, "sluice: redis: %s failed: %s", what,
          r->type == REDIS_REPLY_ERROR ? printable(w, sizeof(w), r->str, r->len) : "an unexpected reply");
  if (held) fprintf(stderr, " (%u similar failures not logged)", held);
  fputc('\n', stderr);
}

/* ---- publishing ---- */

static void publish(struct sl_dirsync *d) {
  if (!d->b.next) return;
  const struct sl_dir_snap *s = sl_dir_publish(&d->b);
  atomic_store_explicit(&d->stats.version, s->version, memory_order_relaxed);
  atomic_store_explicit(&d->stats.accounts, s->naccts, memory_order_relaxed);
  atomic_store_explicit(&d->stats.evictions, d->b.evictions, memory_order_relaxed);
  for (unsigned i = 0; i < d->nworkers; i++) uv_async_send(d->worker_wakes[i]);
}

static void reclaim(struct sl_dirsync *d) {
  uint64_t min = UINT64_MAX;
  for (unsigned i = 0; i <= d->nworkers; i++) {
    /* seq_cst: the worker's reads of older snapshots happen before its store
     * (acquire would do for that); seq_cst also orders this load after our
     * seq_cst publish, against the occasional reader's seq_cst store-then-load
     * (sl_dirsync_enter): one of us sees the other. */
    uint64_t v = atomic_load_explicit(&d->seen[i].seen, memory_order_seq_cst);
    if (v < min) min = v;
  }
  sl_dir_reclaim(&d->b, min);
}

static void put_unavailable(struct sl_dirsync *d, const char *ak, size_t len) {
  struct sl_acct *a = sl_acct_new(ak, len, 0);
  a->kind = SL_ACCT_UNAVAILABLE;
  a->loaded_ms = sl_mono_ms();
  a->valid_until_ms = a->loaded_ms + d->unavailable_ttl_ms;
  sl_dir_put(&d->b, a);
  sl_stat_add_dir(&d->stats.lookup_failures);
}

static int pending_find(struct sl_dirsync *d, const char *ak, size_t len, uint64_t hash) {
  for (unsigned i = 0; i < d->npending; i++)
    if (d->pending[i].hash == hash && d->pending[i].len == len && !memcmp(d->pending[i].ak, ak, len)) return (int)i;
  return -1;
}

static void pending_drop(struct sl_dirsync *d, unsigned i) { d->pending[i] = d->pending[--d->npending]; }

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
  size_t kl = key_cat(kn, key_cat(kn, 0, "ak:", 3), ak, ak_len);
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
  kl = key_cat(kn, key_cat(kn, 0, "qpspkgs:", 8), uid, uid_len);
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
      sl_stat_add_dir(&d->stats.invalid_packages); /* not what the script makes */
      continue;
    }
    kl = key_cat(kn, key_cat(kn, key_cat(kn, key_cat(kn, 0, "qpspkg:", 7), uid, uid_len), ":", 1), id, idl);
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
      sl_stat_add_dir(&d->stats.invalid_packages);
      bad_key(d, kn, kl, why, wl ? wl : strlen(why), "the package is ignored");
      continue;
    }
    memcpy(p->id, id, idl);
    p->id_len = (uint8_t)idl;
    used++;
    if (p->feature < 0) { /* kept (it shows in /explain) but never counts */
      sl_stat_add_dir(&d->stats.invalid_packages);
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
  uint8_t len[BATCH];
  char ak[BATCH][SL_AK_MAX + 1];
};

/* The owner of a reply on the command connection (NULL: a context we
 * dropped); a reply counts as progress for the reply timeout. */
static struct sl_dirsync *cmd_owner(const redisAsyncContext *c, const void *reply) {
  struct sl_dirsync *d = c->data;
  if (d && reply) d->cmd_replies++;
  return d;
}

void sl__dirsync_accounts_reply(struct sl_dirsync *d, unsigned n, const char (*aks)[SL_AK_MAX + 1],
                                const uint8_t *lens, const redisReply *r) {
  int ok = r && r->type == REDIS_REPLY_ARRAY && r->elements == n;
  if (r && !ok) reply_error(d, "account load", r);
  if (ok && !d->suspended_known) {
    /* Never fail open on suspension: with no suspended set read yet, an
     * account found could be a suspended one. */
    uint32_t held;
    if (ratelog_ok(&d->log_nosusp, sl_mono_ms(), &held))
      fprintf(stderr,
              "sluice: redis: the suspended set '%ssuspended' has not been read: accounts are answered "
              "'unavailable' until it is\n",
              d->prefix);
    ok = 0;
  }
  for (unsigned i = 0; i < n; i++) {
    uint64_t h = sl_dir_hash(aks[i], lens[i]);
    int p = pending_find(d, aks[i], lens[i], h);
    struct sl_acct *a = ok ? sl__dirsync_acct_from_reply(d, aks[i], lens[i], r->element[i]) : NULL;
    if (a) {
      sl_dir_put(&d->b, a);
    } else if (p >= 0) { /* a first lookup that failed: say so, do not guess */
      put_unavailable(d, aks[i], lens[i]);
    }
    if (p >= 0) pending_drop(d, (unsigned)p);
  }
  publish(d);
}

static void on_accounts(redisAsyncContext *c, void *reply, void *priv) {
  struct sl_dirsync *d = cmd_owner(c, reply);
  struct batch *bt = priv;
  if (d) sl__dirsync_accounts_reply(d, bt->n, (const char(*)[SL_AK_MAX + 1])bt->ak, bt->len, reply);
  /* else a context we dropped: its lookups time out into "unavailable" */
  free(bt);
}

void sl__dirsync_state_reply(struct sl_dirsync *d, const redisReply *r) {
  if (r->type != REDIS_REPLY_ARRAY || r->elements != 1 + 2 * sl_nfeatures) {
    reply_error(d, "state load", r);
    return;
  }
  const redisReply *m = r->element[0];
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
    key_ok(d, "suspended", 9);
  } else {
    /* Never "nobody is suspended" for "could not read": keep what we had. */
    const char *why = "an unexpected reply";
    size_t wl = strlen(why);
    str_of(m, &why, &wl);
    bad_key(d, "suspended", 9, why, wl,
            d->suspended_known ? "the set read last stays in force"
                               : "no account is admitted until it can be read");
  }
  for (unsigned f = 0; f < sl_nfeatures; f++) {
    char kn[SL_DIR_BADKEY_NAME], wb[128];
    const char *fname = sl_features[f].name;
    size_t kl = key_cat(kn, key_cat(kn, 0, "feature:", 8), fname, strlen(fname));
    const redisReply *qr = r->element[1 + 2 * f], *tr = r->element[2 + 2 * f];
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
      continue;
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
  publish(d);
}

static void on_state(redisAsyncContext *c, void *reply, void *priv) {
  (void)priv;
  struct sl_dirsync *d = cmd_owner(c, reply);
  if (d && reply) sl__dirsync_state_reply(d, reply);
}

static void on_resync_done(redisAsyncContext *c, void *reply, void *priv) {
  (void)priv;
  struct sl_dirsync *d = cmd_owner(c, reply);
  if (!d) return;
  d->resync_running = 0;
  if (reply) sl_stat_add_dir(&d->stats.resyncs);
}

/* ---- requests ---- */

static void request_state(struct sl_dirsync *d) {
  if (!d->cmd_ready) return;
  const char *argv[2 + SL_MAX_FEATURES + 1];
  size_t lens[2 + SL_MAX_FEATURES + 1];
  int argc = 0;
  argv[argc] = "EVAL", lens[argc++] = 4;
  argv[argc] = state_script, lens[argc++] = sizeof(state_script) - 1;
  argv[argc] = "0", lens[argc++] = 1;
  argv[argc] = d->prefix, lens[argc++] = d->prefix_len;
  for (unsigned f = 0; f < sl_nfeatures && argc < (int)SL_ARRAY_SIZE(argv); f++) {
    argv[argc] = sl_features[f].name;
    lens[argc++] = strlen(sl_features[f].name);
  }
  redisAsyncCommandArgv(d->cmd, on_state, NULL, argc, argv, lens);
}

static void request_accounts(struct sl_dirsync *d, char (*aks)[SL_AK_MAX + 1], const uint8_t *akl, unsigned n) {
  for (unsigned off = 0; off < n; off += BATCH) {
    unsigned k = n - off < BATCH ? n - off : BATCH;
    struct batch *bt = sl_calloc(1, sizeof(*bt));
    bt->n = k;
    const char *argv[4 + BATCH];
    size_t lens[4 + BATCH];
    int argc = 0;
    argv[argc] = "EVAL", lens[argc++] = 4;
    argv[argc] = account_script, lens[argc++] = sizeof(account_script) - 1;
    argv[argc] = "0", lens[argc++] = 1;
    argv[argc] = d->prefix, lens[argc++] = d->prefix_len;
    for (unsigned i = 0; i < k; i++) {
      memcpy(bt->ak[i], aks[off + i], akl[off + i]);
      bt->len[i] = akl[off + i];
      argv[argc] = bt->ak[i];
      lens[argc++] = bt->len[i];
    }
    if (redisAsyncCommandArgv(d->cmd, on_accounts, bt, argc, argv, lens) != REDIS_OK) free(bt);
  }
}

/* Queues an AccessKeyId for the next coalesced reload. */
static void reload_push(struct sl_dirsync *d, const char *ak, size_t len) {
  if (d->nreload == d->capreload) {
    d->capreload = d->capreload ? 2 * d->capreload : 256;
    d->reload_ak = sl_realloc(d->reload_ak, d->capreload * sizeof(*d->reload_ak));
    d->reload_len = sl_realloc(d->reload_len, d->capreload);
  }
  memcpy(d->reload_ak[d->nreload], ak, len);
  d->reload_len[d->nreload++] = (uint8_t)len;
}

/* Reloads every account the directory holds (resync) or the ones holding
 * uid (its packages changed; uid == NULL: all). */
static void reload_accounts(struct sl_dirsync *d, const char *uid, size_t uid_len) {
  const struct sl_dir_snap *s = atomic_load_explicit(&d->b.current, memory_order_relaxed);
  uint64_t now = sl_mono_ms();
  for (unsigned k = 0; k < SL_DIR_SHARDS; k++) {
    const struct sl_acct_shard *sh = s->shards[k];
    if (!sh) continue;
    for (uint32_t i = 0; i <= sh->mask; i++) {
      const struct sl_acct *a = sh->slot[i];
      if (!a) continue;
      if (uid && (a->uid_len != uid_len || memcmp(a->uid, uid, uid_len))) continue;
      if (!uid && a->kind != SL_ACCT_FOUND) {
        if (a->valid_until_ms <= now) sl_dir_remove(&d->b, a->ak, a->ak_len, a->hash); /* expired negatives go */
        continue;
      }
      reload_push(d, a->ak, a->ak_len);
    }
  }
}

static void queue_reload_ak(struct sl_dirsync *d, const char *ak, size_t len) {
  if (len > SL_AK_MAX) return;
  const struct sl_dir_snap *s = atomic_load_explicit(&d->b.current, memory_order_relaxed);
  if (!sl_dir_find(s, ak, len, sl_dir_hash(ak, len))) return; /* never asked for: nothing to refresh */
  reload_push(d, ak, len);
}

static void on_flush(uv_timer_t *t) {
  struct sl_dirsync *d = t->data;
  if (!d->cmd_ready) return;
  if (d->reload_state) {
    d->reload_state = 0;
    request_state(d);
  }
  if (d->nreload) {
    request_accounts(d, d->reload_ak, d->reload_len, d->nreload);
    d->nreload = 0;
  }
  publish(d);
}

static void schedule_flush(struct sl_dirsync *d) {
  if (!uv_is_active((uv_handle_t *)&d->flush)) uv_timer_start(&d->flush, on_flush, 0, 0);
}

static void full_resync(struct sl_dirsync *d) {
  if (!d->cmd_ready || d->resync_running) return;
  d->resync_running = 1;
  d->reload_state = 1;
  reload_accounts(d, NULL, 0);
  on_flush(&d->flush);
  /* Replies come in order on one connection: this one marks the end. */
  redisAsyncCommand(d->cmd, on_resync_done, NULL, "PING");
  d->next_resync_ms = sl_mono_ms() + d->resync_ms;
}

/* Dispatches a changed key (without the prefix) to what must be reloaded. */
static void key_changed(struct sl_dirsync *d, const char *k, size_t n) {
  sl_stat_add_dir(&d->stats.notifications);
#define STARTS(lit) (n >= sizeof(lit) - 1 && !memcmp(k, lit, sizeof(lit) - 1))
  if ((n == 9 && !memcmp(k, "suspended", 9)) || STARTS("feature:")) {
    d->reload_state = 1;
  } else if (STARTS("ak:")) {
    queue_reload_ak(d, k + 3, n - 3);
  } else if (STARTS("qpspkgs:")) {
    reload_accounts(d, k + 8, n - 8);
  } else if (STARTS("qpspkg:")) {
    const char *colon = memchr(k + 7, ':', n - 7);
    reload_accounts(d, k + 7, colon ? (size_t)(colon - k - 7) : n - 7);
  } else {
    full_resync(d);
    return;
  }
#undef STARTS
  schedule_flush(d);
}

static void on_sub_message(redisAsyncContext *c, void *reply, void *priv) {
  (void)priv;
  struct sl_dirsync *d = c->data;
  if (!d) return;
  redisReply *r = reply;
  if (!r || r->type != REDIS_REPLY_ARRAY || r->elements < 3) return;
  const redisReply *kind = r->element[0];
  if (kind->type != REDIS_REPLY_STRING) return;
  if (kind->len == 8 && !memcmp(kind->str, "pmessage", 8) && r->elements == 4) {
    /* channel: __keyspace@<db>__:<prefix><key> */
    const redisReply *ch = r->element[2];
    if (ch->type != REDIS_REPLY_STRING) return;
    const char *key = memchr(ch->str, ':', ch->len);
    if (!key) return;
    key++;
    size_t kl = ch->len - (size_t)(key - ch->str);
    if (kl < d->prefix_len || memcmp(key, d->prefix, d->prefix_len)) return;
    key_changed(d, key + d->prefix_len, kl - d->prefix_len);
  } else if (kind->len == 7 && !memcmp(kind->str, "message", 7)) {
    /* P changes: the payload names a key (with or without the prefix);
     * anything else asks for a full resync. */
    const redisReply *msg = r->element[2];
    if (msg->type != REDIS_REPLY_STRING) return;
    const char *k = msg->str;
    size_t kl = msg->len;
    if (kl >= d->prefix_len && !memcmp(k, d->prefix, d->prefix_len)) {
      k += d->prefix_len;
      kl -= d->prefix_len;
    }
    key_changed(d, k, kl);
  }
}

/* ---- connections ---- */

/* Keyspace notifications: said when the state changes, not at every
 * reconnect. */
static void say_keyspace(struct sl_dirsync *d, int ok, const char *why) {
  int state = ok ? 1 : 2;
  atomic_store_explicit(&d->stats.keyspace_enabled, ok, memory_order_relaxed);
  if (d->keyspace_said == state) return;
  d->keyspace_said = state;
  if (ok)
    fprintf(stderr, "sluice: redis: keyspace notifications enabled\n");
  else
    fprintf(stderr,
            "sluice: redis: cannot enable keyspace notifications (%s): changes reach sluice through '%schanges' "
            "messages and the %u ms resync only\n",
            why, d->prefix, d->resync_ms);
}

static void on_config_set_check(redisAsyncContext *c, void *reply, void *priv) {
  (void)priv;
  struct sl_dirsync *d = cmd_owner(c, reply);
  if (!d) return;
  redisReply *r = reply;
  char w[160];
  int ok = r && r->type == REDIS_REPLY_STATUS;
  say_keyspace(d, ok, r && r->type == REDIS_REPLY_ERROR ? printable(w, sizeof(w), r->str, r->len) : "no reply");
}

static void on_config_get(redisAsyncContext *c, void *reply, void *priv) {
  (void)priv;
  struct sl_dirsync *d = cmd_owner(c, reply);
  if (!d) return;
  redisReply *r = reply;
  char flags[64] = "";
  if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 2 && r->element[1]->type == REDIS_REPLY_STRING &&
      r->element[1]->len < 40)
    memcpy(flags, r->element[1]->str, r->element[1]->len + 1);
  /* (a refused CONFIG GET shows in the CONFIG SET answer that follows) */
  /* K: keyspace channel; g$shxe: generic, string, set, hash, expired, evicted
   * (A covers all). Added to what the server already has. */
  int have = strchr(flags, 'K') && (strchr(flags, 'A') || (strchr(flags, 'g') && strchr(flags, '$') &&
                                                            strchr(flags, 's') && strchr(flags, 'h')));
  if (have) {
    say_keyspace(d, 1, NULL);
    return;
  }
  char want[96];
  snprintf(want, sizeof(want), "%sKg$shxe", flags);
  redisAsyncCommand(d->cmd, on_config_set_check, NULL, "CONFIG SET notify-keyspace-events %s", want);
}

static void enable_notifications(struct sl_dirsync *d) {
  redisAsyncCommand(d->cmd, on_config_get, NULL, "CONFIG GET notify-keyspace-events");
}

static void mark_down(struct sl_dirsync *d) {
  d->cmd_conn = d->sub_conn = d->cmd_ready = 0;
  atomic_store_explicit(&d->stats.redis_up, 0, memory_order_relaxed);
  d->resync_running = 0;
  if (d->backoff_ms == 0) d->backoff_ms = 100;
  d->next_connect_ms = sl_mono_ms() + d->backoff_ms;
  d->backoff_ms = d->backoff_ms * 2 > 2000 ? 2000 : d->backoff_ms * 2;
  /* Lookups in flight can no longer be answered: fail them now. */
  for (unsigned i = 0; i < d->npending; i++) put_unavailable(d, d->pending[i].ak, d->pending[i].len);
  d->npending = 0;
  publish(d);
}

/* Drops a context we no longer want: it is forgotten first and its
 * callbacks then see no owner, so nothing runs twice. Freed, not
 * disconnected: redisAsyncDisconnect waits for the replies outstanding,
 * which a server that stopped answering never sends. (Called from inside
 * one of its callbacks, hiredis frees it when the callback returns.) */
static void drop_ctx(void **slot) {
  redisAsyncContext *c = *slot;
  if (!c) return;
  *slot = NULL;
  c->data = NULL;
  redisAsyncFree(c);
}

/* Every failure (a connect refused or timed out, a connection lost, no
 * reply in time, not Redis) comes here: both connections go, lookups in
 * flight are answered "unavailable", a reconnect follows the backoff. The
 * log says the outage once with its reason, then at most one line per
 * LOG_EVERY_MS while it lasts; went_up says "up again" if the outage was
 * told. */
static void went_down(struct sl_dirsync *d, const char *why) {
  uint64_t now = sl_mono_ms();
  int first = d->failures++ == 0;
  if (first) d->down_since_ms = now;
  d->up = 0;
  drop_ctx(&d->cmd);
  drop_ctx(&d->sub);
  mark_down(d);
  if (atomic_load_explicit(&d->stop, memory_order_relaxed) || now < d->next_down_log_ms) return;
  d->next_down_log_ms = now + LOG_EVERY_MS;
  char w[200];
  printable(w, sizeof(w), why, strlen(why));
  if (first)
    fprintf(stderr, "sluice: redis: %s%s%d is down: %s (retrying)\n", d->host, d->port ? ":" : "", d->port, w);
  else
    fprintf(stderr, "sluice: redis: %s%s%d still down after %llu s: %s (%u attempts failed)\n", d->host,
            d->port ? ":" : "", d->port, (unsigned long long)(now - d->down_since_ms) / 1000, w, d->failures);
  d->outage_logged = 1;
}

static void went_up(struct sl_dirsync *d) {
  uint64_t now = sl_mono_ms();
  if (!d->ever_up)
    fprintf(stderr, "sluice: redis: connected to %s%s%d\n", d->host, d->port ? ":" : "", d->port);
  else if (d->outage_logged)
    fprintf(stderr, "sluice: redis: %s%s%d is up again after %llu.%llu s (%u attempts failed)\n", d->host,
            d->port ? ":" : "", d->port, (unsigned long long)(now - d->down_since_ms) / 1000,
            (unsigned long long)(now - d->down_since_ms) % 1000 / 100, d->failures);
  /* else: a short outage inside a logging period; counted, not told */
  d->up = d->ever_up = 1;
  d->outage_logged = 0;
  d->failures = 0;
  d->cmd_ready = 1;
  d->progress_ms = now;
  d->seen_replies = d->cmd_replies;
  d->up_since_ms = now; /* the backoff resets once it stays up (check_timeouts) */
  atomic_store_explicit(&d->stats.redis_up, 1, memory_order_relaxed);
}

static void on_disconnect(const redisAsyncContext *c, int status) {
  struct sl_dirsync *d = c->data;
  if (!d) return;
  if (c == d->cmd) d->cmd = NULL; /* hiredis frees it after this */
  if (c == d->sub) d->sub = NULL;
  char why[200];
  const char *refused = sl_redis_refused(c);
  if (refused)
    snprintf(why, sizeof(why), "the server sent %s", refused);
  else if (status == REDIS_OK)
    snprintf(why, sizeof(why), "connection closed by the server");
  else
    snprintf(why, sizeof(why), "connection lost: %s", c->errstr);
  went_down(d, why);
}

/* The first reply on a new connection: up only when the server answers
 * PING as Redis does; a server that accepts and says nothing stays down
 * (the connect timeout ends it), one that says something else is dropped. */
static void on_hello(redisAsyncContext *c, void *reply, void *priv) {
  (void)priv;
  struct sl_dirsync *d = cmd_owner(c, reply);
  if (!d || !reply) return;
  redisReply *r = reply;
  if (!(r->type == REDIS_REPLY_STATUS && r->len == 4 && !strncasecmp(r->str, "PONG", 4))) {
    char why[200], w[120];
    if (r->type == REDIS_REPLY_STATUS || r->type == REDIS_REPLY_ERROR || r->type == REDIS_REPLY_STRING)
      snprintf(why, sizeof(why), "PING answered '%s'", printable(w, sizeof(w), r->str, r->len));
    else
      snprintf(why, sizeof(why), "PING answered with a reply of type %d", r->type);
    went_down(d, why);
    return;
  }
  went_up(d);
  enable_notifications(d);
  /* Only the keys the directory follows: a wider pattern would bring every
   * metering write (usage, calls, batch markers) back as a notification. */
  static const char *const follow[] = {"ak:*", "suspended", "feature:*", "qpspkg*"};
  for (size_t i = 0; i < SL_ARRAY_SIZE(follow); i++) {
    char pattern[160];
    snprintf(pattern, sizeof(pattern), "__keyspace@*__:%s%s", d->prefix, follow[i]);
    redisAsyncCommand(d->sub, on_sub_message, NULL, "PSUBSCRIBE %s", pattern);
  }
  redisAsyncCommand(d->sub, on_sub_message, NULL, "SUBSCRIBE %schanges", d->prefix);
  d->resync_running = 0;
  full_resync(d);
}

static void on_connect(const redisAsyncContext *c, int status) {
  struct sl_dirsync *d = c->data;
  if (!d) return;
  if (status != REDIS_OK) {
    char why[200];
    snprintf(why, sizeof(why), "cannot connect: %s", c->errstr);
    if (c == d->cmd) d->cmd = NULL; /* hiredis frees it after this */
    if (c == d->sub) d->sub = NULL;
    went_down(d, why);
    return;
  }
  if (c == d->cmd) d->cmd_conn = 1;
  if (c == d->sub) d->sub_conn = 1;
  if (!d->cmd_conn || !d->sub_conn) return;
  /* Connected is not up: a server that accepts and never answers would
   * otherwise count as up. The connect timeout keeps running until PONG. */
  redisAsyncCommand(d->cmd, on_hello, NULL, "PING");
}

/* Returns the context, or NULL with why (why_len bytes) filled in. */
static redisAsyncContext *open_ctx(struct sl_dirsync *d, char *why, size_t why_len) {
  redisAsyncContext *c = d->port ? redisAsyncConnect(d->host, d->port) : redisAsyncConnectUnix(d->host);
  if (!c) {
    snprintf(why, why_len, "cannot connect: out of memory");
    return NULL;
  }
  if (c->err) {
    snprintf(why, why_len, "cannot connect: %s", c->errstr);
    redisAsyncFree(c);
    return NULL;
  }
  /* A peer that vanishes without a word (a cable, a frozen host) is found
   * by the reply timeout when a reply is due, by keepalive otherwise (the
   * subscriber connection mostly waits). */
  if (d->port && redisEnableKeepAlive(&c->c) != REDIS_OK) {
    snprintf(why, why_len, "cannot enable TCP keepalive: %s", c->c.errstr);
    redisAsyncFree(c);
    return NULL;
  }
  if (sl_redis_attach(c, &d->loop) != REDIS_OK) {
    snprintf(why, why_len, "cannot watch the socket");
    redisAsyncFree(c);
    return NULL;
  }
  c->data = d;
  redisAsyncSetConnectCallback(c, on_connect);
  redisAsyncSetDisconnectCallback(c, on_disconnect);
  return c;
}

static void connect_redis(struct sl_dirsync *d) {
  if (d->cmd || d->sub) return; /* an attempt is under way */
  sl_stat_add_dir(&d->stats.reconnects);
  d->cmd_conn = d->sub_conn = d->cmd_ready = 0;
  d->connect_started_ms = sl_mono_ms();
  char why[200] = "cannot connect";
  d->cmd = open_ctx(d, why, sizeof(why));
  d->sub = d->cmd ? open_ctx(d, why, sizeof(why)) : NULL;
  if (!d->cmd || !d->sub) went_down(d, why);
}

static void on_probe(redisAsyncContext *c, void *reply, void *priv) {
  (void)priv;
  cmd_owner(c, reply); /* progress is all it is for */
}

/* From the tick: a connection that is not up within redis_timeout_ms of
 * its start, or a command connection with replies outstanding and none
 * come for redis_timeout_ms, counts as down. */
static void check_timeouts(struct sl_dirsync *d, uint64_t now) {
  char why[200];
  if ((d->cmd || d->sub) && !d->cmd_ready) {
    if (now - d->connect_started_ms < d->redis_timeout_ms) return;
    if (d->cmd_conn && d->sub_conn)
      snprintf(why, sizeof(why), "connected, but no answer to PING within %u ms (not a Redis server?)",
               d->redis_timeout_ms);
    else
      snprintf(why, sizeof(why), "no connection within %u ms", d->redis_timeout_ms);
    sl_stat_add_dir(&d->stats.redis_timeouts);
    went_down(d, why);
    return;
  }
  if (!d->cmd_ready || !d->cmd) return;
  /* A server that answers PING and then fails goes up and down: the
   * backoff grows across such short stays, and resets after a long one. */
  if (d->backoff_ms && now - d->up_since_ms >= LOG_EVERY_MS) d->backoff_ms = 0;
  redisAsyncContext *c = d->cmd;
  if (!c->replies.head || d->cmd_replies != d->seen_replies) { /* idle, or replies came */
    d->seen_replies = d->cmd_replies;
    d->progress_ms = now;
    /* Idle for a while: a PING, so that a server gone silent is found
     * even when nothing else is asked (the resync may be far off). */
    if (!c->replies.head && now >= d->next_probe_ms) {
      d->next_probe_ms = now + d->redis_timeout_ms;
      redisAsyncCommand(c, on_probe, NULL, "PING");
    }
    return;
  }
  if (now - d->progress_ms < d->redis_timeout_ms) return;
  snprintf(why, sizeof(why), "no reply within %u ms", d->redis_timeout_ms);
  sl_stat_add_dir(&d->stats.redis_timeouts);
  went_down(d, why);
}

/* ---- the loop ---- */

static void on_wake(uv_async_t *a) {
  struct sl_dirsync *d = a->data;
  if (atomic_load_explicit(&d->stop, memory_order_acquire)) {
    uv_timer_stop(&d->tick);
    uv_timer_stop(&d->flush);
    sl__close((uv_handle_t *)&d->tick, NULL);
    sl__close((uv_handle_t *)&d->flush, NULL);
    sl__close((uv_handle_t *)&d->wake, NULL);
    drop_ctx(&d->cmd);
    drop_ctx(&d->sub);
    d->cmd_conn = d->sub_conn = d->cmd_ready = 0;
    return;
  }
  struct sl_lookup_msg m;
  char(*aks)[SL_AK_MAX + 1] = NULL;
  uint8_t *lens = NULL;
  unsigned n = 0, cap = 0;
  const struct sl_dir_snap *s = atomic_load_explicit(&d->b.current, memory_order_relaxed);
  uint64_t now = sl_mono_ms();
  while (sl_ring_pop(&d->ring, &m) == 0) {
    sl_stat_add_dir(&d->stats.lookups);
    const struct sl_acct *have = sl_dir_find(s, m.ak, m.len, m.hash);
    if (have && (have->kind == SL_ACCT_FOUND || have->valid_until_ms > now)) {
      uv_async_send(d->worker_wakes[m.worker]); /* answered meanwhile */
      continue;
    }
    if (pending_find(d, m.ak, m.len, m.hash) >= 0) continue; /* shared with an earlier ask */
    if (!d->cmd_ready || d->npending == SL_DIR_MAX_PENDING) {
      put_unavailable(d, m.ak, m.len);
      continue;
    }
    d->pending[d->npending].hash = m.hash;
    d->pending[d->npending].len = m.len;
    d->pending[d->npending].started_ms = now;
    memcpy(d->pending[d->npending].ak, m.ak, m.len);
    d->npending++;
    if (n == cap) {
      cap = cap ? 2 * cap : 64;
      aks = sl_realloc(aks, cap * sizeof(*aks));
      lens = sl_realloc(lens, cap);
    }
    memcpy(aks[n], m.ak, m.len);
    lens[n++] = m.len;
  }
  if (n) request_accounts(d, aks, lens, n);
  free(aks);
  free(lens);
  publish(d);
}

static void on_tick(uv_timer_t *t) {
  struct sl_dirsync *d = t->data;
  uint64_t now = sl_mono_ms();
  if (!d->cmd && !d->sub && now >= d->next_connect_ms)
    connect_redis(d);
  else
    check_timeouts(d, now);
  /* The suspended set never read (unusable at start): ask again soon, not
   * at the next resync, since accounts wait for it. */
  if (d->cmd_ready && !d->suspended_known && now >= d->next_state_retry_ms) {
    d->next_state_retry_ms = now + STATE_RETRY_MS;
    request_state(d);
  }
  if (now >= d->next_badkey_sweep_ms) {
    d->next_badkey_sweep_ms = now + 1000;
    badkey_sweep(d, now);
  }
  /* Slow Redis: a first lookup waits at most lookup_timeout_ms. */
  for (unsigned i = 0; i < d->npending;) {
    if (now - d->pending[i].started_ms >= d->lookup_timeout_ms) {
      put_unavailable(d, d->pending[i].ak, d->pending[i].len);
      pending_drop(d, i);
    } else {
      i++;
    }
  }
  if (d->cmd_ready && now >= d->next_resync_ms) full_resync(d);
  publish(d);
  reclaim(d);
}

static void dirsync_main(void *arg) {
  /* Background work: under CFS a small nice value keeps it from taking the
   * workers' core in bursts (p99), without starving it. */
  (void)setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 5);
  struct sl_dirsync *d = arg;
  uv_run(&d->loop, UV_RUN_DEFAULT);
}

int sl_dirsync_start(struct sl_dirsync *d, const struct sl_config *cfg, unsigned nworkers, uv_async_t **wakes) {
  int r;
  size_t pl = strlen(cfg->redis_prefix);
  memcpy(d->prefix, cfg->redis_prefix, pl + 1);
  d->prefix_len = pl;
  if (!strncmp(cfg->redis, "unix:", 5)) {
    snprintf(d->host, sizeof(d->host), "%s", cfg->redis + 5);
    d->port = 0;
  } else {
    const char *colon = strrchr(cfg->redis, ':');
    if (!colon) return -EINVAL;
    snprintf(d->host, sizeof(d->host), "%.*s", (int)(colon - cfg->redis), cfg->redis);
    d->port = atoi(colon + 1);
    if (d->port <= 0 || d->port > 65535) return -EINVAL;
  }
  d->resync_ms = cfg->resync_ms;
  d->lookup_timeout_ms = cfg->lookup_timeout_ms;
  d->redis_timeout_ms = cfg->redis_timeout_ms ? cfg->redis_timeout_ms : 2000;
  d->negative_ttl_ms = cfg->negative_ttl_ms;
  d->unavailable_ttl_ms = 1000;
  d->nworkers = nworkers;
  d->worker_wakes = wakes;
  d->seen = sl_calloc(nworkers + 1, sizeof(*d->seen)); /* + the occasional reader */
  uint32_t qps[SL_MAX_FEATURES];
  uint8_t tier[SL_MAX_FEATURES];
  for (unsigned f = 0; f < sl_nfeatures; f++) {
    qps[f] = sl_features[f].default_qps;
    tier[f] = (uint8_t)sl_features[f].tier;
  }
  if ((r = sl_dir_builder_init(&d->b, cfg->max_accounts, qps, tier, sl_nfeatures)) != 0) return r;
  for (unsigned i = 0; i < nworkers; i++) atomic_init(&d->seen[i].seen, 1);
  atomic_init(&d->seen[nworkers].seen, UINT64_MAX); /* not reading */
  atomic_init(&d->stats.version, 1);
  if ((r = sl_ring_init(&d->ring, 8192, sizeof(struct sl_lookup_msg))) != 0) return r;
  if ((r = uv_loop_init(&d->loop)) != 0) return r;
  uv_async_init(&d->loop, &d->wake, on_wake);
  d->wake.data = d;
  uv_timer_init(&d->loop, &d->tick);
  d->tick.data = d;
  uv_timer_init(&d->loop, &d->flush);
  d->flush.data = d;
  uv_timer_start(&d->tick, on_tick, 100, 100);
  connect_redis(d);
  return uv_thread_create(&d->thread, dirsync_main, d);
}

void sl_dirsync_stop(struct sl_dirsync *d) {
  atomic_store_explicit(&d->stop, 1, memory_order_release);
  uv_async_send(&d->wake);
  uv_thread_join(&d->thread);
  uv_run(&d->loop, UV_RUN_DEFAULT); /* close callbacks of what hiredis left */
  uv_loop_close(&d->loop);
  sl_ring_free(&d->ring);
  sl_dir_builder_free(&d->b);
  free(d->seen);
  free(d->reload_ak);
  free(d->reload_len);
}

int sl_dirsync_lookup(struct sl_dirsync *d, unsigned worker, const char *ak, size_t len, uint64_t hash) {
  struct sl_lookup_msg m;
  m.hash = hash;
  m.worker = (uint16_t)worker;
  m.len = (uint8_t)len;
  memcpy(m.ak, ak, len);
  int r = sl_ring_push(&d->ring, &m);
  if (r == 0) uv_async_send(&d->wake);
  return r;
}

void sl_dirsync_quiescent(struct sl_dirsync *d, unsigned worker) {
  uint64_t v = atomic_load_explicit(&d->b.current, memory_order_acquire)->version;
  /* release: this worker's earlier reads of older snapshots are done. */
  atomic_store_explicit(&d->seen[worker].seen, v, memory_order_release);
}

const struct sl_dir_snap *sl_dirsync_enter(struct sl_dirsync *d) {
  uint64_t v = atomic_load_explicit(&d->stats.version, memory_order_relaxed);
  /* seq_cst store then seq_cst load: our slot is in the single total order
   * before the load, so the directory thread's seq_cst publish-then-read
   * either sees the slot or we see its newer snapshot (Dekker). */
  atomic_store_explicit(&d->seen[d->nworkers].seen, v, memory_order_seq_cst);
  return atomic_load_explicit(&d->b.current, memory_order_seq_cst);
}

void sl_dirsync_exit(struct sl_dirsync *d) {
  /* release: our reads of the snapshot are done before the slot clears. */
  atomic_store_explicit(&d->seen[d->nworkers].seen, UINT64_MAX, memory_order_release);
}
