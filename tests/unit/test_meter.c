/* Unit tests for proxy/meter.c (days, tables, bounds, hand-off) and the
 * spool encoding of proxy/flusher.c. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "flusher.h"
#include "meter.h"

static struct sl_meter_key key(const char *uid, uint8_t outcome) {
  struct sl_meter_key k;
  memset(&k, 0, sizeof(k));
  k.day = 20261127;
  k.feature = 0;
  k.outcome = outcome;
  k.uid_len = (uint8_t)strlen(uid);
  memcpy(k.uid, uid, k.uid_len);
  k.region_len = 11;
  memcpy(k.region, "cn-shanghai", 11);
  return k;
}

static void test_days(void **state) {
  (void)state;
  assert_int_equal(sl_meter_day(0, 0), 19700101);
  assert_int_equal(sl_meter_day(1795737600, 0), 20261127);     /* 2026-11-27 00:00:00 UTC */
  assert_int_equal(sl_meter_day(1795737600 - 1, 0), 20261126); /* one second before midnight */
  assert_int_equal(sl_meter_day(1795737600 - 1, 480), 20261127); /* 08:00 later in UTC+8 */
  assert_int_equal(sl_meter_day(1795737600, -60), 20261126);     /* 23:00 the day before in UTC-1 */
  assert_int_equal(sl_meter_day(951782400, 0), 20000229);        /* a leap day */
  assert_int_equal(sl_meter_day(951868800, 0), 20000301);
  assert_int_equal(sl_meter_day(4107542400, 0), 21000301);       /* 2100 is not a leap year */
  assert_int_equal(sl_meter_day(-1, 0), 19691231);
}

static void test_worker_day_cache(void **state) {
  (void)state;
  struct sl_meter_worker m;
  assert_int_equal(sl_meter_worker_init(&m, 16, 0), 0);
  assert_int_equal(sl_meter_worker_day(&m, 1795737600 - 1), 20261126);
  assert_int_equal(sl_meter_worker_day(&m, 1795737600), 20261127); /* the cache turns at midnight */
  assert_int_equal(sl_meter_worker_day(&m, 1795737600 + 86399), 20261127);
  assert_int_equal(sl_meter_worker_day(&m, 1795737600 + 86400), 20261128);
  assert_int_equal(sl_meter_worker_day(&m, 1795737600 - 86400), 20261126); /* a clock stepped back */
  sl_meter_worker_free(&m);
}

static void test_table_bound(void **state) {
  (void)state;
  struct sl_meter_table *t = sl_meter_table_new(4);
  char uid[8];
  for (int i = 0; i < 4; i++) {
    snprintf(uid, sizeof(uid), "u%d", i);
    struct sl_meter_key k = key(uid, 0);
    assert_int_equal(sl_meter_add(t, &k, sl_meter_key_hash(&k), 2), 0);
  }
  struct sl_meter_key k = key("u0", 0);
  assert_int_equal(sl_meter_add(t, &k, sl_meter_key_hash(&k), 1), 0); /* an existing key always fits */
  struct sl_meter_key other = key("u0", 1);                            /* another outcome: a new key */
  assert_int_equal(sl_meter_add(t, &other, sl_meter_key_hash(&other), 1), -ENOBUFS);
  assert_int_equal(t->n, 4);
  assert_int_equal(t->total, 9);
  sl_meter_table_clear(t);
  assert_int_equal(t->n, 0);
  assert_int_equal(sl_meter_add(t, &other, sl_meter_key_hash(&other), 1), 0);
  sl_meter_table_free(t);
}

/* Sums every count the flusher would see: what was handed off plus what is
 * still with the worker. */
static uint64_t drain_total(struct sl_meter_worker *m) {
  uint64_t total = 0;
  struct sl_meter_table *t;
  while (sl_ring_pop(&m->handoff, &t) == 0) {
    total += t->total;
    sl_meter_table_free(t);
  }
  for (unsigned i = 0; i < m->noverflow; i++) total += m->overflow[i]->total;
  return total + m->active->total;
}

