/* The directory thread: its loop, the workers' lookups, change
 * notifications, resyncs and the Redis connection (client.h). The scripts
 * and their replies are in dirsync_load.c. */
#include "dirsync.h"

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "addr.h"
#include "client.h"
#include "db.h"
#include "dirsync_int.h"
#include "keys.h"

#include "catalog.h"
#include "common.h"
#include "stat.h"
#include "uv_util.h"

#define STATE_RETRY_MS 1000 /* the suspended set never read yet: ask again this often */
#define SUBS_CHECK_MS 200   /* a cluster: the subscribers checked against the slot map this often */
#define LOOKUP_HOLD_MS 200  /* one server: a first lookup waits behind a call in flight at most this long */
#define SL_DIR_SUB_CHANNELS 6 /* subscribe(): five keyspace patterns and P changes */

static void subscribe(struct sl_dirsync_sub *sub);

/* Whether notify-keyspace-events flags cover what the directory follows.
 * K: keyspace channel; g$shxe: generic, string, set, hash, expired, evicted
 * (A covers all). */
static int keyspace_covered(const char *flags) {
  if (!strchr(flags, 'K')) return 0;
  if (strchr(flags, 'A')) return 1;
  for (const char *c = "g$shxe"; *c; c++)
    if (!strchr(flags, *c)) return 0;
  return 1;
}

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

unsigned sl__dirsync_key_slot(const struct sl_dirsync *d, const char *name, size_t len) {
  char k[SL_DIR_BADKEY_NAME + 64];
  size_t pl = d->prefix_len;
  if (len > sizeof(k) - pl) len = sizeof(k) - pl;
  memcpy(k, d->prefix, pl);
  memcpy(k + pl, name, len);
  return sl_db_key_slot(k, pl + len);
}

int sl__dirsync_cmd_ready(const struct sl_dirsync *d) { return d->db && sl_db_ready(d->db); }

/* Lookups may be sent: with one server once connected (the suspended set's
 * load goes first on the one connection); in a cluster once the suspended
 * set has been read (its reply and an account's come from different
 * nodes, in no order). */
static int lookup_ready(const struct sl_dirsync *d) {
  return sl__dirsync_cmd_ready(d) && (!d->cluster || d->suspended_known);
}

static void on_resync_done(void *owner, void *priv, const redisReply *reply) {
  (void)priv;
  struct sl_dirsync *d = owner;
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
  if (!sl__dirsync_cmd_ready(d)) return;
  if (d->reload_state) {
    d->reload_state = 0;
    sl__dirsync_request_state(d);
  }
  if (d->nreload) {
    sl__dirsync_request_accounts(d, d->reload_ak, d->reload_len, d->nreload, 0);
    d->nreload = 0;
  }
  sl__dirsync_publish(d);
}

static void schedule_flush(struct sl_dirsync *d) {
  if (!uv_is_active((uv_handle_t *)&d->flush)) uv_timer_start(&d->flush, on_flush, 0, 0);
}

/* ---- resync checks ---- */

/* The servers whose notifications the directory follows: one server:
 * subs[0] (on db's client); a cluster: each master's entry in use. */
static int sub_live(const struct sl_dirsync *d, const struct sl_dirsync_sub *s) {
  return d->cluster ? s->r != NULL : s == &d->subs[0];
}

/* Whether every followed server's notifications cover ours and its
 * subscriptions are confirmed (a cluster: a subscriber on every master of
 * the map). */
static int subs_confirmed(const struct sl_dirsync *d) {
  unsigned live = 0;
  for (unsigned i = 0; i < SL_DIR_SUBS; i++) {
    const struct sl_dirsync_sub *s = &d->subs[i];
    if (!sub_live(d, s)) continue;
    live++;
    if (!s->keyspace_ok || s->acks < SL_DIR_SUB_CHANNELS) return 0;
  }
  if (d->cluster) {
    const struct sl_cluster_map *m = sl_db_map(d->db);
    return m && live == m->nnodes;
  }
  return live == 1;
}

#define MARK_KEY_CAP (sizeof(((struct sl_dirsync *)0)->prefix) + sizeof(SL_KEY_DIR_MARK) + SL_CLUSTER_TAG_SIZE + 4)

/* The slot of a server's mark: one server: 0; a cluster: the lowest slot
 * the map gives its master, or -1 when it gives it none. */
