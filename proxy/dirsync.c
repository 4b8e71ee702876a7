#include "dirsync.h"

#include <errno.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdlib.h>
#include <string.h>

#include "redis_uv.h"

#include "catalog.h"
#include "common.h"
#include "proxy.h" /* sl__close */

#define BATCH 100 /* accounts per EVAL */

/* One round trip per batch of accounts: the UID and every package of it,
 * read atomically (a script runs alone), so a record never mixes states.
 * A key starting with byte 0x01 is a UID given by a trusted header (no
 * AccessKeyId holds control bytes: the classifier refuses them). */
static const char account_script[] =
    "local p = ARGV[1] local out = {} "
    "for i = 2, #ARGV do "
    "  local uid "
    "  if string.byte(ARGV[i], 1) == 1 then uid = string.sub(ARGV[i], 2) "
    "  else uid = redis.call('GET', p .. 'ak:' .. ARGV[i]) end "
    "  if not uid then out[#out + 1] = {} else "
    "    local r = {uid} "
    "    for _, id in ipairs(redis.call('SMEMBERS', p .. 'qpspkgs:' .. uid)) do "
    "      local h = redis.call('HMGET', p .. 'qpspkg:' .. uid .. ':' .. id, "
    "                           'feature', 'region', 'qps', 'starts_at', 'expires_at') "
    "      r[#r + 1] = id "
    "      for j = 1, 5 do r[#r + 1] = h[j] or '' end "
    "    end "
    "    out[#out + 1] = r "
    "  end "
    "end "
    "return out";

/* The suspended set and every feature override, in one reply. */
static const char state_script[] =
    "local p = ARGV[1] local out = {redis.call('SMEMBERS', p .. 'suspended')} "
    "for i = 2, #ARGV do "
    "  local h = redis.call('HMGET', p .. 'feature:' .. ARGV[i], 'default_qps', 'tier') "
    "  out[#out + 1] = h[1] or '' out[#out + 1] = h[2] or '' "
    "end "
    "return out";

static uint64_t mono_ms(void) { return uv_hrtime() / 1000000; }


/* The directory thread is each counter's only writer. */
static inline void sl_stat_add_dir(_Atomic uint64_t *c) { atomic_fetch_add_explicit(c, 1, memory_order_relaxed); }

static void connect_redis(struct sl_dirsync *d);
static void request_state(struct sl_dirsync *d);
static void request_accounts(struct sl_dirsync *d, char (*aks)[SL_AK_MAX + 1], const uint8_t *lens, unsigned n);

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
  a->loaded_ms = mono_ms();
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
  if (r->type != REDIS_REPLY_STRING && r->type != REDIS_REPLY_STATUS) return -1;
  *s = r->str;
  *n = r->len;
  return 0;
}