static void test_count_never_loses(void **state) {
  (void)state;
  struct sl_meter_worker m;
  assert_int_equal(sl_meter_worker_init(&m, 4, 0), 0);
  char uid[16];
  /* 4 keys per table, 16 tables in the ring: 200 distinct keys overflow the
   * ring, and the worker keeps the rest aside and says it is saturated. */
  for (int i = 0; i < 200; i++) {
    snprintf(uid, sizeof(uid), "u%d", i);
    struct sl_meter_key k = key(uid, 0);
    sl_meter_count(&m, &k);
  }
  assert_true(sl_meter_saturated(&m));
  assert_int_equal(drain_total(&m), 200);
  /* Once the flusher drained the ring, a hand-off moves what was kept aside. */
  unsigned moved = sl_meter_handoff(&m);
  assert_true(moved > 0);
  assert_int_equal(m.noverflow > 0 ? 1 : 0, m.noverflow > 0);
  while (m.noverflow) {
    struct sl_meter_table *t;
    while (sl_ring_pop(&m.handoff, &t) == 0) sl_meter_table_free(t);
    sl_meter_handoff(&m);
  }
  assert_false(sl_meter_saturated(&m));
  sl_meter_worker_free(&m);
}

/* A flood of distinct refused calls (made-up regions, unknown keys,
 * suspended accounts) adds a bounded number of keys: the table never fills,
 * nothing is handed off, and every call is counted. */
static void test_refused_keys_bounded(void **state) {
  (void)state;
  struct sl_meter_worker m;
  assert_int_equal(sl_meter_worker_init(&m, 16, 0), 0);
  assert_int_equal(m.active->refused_max, 4); /* a quarter of a 16-key table */
  char s[32];
  for (int i = 0; i < 10000; i++) {
    struct sl_meter_key k = key("-", (uint8_t)(4 + i % 3)); /* unauthenticated, bad_request, unavailable */
    k.region_len = (uint8_t)snprintf(s, sizeof(s), "r%d", i);
    memcpy(k.region, s, k.region_len);
    sl_meter_count(&m, &k);
    struct sl_meter_key susp = key(s, 3); /* suspended: a UID of its own each time */
    sl_meter_count(&m, &susp);
  }
  /* 4 keys under their own shape, then one per outcome (4) for the day */
  assert_true(m.active->n <= 4 + 4);
  assert_int_equal(m.active->total, 20000);
  struct sl_meter_table *t;
  assert_int_not_equal(sl_ring_pop(&m.handoff, &t), 0); /* nothing handed off */
  assert_false(sl_meter_saturated(&m));
  /* the fixed shape: UID, feature and region "-", baseline tier */
  struct sl_meter_key in = key("u9", 3), shape;
  in.tier = 1;
  sl_meter_key_collapse(&shape, &in);
  assert_int_equal(shape.outcome, 3);
  assert_int_equal(shape.day, in.day);
  assert_int_equal(shape.feature, SL_METER_NO_FEATURE);
  assert_int_equal(shape.tier, 0);
  assert_int_equal(shape.uid_len, 1);
  assert_int_equal(shape.uid[0], '-');
  assert_int_equal(shape.region_len, 1);
  /* admitted outcomes are never collapsed */
  struct sl_meter_key ok = key("u1", 0);
  sl_meter_count(&m, &ok);
  uint64_t h = sl_meter_key_hash(&ok);
  int found = 0;
  for (uint32_t i = 0; i < m.active->n; i++) {
    const struct sl_meter_entry *e = &m.active->e[i];
    if (e->hash == h && e->k.uid_len == 2 && !memcmp(e->k.uid, "u1", 2)) found = 1;
  }
  assert_true(found);
  sl_meter_worker_free(&m);
}