static int mark_slot_now(const struct sl_dirsync *d, const struct sl_dirsync_sub *s) {
  if (!d->cluster) return 0;
  const struct sl_cluster_map *m = sl_db_map(d->db);
  for (unsigned slot = 0; m && slot < SL_CLUSTER_SLOTS; slot++) {
    const struct sl_cluster_node *n = sl_cluster_map_node(m, slot);
    if (n && n->port == s->port && !strcmp(n->host, s->host)) return (int)slot;
  }
  return -1;
}

/* The mark's name into key (MARK_KEY_CAP bytes): P dir:mark, or in a
 * cluster one per master, P dir:mark:{<tag>} with the tag of a slot of it
 * (each master's data set is flushed on its own). */
static void mark_key(const struct sl_dirsync *d, const char *tag, char *key) {
  if (!d->cluster)
    snprintf(key, MARK_KEY_CAP, "%s" SL_KEY_DIR_MARK, d->prefix);
  else
    snprintf(key, MARK_KEY_CAP, "%s" SL_KEY_DIR_MARK ":{%s}", d->prefix, tag);
}

/* A new random mark value into out (cap bytes). */
static void new_mark_value(char *out, size_t cap) {
  uint64_t rnd[2];
  if (getrandom(rnd, sizeof(rnd), 0) != sizeof(rnd)) rnd[0] = uv_hrtime(), rnd[1] = (uint64_t)uv_os_getpid();
  snprintf(out, cap, "%016llx%016llx", (unsigned long long)rnd[0], (unsigned long long)rnd[1]);
}

/* A reply about one server of the check or the mark's read: for the entry
 * as it was when asked (gen). */
struct sub_ask {
  struct sl_dirsync_sub *s;
  unsigned gen;
};

static struct sub_ask *sub_ask(struct sl_dirsync_sub *s) {
  struct sub_ask *a = sl_malloc(sizeof *a);
  *a = (struct sub_ask){s, s->gen};
  return a;
}

static void on_mark_read(void *owner, void *priv, const redisReply *r) {
  struct sub_ask *a = priv;
  struct sl_dirsync_sub *s = a->s;
  int current = owner && a->gen == s->gen;
  free(a);
  if (!current) return;
  s->mark[0] = 0;
  if (r && r->type == REDIS_REPLY_NIL)
    memcpy(s->mark, s->mark_ours, sizeof(s->mark)); /* ours was set */
  else if (r && r->type == REDIS_REPLY_STRING && r->len < sizeof(s->mark))
    memcpy(s->mark, r->str, r->len + 1);
}

/* Each followed server's mark: set to a new random value unless there is
 * one, and read (SET NX GET), just before a full reread, on the connection
 * the reread's commands for that server go on: a later check that finds it
 * gone or changed knows that data set was flushed or replaced since. */
static void read_marks(struct sl_dirsync *d) {
  for (unsigned i = 0; i < SL_DIR_SUBS; i++) {
    struct sl_dirsync_sub *s = &d->subs[i];
    if (!sub_live(d, s)) continue;
    s->mark[0] = 0;
    int slot = mark_slot_now(d, s);
    if (slot < 0) continue; /* no slot: no mark, the next interval rereads */
    s->mark_slot = (unsigned)slot;
    if (d->cluster) sl_cluster_slot_tag(s->mark_slot, s->mark_tag);
    new_mark_value(s->mark_ours, sizeof(s->mark_ours));
    char key[MARK_KEY_CAP];
    mark_key(d, s->mark_tag, key);
    const char *argv[] = {"SET", key, s->mark_ours, "NX", "GET"};
    size_t len[] = {3, strlen(key), strlen(s->mark_ours), 2, 3};
    struct sub_ask *a = sub_ask(s);
    if (sl_db_command(d->db, s->mark_slot, on_mark_read, a, 5, argv, len) != 0) free(a);
  }
}

