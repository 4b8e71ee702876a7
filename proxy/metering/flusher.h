/* The metering flusher: a thread of its own that gathers the workers'
 * metering tables at least every flush interval, turns them into batches
 * with a stable id (instance id, process epoch, sequence), appends each batch
 * to a local spool file (fsync'd every round), and applies the batches to
 * Redis in order with one Lua script per batch that records the id and
 * skips a batch it has already applied (a Redis Cluster: per slot, the
 * highest seq applied, flusher.c). A batch whose reply is lost is sent
 * again with the same id; a restart replays what the spool holds unacked. */
#ifndef SL_FLUSHER_H
#define SL_FLUSHER_H

#include <stdatomic.h>
#include <uv.h>

#include "common.h"
#include "config.h"
#include "inbox.h"
#include "meter.h"
#include "spool.h"

struct sl_flusher_stats {
  _Atomic uint64_t batches;          /* made */
  _Atomic uint64_t applied;          /* applied by Redis */
  _Atomic uint64_t deduplicated;     /* Redis had already applied them */
  _Atomic uint64_t retried;          /* sent again after a lost reply or an error */
  _Atomic uint64_t replayed;         /* read back from the spool at start */
  _Atomic uint64_t queued;           /* gauge: batches not yet applied */
  _Atomic uint64_t queued_counts;    /* gauge: requests counted in them */
  _Atomic uint64_t accumulated;      /* gauge: requests gathered (and journaled) for the next flush, not in a batch yet */
  _Atomic uint64_t oldest_ms;        /* gauge: creation time of the oldest unapplied batch (0: none) */
  _Atomic uint64_t spool_bytes;      /* gauge */
  _Atomic uint64_t spool_full;       /* gauge 0/1 */
  _Atomic uint64_t spool_errors;
  _Atomic uint64_t redis_up;         /* gauge 0/1 */
  _Atomic uint64_t flush_latency_us_sum; /* made -> applied */
  _Atomic uint64_t flush_latency_us_max;
  _Atomic uint64_t counted;          /* requests handed to batches */
  _Atomic uint64_t lost;             /* requests dropped (spool full and shut down without Redis) */
};

struct sl_db;

struct sl_flusher {
  uv_thread_t thread;
  uv_loop_t loop;
  uv_async_t wake;
  uv_timer_t tick;  /* rounds, every spool interval */
  uv_timer_t pace;  /* the next batch's turn (sends spread over the interval) */
  struct sl_flusher_stats stats;
  struct sl_meter_worker **workers;
  struct sl_inbox **worker_inboxes;
  unsigned nworkers;
  uint64_t round;
  struct sl_meter_table *acc;
  struct sl_batch *head, *tail;
  unsigned nqueued;
  uint64_t queued_counts; /* requests counted in the queued batches */
  struct sl_batch *inflight;
  /* its parts (one, or with Redis Cluster one per master and per slot sent
   * alone, the days' sets and the stream entry): sent as send number gen, left unanswered, the worst
   * end so far, whether one was applied (not found applied) */
  uint64_t gen;
  unsigned parts_left;
  int part_worst, part_applied;
  struct sl_spool spool;
  /* identity */
  char instance[64];
  uint64_t epoch, seq;
  /* Redis (db.h: one server, Sentinel or a cluster) */
  struct sl_db *redis;
  char stream_tag[16];          /* a cluster: a hash tag in usage:stream's slot, for the entry's marker */
  char *slot_tags;              /* a cluster: each slot's tag (cluster.h's sl_cluster_slot_tags), for its mark */
  uint32_t *mark_fresh_s;       /* a cluster: per slot, when its mark's TTL was last renewed (sl_flusher_mark_ttl_due) */
  char prefix[64];
  uint64_t retry_at_ms;         /* after an error reply, the batch goes again then */
  uint64_t errors;              /* error replies to batches */
  struct sl_ratelog log_err;    /* their lines */
  int wait_replicas;            /* --redis-wait-replicas: a batch is acked once on this many (-1 auto, 0 off) */
  unsigned wait_ms;             /* WAIT's timeout */
  struct sl_ratelog log_wait;   /* "fewer replicas than needed" lines */
  int final_fail;               /* a connection failed since the final flush began */
  unsigned flush_ms, queue_max, final_ms;
  unsigned spool_ms;            /* rounds: counts gathered and made durable */
  uint64_t next_flush_ms;       /* when the accumulator next becomes batches */
  uint32_t flushes;             /* flush times passed (the accumulator's epoch) */
  uint32_t quiet_rounds;        /* --flush-quiet-ms / --flush-ms: flushes a quiet key may wait through, + 1 */
  unsigned pace_ms;             /* between two batch sends (0: at once) */
  uint64_t next_send_ms;
  int journal;                  /* tables merged now are journaled as deltas */
  unsigned slice_keys;          /* keys handled since the flusher last let the CPU go (breathe) */
  struct sl_batch *pending;     /* at start: journaled deltas not covered by a batch */
  _Atomic int final; /* set by sl_flusher_stop */
  int final_started;
  uint64_t final_deadline;
};

/* Opens (or creates, 0700) the spool directory, the instance id and the
 * spool, replays unacked batches, and starts the thread. Returns 0, or a
 * negative errno with a message in err (nothing is left behind then). */
int sl_flusher_start(struct sl_flusher *f, const struct sl_config *cfg, struct sl_meter_worker **workers,
                     struct sl_inbox **worker_inboxes, unsigned nworkers, char *err, size_t errlen);
/* After the workers have stopped: takes what their tables hold, writes it
 * to Redis (waiting at most the final-flush bound) or the spool, and stops. */
void sl_flusher_stop(struct sl_flusher *f);
/* Workers call this after handing their tables over for a round. */
static inline void sl_flusher_notify(struct sl_flusher *f) { uv_async_send(&f->wake); }

/* How replies to a batch's commands are taken (exposed for the fuzz
 * harness); r is NULL when the connection went first. A script's (Redis
 * Cluster): 1 applied, 0 found applied. One server: the GET of the batch's
 * marker (nil: not yet applied; a string: applied), and its transaction's
 * EXEC (nil: the marker changed, read it again; an array of a reply per
 * command sent: applied). */
struct redisReply;
enum { SL_REPLY_LOST, SL_REPLY_APPLIED, SL_REPLY_DUPLICATE, SL_REPLY_ERROR, SL_REPLY_NOT_YET, SL_REPLY_AGAIN };
int sl_flusher_reply_kind(const struct redisReply *r);
int sl_flusher_marker_kind(const struct redisReply *r);
int sl_flusher_exec_kind(const struct redisReply *r, size_t cmds);

/* Redis Cluster: whether a slot's mark gets its 7 days again in the next
 * batch rather than keeping its TTL (which costs Redis about half as much):
 * when this process has not renewed it for SL_MARK_FRESH_S (fresh_s: when
 * it last did, by a script answered applied, in monotonic s + 1; 0 never).
 * So after each write a mark has at least 7 days less an hour left for a
 * replay to find it; marks are per process (their epoch): no one else
 * writes them. */
#define SL_MARK_FRESH_S 3600
int sl_flusher_mark_ttl_due(uint32_t fresh_s, uint32_t now_s);

/* The names a key is written to Redis under (feature, tier, outcome). */
void sl_flusher_key_names(const struct sl_meter_key *k, const char **feature, const char **tier,
                          const char **outcome);

#endif
