/* The directory thread: its loop, the workers' lookups, change
 * notifications, resyncs and the Redis connection (client.h). The scripts
 * and their replies are in dirsync_load.c. */
#include "dirsync.h"

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "addr.h"
#include "client.h"
#include "dirsync_int.h"
#include "keys.h"

#include "catalog.h"
#include "common.h"
#include "stat.h"
#include "uv_util.h"

#define STATE_RETRY_MS 1000 /* the suspended set never read yet: ask again this often */

/* ---- publishing ---- */

void sl__dirsync_publish(struct sl_dirsync *d) {
  if (!d->b.next) return;
  const struct sl_dir_snap *s = sl_dir_publish(&d->b);
  atomic_store_explicit(&d->stats.version, s->version, memory_order_relaxed);
  atomic_store_explicit(&d->stats.accounts, s->naccts, memory_order_relaxed);
  atomic_store_explicit(&d->stats.evictions, d->b.evictions, memory_order_relaxed);
  for (unsigned i = 0; i < d->nworkers; i++) sl_inbox_post(d->worker_inboxes[i], SL_MSG_DIRECTORY);
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

void sl__dirsync_unavailable(struct sl_dirsync *d, const char *ak, size_t len) {
  struct sl_acct *a = sl_acct_new(ak, len, 0);
  a->kind = SL_ACCT_UNAVAILABLE;
  a->loaded_ms = sl_mono_ms();
  a->valid_until_ms = a->loaded_ms + d->unavailable_ttl_ms;
  sl_dir_put(&d->b, a);
  sl_stat_inc(&d->stats.lookup_failures, 1);
}

int sl__dirsync_pending_find(struct sl_dirsync *d, const char *ak, size_t len, uint64_t hash) {
  for (unsigned i = 0; i < d->npending; i++)
    if (d->pending[i].hash == hash && d->pending[i].len == len && !memcmp(d->pending[i].ak, ak, len)) return (int)i;
  return -1;
}

void sl__dirsync_pending_drop(struct sl_dirsync *d, unsigned i) { d->pending[i] = d->pending[--d->npending]; }

static void on_resync_done(redisAsyncContext *c, void *reply, void *priv) {
  (void)priv;
  struct sl_dirsync *d = sl_redis_owner(c, reply);
  if (!d) return;
  d->resync_running = 0;
  if (reply) sl_stat_inc(&d->stats.resyncs, 1);
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
  if (!sl_redis_cmd(d->redis)) return;
  if (d->reload_state) {
    d->reload_state = 0;
    sl__dirsync_request_state(d);
  }
  if (d->nreload) {
    sl__dirsync_request_accounts(d, d->reload_ak, d->reload_len, d->nreload);
    d->nreload = 0;
  }
  sl__dirsync_publish(d);
}

static void schedule_flush(struct sl_dirsync *d) {
  if (!uv_is_active((uv_handle_t *)&d->flush)) uv_timer_start(&d->flush, on_flush, 0, 0);
}

static void full_resync(struct sl_dirsync *d) {
  if (!sl_redis_cmd(d->redis) || d->resync_running) return;
  d->resync_running = 1;
  d->reload_state = 1;
  reload_accounts(d, NULL, 0);
  on_flush(&d->flush);
  /* Replies come in order on one connection: this one marks the end. */
  redisAsyncCommand(sl_redis_cmd(d->redis), on_resync_done, NULL, "PING");
  d->next_resync_ms = sl_mono_ms() + d->resync_ms;
}

/* Dispatches a changed key (without the prefix) to what must be reloaded. */
static void key_changed(struct sl_dirsync *d, const char *k, size_t n) {
  sl_stat_inc(&d->stats.notifications, 1);
#define STARTS(lit) (n >= sizeof(lit) - 1 && !memcmp(k, lit, sizeof(lit) - 1))
  if ((n == SL_KEYLEN(SL_KEY_SUSPENDED) && !memcmp(k, SL_KEY_SUSPENDED, n)) || STARTS(SL_KEY_FEATURE)) {
    d->reload_state = 1;
  } else if (STARTS(SL_KEY_AK)) {
    queue_reload_ak(d, k + SL_KEYLEN(SL_KEY_AK), n - SL_KEYLEN(SL_KEY_AK));
  } else if (STARTS(SL_KEY_QPSPKGS)) {
    reload_accounts(d, k + SL_KEYLEN(SL_KEY_QPSPKGS), n - SL_KEYLEN(SL_KEY_QPSPKGS));
  } else if (STARTS(SL_KEY_QPSPKG)) {
    const size_t pl = SL_KEYLEN(SL_KEY_QPSPKG);
    const char *colon = memchr(k + pl, ':', n - pl);
    reload_accounts(d, k + pl, colon ? (size_t)(colon - k - pl) : n - pl);
  } else {
    full_resync(d);
    return;
  }
#undef STARTS
  schedule_flush(d);
}

static void on_sub_message(redisAsyncContext *c, void *reply, void *priv) {
  (void)priv;
  struct sl_dirsync *d = sl_redis_owner(c, NULL); /* not progress: the watchdog watches the command connection */
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
            "sluice: redis: cannot enable keyspace notifications (%s): changes reach sluice through '%s" SL_CHANNEL_CHANGES "' "
            "messages and the %u ms resync only\n",
            why, d->prefix, d->resync_ms);
}

