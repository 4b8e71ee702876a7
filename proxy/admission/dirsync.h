/* The directory thread: keeps the account directory (dir.h) in step with
 * Redis. It loads the suspended set and feature overrides whole, accounts
 * (AccessKeyId -> UID and that UID's packages) on first sight, listens for
 * keyspace notifications and messages on `P changes`, and every resync
 * interval rereads everything it holds, or, where notifications are known
 * to be live, checks for what they cannot tell (check_or_resync). It runs its own libuv loop with hiredis'
 * async API; workers talk to it through a lock-free ring and uv_async. */
#ifndef SL_DIRSYNC_H
#define SL_DIRSYNC_H

#include <stdatomic.h>
#include <uv.h>

#include "common.h"
#include "config.h"
#include "db.h"
#include "dir.h"
#include "inbox.h"
#include "ring.h"

#define SL_DIR_MAX_PENDING 4096 /* distinct accounts being looked up at once */
#define SL_DIR_FULL_EVERY 10    /* everything reread at least every this many resync intervals */

struct sl_lookup_msg {
  uint64_t hash;
  uint16_t worker;
  uint8_t len;
  char ak[SL_AK_MAX + 1];
};

struct sl_dirsync_stats {
  _Atomic uint64_t redis_up;          /* gauge 0/1 */
  _Atomic uint64_t keyspace_enabled;  /* gauge 0/1: CONFIG SET worked or was already set */
  _Atomic uint64_t lookups;           /* accounts asked for by workers */
  _Atomic uint64_t lookup_failures;   /* answered "unavailable" (Redis down or slow) */
  _Atomic uint64_t notifications;     /* keyspace events and change messages handled */
  _Atomic uint64_t resyncs;           /* full resyncs completed */
  _Atomic uint64_t resync_checks;     /* resync intervals that found nothing missed (no reread needed) */
  _Atomic uint64_t reconnects;        /* connection attempts after a loss */
  _Atomic uint64_t invalid_packages;  /* package hashes that could not be used */
  _Atomic uint64_t accounts;          /* gauge: records in the directory */
  _Atomic uint64_t version;           /* gauge: directory snapshot version */
  _Atomic uint64_t evictions;
  _Atomic uint64_t bad_keys;       /* gauge: keys seen unusable lately (wrong type, bad value) */
  _Atomic uint64_t bad_key_reads;  /* reads that found a key unusable and set it aside */
  _Atomic uint64_t redis_timeouts; /* connections dropped: no connect or no reply within redis-timeout-ms */
};

/* A key that could not be used: named in the log at first sight, then at
 * most every SL_DIR_BADKEY_LOG_MS while it stays so. */
#define SL_DIR_BADKEYS 128
#define SL_DIR_BADKEY_NAME 200
struct sl_dirsync_badkey {
  uint64_t hash, last_seen_ms, next_log_ms;
  uint32_t unlogged; /* reads since the last line */
  uint16_t len;
  char name[SL_DIR_BADKEY_NAME]; /* without the prefix; cut at the bound */
};

struct sl_redis;
struct sl_db;

/* A connection that listens for keyspace notifications and `P changes`:
 * the one server's (its client's subscriber), or, in a Redis Cluster, one
 * per master (notifications are node-local), following the slot map. */
#define SL_DIR_SUBS 64
struct sl_dirsync_sub {
  struct sl_dirsync *d;
  struct sl_redis *r; /* NULL: free (a cluster's entry whose master left the map) */
  char host[256];
  int port;
  int seen; /* in the map at the last check */
  /* this server's part in the resync checks (dirsync.c, check_or_resync) */
  int keyspace_ok;    /* its notify-keyspace-events covers ours, as last seen */
  unsigned acks;      /* subscriptions confirmed since its last subscribe() */
  char mark[40];      /* its P dir:mark's value as last read ("": unknown) */
  char mark_ours[40]; /* the value the last read offered */
  unsigned mark_slot; /* a cluster: the slot of its mark, one of its master's at the last full reread */
  char mark_tag[SL_CLUSTER_TAG_SIZE]; /* a cluster: that slot's tag, found once per full reread */
  unsigned gen;       /* bumped when the entry goes to another server: replies for the old one are dropped */
};

struct sl_dirsync_slot {
  _Alignas(64) _Atomic uint64_t seen; /* one worker's quiescent version */
};

