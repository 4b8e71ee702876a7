/* A bounded multi-producer queue (Vyukov's array queue): producers claim a
 * cell with one CAS on the tail, the consumer needs no atomic RMW at all.
 * Used for the workers' account lookups to the directory thread. Elements
 * are copied in and out (fixed size); full and empty are reported, never
 * waited on. */
#ifndef SL_RING_H
#define SL_RING_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

struct sl_ring_cell {
  _Atomic size_t seq;
  /* element bytes follow */
};

struct sl_ring {
  size_t mask;
  size_t elem_size;
  size_t cell_size;
  char *cells;
  _Alignas(64) _Atomic size_t tail; /* producers */
  _Alignas(64) size_t head;         /* the single consumer */
};

/* capacity must be a power of two >= 2. Returns 0 or -ENOMEM/-EINVAL. */
int sl_ring_init(struct sl_ring *r, size_t capacity, size_t elem_size);
void sl_ring_free(struct sl_ring *r);
/* Any thread. Returns 0, or -ENOBUFS when full (nothing is copied). */
int sl_ring_push(struct sl_ring *r, const void *elem);
/* The consumer thread only. Returns 0, or -EAGAIN when empty. */
int sl_ring_pop(struct sl_ring *r, void *elem);
/* The consumer thread only: copies the oldest element without taking it
 * (the consumer may leave it for later). Returns 0, or -EAGAIN when empty. */
int sl_ring_peek(struct sl_ring *r, void *elem);

#endif
