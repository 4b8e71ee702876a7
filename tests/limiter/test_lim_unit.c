/*
 * Limiter unit tests with an injected clock: exact admit/reject sequences,
 * limit changes, cost weights, eviction and reuse, peek, stats, arguments.
 */
#include <errno.h>
#include <stdlib.h>

#include "lim_test.h"

#define T0 (5 * LIM_T_S) /* any start time: buckets start full */
#define MS UINT64_C(1000000)

static struct lim_table *new_table(size_t capacity, unsigned shards) {
  struct lim_table *t = lim_table_new(capacity, shards);

  assert_non_null(t);
  return t;
}

static void test_burst_then_reject(void **state) {
  struct lim_table *t = new_table(64, 4);
  struct lim_decision d;

  (void)state;
  for (unsigned i = 0; i < 10; i++) {
    d = lim_t_decide(t, 1, 10, 1, T0);
    assert_int_equal(d.result, LIM_ADMIT);
    assert_int_equal(d.limit, 10);
    assert_int_equal(d.remaining, 9 - i);
    assert_int_equal(d.reset_ns, (i + 1) * 100 * MS);
    assert_int_equal(d.retry_after_ns, i < 9 ? 0 : 100 * MS);
  }
  d = lim_t_decide(t, 1, 10, 1, T0);
  assert_int_equal(d.result, LIM_REJECT);
  assert_int_equal(d.remaining, 0);
  assert_int_equal(d.retry_after_ns, 100 * MS);
  assert_int_equal(d.reset_ns, LIM_T_S);
  /* One ns early is still too early, and says so exactly. */
  d = lim_t_decide(t, 1, 10, 1, T0 + 100 * MS - 1);
  assert_int_equal(d.result, LIM_REJECT);
  assert_int_equal(d.retry_after_ns, 1);
  d = lim_t_decide(t, 1, 10, 1, T0 + 100 * MS);
  assert_int_equal(d.result, LIM_ADMIT);
  assert_int_equal(d.remaining, 0);
  /* Another key is independent. */
  d = lim_t_decide(t, 2, 10, 1, T0);
  assert_int_equal(d.result, LIM_ADMIT);
  assert_int_equal(d.remaining, 9);
  lim_table_free(t);
}

static void test_reject_does_not_consume(void **state) {
  struct lim_table *t = new_table(64, 1);
  struct lim_decision d;

  (void)state;
  assert_int_equal(lim_t_decide(t, 1, 2, 1, T0).result, LIM_ADMIT);
  assert_int_equal(lim_t_decide(t, 1, 2, 1, T0).result, LIM_ADMIT);
  for (unsigned i = 0; i < 1000; i++) {
    d = lim_t_decide(t, 1, 2, 1, T0 + i * 100);
    assert_int_equal(d.result, LIM_REJECT);
    assert_int_equal(d.retry_after_ns, 500 * MS - i * 100);
  }
  d = lim_t_decide(t, 1, 2, 1, T0 + 500 * MS);
  assert_int_equal(d.result, LIM_ADMIT);
  assert_int_equal(lim_t_decide(t, 1, 2, 1, T0 + 500 * MS).result, LIM_REJECT);
  lim_table_free(t);
}

static void test_steady_rate(void **state) {
  struct lim_table *t = new_table(64, 1);
  uint64_t now = T0;

  (void)state;
  for (unsigned i = 0; i < 4; i++) /* the whole burst */
    assert_int_equal(lim_t_decide(t, 1, 4, 1, now).result, LIM_ADMIT);
  /* At exactly R per second every request passes and the allowance
   * stays where it was; at 2R every other one passes. */
  for (unsigned i = 0; i < 40; i++) {
    now += 250 * MS;
    assert_int_equal(lim_t_decide(t, 1, 4, 1, now).result, LIM_ADMIT);
  }
  for (unsigned i = 0; i < 40; i++) {
    now += 125 * MS;
    assert_int_equal(lim_t_decide(t, 1, 4, 1, now).result,
                     i % 2 ? LIM_ADMIT : LIM_REJECT);
  }
  lim_table_free(t);
}

static void test_rate_zero_rejects_all(void **state) {
  struct lim_table *t = new_table(64, 1);
  struct lim_decision d;
  struct lim_stats st;

  (void)state;
  d = lim_t_decide(t, 1, 0, 1, T0);
  assert_int_equal(d.result, LIM_REJECT);
  assert_int_equal(d.limit, 0);
  assert_int_equal(d.remaining, 0);
  assert_int_equal(d.retry_after_ns, LIM_NEVER);
  lim_table_stats(t, &st);
  assert_int_equal(st.keys, 0); /* no bucket spent on it */
  lim_table_free(t);
}