static void full_resync(struct sl_dirsync *d) {
  if (!sl__dirsync_cmd_ready(d)) return;
  if (d->resync_running) { /* a check's or a reread's replies are due: this one goes after (on_tick) */
    d->resync_wanted = 1;
    return;
  }
  d->resync_running = 1;
  d->resync_wanted = 0;
  d->reload_state = 1;
  d->checks_since_full = 0;
  d->force_full = 0;
  /* a change made before notifications and subscriptions are confirmed may
   * be read by this reread or notified, or neither: only a reread sent
   * after both may stand for the intervals that follow */
  d->full_trusted = subs_confirmed(d);
  read_marks(d);
  reload_accounts(d, NULL, 0);
  on_flush(&d->flush);
  /* Replies come in order on one connection: this one marks the end (in a
   * cluster, of the suspended set's load, on that slot's connection). */
  const char *ping = "PING";
  size_t pl = 4;
  if (sl_db_command(d->db, sl__dirsync_key_slot(d, SL_KEY_SUSPENDED, SL_KEYLEN(SL_KEY_SUSPENDED)), on_resync_done,
                    NULL, 1, &ping, &pl) != 0)
    d->resync_running = 0;
  d->next_resync_ms = sl_mono_ms() + d->resync_ms;
}

/* Whether every change since the last full reread was notified, as far as
 * sluice can know: notifications on for our classes (as each server said
 * last), every subscription confirmed on the connection in use since that
 * reread (a reconnect rereads everything), each server's mark read and, in
 * a cluster, each mark still on its master's slot (a reshard or failover
 * since: reread). What notifies nothing (FLUSHALL, FLUSHDB, SWAPDB, CONFIG
 * SET turning notifications off) the check finds. */
static int notified_so_far(const struct sl_dirsync *d) {
  if (!d->full_trusted || !subs_confirmed(d) || d->force_full || d->volatile_seen) return 0;
  for (unsigned i = 0; i < SL_DIR_SUBS; i++) {
    const struct sl_dirsync_sub *s = &d->subs[i];
    if (sub_live(d, s) && (!s->mark[0] || mark_slot_now(d, s) != (int)s->mark_slot)) return 0;
  }
  return 1;
}

/* One reply of the check in flight has come: the last decides. */
static void check_answered(struct sl_dirsync *d) {
  if (--d->check_left) return;
  d->resync_running = 0;
  if (d->check_failed || !notified_so_far(d)) {
    full_resync(d);
    return;
  }
  d->checks_since_full++;
  sl_stat_inc(&d->stats.resync_checks, 1);
}

static void on_check_flags(void *owner, void *priv, const redisReply *r) {
  struct sub_ask *a = priv;
  struct sl_dirsync_sub *s = a->s;
  struct sl_dirsync *d = owner;
  int current = d && a->gen == s->gen;
  free(a);
  if (!d) return;
  char flags[64] = "";
  if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 2 && r->element[1]->type == REDIS_REPLY_STRING &&
      r->element[1]->len < sizeof(flags))
    memcpy(flags, r->element[1]->str, r->element[1]->len + 1);
  if (!keyspace_covered(flags)) {
    d->check_failed = 1;
    /* notifications off: turned back on (and resubscribed: the server
     * keeps what is already subscribed); the reread this check makes may
     * go before that, so the next interval rereads again (full_trusted) */
    if (current && r && r->type == REDIS_REPLY_ARRAY) {
      s->keyspace_ok = 0;
      subscribe(s);
    }
  }
  check_answered(d);
}

static void on_check_mark(void *owner, void *priv, const redisReply *r) {
  struct sub_ask *a = priv;
  struct sl_dirsync_sub *s = a->s;
  struct sl_dirsync *d = owner;
  int current = d && a->gen == s->gen;
  free(a);
  if (!d) return;
  if (!current || !r || r->type != REDIS_REPLY_STRING || !s->mark[0] || r->len != strlen(s->mark) ||
      memcmp(r->str, s->mark, r->len))
    d->check_failed = 1;
  check_answered(d);
}

/* The resync interval: with every change notified so far, rereading every
 * account (about 5 us of Redis CPU each, every interval, for every
 * instance) finds nothing; a check of what could have changed unnotified
 * stands in for it (two commands per server: its notification flags and
 * its mark), and everything is still reread every SL_DIR_FULL_EVERY
 * intervals. Else a full reread. */
