#include "meter.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common.h"

const char *const sl_outcome_names[SL_NOUTCOMES] = {SL_OUT_OK_NAME,       "upstream_error", "throttled",  "suspended",
                                                    "unauthenticated", "bad_request", "unavailable"};

struct sl_meter_table *sl_meter_table_new(uint32_t capacity) {
  struct sl_meter_table *t = sl_calloc(1, sizeof(*t));
  uint32_t slots = 16;
  while (slots < 2 * capacity) slots *= 2;
  t->mask = slots - 1;
  t->limit = capacity;
  t->e = sl_malloc((size_t)capacity * sizeof(*t->e));
  t->index = sl_calloc(slots, sizeof(*t->index));
  return t;
}

void sl_meter_table_free(struct sl_meter_table *t) {
  if (!t) return;
  free(t->e);
  free(t->index);
  free(t);
}

void sl_meter_table_clear(struct sl_meter_table *t) {
  if (t->n > (t->mask + 1) / 16) {
    memset(t->index, 0, ((size_t)t->mask + 1) * sizeof(*t->index));
  } else { /* few keys: find each one's slot rather than wipe the index */
    for (uint32_t j = 0; j < t->n; j++)
      for (uint32_t i = (uint32_t)t->e[j].hash & t->mask;; i = (i + 1) & t->mask)
        if (t->index[i] == j + 1) {
          t->index[i] = 0;
          break;
        }
  }
  t->n = 0;
  t->total = 0;
  t->refused = 0;
}

uint32_t sl_meter_table_retain(struct sl_meter_table *t, int (*keep)(const struct sl_meter_entry *, void *), void *arg) {
  uint32_t m = 0;
  uint64_t total = 0;
  for (uint32_t j = 0; j < t->n; j++)
    if (keep(&t->e[j], arg)) {
      if (m != j) t->e[m] = t->e[j];
      total += t->e[m++].count;
    }
  memset(t->index, 0, ((size_t)t->mask + 1) * sizeof(*t->index));
  for (uint32_t j = 0; j < m; j++) {
    uint32_t i = (uint32_t)t->e[j].hash & t->mask;
    while (t->index[i]) i = (i + 1) & t->mask;
    t->index[i] = j + 1;
  }
  t->n = m;
  t->total = total;
  t->refused = 0; /* (the accumulator's: it has no bound on refused keys) */
  return m;
}

uint64_t sl_meter_key_hash(const struct sl_meter_key *k) {
  uint64_t h = sl_dir_hash(k->uid, k->uid_len);
  h ^= sl_dir_hash(k->region, k->region_len) * 0x9e3779b97f4a7c15ull;
  h ^= ((uint64_t)k->billable << 56 | (uint64_t)k->day << 24 | (uint64_t)k->feature << 16 | (uint64_t)k->tier << 8 |
        k->outcome) *
       0xc2b2ae3d27d4eb4full;
  if (k->service_len) h ^= sl_dir_hash(k->service, k->service_len) * 0xd6e8feb86659fd93ull;
  h ^= h >> 29;
  return h ? h : 1; /* 0 marks an empty slot */
}

static int is_dash(const char *s, uint8_t len) { return len == 1 && s[0] == '-'; }

/* The fixed shape refused calls fall back to: never held against the bound. */
static int key_collapsed(const struct sl_meter_key *k) {
  return k->feature == SL_METER_NO_FEATURE && k->tier == 0 && is_dash(k->uid, k->uid_len) &&
         is_dash(k->region, k->region_len);
}

void sl_meter_key_collapse(struct sl_meter_key *out, const struct sl_meter_key *k) {
  out->day = k->day;
  out->feature = SL_METER_NO_FEATURE;
  out->tier = 0;
  out->outcome = k->outcome;
  out->uid_len = 1;
  out->uid[0] = '-';
  out->region_len = 1;
  out->region[0] = '-';
  out->billable = 0;
  out->service_len = 0;
}

static int key_eq(const struct sl_meter_key *a, const struct sl_meter_key *b) {
  return a->day == b->day && a->feature == b->feature && a->tier == b->tier && a->outcome == b->outcome &&
         a->billable == b->billable && a->uid_len == b->uid_len && a->region_len == b->region_len &&
         a->service_len == b->service_len && !memcmp(a->uid, b->uid, a->uid_len) &&
         !memcmp(a->region, b->region, a->region_len) && !memcmp(a->service, b->service, a->service_len);
}

