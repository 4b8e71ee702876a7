/* Global limits (SPEC section 9): instances that share a Redis and a prefix
 * keep one QPS limit per (UID, feature, region) between them, with no Redis
 * round trip on the request path. docs/limits.md has the algorithm and its
 * bounds; in short:
 *
 * - Every instance heartbeats into Redis; N is the number of live ones.
 * - A key that no instance finds busy stays local: each instance admits
 *   R/N of it (its "default share"), which no one else can take: zero Redis
 *   traffic for such keys, however many there are.
 * - A key that gets busy here (its local bucket more than half used) is
 *   coordinated: this instance registers its demand for it in Redis and gets
 *   a lease, a share of R in parts per million; the Lua script that grants
 *   leases never lets the leases of a key plus R/N for each live instance
 *   not registered on it exceed R, and announces the key so that the other
 *   instances register too (and give up their R/N for a lease that follows
 *   their demand).
 * - Leases live --global-ttl-ms without refresh: an instance that dies gives
 *   its share back then. With Redis unreachable every key falls back to R/N
 *   here, N as last seen.
 *
 * Threads: workers read the share of a key and count their decisions on it
 * (lock-free, struct sl_fleet_slot), and ask for a key to be coordinated
 * through a bounded ring (sl_fleet_want); the fleet thread alone inserts,
 * updates and deletes slots, and alone talks to Redis. */
#ifndef SL_FLEET_H
#define SL_FLEET_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <uv.h>

#include "common.h"
#include "config.h"
#include "db.h"
#include "ring.h"

#define SL_FLEET_PPM 1000000u      /* a whole limit, in shares */
#define SL_FLEET_KEY_MAX 160       /* a bucket key's bytes (admit.h's SL_BUCKET_KEY_MAX fits) */
#define SL_FLEET_WANTS 1024        /* the workers' ring of keys to coordinate */
#define SL_FLEET_RECENT 64         /* per worker: keys asked for lately (not asked again for a second) */
#define SL_FLEET_PROBE 32          /* slots a key may lie past its home slot */
#define SL_FLEET_INSTANCES_TEXT 1024

enum sl_fleet_mode {
  SL_FLEET_OFF = 0,      /* --global-limits off: limits per instance */
  SL_FLEET_SHARED = 1,   /* shares from Redis */
  SL_FLEET_FALLBACK = 2, /* Redis unreachable: every key R / N_last here */
  SL_FLEET_JOINING = 3,  /* Redis back: heartbeating, still R / N_last, until the others are seen */
};

/* One coordinated key, as the workers see it: one cache line, so that two
 * busy keys' counters never share a line. */
struct sl_fleet_slot {
  _Atomic uint64_t tag;      /* lim_hash of the bucket key (never 0 or SL_FLEET_TOMB); 0 free */
  _Atomic uint64_t attempts; /* decisions on the key here, admitted or not */
  _Atomic uint32_t share;    /* this instance's lease, ppm of the limit */
  _Atomic uint32_t limit;    /* the limit R the workers last applied, requests/s */
  _Atomic uint64_t local_demand; /* milli-requests/s, smoothed (for /explain) */
  _Atomic uint64_t fleet_demand; /* the same, summed over the registered instances */
  _Atomic uint32_t registered;   /* instances registered on the key */
  uint32_t pad_;
  uint64_t pad2_[2];
};
#define SL_FLEET_TOMB UINT64_MAX

struct sl_fleet_stats {
  _Atomic uint64_t mode;        /* gauge: enum sl_fleet_mode */
  _Atomic uint64_t instances;   /* gauge: live instances in the last reply */
  _Atomic uint64_t coordinated; /* gauge: slots in use */
  _Atomic uint64_t last_sync_ms;/* monotonic ms of the last reply (0: never) */
  _Atomic uint64_t syncs;
  _Atomic uint64_t sync_errors;
  _Atomic uint64_t keys_full;   /* keys not coordinated: the table was full */
  _Atomic uint64_t wants_dropped; /* asks lost to a full ring (asked again later) */
  _Atomic uint64_t fallbacks;   /* switches to fallback */
  _Atomic uint64_t releases;    /* keys given back to local shares */
  _Atomic uint64_t redis_up;    /* gauge 0/1 */
  _Atomic uint64_t key_updates; /* keys sent to Redis (the script's per-key work) */
  _Atomic uint64_t bell_up;     /* gauge 0/1: subscribed to the bell (one server) */
  _Atomic uint64_t bells;       /* the bell heard (another session rang it) */
};