static void check_or_resync(struct sl_dirsync *d) {
  if (!notified_so_far(d) || d->checks_since_full + 1 >= SL_DIR_FULL_EVERY) {
    full_resync(d);
    return;
  }
  if (!sl__dirsync_cmd_ready(d) || d->resync_running) return;
  d->resync_running = 1;
  d->check_failed = 0;
  d->check_left = 1; /* this function's own, dropped at its end: no reply decides before every ask is out */
  for (unsigned i = 0; i < SL_DIR_SUBS; i++) {
    struct sl_dirsync_sub *s = &d->subs[i];
    if (!sub_live(d, s)) continue;
    char key[MARK_KEY_CAP];
    mark_key(d, s->mark_tag, key);
    const char *flags[] = {"CONFIG", "GET", "notify-keyspace-events"};
    size_t flags_len[] = {6, 3, 22};
    const char *get[] = {"GET", key};
    size_t get_len[] = {3, strlen(key)};
    /* one connection to that server: the mark's reply comes after the flags' */
    struct sub_ask *fa = sub_ask(s), *ma = sub_ask(s);
    if (sl_db_command(d->db, s->mark_slot, on_check_flags, fa, 3, flags, flags_len) == 0)
      d->check_left++;
    else
      free(fa), d->check_failed = 1;
    if (sl_db_command(d->db, s->mark_slot, on_check_mark, ma, 2, get, get_len) == 0)
      d->check_left++;
    else
      free(ma), d->check_failed = 1;
  }
  d->next_resync_ms = sl_mono_ms() + d->resync_ms;
  check_answered(d);
}

/* A UID in a key's name after its head: <uid> up to the end or `stop`, or
 * in a cluster {<uid>} (SPEC 10). Sets *n to its length. */
static const char *key_uid(const struct sl_dirsync *d, const char *u, size_t *n, int stop) {
  if (d->cluster && *n >= 2 && u[0] == '{') {
    const char *e = memchr(u + 1, '}', *n - 1);
    if (e) {
      *n = (size_t)(e - u - 1);
      return u + 1;
    }
  }
  const char *c = stop ? memchr(u, stop, *n) : NULL;
  if (c) *n = (size_t)(c - u);
  return u;
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
    size_t ul = n - SL_KEYLEN(SL_KEY_QPSPKGS);
    const char *u = key_uid(d, k + SL_KEYLEN(SL_KEY_QPSPKGS), &ul, 0);
    reload_accounts(d, u, ul);
  } else if (STARTS(SL_KEY_QPSPKG)) {
    size_t ul = n - SL_KEYLEN(SL_KEY_QPSPKG);
    const char *u = key_uid(d, k + SL_KEYLEN(SL_KEY_QPSPKG), &ul, ':');
    reload_accounts(d, u, ul);
  } else {
    full_resync(d);
    return;
  }
#undef STARTS
  schedule_flush(d);
}