/* Builds the record for ak from one element of the account script's reply. */
static struct sl_acct *acct_from_reply(struct sl_dirsync *d, const char *ak, size_t ak_len, const redisReply *r) {
  uint64_t now = mono_ms();
  if (r->type != REDIS_REPLY_ARRAY) return NULL;
  if (r->elements == 0) {
    struct sl_acct *a = sl_acct_new(ak, ak_len, 0);
    a->kind = SL_ACCT_NOT_FOUND;
    a->loaded_ms = now;
    a->valid_until_ms = now + d->negative_ttl_ms;
    return a;
  }
  const char *uid;
  size_t uid_len;
  if (str_of(r->element[0], &uid, &uid_len) != 0 || uid_len == 0 || uid_len > SL_UID_MAX) return NULL;
  size_t npk = (r->elements - 1) / 6;
  if (npk > SL_MAX_PKGS) npk = SL_MAX_PKGS;
  struct sl_acct *a = sl_acct_new(ak, ak_len, (uint32_t)npk);
  a->kind = SL_ACCT_FOUND;
  a->loaded_ms = now;
  a->valid_until_ms = UINT64_MAX;
  memcpy(a->uid, uid, uid_len);
  a->uid_len = (uint8_t)uid_len;
  uint32_t used = 0;
  for (size_t k = 0; k < npk; k++) {
    redisReply *const *e = r->element + 1 + k * 6;
    const char *id, *feat, *region, *qps, *start, *exp;
    size_t idl, fl, rl, ql, sl, el;
    int64_t q, st = 0, ex;
    if (str_of(e[0], &id, &idl) || str_of(e[1], &feat, &fl) || str_of(e[2], &region, &rl) ||
        str_of(e[3], &qps, &ql) || str_of(e[4], &start, &sl) || str_of(e[5], &exp, &el) || idl > SL_PKGID_MAX ||
        rl == 0 || rl > SL_REGION_MAX || parse_i64(qps, ql, &q) || q < 0 || q > UINT32_MAX ||
        (sl && parse_i64(start, sl, &st)) || parse_i64(exp, el, &ex)) {
      sl_stat_add_dir(&d->stats.invalid_packages);
      continue;
    }
    struct sl_pkg *p = &a->pkgs[used++];
    p->feature = sl_feature_id(feat, fl);
    p->qps = (uint32_t)q;
    p->starts_at = st;
    p->expires_at = ex;
    memcpy(p->region, region, rl);
    p->region_len = (uint8_t)rl;
    memcpy(p->id, id, idl);
    p->id_len = (uint8_t)idl;
    if (p->feature < 0) sl_stat_add_dir(&d->stats.invalid_packages);
  }
  a->npkgs = used;
  return a;
}

struct batch {
  unsigned n;
  uint8_t len[BATCH];
  char ak[BATCH][SL_AK_MAX + 1];
};

static void on_accounts(redisAsyncContext *c, void *reply, void *priv) {
  struct sl_dirsync *d = c->data;
  struct batch *bt = priv;
  if (!d) { /* a context we dropped: its lookups time out into "unavailable" */
    free(bt);
    return;
  }
  redisReply *r = reply;
  int ok = r && r->type == REDIS_REPLY_ARRAY && r->elements == bt->n;
  if (!ok && r && r->type == REDIS_REPLY_ERROR) fprintf(stderr, "sluice: redis: account load: %s\n", r->str);
  for (unsigned i = 0; i < bt->n; i++) {
    uint64_t h = sl_dir_hash(bt->ak[i], bt->len[i]);
    int p = pending_find(d, bt->ak[i], bt->len[i], h);
    struct sl_acct *a = ok ? acct_from_reply(d, bt->ak[i], bt->len[i], r->element[i]) : NULL;
    if (a) {
      sl_dir_put(&d->b, a);
    } else if (p >= 0) { /* a first lookup that failed: say so, do not guess */
      put_unavailable(d, bt->ak[i], bt->len[i]);
    }
    if (p >= 0) pending_drop(d, (unsigned)p);
  }
  free(bt);
  publish(d);
}