/* Tables turn over every round: the day's set still holds the distinct
 * refused keys under their own shape to SL_METER_REFUSED_PER_DAY per worker,
 * however many rounds a flood lasts; a new day starts a new set. */
static void test_refused_keys_per_day(void **state) {
  (void)state;
  struct sl_meter_worker m;
  assert_int_equal(sl_meter_worker_init(&m, 1024, 0), 0);
  uint32_t own = 0; /* keys under their own shape, summed over every table handed off */
  uint64_t total = 0;
  char s[32];
  for (uint32_t day = 20261127; day <= 20261128; day++) {
    own = 0;
    for (int i = 0; i < 20000; i++) {
      struct sl_meter_key k = key("-", 4);
      k.day = day;
      k.region_len = (uint8_t)snprintf(s, sizeof(s), "r%d", i);
      memcpy(k.region, s, k.region_len);
      sl_meter_count(&m, &k);
      if (i % 50 == 49 || i == 19999) { /* a round: hand off and drain, as the flusher does */
        sl_meter_handoff(&m);
        struct sl_meter_table *t;
        while (sl_ring_pop(&m.handoff, &t) == 0) {
          for (uint32_t j = 0; j < t->n; j++)
            if (t->e[j].k.region_len != 1) own++;
          total += t->total;
          sl_meter_table_clear(t);
          assert_int_equal(sl_ring_push(&m.spare, &t), 0);
        }
      }
    }
    assert_int_equal(own, SL_METER_REFUSED_PER_DAY);
  }
  assert_int_equal(total, 40000);
  sl_meter_worker_free(&m);
}

/* Past SL_METER_ASIDE_MAX full tables kept aside (the ring full, nobody
 * draining it) the worker neither aborts nor loses a count. */
static void test_aside_past_its_bound(void **state) {
  (void)state;
  struct sl_meter_worker m;
  assert_int_equal(sl_meter_worker_init(&m, 16, 0), 0);
  unsigned n = 16 * (SL_METER_RING + SL_METER_ASIDE_MAX + 8) + 3;
  char uid[16];
  for (unsigned i = 0; i < n; i++) {
    snprintf(uid, sizeof(uid), "u%u", i);
    struct sl_meter_key k = key(uid, 0);
    sl_meter_count(&m, &k);
  }
  assert_true(sl_meter_saturated(&m));
  assert_true(m.noverflow > SL_METER_ASIDE_MAX);
  assert_true(m.over_bound > 0);
  assert_int_equal(drain_total(&m), n);
  while (m.noverflow) { /* the flusher takes them all back, oldest first */
    struct sl_meter_table *t;
    while (sl_ring_pop(&m.handoff, &t) == 0) sl_meter_table_free(t);
    sl_meter_handoff(&m);
  }
  assert_false(sl_meter_saturated(&m));
  sl_meter_worker_free(&m);
}

/* peek leaves the element for the next pop. */
static void test_ring_peek(void **state) {
  (void)state;
  struct sl_ring r;
  assert_int_equal(sl_ring_init(&r, 2, sizeof(int)), 0);
  int v = 0;
  assert_int_equal(sl_ring_peek(&r, &v), -EAGAIN);
  int a = 7, b = 8;
  assert_int_equal(sl_ring_push(&r, &a), 0);
  assert_int_equal(sl_ring_push(&r, &b), 0);
  assert_int_equal(sl_ring_push(&r, &b), -ENOBUFS);
  assert_int_equal(sl_ring_peek(&r, &v), 0);
  assert_int_equal(v, 7);
  assert_int_equal(sl_ring_peek(&r, &v), 0);
  assert_int_equal(v, 7);
  assert_int_equal(sl_ring_push(&r, &b), -ENOBUFS); /* a peeked cell is still taken */
  assert_int_equal(sl_ring_pop(&r, &v), 0);
  assert_int_equal(v, 7);
  assert_int_equal(sl_ring_pop(&r, &v), 0);
  assert_int_equal(v, 8);
  assert_int_equal(sl_ring_peek(&r, &v), -EAGAIN);
  sl_ring_free(&r);
}