static void test_rate_rounding(void **state) {
  struct lim_table *t = new_table(64, 1);
  struct lim_decision d;

  (void)state;
  /* 1e9/3 is not whole: the interval rounds up, the burst stays 3. */
  for (unsigned i = 0; i < 3; i++)
    assert_int_equal(lim_t_decide(t, 1, 3, 1, T0).result, LIM_ADMIT);
  d = lim_t_decide(t, 1, 3, 1, T0);
  assert_int_equal(d.result, LIM_REJECT);
  assert_int_equal(d.retry_after_ns, 333333334);
  /* Rates above LIM_RATE_MAX count as LIM_RATE_MAX. */
  d = lim_t_decide(t, 2, LIM_RATE_MAX * 5, 1, T0);
  assert_int_equal(d.result, LIM_ADMIT);
  assert_int_equal(d.limit, LIM_RATE_MAX);
  assert_int_equal(d.remaining, LIM_RATE_MAX - 1);
  /* A clock past LIM_NOW_MAX is clamped, not wrapped. */
  d = lim_t_decide(t, 3, 10, 1, UINT64_MAX);
  assert_int_equal(d.result, LIM_ADMIT);
  assert_int_equal(d.remaining, 9);
  lim_table_free(t);
}

static void test_cost_weights(void **state) {
  struct lim_table *t = new_table(64, 1);
  struct lim_decision d;

  (void)state;
  for (unsigned i = 0; i < 3; i++) {
    d = lim_t_decide(t, 1, 10, 3, T0);
    assert_int_equal(d.result, LIM_ADMIT);
    assert_int_equal(d.remaining, 7 - 3 * i);
  }
  /* 1 left: cost 3 waits for 2 more intervals, cost 1 still passes. */
  d = lim_t_decide(t, 1, 10, 3, T0);
  assert_int_equal(d.result, LIM_REJECT);
  assert_int_equal(d.remaining, 1);
  assert_int_equal(d.retry_after_ns, 200 * MS);
  d = lim_t_decide(t, 1, 10, 1, T0);
  assert_int_equal(d.result, LIM_ADMIT);
  assert_int_equal(d.remaining, 0);
  /* A cost of the whole burst passes on a full bucket... */
  d = lim_t_decide(t, 2, 10, 10, T0);
  assert_int_equal(d.result, LIM_ADMIT);
  assert_int_equal(d.remaining, 0);
  /* ...and one above it never does. */
  d = lim_t_decide(t, 3, 10, 11, T0);
  assert_int_equal(d.result, LIM_REJECT);
  assert_int_equal(d.retry_after_ns, LIM_NEVER);
  assert_int_equal(d.remaining, 10);
  lim_table_free(t);
}

static void test_limit_change(void **state) {
  struct lim_table *t = new_table(64, 1);
  struct lim_decision d;
  char k[48];
  size_t n = lim_t_key(k, 1);

  (void)state;
  for (unsigned i = 0; i < 5; i++) /* half of a 10/s burst used */
    assert_int_equal(lim_t_decide(t, 1, 10, 1, T0).result, LIM_ADMIT);
  /* A package bought: 100/s. Half the new allowance is left, neither a
   * fresh bucket (100) nor the old count (5). */
  assert_int_equal(lim_peek(t, k, n, lim_hash(k, n), 100, T0, &d), 0);
  assert_int_equal(d.remaining, 50);
  d = lim_t_decide(t, 1, 100, 1, T0);
  assert_int_equal(d.result, LIM_ADMIT);
  assert_int_equal(d.limit, 100);
  assert_int_equal(d.remaining, 49);
  assert_int_equal(d.reset_ns, 510 * MS);
  /* Up to 1000/s, then down to 2/s: the debt (511 ms) carries over. */
  d = lim_t_decide(t, 1, 1000, 1, T0);
  assert_int_equal(d.remaining, 489);
  d = lim_t_decide(t, 1, 2, 1, T0);
  assert_int_equal(d.result, LIM_REJECT);
  assert_int_equal(d.remaining, 0);
  assert_int_equal(d.retry_after_ns, 11 * MS);
  /* And the debt drains at the clock's pace whatever the rate. */
  d = lim_t_decide(t, 1, 2, 1, T0 + 11 * MS);
  assert_int_equal(d.result, LIM_ADMIT);
  assert_int_equal(d.remaining, 0);
  lim_table_free(t);
}