static void on_state(redisAsyncContext *c, void *reply, void *priv) {
  (void)priv;
  struct sl_dirsync *d = c->data;
  if (!d) return;
  redisReply *r = reply;
  if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 1 + 2 * sl_nfeatures ||
      r->element[0]->type != REDIS_REPLY_ARRAY) {
    if (r && r->type == REDIS_REPLY_ERROR) fprintf(stderr, "sluice: redis: state load: %s\n", r->str);
    return;
  }
  const redisReply *m = r->element[0];
  const char **strs = sl_calloc(m->elements + 1, sizeof(char *));
  size_t *lens = sl_calloc(m->elements + 1, sizeof(size_t));
  size_t n = 0;
  for (size_t i = 0; i < m->elements; i++)
    if (str_of(m->element[i], &strs[n], &lens[n]) == 0) n++;
  sl_dir_set_suspended(&d->b, sl_strset_new(strs, lens, n));
  free(strs);
  free(lens);
  for (unsigned f = 0; f < sl_nfeatures; f++) {
    const char *qs, *ts;
    size_t ql, tl;
    int64_t q;
    uint32_t qps = sl_features[f].default_qps;
    uint8_t tier = (uint8_t)sl_features[f].tier;
    int over = 0;
    if (str_of(r->element[1 + 2 * f], &qs, &ql) == 0 && ql) {
      if (parse_i64(qs, ql, &q) == 0 && q >= 0 && q <= UINT32_MAX) {
        qps = (uint32_t)q;
        over = 1;
      } else {
        fprintf(stderr, "sluice: %sfeature:%s default_qps '%.*s' is not a number: ignored\n", d->prefix,
                sl_features[f].name, (int)ql, qs);
      }
    }
    if (str_of(r->element[2 + 2 * f], &ts, &tl) == 0 && tl) {
      if (tl == 3 && !memcmp(ts, "llm", 3)) {
        tier = SL_TIER_LLM;
        over = 1;
      } else if (tl == 8 && !memcmp(ts, "baseline", 8)) {
        tier = SL_TIER_BASELINE;
        over = 1;
      }
    }
    sl_dir_set_feature(&d->b, f, qps, tier, over);
  }
  publish(d);
}