struct sl_fleet_key; /* the fleet thread's own state of a slot */
struct sl_db;

struct sl_fleet {
  /* ---- read by workers ---- */
  /* mode << 32 | the default share (ppm) of keys not coordinated, and of
   * every key unless the mode is shared */
  _Atomic uint64_t word;
  struct sl_fleet_slot *slots;
  uint32_t mask; /* slots - 1 */
  struct sl_ring wants;
  struct sl_fleet_recent *recent; /* [nworkers] */
  unsigned nworkers;
  struct sl_fleet_stats stats;
  /* ---- the fleet thread ---- */
  uv_thread_t thread;
  uv_loop_t loop;
  uv_async_t stop;
  uv_timer_t tick;
  struct sl_db *db;           /* db.h: one server, Sentinel or a cluster */
  struct sl_fleet_key *keys; /* [mask + 1], parallel to slots */
  uint32_t *used;            /* indices of the slots in use */
  uint32_t *pick;            /* scratch: the keys a sync names */
  uint32_t nused, cap;
  char prefix[64];
  char id[96];               /* this process: host/pid/random */
  /* The session in Redis, <id>#<n>: a lease counts while its session
   * heartbeats, so a new one starts whenever this instance's leases stop
   * being kept (an outage, alone in the fleet); earlier ones still to
   * drop from the zset go with the next heartbeat. */
  char member[112];
  char old_members[4 * 112];
  unsigned session;
  struct sl_db_script scripts[5]; /* called by EVALSHA (db.h: EVAL after NOSCRIPT) */
  unsigned sync_ms, ttl_ms;
  uint64_t last_tick_ms;
  uint64_t last_sent_ms;     /* the last sync sent */
  uint64_t refresh_at_ms;    /* the next refresh epoch (fleet.c's key_due) */
  uint64_t joined_at_ms;     /* after a reconnect: keys sync from then on */
  unsigned n_last;           /* live instances in the last reply */
  int inflight, ever_synced, outage, outage_logged;
  int rejoin;                /* a cluster after an outage: the next heartbeat starts the join wait */
  int bell_up;               /* subscribed to P share:bell (one server): no polling for nudges */
  int bell;                  /* it rang since the last call: read at the next tick */
  unsigned odd_tick;         /* keys that can wait go every other tick (fleet.c's sync_now) */
  unsigned leaving;          /* parts of the leave not answered yet */
  _Atomic int outage_seen; /* for sl_fleet_wait_first */
  struct sl_ratelog log_err; /* error replies: a line at most every 10 s */
  char ann_last[48];         /* the newest announcement read */
  /* ---- read by the admin thread under lock ---- */
  pthread_mutex_t text_lock;
  char instances_text[SL_FLEET_INSTANCES_TEXT]; /* JSON array of the live instances' ids */
};

/* Makes the table and starts the thread (cfg->global_limits on). Returns 0,
 * or a negative errno with a message in err. */
int sl_fleet_start(struct sl_fleet *f, const struct sl_config *cfg, unsigned nworkers, char *err, size_t errlen);
/* Waits (at most timeout_ms) until the first sync has answered, so that an
 * instance joining a fleet serves with its share from its first request
 * rather than the whole limit; returns at once when Redis is found
 * unreachable (fallback). Main thread, before the workers run. */
void sl_fleet_wait_first(struct sl_fleet *f, unsigned timeout_ms);
/* After the workers have stopped. */
void sl_fleet_stop(struct sl_fleet *f);

static inline enum sl_fleet_mode sl_fleet_mode_of(uint64_t word) { return (enum sl_fleet_mode)(word >> 32); }