static void test_peek(void **state) {
  struct lim_table *t = new_table(64, 1);
  struct lim_decision d, d2;
  char k[48];
  size_t n = lim_t_key(k, 7);
  uint64_t h = lim_hash(k, n);

  (void)state;
  assert_int_equal(lim_peek(t, k, n, h, 10, T0, &d), -ENOENT);
  assert_int_equal(d.result, LIM_ADMIT);
  assert_int_equal(d.remaining, 10);
  assert_int_equal(d.reset_ns, 0);
  for (unsigned i = 0; i < 10; i++)
    lim_t_decide(t, 7, 10, 1, T0);
  for (unsigned i = 0; i < 3; i++) { /* peeking changes nothing */
    assert_int_equal(lim_peek(t, k, n, h, 10, T0 + 50 * MS, &d), 0);
    assert_int_equal(d.result, LIM_REJECT);
    assert_int_equal(d.remaining, 0);
    assert_int_equal(d.retry_after_ns, 50 * MS);
    assert_int_equal(d.reset_ns, 950 * MS);
  }
  assert_int_equal(lim_peek(t, k, n, h, 10, T0 + 250 * MS, &d), 0);
  assert_int_equal(d.result, LIM_ADMIT);
  assert_int_equal(d.remaining, 2);
  assert_int_equal(lim_peek(t, k, n, h, 0, T0, &d2), 0);
  assert_int_equal(d2.retry_after_ns, LIM_NEVER);
  assert_int_equal(lim_peek(NULL, k, n, h, 10, T0, &d), -EINVAL);
  lim_table_free(t);
}

/* 16 slots in one shard: the probe window is the whole table. */
static void fill_small(struct lim_table *t, unsigned first, uint64_t now) {
  for (unsigned i = 0; i < 16; i++)
    assert_int_equal(lim_t_decide(t, first + i, 10, 1, now).result,
                     LIM_ADMIT);
}

static void test_full_then_reclaim(void **state) {
  struct lim_table *t = new_table(8, 1);
  struct lim_decision d;
  struct lim_stats st;

  (void)state;
  lim_table_stats(t, &st);
  assert_int_equal(st.slots, 16);
  assert_int_equal(st.capacity, 8);
  fill_small(t, 100, T0);
  d = lim_t_decide(t, 200, 10, 1, T0 + 100 * MS - 1);
  assert_int_equal(d.result, LIM_FULL);
  lim_table_stats(t, &st);
  assert_int_equal(st.keys, 16);
  assert_int_equal(st.full, 1);
  assert_int_equal(st.reclaims, 0);
  /* The keys already there still decide. */
  assert_int_equal(lim_t_decide(t, 105, 10, 1, T0).result, LIM_ADMIT);
  /* 100 ms on, all but key 105 are full again: reusable. */
  d = lim_t_decide(t, 200, 10, 1, T0 + 100 * MS);
  assert_int_equal(d.result, LIM_ADMIT);
  assert_int_equal(d.remaining, 9);
  lim_table_stats(t, &st);
  assert_int_equal(st.keys, 16);
  assert_int_equal(st.reclaims, 1);
  /* Fill up with 14 more new keys, all reclaiming; 105 (not idle) stays. */
  for (unsigned i = 0; i < 14; i++)
    assert_int_equal(lim_t_decide(t, 300 + i, 10, 1, T0 + 100 * MS).result,
                     LIM_ADMIT);
  assert_int_equal(lim_t_decide(t, 400, 10, 1, T0 + 100 * MS).result,
                   LIM_FULL);
  d = lim_t_decide(t, 105, 10, 1, T0 + 100 * MS);
  assert_int_equal(d.result, LIM_ADMIT);
  assert_int_equal(d.remaining, 8); /* its history was kept */
  lim_table_stats(t, &st);
  assert_int_equal(st.reclaims, 15);
  assert_int_equal(st.full, 2);
  lim_table_free(t);
}