static void on_config_set_check(redisAsyncContext *c, void *reply, void *priv) {
  (void)priv;
  struct sl_dirsync *d = sl_redis_owner(c, reply);
  if (!d) return;
  redisReply *r = reply;
  char w[160];
  int ok = r && r->type == REDIS_REPLY_STATUS;
  say_keyspace(d, ok, r && r->type == REDIS_REPLY_ERROR ? sl_printable(w, sizeof(w), r->str, r->len) : "no reply");
}

static void on_config_get(redisAsyncContext *c, void *reply, void *priv) {
  (void)priv;
  struct sl_dirsync *d = sl_redis_owner(c, reply);
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
  redisAsyncContext *cmd = sl_redis_cmd(d->redis);
  if (cmd) redisAsyncCommand(cmd, on_config_set_check, NULL, "CONFIG SET notify-keyspace-events %s", want);
}

static void enable_notifications(struct sl_dirsync *d) {
  redisAsyncCommand(sl_redis_cmd(d->redis), on_config_get, NULL, "CONFIG GET notify-keyspace-events");
}

/* The connections are gone (client.h): lookups in flight can no longer
 * be answered, so they are failed now. */
static void on_redis_down(void *data, const char *why) {
  (void)why; /* the client logs it */
  struct sl_dirsync *d = data;
  d->resync_running = 0;
  for (unsigned i = 0; i < d->npending; i++) sl__dirsync_unavailable(d, d->pending[i].ak, d->pending[i].len);
  d->npending = 0;
  sl__dirsync_publish(d);
}

/* PING answered: notifications, subscriptions, and everything reloaded
 * (what changed while down was not notified). */
