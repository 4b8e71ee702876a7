#include "meter.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

struct sl_meter_table *sl_meter_table_new(uint32_t capacity) {
  struct sl_meter_table *t = sl_calloc(1, sizeof(*t));
  uint32_t slots = 16;
  while (slots < 2 * capacity) slots *= 2;
  t->mask = slots - 1;
  t->limit = capacity;
  t->e = sl_calloc(slots, sizeof(*t->e));
  t->used = sl_malloc((size_t)capacity * sizeof(*t->used));
  return t;
}

void sl_meter_table_free(struct sl_meter_table *t) {
  if (!t) return;
  free(t->e);
  free(t->used);
  free(t);
}

void sl_meter_table_clear(struct sl_meter_table *t) {
  for (uint32_t i = 0; i < t->n; i++) t->e[t->used[i]].hash = 0; /* an empty slot is hash 0 */
  t->n = 0;
  t->total = 0;
}

uint64_t sl_meter_key_hash(const struct sl_meter_key *k) {
  uint64_t h = sl_dir_hash(k->uid, k->uid_len);
  h ^= sl_dir_hash(k->region, k->region_len) * 0x9e3779b97f4a7c15ull;
  h ^= ((uint64_t)k->day << 24 | (uint64_t)k->feature << 16 | (uint64_t)k->tier << 8 | k->outcome) *
       0xc2b2ae3d27d4eb4full;
  h ^= h >> 29;
  return h ? h : 1; /* 0 marks an empty slot */
}

static int key_eq(const struct sl_meter_key *a, const struct sl_meter_key *b) {
  return a->day == b->day && a->feature == b->feature && a->tier == b->tier && a->outcome == b->outcome &&
         a->uid_len == b->uid_len && a->region_len == b->region_len && !memcmp(a->uid, b->uid, a->uid_len) &&
         !memcmp(a->region, b->region, a->region_len);
}

int sl_meter_add(struct sl_meter_table *t, const struct sl_meter_key *k, uint64_t hash, uint64_t count) {
  for (uint32_t i = (uint32_t)hash & t->mask;; i = (i + 1) & t->mask) {
    struct sl_meter_entry *e = &t->e[i];
    if (e->hash == hash && key_eq(&e->k, k)) {
      e->count += count;
      t->total += count;
      return 0;
    }
    if (e->hash == 0) {
      if (t->n >= t->limit) return -ENOBUFS;
      e->hash = hash;
      e->k = *k;
      e->count = count;
      t->used[t->n++] = i;
      t->total += count;
      return 0;
    }
  }
}

uint32_t sl_meter_day(int64_t secs, int tz_offset_min) {
  int64_t days = (secs + (int64_t)tz_offset_min * 60);
  days = days >= 0 ? days / 86400 : (days - 86399) / 86400;
  /* Civil date from days since 1970-01-01 (Howard Hinnant's algorithm). */
  int64_t z = days + 719468;
  int64_t era = (z >= 0 ? z : z - 146096) / 146097;
  int64_t doe = z - era * 146097;
  int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
  int64_t y = yoe + era * 400;
  int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
  int64_t mp = (5 * doy + 2) / 153;
  int64_t d = doy - (153 * mp + 2) / 5 + 1;
  int64_t m = mp < 10 ? mp + 3 : mp - 9;
  if (m <= 2) y++;
  return (uint32_t)(y * 10000 + m * 100 + d);
}

int sl_meter_worker_init(struct sl_meter_worker *m, uint32_t capacity, int tz_offset_min) {
  int r;
  memset(m, 0, sizeof(*m));
  m->capacity = capacity;
  m->tz_offset_min = tz_offset_min;
  m->active = sl_meter_table_new(capacity);
  if ((r = sl_ring_init(&m->handoff, 16, sizeof(struct sl_meter_table *))) != 0) return r;
  if ((r = sl_ring_init(&m->spare, 16, sizeof(struct sl_meter_table *))) != 0) return r;
  return 0;
}

void sl_meter_worker_free(struct sl_meter_worker *m) {
  struct sl_meter_table *t;
  while (sl_ring_pop(&m->spare, &t) == 0) sl_meter_table_free(t);
  while (sl_ring_pop(&m->handoff, &t) == 0) sl_meter_table_free(t); /* only after the flusher stopped */
  sl_meter_table_free(m->active);
  for (unsigned i = 0; i < m->noverflow; i++) sl_meter_table_free(m->overflow[i]);
  sl_ring_free(&m->handoff);
  sl_ring_free(&m->spare);
}

uint32_t sl_meter_worker_day(struct sl_meter_worker *m, int64_t secs) {
  if (secs < m->day_start || secs >= m->day_end) {
    m->day = sl_meter_day(secs, m->tz_offset_min);
    int64_t local = secs + (int64_t)m->tz_offset_min * 60;
    int64_t start = (local >= 0 ? local / 86400 : (local - 86399) / 86400) * 86400 - (int64_t)m->tz_offset_min * 60;
    m->day_start = start;
    m->day_end = start + 86400;
  }
  return m->day;
}

static struct sl_meter_table *fresh_table(struct sl_meter_worker *m) {
  struct sl_meter_table *t;
  if (sl_ring_pop(&m->spare, &t) == 0) return t;
  return sl_meter_table_new(m->capacity);
}

unsigned sl_meter_handoff(struct sl_meter_worker *m) {
  unsigned n = 0;
  /* Older tables first, so that the flusher sees counts in order. */
  while (m->noverflow && sl_ring_push(&m->handoff, &m->overflow[0]) == 0) {
    memmove(m->overflow, m->overflow + 1, (m->noverflow - 1) * sizeof(m->overflow[0]));
    m->noverflow--;
    n++;
  }
  if (m->active->n && !m->noverflow && sl_ring_push(&m->handoff, &m->active) == 0) {
    m->active = fresh_table(m);
    n++;
  }
  return n;
}

void sl_meter_count(struct sl_meter_worker *m, const struct sl_meter_key *k) {
  uint64_t h = sl_meter_key_hash(k);
  if (SL_LIKELY(sl_meter_add(m->active, k, h, 1) == 0)) return;
  /* The table is full: hand it off, or keep it aside, and start a new one. */
  if (m->noverflow || sl_ring_push(&m->handoff, &m->active) != 0) {
    if (m->noverflow == SL_ARRAY_SIZE(m->overflow)) {
      /* Cannot happen while admission refuses work when saturated (the
       * requests in flight are far fewer than 64 tables): say so and abort
       * rather than lose a count silently. */
      fprintf(stderr, "sluice: metering overflow beyond %zu tables\n", SL_ARRAY_SIZE(m->overflow));
      abort();
    }
    m->overflow[m->noverflow++] = m->active;
  }
  m->active = fresh_table(m);
  sl_meter_add(m->active, k, h, 1);
}
