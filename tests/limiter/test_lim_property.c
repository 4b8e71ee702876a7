/*
 * Limiter property tests against the reference model (lim_test.h): random
 * arrival times, costs and limits. For every window of W ns the admitted cost
 * is at most R*W/1e9 + R; under continuous overload at least 99% of R*W/1e9;
 * and a small table that reclaims buckets all the time decides exactly as the
 * model with unbounded memory (apart from its LIM_FULL answers).
 */
#include <stdlib.h>

#include "lim_test.h"

#define MS UINT64_C(1000000)

struct adm {
  uint64_t t;    /* ns */
  uint64_t rate; /* the limit in force, requests/s */
  uint32_t c;    /* cost */
  uint32_t seg;  /* bumped at each change of limit */
};

/* Fails unless, for every window [a[i].t, a[i].t + w] opening on an
 * admission, the cost admitted in it is within the bound. If imin is 0 the
 * window counts only admissions under a[i]'s limit R, and the bound is the
 * issue's R*w/1e9 + R. Otherwise it counts all, and the bound is GCRA's
 * (w + tau)/I for the smallest interval imin and the largest tolerance. */
static void check_upper(const struct adm *a, size_t n, uint64_t w,
                        uint64_t imin, uint64_t taumax) {
  size_t j = 0;
  uint64_t sum = 0;

  for (size_t i = 0; i < n; i++) {
    int ok;

    if (!imin && j > i && a[j - 1].seg != a[i].seg) { /* a new segment */
      j = i;
      sum = 0;
    }
    while (j < n && a[j].t <= a[i].t + w && (imin || a[j].seg == a[i].seg))
      sum += a[j++].c;
    ok = imin ? sum * imin <= w + taumax
              : sum * LIM_T_S <= a[i].rate * w + a[i].rate * LIM_T_S;
    if (!ok)
      fail_msg("rate %llu window %llu ns from %llu: %llu admitted",
               (unsigned long long)a[i].rate, (unsigned long long)w,
               (unsigned long long)a[i].t, (unsigned long long)sum);
    sum -= a[i].c;
  }
}

static uint64_t pick_rate(uint64_t *rng) {
  static const uint64_t rates[] = {1, 2, 3, 7, 10, 33, 100, 999, 1000, 12345};
  uint64_t r = lim_t_rand(rng);

  return r % 3 ? rates[r % 10] : 1 + r % 50000;
}

/* Returns the gap to the next arrival: bursts, near-rate and idle spells. */
static uint64_t pick_gap(uint64_t *rng, uint64_t interval) {
  uint64_t r = lim_t_rand(rng), k = r % 10;

  r >>= 8;
  if (k < 3)
    return 0;
  if (k < 7)
    return r % (2 * interval + 1);
  if (k < 9)
    return r % (interval / 10 + 1);
  return r % (3 * LIM_T_S);
}

/* Random arrivals and costs for one key, under one limit or a changing one;
 * every decision must equal the model's, and every window meet the bound. */
static void run_random(uint64_t seed, int change_limits) {
  enum { N = 20000 };
  static const uint64_t windows[] = {0, 100 * MS, LIM_T_S, 2500 * MS,
                                     10 * LIM_T_S};
  struct lim_table *t = lim_table_new(64, 2);
  struct adm *a = calloc(N, sizeof *a);
  struct lim_ref ref = {0, LIM_T_S};
  uint64_t rng = seed, now = LIM_T_S, rate = pick_rate(&rng);
  uint64_t imin = UINT64_MAX, taumax = 0;
  uint32_t seg = 0;
  size_t n = 0;

  assert_non_null(t);
  assert_non_null(a);
  for (unsigned e = 0; e < N; e++) {
    uint64_t interval;
    uint32_t cost = lim_t_rand(&rng) % 5 ? 1 : 1 + lim_t_rand(&rng) % 4;
    struct lim_decision d, want;

    if (change_limits && lim_t_rand(&rng) % 500 == 0) {
      rate = pick_rate(&rng);
      seg++;
    }
    interval = (LIM_T_S + rate - 1) / rate;
    imin = interval < imin ? interval : imin;
    taumax = rate * interval > taumax ? rate * interval : taumax;
    now += pick_gap(&rng, interval);
    d = lim_t_decide(t, 7, rate, cost, now);
    lim_ref_decide(&ref, rate, cost, now, &want);
    lim_t_same(&d, &want);
    if (d.result == LIM_ADMIT)
      a[n++] = (struct adm){now, rate, cost, seg};
  }
  assert_true(n > N / 10);
  for (unsigned w = 0; w < sizeof windows / sizeof *windows; w++) {
    check_upper(a, n, windows[w], 0, 0);
    if (change_limits)
      check_upper(a, n, windows[w], imin, taumax);
  }
  free(a);
  lim_table_free(t);
}

static void test_window_bound_random(void **state) {
  (void)state;
  for (uint64_t s = 1; s <= 12; s++)
    run_random(s * UINT64_C(0x9e3779b97f4a7c15), 0);
}