static void on_sub_message(redisAsyncContext *c, void *reply, void *priv) {
  /* not progress: the watchdog watches the command connection */
  if (!sl_redis_owner(c, NULL)) return;
  struct sl_dirsync *d = ((struct sl_dirsync_sub *)priv)->d;
  redisReply *r = reply;
  if (!r || r->type != REDIS_REPLY_ARRAY || r->elements < 3) return;
  const redisReply *kind = r->element[0];
  if (kind->type != REDIS_REPLY_STRING) return;
  if ((kind->len == 10 && !memcmp(kind->str, "psubscribe", 10)) || (kind->len == 9 && !memcmp(kind->str, "subscribe", 9))) {
    ((struct sl_dirsync_sub *)priv)->acks++;
  } else if (kind->len == 8 && !memcmp(kind->str, "pmessage", 8) && r->elements == 4) {
    /* channel: __keyspace@<db>__:<prefix><key> */
    const redisReply *ch = r->element[2];
    if (ch->type != REDIS_REPLY_STRING) return;
    const char *key = memchr(ch->str, ':', ch->len);
    if (!key) return;
    key++;
    size_t kl = ch->len - (size_t)(key - ch->str);
    if (kl < d->prefix_len || memcmp(key, d->prefix, d->prefix_len)) return;
    /* A TTL given to a followed key: its expiry is notified only when Redis
     * deletes it, which with many keys with a TTL (the metering's markers)
     * may be minutes late, where a reread's GET deletes it at once. */
    const redisReply *ev = r->element[3];
    if (ev->type == REDIS_REPLY_STRING && ev->len == 6 && !memcmp(ev->str, "expire", 6)) d->volatile_seen = 1;
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
static void say_keyspace(struct sl_dirsync_sub *sub, int ok, const char *why) {
  struct sl_dirsync *d = sub->d;
  int state = ok ? 1 : 2;
  sub->keyspace_ok = ok;
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
  if (!sl_redis_owner(c, reply)) return;
  struct sl_dirsync_sub *sub = priv;
  struct sl_dirsync *d = sub->d;
  redisReply *r = reply;
  char w[160];
  int ok = r && r->type == REDIS_REPLY_STATUS;
  say_keyspace(sub, ok, r && r->type == REDIS_REPLY_ERROR ? sl_printable(w, sizeof(w), r->str, r->len) : "no reply");
  /* Notifications were off: changes may have gone unnotified to every
   * instance. A new mark makes each one's next check reread everything,
   * after notifications are back on (a cluster: this master's mark, on its
   * own connection; a slot it no longer serves answers MOVED, and a map
   * that changed makes every instance reread anyway). */
  int slot = mark_slot_now(d, sub);
  if (ok && slot >= 0) {
    char key[MARK_KEY_CAP], val[sizeof(sub->mark)], tag[SL_CLUSTER_TAG_SIZE] = "";
    if (d->cluster) sl_cluster_slot_tag((unsigned)slot, tag);
    mark_key(d, tag, key);
    new_mark_value(val, sizeof(val));
    redisAsyncCommand(c, NULL, NULL, "SET %b %b", key, strlen(key), val, strlen(val));
  }
}

static void on_config_get(redisAsyncContext *c, void *reply, void *priv) {
  if (!sl_redis_owner(c, reply)) return;
  struct sl_dirsync_sub *sub = priv;
  redisReply *r = reply;
  char flags[64] = "";
  if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 2 && r->element[1]->type == REDIS_REPLY_STRING &&
      r->element[1]->len < 40)
    memcpy(flags, r->element[1]->str, r->element[1]->len + 1);
  /* (a refused CONFIG GET shows in the CONFIG SET answer that follows) */
  if (keyspace_covered(flags)) {
    say_keyspace(sub, 1, NULL);
    return;
  }
  char want[96]; /* ours added to what the server already has */
  snprintf(want, sizeof(want), "%sKg$shxe", flags);
  redisAsyncContext *cmd = sl_redis_cmd(sub->r);
  if (cmd) redisAsyncCommand(cmd, on_config_set_check, sub, "CONFIG SET notify-keyspace-events %s", want);
}

/* sub's server is ready: notifications enabled there, its keyspace
 * channels and `P changes` subscribed. */
static void subscribe(struct sl_dirsync_sub *sub) {
  struct sl_dirsync *d = sub->d;
  redisAsyncContext *cmd = sl_redis_cmd(sub->r), *s = sl_redis_sub(sub->r);
  sub->keyspace_ok = 0;
  sub->acks = 0;
  d->full_trusted = 0;
  if (cmd) redisAsyncCommand(cmd, on_config_get, sub, "CONFIG GET notify-keyspace-events");
  if (!s) return;
  /* Only the keys the directory follows: a wider pattern would bring every
   * metering write (usage, calls, batch markers) back as a notification. */
  static const char *const follow[] = {SL_KEY_AK "*", SL_KEY_SUSPENDED, SL_KEY_FEATURE "*", SL_KEY_QPSPKGS "*",
                                       SL_KEY_QPSPKG "*"};
  for (size_t i = 0; i < SL_ARRAY_SIZE(follow); i++) {
    char pattern[160];
    /* Database 0, the one sluice reads, spelled out: Redis matches every
     * pattern against every notification, the metering's HINCRBYs too, and
     * a leading literal fails at once where "@*" scans the whole channel
     * (measured: 3.4 -> 2.3 us per HINCRBY with three instances). */
    snprintf(pattern, sizeof(pattern), "__keyspace@0__:%s%s", d->prefix, follow[i]);
    redisAsyncCommand(s, on_sub_message, sub, "PSUBSCRIBE %s", pattern);
  }
  /* (in a cluster a PUBLISH reaches every node: each master's subscriber
   * hears it, a reload more, coalesced by the flush) */
  redisAsyncCommand(s, on_sub_message, sub, "SUBSCRIBE %s" SL_CHANNEL_CHANGES, d->prefix);
}

/* The connections are gone (client.h): lookups in flight can no longer
 * be answered, so they are failed now. */
static void on_redis_down(void *data, const char *why) {
  (void)why; /* the client logs it */
  struct sl_dirsync *d = data;
  d->resync_running = 0;
  for (unsigned i = 0; i < d->npending; i++) sl__dirsync_unavailable(d, d->pending[i].ak, d->pending[i].len);
  d->npending = 0;
  d->lookup_calls = 0; /* their replies come with no owner */
  sl__dirsync_publish(d);
}

/* The pending lookups (all, or those not yet asked) as first lookups. */
static void request_pending(struct sl_dirsync *d, int unsent_only) {
  char(*aks)[SL_AK_MAX + 1] = sl_malloc((d->npending ? d->npending : 1) * sizeof(*aks));
  uint8_t *lens = sl_malloc(d->npending ? d->npending : 1);
  unsigned n = 0;
  for (unsigned i = 0; i < d->npending; i++) {
    if (unsent_only && d->pending[i].sent) continue;
    d->pending[i].sent = 1;
    memcpy(aks[n], d->pending[i].ak, d->pending[i].len);
    lens[n++] = d->pending[i].len;
  }
  if (n) sl__dirsync_request_accounts(d, aks, lens, n, 1);
  free(aks);
  free(lens);
}

void sl__dirsync_request_pending(struct sl_dirsync *d) {
  d->lookup_calls = 0; /* a new connection: what was in flight is gone */
  request_pending(d, 0);
}

void sl__dirsync_request_unsent(struct sl_dirsync *d) { request_pending(d, 1); }

/* One server: PING answered: notifications, subscriptions, and everything
 * reloaded (what changed while down was not notified), then the lookups
 * that waited. A cluster: the first slot map (its masters' subscribers
 * follow the map: sync_subs); lookups wait for the suspended set. */
static void on_redis_ready(void *data) {
  struct sl_dirsync *d = data;
  if (!d->cluster) subscribe(&d->subs[0]);
  d->resync_running = 0;
  full_resync(d);
  if (!d->cluster) sl__dirsync_request_pending(d);
}

/* A cluster master's subscriber is up: what changed meanwhile on it was not
 * notified, so everything is reloaded. */
static void on_sub_ready(void *data) {
  struct sl_dirsync_sub *sub = data;
  subscribe(sub);
  sub->d->resync_running = 0;
  full_resync(sub->d);
}

/* A cluster: one subscriber per master of the current map; a master gone
 * from the map loses its subscriber, a new one (a promoted replica, a
 * node added) gets one. */
static void sync_subs(struct sl_dirsync *d) {
  const struct sl_cluster_map *m = sl_db_map(d->db);
  if (!m) return;
  for (unsigned i = 0; i < SL_DIR_SUBS; i++) d->subs[i].seen = 0;
  for (unsigned n = 0; n < m->nnodes; n++) {
    const struct sl_cluster_node *node = &m->nodes[n];
    struct sl_dirsync_sub *free_sub = NULL, *have = NULL;
    for (unsigned i = 0; i < SL_DIR_SUBS && !have; i++) {
      struct sl_dirsync_sub *s = &d->subs[i];
      if (!s->r) {
        if (!free_sub) free_sub = s;
      } else if (s->port == node->port && !strcmp(s->host, node->host)) {
        have = s;
      }
    }
    if (have) {
      have->seen = 1;
      continue;
    }
    if (!free_sub) continue; /* more masters than SL_DIR_SUBS: the others' changes come with the resync */
    char addr[300];
    snprintf(addr, sizeof(addr), strchr(node->host, ':') ? "[%s]:%d" : "%s:%d", node->host, node->port);
    struct sl_redis_opts o = {
        .addr = addr,
        .timeout_ms = d->timeout_ms,
        .subscriber = 1,
        .log_subject = d->log_subject,
        .on_ready = on_sub_ready,
        .data = free_sub,
    };
    snprintf(free_sub->host, sizeof(free_sub->host), "%s", node->host);
    free_sub->port = node->port;
    free_sub->gen++; /* another server: what was asked of the old one is dropped */
    free_sub->keyspace_ok = 0;
    free_sub->acks = 0;
    free_sub->mark[0] = 0;
    if (sl_redis_init(&free_sub->r, &d->loop, &o) != 0) {
      free_sub->r = NULL;
      continue;
    }
    free_sub->seen = 1;
    sl_redis_start(free_sub->r);
  }
  int down = 0;
  for (unsigned i = 0; i < SL_DIR_SUBS; i++) {
    struct sl_dirsync_sub *s = &d->subs[i];
    if (s->r && s->seen && sl_redis_state(s->r) != SL_REDIS_READY) down = 1;
    if (s->r && !s->seen) {
      sl_redis_stop(s->r); /* its callbacks find no owner; the entry stays (it is never freed before stop) */
      s->r = NULL;
    }
  }
  /* A master unreachable: the map is asked for again until it names its
   * successor (a failover), whose subscriber then starts at the next check. */
  if (down) sl_db_refresh(d->db);
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
    /* freed by the loop's close callbacks (sl_dirsync_stop runs them) */
    for (unsigned i = d->cluster ? 0 : 1; i < SL_DIR_SUBS; i++)
      if (d->subs[i].r) {
        sl_redis_stop(d->subs[i].r);
        d->subs[i].r = NULL;
      }
    if (d->db) sl_db_stop(d->db);
    d->db = NULL;
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
    int ready = lookup_ready(d);
    /* (a cluster is never "known down": the router retries; the lookup
     * waits within lookup_timeout_ms) */
    if ((!ready && !d->cluster && (!d->db || sl_db_state(d->db) != SL_REDIS_CONNECTING)) ||
        d->npending == SL_DIR_MAX_PENDING) {
      sl__dirsync_unavailable(d, m.ak, m.len);
      continue;
    }
    d->pending[d->npending].hash = m.hash;
    d->pending[d->npending].len = m.len;
    d->pending[d->npending].started_ms = now;
    memcpy(d->pending[d->npending].ak, m.ak, m.len);
    d->pending[d->npending].sent = 0;
    d->npending++;
    if (!ready) continue; /* asked once the connection is up (on_redis_ready) */
    if (!d->cluster && d->lookup_calls) continue; /* goes with the others at that call's reply */
    d->pending[d->npending - 1].sent = 1;
    if (n == cap) {
      cap = cap ? 2 * cap : 64;
      aks = sl_realloc(aks, cap * sizeof(*aks));
      lens = sl_realloc(lens, cap);
    }
    memcpy(aks[n], m.ak, m.len);
    lens[n++] = m.len;
  }
  if (n) sl__dirsync_request_accounts(d, aks, lens, n, 1);
  free(aks);
  free(lens);
  sl__dirsync_publish(d);
}