static int count_record(void *arg, int type, const unsigned char *p, uint32_t len) {
  (void)p;
  (void)len;
  assert_int_equal(type, SL_SPOOL_REC_BATCH);
  ++*(unsigned *)arg;
  return 0;
}

/* A delta record (counts journaled, not yet in a batch): the batch payload
 * with id "d", its own record type; decode_delta takes only that. */
static void test_spool_delta(void **state) {
  (void)state;
  struct sl_batch *b = calloc(1, sizeof(*b) + 2 * sizeof(struct sl_batch_entry));
  memcpy(b->id, "inst:00ff:7", 11);
  b->id_len = 11;
  b->n = 2;
  b->e[0].k = key("1001", 0);
  b->e[0].count = 5;
  b->e[1].k = key("1002", 1);
  b->e[1].count = 9;
  b->id_len = 0; /* as the flusher's journal makes them: the record says "d" */
  unsigned char *buf = malloc(sl_spool_delta_size(b));
  size_t sz = sl_spool_encode_delta(b, buf);
  assert_int_equal(sz, sl_spool_delta_size(b));
  assert_int_equal(buf[4], SL_SPOOL_REC_DELTA);
  uint32_t len;
  memcpy(&len, buf + 8, 4);
  assert_int_equal(len, sz - 16);
  struct sl_batch *d = sl_spool_decode_delta(buf + 16, len);
  assert_non_null(d);
  assert_int_equal(d->n, 2);
  assert_int_equal(d->e[1].count, 9);
  assert_memory_equal(&d->e[0].k, &b->e[0].k, sizeof(struct sl_meter_key));
  free(d);
  /* a batch's payload is not a delta */
  b->id_len = 11;
  unsigned char *bb = malloc(sl_spool_batch_size(b));
  size_t bsz = sl_spool_encode_batch(b, bb);
  assert_null(sl_spool_decode_delta(bb + 16, bsz - 16));
  free(bb);
  free(buf);
  free(b);
}

static void test_spool_roundtrip(void **state) {
  (void)state;
  struct sl_batch *b = calloc(1, sizeof(*b) + 3 * sizeof(struct sl_batch_entry));
  memcpy(b->id, "inst:00ff:7", 11);
  b->id_len = 11;
  b->n = 3;
  b->e[0].k = key("1001", 0);
  b->e[0].count = 42;
  b->e[1].k = key("-", 4);
  b->e[1].count = 1;
  b->e[2].k = key("1002", 2);
  b->e[2].count = 1ull << 40;
  size_t sz = sl_spool_batch_size(b);
  unsigned char *buf = malloc(sz);
  assert_int_equal(sl_spool_encode_batch(b, buf), sz);
  uint32_t len, crc;
  memcpy(&len, buf + 8, 4);
  memcpy(&crc, buf + 12, 4);
  assert_int_equal(len, sz - 16);
  assert_int_equal(crc, sl_crc32(buf + 16, len));
  struct sl_batch *d = sl_spool_decode_batch(buf + 16, len);
  assert_non_null(d);
  assert_int_equal(d->n, 3);
  assert_memory_equal(d->id, "inst:00ff:7", 11);
  for (int i = 0; i < 3; i++) {
    assert_int_equal(d->e[i].count, b->e[i].count);
    assert_memory_equal(&d->e[i].k, &b->e[i].k, sizeof(struct sl_meter_key));
  }
  free(d);
  /* A record cut short is refused, not half-read; so is one with bytes
   * encode never writes (trailing bytes, a tier beyond llm). */
  assert_null(sl_spool_decode_batch(buf + 16, len - 1));
  assert_null(sl_spool_decode_batch(buf + 16, 3));
  unsigned char *longer = malloc(len + 1);
  memcpy(longer, buf + 16, len);
  longer[len] = 0;
  assert_null(sl_spool_decode_batch(longer, len + 1));
  longer[1 + 11 + 4 + 5] = 7; /* the first key's tier */
  assert_null(sl_spool_decode_batch(longer, len));
  free(longer);
  /* the record walk takes the whole record, and stops at a torn one */
  unsigned records = 0;
  assert_int_equal(sl_spool_scan(buf, sz, count_record, &records), sz);
  assert_int_equal(records, 1);
  assert_int_equal(sl_spool_scan(buf, sz - 1, count_record, &records), 0);
  free(buf);
  free(b);
  assert_int_equal(sl_crc32("123456789", 9), 0xcbf43926u); /* the standard check value */
}