static void on_redis_ready(void *data) {
  struct sl_dirsync *d = data;
  enable_notifications(d);
  /* Only the keys the directory follows: a wider pattern would bring every
   * metering write (usage, calls, batch markers) back as a notification. */
  static const char *const follow[] = {SL_KEY_AK "*", SL_KEY_SUSPENDED, SL_KEY_FEATURE "*", SL_KEY_QPSPKGS "*",
                                       SL_KEY_QPSPKG "*"};
  redisAsyncContext *sub = sl_redis_sub(d->redis);
  for (size_t i = 0; i < SL_ARRAY_SIZE(follow); i++) {
    char pattern[160];
    /* Database 0, the one sluice reads, spelled out: Redis matches every
     * pattern against every notification, the metering's HINCRBYs too, and
     * a leading literal fails at once where "@*" scans the whole channel
     * (measured: 3.4 -> 2.3 us per HINCRBY with three instances). */
    snprintf(pattern, sizeof(pattern), "__keyspace@0__:%s%s", d->prefix, follow[i]);
    redisAsyncCommand(sub, on_sub_message, NULL, "PSUBSCRIBE %s", pattern);
  }
  redisAsyncCommand(sub, on_sub_message, NULL, "SUBSCRIBE %s" SL_CHANNEL_CHANGES, d->prefix);
  d->resync_running = 0;
  full_resync(d);
  /* First lookups that waited for the connection. */
  if (d->npending) {
    char(*aks)[SL_AK_MAX + 1] = sl_malloc(d->npending * sizeof(*aks));
    uint8_t *lens = sl_malloc(d->npending);
    for (unsigned i = 0; i < d->npending; i++) {
      memcpy(aks[i], d->pending[i].ak, d->pending[i].len);
      lens[i] = d->pending[i].len;
    }
    sl__dirsync_request_accounts(d, aks, lens, d->npending);
    free(aks);
    free(lens);
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
    sl_redis_stop(d->redis); /* freed by the loop's close callbacks (sl_dirsync_stop runs them) */
    d->redis = NULL;
    return;
  }
  struct sl_lookup_msg m;
  char(*aks)[SL_AK_MAX + 1] = NULL;
  uint8_t *lens = NULL;
  unsigned n = 0, cap = 0;
  const struct sl_dir_snap *s = atomic_load_explicit(&d->b.current, memory_order_relaxed);
  uint64_t now = sl_mono_ms();
  while (sl_ring_pop(&d->ring, &m) == 0) {
    sl_stat_inc(&d->stats.lookups, 1);
    const struct sl_acct *have = sl_dir_find(s, m.ak, m.len, m.hash);
    if (have && (have->kind == SL_ACCT_FOUND || have->valid_until_ms > now)) {
      sl_inbox_post(d->worker_inboxes[m.worker], SL_MSG_DIRECTORY); /* answered meanwhile */
      continue;
    }
    if (sl__dirsync_pending_find(d, m.ak, m.len, m.hash) >= 0) continue; /* shared with an earlier ask */
    /* While the connection is being made (at start, or after a drop), a
     * first lookup waits for it, within lookup_timeout_ms like any other;
     * with Redis known down it is answered "unavailable" at once. */
    int ready = sl_redis_cmd(d->redis) != NULL;
    if ((!ready && sl_redis_state(d->redis) != SL_REDIS_CONNECTING) || d->npending == SL_DIR_MAX_PENDING) {
      sl__dirsync_unavailable(d, m.ak, m.len);
      continue;
    }
    d->pending[d->npending].hash = m.hash;
    d->pending[d->npending].len = m.len;
    d->pending[d->npending].started_ms = now;
    memcpy(d->pending[d->npending].ak, m.ak, m.len);
    d->npending++;
    if (!ready) continue; /* asked once the connection is up (on_redis_ready) */
    if (n == cap) {
      cap = cap ? 2 * cap : 64;
      aks = sl_realloc(aks, cap * sizeof(*aks));
      lens = sl_realloc(lens, cap);
    }
    memcpy(aks[n], m.ak, m.len);
    lens[n++] = m.len;
  }
  if (n) sl__dirsync_request_accounts(d, aks, lens, n);
  free(aks);
  free(lens);
  sl__dirsync_publish(d);
}

static void on_tick(uv_timer_t *t) {
  struct sl_dirsync *d = t->data;
  uint64_t now = sl_mono_ms();
  int ready = sl_redis_cmd(d->redis) != NULL;
  /* The suspended set never read (unusable at start): ask again soon, not
   * at the next resync, since accounts wait for it. */
  if (ready && !d->suspended_known && now >= d->next_state_retry_ms) {
    d->next_state_retry_ms = now + STATE_RETRY_MS;
    sl__dirsync_request_state(d);
  }
  if (now >= d->next_badkey_sweep_ms) {
    d->next_badkey_sweep_ms = now + 1000;
    sl__dirsync_badkey_sweep(d, now);
  }
  /* Slow Redis: a first lookup waits at most lookup_timeout_ms. */
  for (unsigned i = 0; i < d->npending;) {
    if (now - d->pending[i].started_ms >= d->lookup_timeout_ms) {
      sl__dirsync_unavailable(d, d->pending[i].ak, d->pending[i].len);
      sl__dirsync_pending_drop(d, i);
    } else {
      i++;
    }
  }
  if (ready && now >= d->next_resync_ms) full_resync(d);
  sl__dirsync_publish(d);
  reclaim(d);
}

