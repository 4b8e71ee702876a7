/* The metering flusher: a thread of its own that gathers the workers'
 * metering tables at least every flush interval, turns them into batches
 * with a stable id (instance id, process epoch, sequence), appends each batch
 * to a local spool file (fsync'd every round), and applies the batches to
 * Redis in order with one Lua script per batch that records the id and
 * skips a batch it has already applied. A batch whose reply is lost is sent
 * again with the same id; a restart replays what the spool holds unacked. */
#ifndef SL_FLUSHER_H
#define SL_FLUSHER_H

#include <stdatomic.h>
#include <uv.h>

#include "config.h"
#include "meter.h"

#define SL_BATCH_MAX 1000 /* keys per batch (one EVAL) */

struct sl_batch_entry {
  struct sl_meter_key k;
  uint64_t count;
};

struct sl_batch {
  struct sl_batch *next;
  uint64_t created_ms;
  uint32_t n;
  uint8_t id_len;
  uint8_t spooled;
  char id[96];
  struct sl_batch_entry e[];
};

struct sl_flusher_stats {
  _Atomic uint64_t batches;          /* made */
  _Atomic uint64_t applied;          /* applied by Redis */
  _Atomic uint64_t deduplicated;     /* Redis had already applied them */
  _Atomic uint64_t retried;          /* sent again after a lost reply or an error */
  _Atomic uint64_t replayed;         /* read back from the spool at start */
  _Atomic uint64_t queued;           /* gauge: batches not yet applied */
  _Atomic uint64_t queued_counts;    /* gauge: requests counted in them */
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

struct sl_flusher {
  uv_thread_t thread;
  uv_loop_t loop;
  uv_async_t wake;
  uv_timer_t tick;
  struct sl_flusher_stats stats;
  struct sl_meter_worker **workers;
  uv_async_t **worker_wakes;
  unsigned nworkers;
  uint64_t round;
  struct sl_meter_table *acc;
  struct sl_batch *head, *tail;
  unsigned nqueued;
  uint64_t queued_counts; /* requests counted in the queued batches */
  struct sl_batch *inflight;
  /* spool */
  int spool_fd;
  char spool_path[512];
  uint64_t spool_bytes, spool_max;
  int spool_dirty;
  uint64_t spool_full_said_ms;
  /* identity */
  char instance[64];
  uint64_t epoch, seq;
  /* redis */
  void *ctx; /* redisAsyncContext */
  int ready;
  char host[256];
  int port;
  char prefix[64];
  uint64_t backoff_ms, next_connect_ms, retry_at_ms;
  uv_timer_t watchdog;     /* the connect or reply deadline (hiredis 0.14 async has none) */
  unsigned timeout_ms;     /* --redis-timeout-ms */
  uint64_t io_deadline_ms; /* 0: nothing awaited */
  uint64_t last_io_ms;     /* last reply: an idle connection is probed with PING */
  unsigned awaiting;       /* commands sent, replies not yet come */
  int connecting, pinging;
  int down;                /* down (said once), until a PING is answered */
  uint64_t down_since_ms, down_said_ms;
  uint64_t errors, err_said_ms; /* error replies to batches; their log is rate-limited */
  int final_fail;          /* a connection failed since the final flush began */
  unsigned flush_ms, queue_max, final_ms;
  _Atomic int final; /* set by sl_flusher_stop */
  int final_started;
  uint64_t final_deadline;
};

/* Opens (or creates, 0700) the spool directory, the instance id and the
 * spool, replays unacked batches, and starts the thread. Returns 0 or -1
 * with a message in err. */
int sl_flusher_start(struct sl_flusher *f, const struct sl_config *cfg, struct sl_meter_worker **workers,
                     uv_async_t **worker_wakes, unsigned nworkers, char *err, size_t errlen);
/* After the workers have stopped: takes what their tables hold, writes it
 * to Redis (waiting at most the final-flush bound) or the spool, and stops. */
void sl_flusher_stop(struct sl_flusher *f);
/* Workers call this after handing their tables over for a round. */
static inline void sl_flusher_notify(struct sl_flusher *f) { uv_async_send(&f->wake); }

/* How a reply to a batch's EVAL is taken (exposed for the fuzz harness):
 * r is NULL when the connection went first. */
struct redisReply;
enum { SL_REPLY_LOST, SL_REPLY_APPLIED, SL_REPLY_DUPLICATE, SL_REPLY_ERROR };
int sl_flusher_reply_kind(const struct redisReply *r);

/* Spool record encoding, exposed for tests. Returns the bytes written into
 * out (which must hold sl_spool_batch_size(b)). */
size_t sl_spool_batch_size(const struct sl_batch *b);
size_t sl_spool_encode_batch(const struct sl_batch *b, unsigned char *out);
uint32_t sl_crc32(const void *p, size_t n);
/* Decodes a batch record's payload (after the 16-byte header); NULL when
 * malformed (anything encode would not write). The caller frees the batch. */
struct sl_batch *sl_spool_decode_batch(const unsigned char *payload, size_t len);
/* Decodes an ack record's payload: 0 with the acked batch's id (pointing
 * into payload), or -1 when malformed. */
int sl_spool_decode_ack(const unsigned char *payload, size_t len, const unsigned char **id, uint8_t *id_len);
/* Walks the records of a spool image data[0..len): calls on_record(arg,
 * type, payload, payload length) for each whole record whose framing and
 * CRC hold, in order, until one does not or on_record returns non-zero.
 * Returns the offset just past the last record taken (the rest is cut off
 * at start as a torn write). */
size_t sl_spool_scan(const unsigned char *data, size_t len,
                     int (*on_record)(void *arg, int type, const unsigned char *payload, uint32_t plen), void *arg);
#define SL_SPOOL_REC_BATCH 1
#define SL_SPOOL_REC_ACK 2
/* The names a key is written to Redis under (feature, tier, outcome). */
void sl_flusher_key_names(const struct sl_meter_key *k, const char **feature, const char **tier,
                          const char **outcome);

#endif