static void on_tick(uv_timer_t *t) {
  struct sl_dirsync *d = t->data;
  uint64_t now = sl_mono_ms();
  int ready = sl__dirsync_cmd_ready(d);
  if (d->cluster && now >= d->next_subs_ms) {
    d->next_subs_ms = now + SUBS_CHECK_MS;
    sync_subs(d);
  }
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
  /* A call in flight that never answers (the client's timeout drops the
   * connection first, so this is a bound, not a path): the lookups behind
   * it go after LOOKUP_HOLD_MS anyway. */
  if (ready && d->lookup_calls)
    for (unsigned i = 0; i < d->npending; i++)
      if (!d->pending[i].sent && now - d->pending[i].started_ms >= LOOKUP_HOLD_MS) {
        sl__dirsync_request_unsent(d);
        break;
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
  if (ready && d->resync_wanted && !d->resync_running) full_resync(d);
  if (ready && now >= d->next_resync_ms) check_or_resync(d);
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
  d->timeout_ms = cfg->redis_timeout_ms;
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
  d->subs = sl_calloc(SL_DIR_SUBS, sizeof(*d->subs));
  for (unsigned i = 0; i < SL_DIR_SUBS; i++) d->subs[i].d = d;
  if ((r = sl_db_init(&d->db, &d->loop, &o)) != 0) goto err_handles;
  d->cluster = sl_db_cluster(d->db);
  sl__dirsync_scripts_init(d);
  d->redis = sl_db_single(d->db);
  d->subs[0].r = d->redis; /* one server: the subscriber is the client's own (not stopped apart) */
  sl_db_start(d->db);
  uv_timer_start(&d->tick, on_tick, 100, 100);
  if ((r = sl_loop_thread_start(&d->thread, &d->loop, "sluice-dir")) != 0) goto err_redis;
  return 0;
err_redis:
  sl_db_stop(d->db);
  d->db = NULL;
  d->redis = NULL;
err_handles:
  uv_close((uv_handle_t *)&d->tick, NULL);
  uv_close((uv_handle_t *)&d->flush, NULL);
  uv_close((uv_handle_t *)&d->wake, NULL);
  uv_run(&d->loop, UV_RUN_DEFAULT); /* the close callbacks */
  free(d->subs);
  d->subs = NULL;
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
  free(d->subs);
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