struct sl_dirsync {
  uv_thread_t thread;
  uv_loop_t loop;
  uv_async_t wake;
  uv_timer_t tick, flush;
  struct sl_ring ring;
  struct sl_dir_builder b;
  struct sl_dirsync_stats stats;
  struct sl_dirsync_slot *seen;
  struct sl_inbox **worker_inboxes;
  unsigned nworkers;
  _Atomic int stop;
  /* configuration (copied at start) */
  char prefix[64];
  size_t prefix_len;
  unsigned resync_ms, lookup_timeout_ms, negative_ttl_ms, unavailable_ttl_ms, timeout_ms;
  /* Redis: commands through db.h (one server, Sentinel or a cluster); the
   * notifications on subs (one server: subs[0], on db's client) */
  struct sl_db *db;
  struct sl_redis *redis; /* one server or Sentinel: db's client; NULL in a cluster */
  int cluster;
  struct sl_db_script scripts[5]; /* dirsync_load.c's, by SHA-1 */
  struct sl_dirsync_sub *subs; /* SL_DIR_SUBS */
  uint64_t next_subs_ms;
  char log_subject[300];
  struct sl_ratelog log_reply; /* error replies to the loads */
  int keyspace_said;           /* 0, 1: said enabled, 2: said not */
  /* suspension never fails open: accounts are not answered "found" until the
   * suspended set has been read once; a later unreadable set keeps the last */
  int suspended_known;
  uint64_t next_state_retry_ms;
  struct sl_ratelog log_nosusp;
  struct sl_dirsync_badkey bad[SL_DIR_BADKEYS];
  unsigned nbad;
  struct sl_ratelog log_badfull;
  uint64_t next_badkey_sweep_ms;
  uint64_t next_resync_ms;
  int resync_running;
  /* A resync interval rereads everything only when a change may have gone
   * unnotified (dirsync.c, check_or_resync; each server's part in subs). */
  unsigned checks_since_full; /* intervals checked without a reread since the last full one */
  unsigned check_left;        /* replies the check in flight waits for */
  int check_failed;           /* that check found a change unnotified, or no answer */
  int full_trusted;  /* the last full reread was sent with notifications and subscriptions confirmed */
  int force_full;    /* a load failed: the next interval rereads everything */
  int resync_wanted; /* a full reread asked for while one (or a check) was running: it goes after */
  int volatile_seen; /* a followed key was given a TTL: every interval rereads (its expiry may notify late) */
  /* lookups in flight */
  struct {
    uint64_t hash, started_ms;
    uint8_t len;
    uint8_t sent; /* asked of Redis (else waiting behind lookup_calls) */
    char ak[SL_AK_MAX + 1];
  } pending[SL_DIR_MAX_PENDING];
  unsigned npending;
  unsigned lookup_calls; /* one server: first lookups' calls in flight */
  /* coalesced reloads */
  int reload_state;
  char (*reload_ak)[SL_AK_MAX + 1];
  uint8_t *reload_len;
  unsigned nreload, capreload;
};

/* Starts the thread. `worker_inboxes` are the workers' inboxes: each is
 * posted SL_MSG_DIRECTORY when lookups it asked for are answered or a new
 * snapshot is published. Returns 0 or a negative errno. */
int sl_dirsync_start(struct sl_dirsync *d, const struct sl_config *cfg, unsigned nworkers,
                     struct sl_inbox **worker_inboxes);
/* Stops the thread and frees everything; no worker may read afterwards. */
void sl_dirsync_stop(struct sl_dirsync *d);

/* Worker side. The current snapshot (acquire load; valid until the worker's
 * next sl_dirsync_quiescent). */
static inline const struct sl_dir_snap *sl_dirsync_snap(struct sl_dirsync *d) {
  /* acquire: pairs with the publish's release store. */
  return atomic_load_explicit(&d->b.current, memory_order_acquire);
}
/* Asks for ak to be loaded; the worker is woken after the answer is
 * published. Returns 0 or -ENOBUFS when the ring is full. */
int sl_dirsync_lookup(struct sl_dirsync *d, unsigned worker, const char *ak, size_t len, uint64_t hash);
/* Records that `worker` holds no snapshot pointer older than the current. */
void sl_dirsync_quiescent(struct sl_dirsync *d, unsigned worker);

/* For an occasional reader that is not a worker (the admin thread): the
 * snapshot stays valid until sl_dirsync_exit. One such reader at a time. */
const struct sl_dir_snap *sl_dirsync_enter(struct sl_dirsync *d);
void sl_dirsync_exit(struct sl_dirsync *d);

#endif
