/*
 * limiter: a lock-free table of per-key QPS buckets (GCRA), shared by every
 * worker thread. No dependency beyond libc, pthreads and C11 atomics.
 *
 * A key is (UID, feature, region) as opaque bytes plus a 64-bit hash of those
 * bytes (lim_hash(), or any deterministic function of the bytes: the same key
 * must always come with the same hash). The table is split into shards by the
 * high bits of the hash; a shard is an open-addressing array of 16-byte slots.
 * The key bytes are not stored: a slot holds a 64-bit fingerprint of the key
 * computed with a per-table secret seed (see docs/limiter.md for the
 * collision argument) and one 64-bit atomic word of bucket state.
 *
 * Algorithm: GCRA with rate R per second and a burst tolerance of one second
 * (R requests at once). Times are integer nanoseconds from a monotonic clock
 * that the caller passes in (lim_now_ns() reads CLOCK_MONOTONIC).
 *
 * Thread safety: every function taking a table may be called from any number
 * of threads at once, except lim_table_free(), which needs the table to be no
 * longer used by any other thread.
 */
#ifndef SLUICE_LIMITER_H
#define SLUICE_LIMITER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Rates above this (requests per second) are treated as this: the emission
 * interval 1e9/R is kept in whole nanoseconds and must be at least 1. */
#define LIM_RATE_MAX 1000000000ull

/* now_ns values above this are clamped to it (about 36 years of uptime): the
 * bucket state keeps the theoretical arrival time in 60 bits. */
#define LIM_NOW_MAX ((UINT64_C(1) << 60) - (UINT64_C(1) << 32))

/* Slots one key's probe window may span: a key lives within this many slots
 * of its home slot, and "full" means this window holds no free or idle slot. */
#define LIM_WINDOW 128u

/* Returned as retry_after_ns when waiting cannot help: rate 0, or a cost
 * larger than the whole burst (cost > rate). */
#define LIM_NEVER UINT64_MAX

enum lim_result {
  LIM_ADMIT = 0,  /* admitted; the cost was charged to the bucket */
  LIM_REJECT = 1, /* over the limit; nothing was charged */
  LIM_FULL = 2    /* no bucket could be found or made: the key's probe window
                     holds only live, non-idle buckets. Nothing was charged;
                     the caller decides (count it, fail open or closed). */
};

/* What a decision (or a peek) says about a bucket, at the now_ns given. */
struct lim_decision {
  int result;              /* enum lim_result */
  uint64_t limit;          /* the rate applied, requests/s (= the burst size) */
  uint64_t remaining;      /* requests of cost 1 still admissible right now,
                              after this decision (RateLimit-Remaining) */
  uint64_t retry_after_ns; /* ns until the next request would be admitted:
                              for LIM_REJECT, this request at its cost; for
                              LIM_ADMIT, one more of cost 1 (0 if remaining
                              > 0); LIM_NEVER if it never will; 0 for
                              LIM_FULL (unknown) */
  uint64_t reset_ns;       /* ns until the bucket is full again (the whole
                              burst available; RateLimit-Reset) */
};

/* Counters, each read atomically but not all at the same instant. */
struct lim_stats {
  uint64_t capacity;    /* keys asked for at lim_table_new() */
  uint64_t slots;       /* slots allocated (>= 2 * capacity) */
  uint64_t keys;        /* slots holding a key (they are never emptied again;
                           idle ones are reclaimed in place) */
  uint64_t reclaims;    /* idle buckets given to another key */
  uint64_t full;        /* decisions answered LIM_FULL */
  uint64_t bytes;       /* memory held by the table */
  unsigned shards;
};

struct lim_table;

/* Creates a table for about `capacity` keys in `shards` shards (a power of
 * two, 1 to 65536). Returns the table, owned by the caller (free it with
 * lim_table_free()), or NULL with errno set to EINVAL (bad arguments) or
 * ENOMEM. */
struct lim_table *lim_table_new(size_t capacity, unsigned shards);

/* Frees the table. No other thread may use it any more. NULL is ignored. */
void lim_table_free(struct lim_table *t);

/* Returns a 64-bit non-cryptographic hash of the bytes (wyhash-style
 * multiply-fold mixing, written for this project). Any thread. */
uint64_t lim_hash(const void *key, size_t len);

/* Decides one request of `cost` units for the key at time now_ns against a
 * limit of rate_per_s requests per second with a burst of rate_per_s.
 * rate_per_s == 0 means "reject everything" (the table is not touched);
 * rate_per_s above LIM_RATE_MAX counts as LIM_RATE_MAX. A changed rate for the
 * same key takes effect at once and keeps the fraction of the one-second
 * allowance already used (no reset, no penalty).
 * Returns 0 with *out filled (out->result says admitted, rejected or full),
 * or -EINVAL (t or out NULL, key NULL with keylen > 0, cost 0); then *out is
 * untouched. Lock-free for keys already in the table and for claims of free
 * slots; reclaiming an idle slot for a new key takes the shard's mutex.
 * Any thread. */
int lim_decide(struct lim_table *t, const void *key, size_t keylen,
               uint64_t hash, uint64_t rate_per_s, uint32_t cost,
               uint64_t now_ns, struct lim_decision *out);

/* lim_decide() for a rate in milli-requests per second (a fleet's share of a
 * limit is rarely whole): the burst is floor(rate), at least 1 request, and
 * a rate under 1/s admits one request per 1000/rate_milli seconds. A whole
 * rate (a multiple of 1000) decides exactly as lim_decide() does, so both
 * may be used on the same key. out->limit is the whole part of the rate. */
int lim_decide_milli(struct lim_table *t, const void *key, size_t keylen,
                     uint64_t hash, uint64_t rate_milli, uint32_t cost,
                     uint64_t now_ns, struct lim_decision *out);

/* Starts loading the key's home slot into the cache, for a lim_decide() on
 * the same hash a little later. With many keys the table outgrows the CPU
 * caches and a decision waits for memory (about 100 ns); a caller that knows
 * the key early (when it parses the request) can hide that wait behind other
 * work. Never needed for correctness. Any thread; changes nothing. */
void lim_prefetch(const struct lim_table *t, uint64_t hash);

/* Reports what a request of cost 1 would get, without changing anything
 * (for an admin /explain endpoint). Returns 0 if the key has a bucket,
 * -ENOENT if not (then *out describes the full bucket a first request would
 * find), or -EINVAL as lim_decide(). Lock-free; any thread. */
int lim_peek(const struct lim_table *t, const void *key, size_t keylen,
             uint64_t hash, uint64_t rate_per_s, uint64_t now_ns,
             struct lim_decision *out);

/* lim_peek() for a rate in milli-requests per second. */
int lim_peek_milli(const struct lim_table *t, const void *key, size_t keylen,
                   uint64_t hash, uint64_t rate_milli, uint64_t now_ns,
                   struct lim_decision *out);

/* Fills *out with the table's counters. Any thread, lock-free. */
void lim_table_stats(const struct lim_table *t, struct lim_stats *out);

/* Returns CLOCK_MONOTONIC in nanoseconds (0 if the clock fails, which Linux
 * does not do for this clock). Any thread. */
uint64_t lim_now_ns(void);

#ifdef __cplusplus
}
#endif
#endif /* SLUICE_LIMITER_H */