int sl_dirsync_start(struct sl_dirsync *d, const struct sl_config *cfg, unsigned nworkers,
                     struct sl_inbox **inboxes) {
  int r;
  size_t pl = strlen(cfg->redis_prefix);
  memcpy(d->prefix, cfg->redis_prefix, pl + 1);
  d->prefix_len = pl;
  d->resync_ms = cfg->resync_ms;
  d->lookup_timeout_ms = cfg->lookup_timeout_ms;
  d->negative_ttl_ms = cfg->negative_ttl_ms;
  d->unavailable_ttl_ms = 1000;
  d->nworkers = nworkers;
  d->worker_inboxes = inboxes;
  d->seen = sl_calloc(nworkers + 1, sizeof(*d->seen)); /* + the occasional reader */
  uint32_t qps[SL_MAX_FEATURES];
  uint8_t tier[SL_MAX_FEATURES];
  for (unsigned f = 0; f < sl_nfeatures; f++) {
    qps[f] = sl_features[f].default_qps;
    tier[f] = (uint8_t)sl_features[f].tier;
  }
  if ((r = sl_dir_builder_init(&d->b, cfg->max_accounts, qps, tier, sl_nfeatures)) != 0) goto err_seen;
  for (unsigned i = 0; i < nworkers; i++) atomic_init(&d->seen[i].seen, 1);
  atomic_init(&d->seen[nworkers].seen, UINT64_MAX); /* not reading */
  atomic_init(&d->stats.version, 1);
  if ((r = sl_ring_init(&d->ring, 8192, sizeof(struct sl_lookup_msg))) != 0) goto err_builder;
  if ((r = uv_loop_init(&d->loop)) != 0) goto err_ring;
  if ((r = uv_async_init(&d->loop, &d->wake, on_wake)) != 0) goto err_loop;
  d->wake.data = d;
  uv_timer_init(&d->loop, &d->tick);
  d->tick.data = d;
  uv_timer_init(&d->loop, &d->flush);
  d->flush.data = d;
  snprintf(d->log_subject, sizeof(d->log_subject), "redis: %.240s is", cfg->redis);
  struct sl_redis_opts o = {
      .addr = cfg->redis,
      .timeout_ms = cfg->redis_timeout_ms,
      .subscriber = 1,
      .log_subject = d->log_subject,
      .up = &d->stats.redis_up,
      .attempts = &d->stats.reconnects,
      .timeouts = &d->stats.redis_timeouts,
      .on_ready = on_redis_ready,
      .on_down = on_redis_down,
      .data = d,
  };
  /* cluster:// (admission off, config.c): no directory Redis yet (issue 14) */
  if (strncmp(cfg->redis, SL_REDIS_CLUSTER_SCHEME, strlen(SL_REDIS_CLUSTER_SCHEME)) != 0) {
    if ((r = sl_redis_init(&d->redis, &d->loop, &o)) != 0) goto err_handles;
    sl_redis_start(d->redis);
  }
  uv_timer_start(&d->tick, on_tick, 100, 100);
  if ((r = sl_loop_thread_start(&d->thread, &d->loop)) != 0) goto err_redis;
  return 0;
err_redis:
  sl_redis_stop(d->redis);
  d->redis = NULL;
err_handles:
  uv_close((uv_handle_t *)&d->tick, NULL);
  uv_close((uv_handle_t *)&d->flush, NULL);
  uv_close((uv_handle_t *)&d->wake, NULL);
  uv_run(&d->loop, UV_RUN_DEFAULT); /* the close callbacks */
err_loop:
  uv_loop_close(&d->loop);
err_ring:
  sl_ring_free(&d->ring);
err_builder:
  sl_dir_builder_free(&d->b);
err_seen:
  free(d->seen);
  d->seen = NULL;
  return r;
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