static void test_reclaim_never_resets_over_limit(void **state) {
  struct lim_table *t = new_table(8, 1);
  struct lim_decision d;

  (void)state;
  for (unsigned i = 0; i < 10; i++) /* key 1 spends its whole burst */
    assert_int_equal(lim_t_decide(t, 1, 10, 1, T0).result, LIM_ADMIT);
  for (unsigned i = 0; i < 15; i++)
    lim_t_decide(t, 10 + i, 10, 1, T0);
  /* A stream of new keys churns through the 15 idle slots many times. */
  for (unsigned round = 1; round <= 5; round++)
    for (unsigned i = 0; i < 15; i++)
      assert_int_equal(
          lim_t_decide(t, 1000 * round + i, 10, 1, T0 + round * 100 * MS)
              .result,
          LIM_ADMIT);
  /* Key 1 was never reclaimed: at T0 + 500 ms it has exactly 5 left. */
  d = lim_t_decide(t, 1, 10, 1, T0 + 500 * MS);
  assert_int_equal(d.result, LIM_ADMIT);
  assert_int_equal(d.remaining, 4);
  lim_table_free(t);
}

static void test_reclaimed_key_comes_back_full(void **state) {
  struct lim_table *t = new_table(8, 1);
  struct lim_decision d;

  (void)state;
  fill_small(t, 0, T0);
  fill_small(t, 100, T0 + 100 * MS); /* evicts all of keys 0..15 */
  d = lim_t_decide(t, 3, 10, 1, T0 + 200 * MS);
  assert_int_equal(d.result, LIM_ADMIT);
  assert_int_equal(d.remaining, 9); /* same as if it had stayed */
  lim_table_free(t);
}

static void test_stats_and_shards(void **state) {
  struct lim_table *t = new_table(1000, 8);
  struct lim_stats st;

  (void)state;
  for (unsigned i = 0; i < 500; i++)
    lim_t_decide(t, i, 5, 1, T0);
  for (unsigned i = 0; i < 500; i++) /* existing keys add nothing */
    lim_t_decide(t, i, 5, 1, T0);
  lim_table_stats(t, &st);
  assert_int_equal(st.shards, 8);
  assert_int_equal(st.keys, 500);
  assert_true(st.slots >= 2000);
  assert_int_equal(st.full, 0);
  assert_int_equal(st.reclaims, 0);
  assert_true(st.bytes >= st.slots * 16);
  lim_table_free(t);
}