int sl_meter_add(struct sl_meter_table *t, const struct sl_meter_key *k, uint64_t hash, uint64_t count) {
  for (uint32_t i = (uint32_t)hash & t->mask;; i = (i + 1) & t->mask) {
    uint32_t x = t->index[i];
    if (x == 0) {
      if (t->n >= t->limit) return -ENOBUFS;
      int refused = t->refused_max && sl_meter_refused(k->outcome) && !key_collapsed(k);
      if (refused && t->refused >= t->refused_max) return -EDQUOT;
      t->refused += (uint32_t)refused;
      struct sl_meter_entry *e = &t->e[t->n];
      e->hash = hash;
      e->k = *k;
      e->count = count;
      e->born = t->epoch;
      t->index[i] = ++t->n;
      t->total += count;
      return 0;
    }
    struct sl_meter_entry *e = &t->e[x - 1];
    if (e->hash == hash && key_eq(&e->k, k)) {
      e->count += count;
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

/* A worker's table: refused calls are held to their bound there. */
static struct sl_meter_table *worker_table_new(const struct sl_meter_worker *m) {
  struct sl_meter_table *t = sl_meter_table_new(m->capacity);
  uint32_t quarter = m->capacity / 4 ? m->capacity / 4 : 1;
  t->refused_max = quarter < SL_METER_REFUSED_KEYS ? quarter : SL_METER_REFUSED_KEYS;
  return t;
}

int sl_meter_worker_init(struct sl_meter_worker *m, uint32_t capacity, int tz_offset_min) {
  int r;
  memset(m, 0, sizeof(*m));
  m->capacity = capacity;
  m->tz_offset_min = tz_offset_min;
  m->active = worker_table_new(m);
  m->overflow_cap = SL_METER_ASIDE_MAX;
  m->overflow = sl_calloc(m->overflow_cap, sizeof(*m->overflow));
  if ((r = sl_ring_init(&m->handoff, SL_METER_RING, sizeof(struct sl_meter_table *))) != 0) return r;
  if ((r = sl_ring_init(&m->spare, SL_METER_RING, sizeof(struct sl_meter_table *))) != 0) return r;
  return 0;
}

void sl_meter_worker_free(struct sl_meter_worker *m) {
  struct sl_meter_table *t;
  while (sl_ring_pop(&m->spare, &t) == 0) sl_meter_table_free(t);
  while (sl_ring_pop(&m->handoff, &t) == 0) sl_meter_table_free(t); /* only after the flusher stopped */
  sl_meter_table_free(m->active);
  for (unsigned i = 0; i < m->noverflow; i++) sl_meter_table_free(m->overflow[i]);
  free(m->overflow);
  m->overflow = NULL;
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
  if (sl_ring_pop(&m->spare, &t) == 0) return t; /* the flusher cleared it; refused_max is kept */
  return worker_table_new(m);
}

/* Keeps a full table aside. Past SL_METER_ASIDE_MAX the array grows rather
 * than a count being lost: only calls admitted before saturation and still
 * in flight get here (bounded by --max-conns); said at most every 10 s. */
static void keep_aside(struct sl_meter_worker *m, struct sl_meter_table *t) {
  if (SL_UNLIKELY(m->noverflow == m->overflow_cap)) {
    m->overflow_cap *= 2;
    m->overflow = sl_realloc(m->overflow, m->overflow_cap * sizeof(*m->overflow));
  }
  if (SL_UNLIKELY(m->noverflow >= SL_METER_ASIDE_MAX)) {
    m->over_bound++;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
    if (m->over_bound_said_ms == 0 || now - m->over_bound_said_ms >= 10000) {
      m->over_bound_said_ms = now;
      fprintf(stderr,
              "sluice: metering: %u full tables of %u keys kept aside (bound %u): more admitted calls were in "
              "flight when metering backed up than the bound holds; nothing is lost\n",
              m->noverflow + 1, m->capacity, SL_METER_ASIDE_MAX);
    }
  }
  m->overflow[m->noverflow++] = t;
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

_Static_assert((SL_ARRAY_SIZE(((struct sl_meter_worker *)0)->refused_seen) &
                (SL_ARRAY_SIZE(((struct sl_meter_worker *)0)->refused_seen) - 1)) == 0,
               "the refused-key set is a power of two");

/* 1 when refused key k (hash h) may be counted under its own shape: it was
 * seen today already, or today's set has room for it (then it is added). */
static int refused_admit(struct sl_meter_worker *m, const struct sl_meter_key *k, uint64_t h) {
  if (k->day != m->refused_day) {
    if (k->day < m->refused_day) return 0; /* a call from before midnight, answered after: rare */
    memset(m->refused_seen, 0, sizeof(m->refused_seen));
    m->refused_n = 0;
    m->refused_day = k->day;
  }
  const uint32_t mask = SL_ARRAY_SIZE(m->refused_seen) - 1;
  for (uint32_t i = (uint32_t)h & mask;; i = (i + 1) & mask) {
    if (m->refused_seen[i] == h) return 1;
    if (m->refused_seen[i] == 0) {
      if (m->refused_n >= SL_METER_REFUSED_PER_DAY) return 0; /* half full at most: probes end */
      m->refused_seen[i] = h;
      m->refused_n++;
      return 1;
    }
  }
}

void sl_meter_count(struct sl_meter_worker *m, const struct sl_meter_key *k) {
  uint64_t h = sl_meter_key_hash(k);
  struct sl_meter_key shape;
  if (SL_UNLIKELY(sl_meter_refused(k->outcome)) && !key_collapsed(k) && !refused_admit(m, k, h)) {
    sl_meter_key_collapse(&shape, k);
    k = &shape;
    h = sl_meter_key_hash(k);
  }
  int r = sl_meter_add(m->active, k, h, 1);
  if (SL_LIKELY(r == 0)) return;
  if (r == -EDQUOT) {
    /* The table holds its bound of refused keys: count this one under the
     * fixed shape, where refused calls of that day and outcome merge. */
    sl_meter_key_collapse(&shape, k);
    k = &shape;
    h = sl_meter_key_hash(k);
    if (sl_meter_add(m->active, k, h, 1) == 0) return;
  }
  /* The table is full: hand it off, or keep it aside, and start a new one. */
  if (m->noverflow || sl_ring_push(&m->handoff, &m->active) != 0) keep_aside(m, m->active);
  m->active = fresh_table(m);
  /* A fresh table is empty and holds at least 16 keys: this cannot fail. */
  r = sl_meter_add(m->active, k, h, 1);
  (void)r;
}