static void test_window_bound_changing_limits(void **state) {
  (void)state;
  for (uint64_t s = 1; s <= 6; s++)
    run_random(s * UINT64_C(0xbf58476d1ce4e5b9), 1);
}

/* Continuous overload: arrivals far faster than R for 3 windows of T; every
 * window [s, s + T) must hold at least 99% of R*T admissions. */
static void test_overload_lower_bound(void **state) {
  static const uint64_t rates[] = {1, 2, 3, 7, 10, 100, 997, 5000};

  (void)state;
  for (unsigned ri = 0; ri < sizeof rates / sizeof *rates; ri++) {
    uint64_t rate = rates[ri], interval = (LIM_T_S + rate - 1) / rate;
    /* R*T >= 1000 so that 1% is more than one request's rounding. */
    uint64_t win = rate >= 1000 ? LIM_T_S : 1000 * LIM_T_S / rate;
    uint64_t end = 3 * win, now = 0, rng = 0x1234567 + rate;
    /* With R = 1 the bucket is empty after each admission, so the wait for
     * the next arrival is lost: keep arrivals denser there. */
    uint64_t gap = rate == 1 ? interval / 100 : interval / 10;
    struct lim_table *t = lim_table_new(16, 1);
    size_t cap = (size_t)(end / LIM_T_S * rate + rate + 16), n = 0;
    uint64_t *adm = malloc(cap * sizeof *adm);
    size_t i = 0, j = 0;

    assert_non_null(t);
    assert_non_null(adm);
    while (now < end) {
      if (lim_t_decide(t, 1, rate, 1, now).result == LIM_ADMIT) {
        assert_true(n < cap);
        adm[n++] = now;
      }
      now += 1 + lim_t_rand(&rng) % gap;
    }
    for (uint64_t s = 0; s + win <= end; s += win / 20) {
      while (i < n && adm[i] < s)
        i++;
      if (j < i)
        j = i;
      while (j < n && adm[j] < s + win)
        j++;
      if ((j - i) * 100 * LIM_T_S < 99 * rate * win)
        fail_msg("rate %llu: %zu admitted in [%llu, +%llu)",
                 (unsigned long long)rate, j - i, (unsigned long long)s,
                 (unsigned long long)win);
    }
    free(adm);
    lim_table_free(t);
  }
}

/* A 64-slot table serving 300 keys reclaims idle buckets all the time; each
 * answer other than LIM_FULL must equal the unbounded model's: a reclaimed
 * bucket is indistinguishable from the one it replaced. */
static void test_reclaim_matches_model(void **state) {
  enum { KEYS = 300, EVENTS = 200000 };
  struct lim_table *t = lim_table_new(32, 1);
  struct lim_ref *ref = calloc(KEYS, sizeof *ref);
  uint64_t *rate = calloc(KEYS, sizeof *rate);
  uint64_t rng = 42, now = LIM_T_S;
  unsigned full = 0;
  struct lim_stats st;

  (void)state;
  assert_non_null(t);
  assert_non_null(ref);
  assert_non_null(rate);
  for (unsigned k = 0; k < KEYS; k++) {
    static const uint64_t rates[] = {1, 5, 10, 50};
    rate[k] = rates[lim_t_rand(&rng) % 4];
    ref[k].last = now;
  }
  for (unsigned e = 0; e < EVENTS; e++) {
    uint64_t r = lim_t_rand(&rng);
    unsigned k = r % 2 ? (unsigned)(r >> 8) % 20 : (unsigned)(r >> 8) % KEYS;
    uint32_t cost = r >> 40 & 1 ? 1 : 1 + (uint32_t)(r >> 41) % 3;
    struct lim_decision d, want;

    if ((r >> 50) % 100 == 0)
      rate[k] = 1 + (r >> 20) % 60;
    now += (r >> 44) % 64 == 0 ? (r >> 30) % (2 * LIM_T_S)
                               : (r >> 30) % (MS / 2);
    d = lim_t_decide(t, k, rate[k], cost, now);
    if (d.result == LIM_FULL) {
      full++;
      continue;
    }
    lim_ref_decide(&ref[k], rate[k], cost, now, &want);
    lim_t_same(&d, &want);
  }
  lim_table_stats(t, &st);
  assert_int_equal(st.full, full);
  print_message("reclaims %llu full %u\n", (unsigned long long)st.reclaims, full);
  assert_true(st.reclaims > 1000); /* both paths well exercised */
  assert_true(full > 100);
  assert_true(full < EVENTS / 4);
  assert_int_equal(st.keys, st.slots);
  free(rate);
  free(ref);
  lim_table_free(t);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_window_bound_random),
      cmocka_unit_test(test_window_bound_changing_limits),
      cmocka_unit_test(test_overload_lower_bound),
      cmocka_unit_test(test_reclaim_matches_model),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
