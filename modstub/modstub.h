/* modstub: a moderation-backend stand-in that answers like green-cip.
 *
 * Process layout: the main thread parses options, binds one SO_REUSEPORT
 * listening socket per worker and waits for SIGTERM/SIGINT; each worker
 * thread runs its own uv loop with its own socket, so workers share nothing
 * but the statistics (relaxed atomics) and the interned Action names. */
#ifndef MODSTUB_H
#define MODSTUB_H

#include <stdatomic.h>
#include <stdint.h>

#include <uv.h>

#include "buf.h"

#define MS_MAX_WORKERS 256
#define MS_MAX_ACTIONS 64   /* distinct Action names counted in /stats */
#define MS_ACTION_NAME 64   /* longest counted Action name, NUL included */
#define MS_STATUS_SLOTS 600 /* HTTP status codes 0..599 */

struct ms_opts {
  const char *listen;     /* HOST:PORT as given */
  unsigned workers;
  uint64_t latency_ms;    /* fixed delay of every answer */
  uint64_t jitter_ms;     /* plus uniform 0..jitter_ms */
  double error_rate;      /* fraction of answers turned into HTTP 500 */
  uint64_t seed;
};

/* One worker's counters. Only its own loop thread increments them; /stats
 * (any worker) reads and /stats/reset zeroes them, so every access is a
 * relaxed atomic: the numbers need no ordering with anything else. Aligned
 * so that two workers never share a cache line. */
struct ms_stats {
  _Alignas(64) atomic_uint_fast64_t requests;
  atomic_uint_fast64_t connections;
  atomic_uint_fast64_t by_status[MS_STATUS_SLOTS];
  atomic_uint_fast64_t by_action[MS_MAX_ACTIONS];
};

struct ms_worker {
  uv_loop_t loop;
  uv_tcp_t listener;
  uv_async_t stop;
  uv_thread_t thread;
  int fd;                 /* listening socket, owned by `listener` once opened */
  unsigned index;
  uint64_t rng;           /* xorshift64* state, this thread only */
  const struct ms_opts *opts;
  struct ms_buf scratch;  /* reply bodies are built here, then copied out */
  struct ms_stats stats;
};

/* Process-wide state, set up before the workers start and read-only after,
 * except the action table (see ms_action_index). */
extern struct ms_worker *ms_workers;
extern unsigned ms_nworkers;

/* Starts serving connections on w's loop (called on w's thread).
 * Returns 0 or a negative UV_E* code. */
int ms_conn_listen(struct ms_worker *w);
/* Closes the listener and every connection of w (on w's thread); the loop
 * then runs out and every conn is freed in its close callback. */
void ms_conn_close_all(struct ms_worker *w);

/* Next pseudo-random number of w's generator. */
uint64_t ms_rand(struct ms_worker *w);

/* Index in the process-wide Action table of `name` (length n), adding it when
 * new; -1 when the table is full or the name too long. Lock-free lookup, a
 * mutex only around adding. Any thread. */
int ms_action_index(const char *name, size_t n);
/* Writes the /stats JSON object, summed over workers, into b. */
void ms_stats_json(struct ms_buf *b);
/* Zeroes every worker's counters. */
void ms_stats_reset(void);
/* Sets up the action table; call once before the workers start. */
void ms_stats_init(void);
void ms_stats_fini(void);

static inline void ms_count(atomic_uint_fast64_t *c) {
  /* Relaxed: a statistic, ordered with nothing. */
  atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
}

#endif