static void test_bad_args(void **state) {
  struct lim_table *t = new_table(8, 1);
  struct lim_decision d;

  (void)state;
  errno = 0;
  assert_null(lim_table_new(0, 1));
  assert_int_equal(errno, EINVAL);
  assert_null(lim_table_new(10, 0));
  assert_null(lim_table_new(10, 3));
  assert_null(lim_table_new(10, 1u << 17));
  assert_int_equal(lim_decide(t, "k", 1, 1, 10, 0, T0, &d), -EINVAL);
  assert_int_equal(lim_decide(t, NULL, 1, 1, 10, 1, T0, &d), -EINVAL);
  assert_int_equal(lim_decide(t, "k", 1, 1, 10, 1, T0, NULL), -EINVAL);
  assert_int_equal(lim_decide(NULL, "k", 1, 1, 10, 1, T0, &d), -EINVAL);
  /* The empty key is a key. */
  assert_int_equal(lim_decide(t, NULL, 0, lim_hash(NULL, 0), 10, 1, T0, &d),
                   0);
  assert_int_equal(d.result, LIM_ADMIT);
  lim_table_free(t);
  lim_table_free(NULL);
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

static void test_hash(void **state) {
  enum { N = 200000 };
  uint64_t *h = malloc(N * sizeof *h);
  unsigned char zeros[200] = {0};
  char k[48];
  size_t n;

  (void)state;
  assert_non_null(h);
  n = lim_t_key(k, 42);
  assert_int_equal(lim_hash(k, n), lim_hash(k, n));
  /* Keys differing in one bit, and runs of zeros of every length. */
  for (size_t i = 0; i < n * 8; i++) {
    k[i / 8] ^= (char)(1 << (i % 8));
    h[i] = lim_hash(k, n);
    k[i / 8] ^= (char)(1 << (i % 8));
  }
  h[n * 8] = lim_hash(k, n);
  for (size_t i = 0; i <= 200; i++)
    h[n * 8 + 1 + i] = lim_hash(zeros, i);
  qsort(h, n * 8 + 202, sizeof *h, cmp_u64);
  for (size_t i = 1; i < n * 8 + 202; i++)
    assert_true(h[i] != h[i - 1]);
  /* Many similar keys: no collisions, and both halves well spread. */
  for (unsigned i = 0; i < N; i++) {
    n = lim_t_key(k, i);
    h[i] = lim_hash(k, n);
  }
  qsort(h, N, sizeof *h, cmp_u64);
  for (unsigned i = 1; i < N; i++)
    assert_true(h[i] != h[i - 1]);
  {
    unsigned lo[16] = {0}, hi[16] = {0};

    for (unsigned i = 0; i < N; i++) {
      lo[h[i] & 15]++;
      hi[h[i] >> 60]++;
    }
    for (unsigned b = 0; b < 16; b++) { /* expected 12500 each */
      assert_true(lo[b] > 11500 && lo[b] < 13500);
      assert_true(hi[b] > 11500 && hi[b] < 13500);
    }
  }
  free(h);
}

static void test_now_ns(void **state) {
  uint64_t a = lim_now_ns(), b = lim_now_ns();

  (void)state;
  assert_true(a > 0);
  assert_true(b >= a);
}

static struct lim_decision milli_decide(struct lim_table *t, unsigned uid, uint64_t milli, uint64_t now) {
  char k[48];
  size_t n = lim_t_key(k, uid);
  struct lim_decision d;

  assert_int_equal(lim_decide_milli(t, k, n, lim_hash(k, n), milli, 1, now, &d), 0);
  return d;
}

/* A fractional rate (a fleet's share): the burst is its whole part, the
 * long-run rate never exceeds it, and steady overload gets all of it. */
static void test_milli_rate(void **state) {
  struct lim_table *t = new_table(64, 4);
  struct lim_decision d;
  uint64_t admitted = 0;

  (void)state;
  /* 33.333/s: a burst of 33, then one every 30.0003 ms */
  for (unsigned i = 0; i < 40; i++)
    admitted += milli_decide(t, 1, 33333, T0).result == LIM_ADMIT;
  assert_int_equal(admitted, 33);
  d = milli_decide(t, 1, 33333, T0);
  assert_int_equal(d.limit, 33);
  assert_int_equal(d.result, LIM_REJECT);
  /* 100 s of one try per ms from an empty bucket: 3333 more at most, and
   * all but one interval's worth of them */
  admitted = 0;
  for (uint64_t ms = 1; ms <= 100000; ms++)
    admitted += milli_decide(t, 1, 33333, T0 + ms * MS).result == LIM_ADMIT;
  assert_true(admitted <= 3334);
  assert_true(admitted >= 3332);
  /* a whole rate given in milli decides exactly as lim_decide() */
  for (unsigned i = 0; i < 12; i++) {
    struct lim_decision a = milli_decide(t, 2, 10000, T0 + i * MS);
    struct lim_decision b = lim_t_decide(t, 3, 10, 1, T0 + i * MS);
    lim_t_same(&a, &b);
  }
  lim_table_free(t);
}

/* Under 1/s (a small limit split between instances): one request, then one
 * per 1000/rate seconds; zero never admits. */
static void test_milli_rate_under_one(void **state) {
  struct lim_table *t = new_table(64, 4);
  struct lim_decision d;

  (void)state;
  d = milli_decide(t, 1, 333, T0);
  assert_int_equal(d.result, LIM_ADMIT);
  assert_int_equal(d.limit, 0);
  d = milli_decide(t, 1, 333, T0 + LIM_T_S);
  assert_int_equal(d.result, LIM_REJECT);
  assert_true(d.retry_after_ns > 2 * LIM_T_S && d.retry_after_ns < 3100 * MS);
  d = milli_decide(t, 1, 333, T0 + 3004 * MS);
  assert_int_equal(d.result, LIM_ADMIT);
  d = milli_decide(t, 4, 0, T0);
  assert_int_equal(d.result, LIM_REJECT);
  assert_true(d.retry_after_ns == LIM_NEVER);
  lim_table_free(t);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_burst_then_reject),
      cmocka_unit_test(test_reject_does_not_consume),
      cmocka_unit_test(test_steady_rate),
      cmocka_unit_test(test_rate_zero_rejects_all),
      cmocka_unit_test(test_rate_rounding),
      cmocka_unit_test(test_cost_weights),
      cmocka_unit_test(test_limit_change),
      cmocka_unit_test(test_peek),
      cmocka_unit_test(test_full_then_reclaim),
      cmocka_unit_test(test_reclaim_never_resets_over_limit),
      cmocka_unit_test(test_reclaimed_key_comes_back_full),
      cmocka_unit_test(test_stats_and_shards),
      cmocka_unit_test(test_bad_args),
      cmocka_unit_test(test_hash),
      cmocka_unit_test(test_now_ns),
      cmocka_unit_test(test_milli_rate),
      cmocka_unit_test(test_milli_rate_under_one),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