/* The slot of a coordinated key, or NULL. Any thread; lock-free. */
static inline struct sl_fleet_slot *sl_fleet_find(struct sl_fleet *f, uint64_t tag) {
  if (tag == 0 || tag == SL_FLEET_TOMB) tag = 1;
  for (uint32_t i = 0; i < SL_FLEET_PROBE; i++) {
    struct sl_fleet_slot *s = &f->slots[(tag + i) & f->mask];
    /* acquire: a tag comes with the share stored before it (the fleet
     * thread's release store on insertion). */
    uint64_t t = atomic_load_explicit(&s->tag, memory_order_acquire);
    if (t == tag) return s;
    if (t == 0) return NULL;
  }
  return NULL;
}

/* What a worker applies to a key whose limit is `limit` requests/s: the
 * share in ppm. Counts the decision for the key's demand when the key is
 * coordinated (*slot set), else leaves *slot NULL. Lock-free. */
static inline uint32_t sl_fleet_share(struct sl_fleet *f, uint64_t tag, uint64_t limit,
                                      struct sl_fleet_slot **slot) {
  /* relaxed: the word is one value; a share a moment old is as good. */
  uint64_t w = atomic_load_explicit(&f->word, memory_order_relaxed);
  struct sl_fleet_slot *s = sl_fleet_find(f, tag);
  *slot = s;
  if (!s) return (uint32_t)w;
  /* relaxed: a counter and a value, each read on its own. */
  atomic_fetch_add_explicit(&s->attempts, 1, memory_order_relaxed);
  uint32_t l = limit > UINT32_MAX ? UINT32_MAX : (uint32_t)limit;
  if (atomic_load_explicit(&s->limit, memory_order_relaxed) != l)
    atomic_store_explicit(&s->limit, l, memory_order_relaxed);
  return sl_fleet_mode_of(w) == SL_FLEET_SHARED ? atomic_load_explicit(&s->share, memory_order_relaxed)
                                                : (uint32_t)w;
}

/* A worker found a key that is not coordinated busy: asks the fleet thread
 * to coordinate it (at most once a second per worker and key; a full ring
 * drops the ask, made again later). now_ms: the worker's loop time. */
void sl_fleet_want(struct sl_fleet *f, unsigned worker, uint64_t tag, const char *key, size_t len,
                   uint64_t limit, uint64_t now_ms);

/* For /explain: what this instance knows of a key. */
struct sl_fleet_view {
  enum sl_fleet_mode mode;
  unsigned instances;
  int coordinated;
  uint32_t share;                     /* ppm applied now */
  uint64_t local_demand, fleet_demand; /* milli-requests/s */
  unsigned registered;
};
void sl_fleet_view(struct sl_fleet *f, uint64_t tag, struct sl_fleet_view *v);
/* Copies the live instances' ids as a JSON array into buf. */
void sl_fleet_instances(struct sl_fleet *f, char *buf, size_t cap);

const char *sl_fleet_mode_name(enum sl_fleet_mode m);

/* For unit tests and the fuzz harness: the table without the thread; the
 * fleet thread's steps on it. */
struct redisReply;
int sl_fleet_table_init_test(struct sl_fleet *f, unsigned cap, unsigned nworkers);
void sl_fleet_table_free_test(struct sl_fleet *f);
void sl_fleet_table_reset_test(struct sl_fleet *f); /* empty again, as just made */
void sl_fleet_take_wants_test(struct sl_fleet *f);
/* The demand of every key from its decisions counted since the last call,
 * dt_ms ago (the tick's measure). */
void sl_fleet_measure_test(struct sl_fleet *f, uint64_t now, uint64_t dt_ms);
/* Applies a reply to a sync that named the slots idx[0..n). */
int sl_fleet_apply_reply_test(struct sl_fleet *f, const uint32_t *idx, uint32_t n, const struct redisReply *r);
/* Why the key in slot idx would be in a sync at now (ms): the script's
 * flag ('0' refresh or nudged, '1' new or moved, '2' release, '3' retry),
 * or 0 when it is not due. Marks it sent at now when due (as a sync that
 * named it would). */
int sl_fleet_due_test(struct sl_fleet *f, uint32_t idx, uint64_t now);

#endif
