/* Counters and gauges that one thread writes and others (/metrics) read. */
#ifndef SL_STAT_H
#define SL_STAT_H

#include <stdatomic.h>
#include <stdint.h>

/* Single writer: a relaxed load+store pair is a plain add, no lock prefix;
 * readers only need a value that is not torn, which relaxed gives. */
static inline void sl_stat_inc(_Atomic uint64_t *c, uint64_t v) {
  atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + v, memory_order_relaxed);
}
/* An increment that publishes the writes before it: a reader that loads it
 * with acquire sees them (or later values). */
static inline void sl_stat_inc_release(_Atomic uint64_t *c, uint64_t v) {
  atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + v, memory_order_release);
}
static inline void sl_stat_set(_Atomic uint64_t *c, uint64_t v) { atomic_store_explicit(c, v, memory_order_relaxed); }
static inline void sl_stat_dec(_Atomic uint64_t *c, uint64_t v) {
  atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) - v, memory_order_relaxed);
}

#endif