static int keep_odd(const struct sl_meter_entry *e, void *arg) {
  (void)arg;
  return e->count % 2 == 1;
}

/* retain keeps what it is told to, in order, and the index finds the kept
 * keys (and only them) afterwards; born is the table's epoch at insert. */
static void test_retain(void **state) {
  (void)state;
  struct sl_meter_table *t = sl_meter_table_new(64);
  char u[16];
  for (int i = 0; i < 40; i++) {
    t->epoch = (uint32_t)i / 10;
    snprintf(u, sizeof(u), "u%d", i);
    struct sl_meter_key k = key(u, 0);
    assert_int_equal(sl_meter_add(t, &k, sl_meter_key_hash(&k), (uint64_t)i), 0);
  }
  assert_int_equal(sl_meter_table_retain(t, keep_odd, NULL), 20);
  assert_int_equal(t->n, 20);
  assert_int_equal(t->total, 400); /* 1 + 3 + ... + 39 */
  for (uint32_t j = 0; j < t->n; j++) {
    assert_int_equal(t->e[j].count, 2 * j + 1);
    assert_int_equal(t->e[j].born, (2 * j + 1) / 10);
  }
  for (int i = 0; i < 40; i++) { /* a kept key adds up; a dropped one comes back new */
    snprintf(u, sizeof(u), "u%d", i);
    struct sl_meter_key k = key(u, 0);
    assert_int_equal(sl_meter_add(t, &k, sl_meter_key_hash(&k), 1000), 0);
  }
  assert_int_equal(t->n, 40);
  for (uint32_t j = 0; j < 20; j++) assert_int_equal(t->e[j].count, 2 * j + 1 + 1000);
  for (uint32_t j = 20; j < 40; j++) assert_int_equal(t->e[j].count, 1000);
  sl_meter_table_free(t);
}

/* A cluster's mark gets a new TTL when this process has not renewed it
 * within the hour (or ever), else keeps its own. */
static void test_mark_ttl_due(void **state) {
  (void)state;
  assert_true(sl_flusher_mark_ttl_due(0, 1));                       /* never renewed */
  assert_false(sl_flusher_mark_ttl_due(100, 100));                  /* just now */
  assert_false(sl_flusher_mark_ttl_due(100, 100 + SL_MARK_FRESH_S - 1));
  assert_true(sl_flusher_mark_ttl_due(100, 100 + SL_MARK_FRESH_S)); /* an hour on */
  assert_true(sl_flusher_mark_ttl_due(200, 100));                   /* a clock that went back: renewed */
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_days),        cmocka_unit_test(test_worker_day_cache), cmocka_unit_test(test_retain),
      cmocka_unit_test(test_table_bound), cmocka_unit_test(test_count_never_loses),
      cmocka_unit_test(test_refused_keys_bounded), cmocka_unit_test(test_aside_past_its_bound),
      cmocka_unit_test(test_refused_keys_per_day),
      cmocka_unit_test(test_ring_peek),   cmocka_unit_test(test_spool_roundtrip),
      cmocka_unit_test(test_spool_delta), cmocka_unit_test(test_mark_ttl_due),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