static void on_resync_done(redisAsyncContext *c, void *reply, void *priv) {
  (void)reply;
  (void)priv;
  struct sl_dirsync *d = c->data;
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
  uint64_t now = mono_ms();
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
  d->next_resync_ms = mono_ms() + d->resync_ms;
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

static void on_config_set_check(redisAsyncContext *c, void *reply, void *priv) {
  (void)priv;
  struct sl_dirsync *d = c->data;
  if (!d) return;
  redisReply *r = reply;
  int ok = r && r->type == REDIS_REPLY_STATUS;
  atomic_store_explicit(&d->stats.keyspace_enabled, ok, memory_order_relaxed);
  if (!ok)
    fprintf(stderr,
            "sluice: redis: cannot enable keyspace notifications (%s): changes reach sluice through '%schanges' "
            "messages and the %u ms resync only\n",
            r && r->type == REDIS_REPLY_ERROR ? r->str : "no reply", d->prefix, d->resync_ms);
  else
    fprintf(stderr, "sluice: redis: keyspace notifications enabled\n");
}

static void on_config_get(redisAsyncContext *c, void *reply, void *priv) {
  (void)priv;
  struct sl_dirsync *d = c->data;
  if (!d) return;
  redisReply *r = reply;
  char flags[64] = "";
  if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 2 && r->element[1]->type == REDIS_REPLY_STRING &&
      r->element[1]->len < 40)
    memcpy(flags, r->element[1]->str, r->element[1]->len + 1);
  else if (r && r->type == REDIS_REPLY_ERROR)
    fprintf(stderr, "sluice: redis: CONFIG GET refused (%s)\n", r->str);
  /* K: keyspace channel; g$shxe: generic, string, set, hash, expired, evicted
   * (A covers all). Added to what the server already has. */
  int have = strchr(flags, 'K') && (strchr(flags, 'A') || (strchr(flags, 'g') && strchr(flags, '$') &&
                                                            strchr(flags, 's') && strchr(flags, 'h')));
  if (have) {
    atomic_store_explicit(&d->stats.keyspace_enabled, 1, memory_order_relaxed);
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
  d->cmd_ready = d->sub_ready = 0;
  atomic_store_explicit(&d->stats.redis_up, 0, memory_order_relaxed);
  d->resync_running = 0;
  if (d->backoff_ms == 0) d->backoff_ms = 100;
  d->next_connect_ms = mono_ms() + d->backoff_ms;
  d->backoff_ms = d->backoff_ms * 2 > 2000 ? 2000 : d->backoff_ms * 2;
  /* Lookups in flight can no longer be answered: fail them now. */
  for (unsigned i = 0; i < d->npending; i++) put_unavailable(d, d->pending[i].ak, d->pending[i].len);
  d->npending = 0;
  publish(d);
}

/* Drops a context we no longer want: it is forgotten first and its
 * callbacks then see no owner, so nothing runs twice. */
static void drop_ctx(void **slot) {
  redisAsyncContext *c = *slot;
  if (!c) return;
  *slot = NULL;
  c->data = NULL;
  redisAsyncDisconnect(c);
}

static void on_disconnect(const redisAsyncContext *c, int status) {
  struct sl_dirsync *d = c->data;
  if (!d) return;
  if (c == d->cmd) d->cmd = NULL;
  if (c == d->sub) d->sub = NULL;
  if (!atomic_load_explicit(&d->stop, memory_order_relaxed) && !d->said_down) {
    fprintf(stderr, "sluice: redis: connection lost (%s)\n", status == REDIS_OK ? "closed" : c->errstr);
    d->said_down = 1;
  }
  /* Drop the other one too: both come back together, then a resync. */
  drop_ctx(&d->cmd);
  drop_ctx(&d->sub);
  mark_down(d);
}

static void on_connect(const redisAsyncContext *c, int status) {
  struct sl_dirsync *d = c->data;
  if (!d) return;
  if (status != REDIS_OK) {
    /* Said once per outage, not at every retry. */
    if (!d->said_down) fprintf(stderr, "sluice: redis: cannot connect to %s%s%d: %s (retrying)\n", d->host,
                               d->port ? ":" : "", d->port, c->errstr);
    d->said_down = 1;
    if (c == d->cmd) d->cmd = NULL;
    if (c == d->sub) d->sub = NULL;
    drop_ctx(&d->cmd);
    drop_ctx(&d->sub);
    mark_down(d);
    return;
  }
  if (c == d->cmd) d->cmd_ready = 1;
  if (c == d->sub) d->sub_ready = 1;
  if (!d->cmd_ready || !d->sub_ready) return;
  fprintf(stderr, "sluice: redis: connected to %s%s%d\n", d->host, d->port ? ":" : "", d->port);
  d->said_down = 0;
  atomic_store_explicit(&d->stats.redis_up, 1, memory_order_relaxed);
  d->backoff_ms = 0;
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

static redisAsyncContext *open_ctx(struct sl_dirsync *d) {
  redisAsyncContext *c = d->port ? redisAsyncConnect(d->host, d->port) : redisAsyncConnectUnix(d->host);
  if (!c) return NULL;
  if (c->err) {
    if (!d->said_down) fprintf(stderr, "sluice: redis: %s\n", c->errstr);
    d->said_down = 1;
    redisAsyncFree(c);
    return NULL;
  }
  c->data = d;
  if (sl_redis_attach(c, &d->loop) != REDIS_OK) {
    redisAsyncFree(c);
    return NULL;
  }
  redisAsyncSetConnectCallback(c, on_connect);
  redisAsyncSetDisconnectCallback(c, on_disconnect);
  return c;
}

static void connect_redis(struct sl_dirsync *d) {
  if (d->cmd || d->sub) return; /* an attempt is under way */
  sl_stat_add_dir(&d->stats.reconnects);
  d->cmd = open_ctx(d);
  d->sub = d->cmd ? open_ctx(d) : NULL;
  if (!d->cmd || !d->sub) {
    drop_ctx(&d->cmd);
    drop_ctx(&d->sub);
    mark_down(d);
  }
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
    d->cmd_ready = d->sub_ready = 0;
    return;
  }
  struct sl_lookup_msg m;
  char(*aks)[SL_AK_MAX + 1] = NULL;
  uint8_t *lens = NULL;
  unsigned n = 0, cap = 0;
  const struct sl_dir_snap *s = atomic_load_explicit(&d->b.current, memory_order_relaxed);
  uint64_t now = mono_ms();
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
  uint64_t now = mono_ms();
  if (!d->cmd && !d->sub && now >= d->next_connect_ms) connect_redis(d);
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
