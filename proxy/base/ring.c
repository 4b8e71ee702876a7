#include "ring.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static inline struct sl_ring_cell *cell(struct sl_ring *r, size_t i) {
  return (struct sl_ring_cell *)(r->cells + (i & r->mask) * r->cell_size);
}

int sl_ring_init(struct sl_ring *r, size_t capacity, size_t elem_size) {
  if (capacity < 2 || (capacity & (capacity - 1))) return -EINVAL;
  r->mask = capacity - 1;
  r->elem_size = elem_size;
  r->cell_size = (sizeof(struct sl_ring_cell) + elem_size + 7) & ~(size_t)7;
  r->cells = calloc(capacity, r->cell_size);
  if (!r->cells) return -ENOMEM;
  for (size_t i = 0; i < capacity; i++) atomic_init(&cell(r, i)->seq, i);
  atomic_init(&r->tail, 0);
  r->head = 0;
  return 0;
}

void sl_ring_free(struct sl_ring *r) {
  free(r->cells);
  r->cells = NULL;
}

int sl_ring_push(struct sl_ring *r, const void *elem) {
  size_t pos = atomic_load_explicit(&r->tail, memory_order_relaxed);
  for (;;) {
    struct sl_ring_cell *c = cell(r, pos);
    /* acquire: the consumer's release of this cell (it finished reading the
     * previous element) happens before we overwrite it. */
    size_t seq = atomic_load_explicit(&c->seq, memory_order_acquire);
    intptr_t dif = (intptr_t)seq - (intptr_t)pos;
    if (dif == 0) {
      /* relaxed CAS: the claim itself publishes nothing; the seq store below does. */
      if (atomic_compare_exchange_weak_explicit(&r->tail, &pos, pos + 1, memory_order_relaxed,
                                                memory_order_relaxed)) {
        memcpy(c + 1, elem, r->elem_size);
        /* release: the element bytes are visible before the consumer sees seq. */
        atomic_store_explicit(&c->seq, pos + 1, memory_order_release);
        return 0;
      }
    } else if (dif < 0) {
      return -ENOBUFS; /* the cell still holds an element a lap behind: full */
    } else {
      pos = atomic_load_explicit(&r->tail, memory_order_relaxed);
    }
  }
}

int sl_ring_pop(struct sl_ring *r, void *elem) {
  struct sl_ring_cell *c = cell(r, r->head);
  /* acquire: pairs with the producer's release, so the bytes are complete. */
  size_t seq = atomic_load_explicit(&c->seq, memory_order_acquire);
  if ((intptr_t)seq - (intptr_t)(r->head + 1) < 0) return -EAGAIN;
  memcpy(elem, c + 1, r->elem_size);
  /* release: our read of the bytes is done before a producer reuses the cell. */
  atomic_store_explicit(&c->seq, r->head + r->mask + 1, memory_order_release);
  r->head++;
  return 0;
}

int sl_ring_peek(struct sl_ring *r, void *elem) {
  struct sl_ring_cell *c = cell(r, r->head);
  /* acquire: as in pop, the producer's bytes are complete once seq says so;
   * the cell stays ours (no release) until pop hands it back. */
  size_t seq = atomic_load_explicit(&c->seq, memory_order_acquire);
  if ((intptr_t)seq - (intptr_t)(r->head + 1) < 0) return -EAGAIN;
  memcpy(elem, c + 1, r->elem_size);
  return 0;
}
