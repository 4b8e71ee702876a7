/*
 * Limiter concurrency tests (run under ThreadSanitizer too): 2, 4 and 8
 * threads hammer one hot key, many keys, and a table too small for its keys.
 * All threads of a phase pass the same now, so the admitted totals are
 * deterministic: they must equal the single-thread model's exactly.
 */
#include <pthread.h>
#include <stdlib.h>

#include "lim_test.h"

#define MS UINT64_C(1000000)
#define PHASES 16

/* Times of the phases: repeats, small and large steps, exact intervals. */
static const uint64_t phase_step[PHASES] = {
    0, 0, 37 * MS, 250 * MS, 1100 * MS, 3 * MS, 999 * MS, 1,
    200 * MS, 5000 * MS, 10 * MS, 10 * MS, 400 * MS, 0, 2000 * MS, 7 * MS};

struct worker {
  pthread_t th;
  struct lim_table *t;
  pthread_barrier_t *bar;
  unsigned id;
  unsigned keys;     /* keys 0..keys-1 */
  unsigned passes;   /* passes over the keys per phase */
  uint64_t rate;
  uint64_t *admitted; /* [PHASES][keys], this thread's */
  uint64_t full;      /* LIM_FULL answers seen */
  uint64_t seed;      /* 0: keys in a rotated order; else random keys */
};

static uint64_t phase_now(unsigned p) {
  uint64_t now = LIM_T_S;

  for (unsigned i = 0; i <= p; i++)
    now += phase_step[i];
  return now;
}

static void *work(void *arg) {
  struct worker *w = arg;

  for (unsigned p = 0; p < PHASES; p++) {
    uint64_t now = phase_now(p);

    pthread_barrier_wait(w->bar);
    for (unsigned pass = 0; pass < w->passes; pass++)
      for (unsigned i = 0; i < w->keys; i++) {
        unsigned k = w->seed ? (unsigned)(lim_t_rand(&w->seed) % w->keys)
                             : (i + w->id * 7919u) % w->keys;
        struct lim_decision d = lim_t_decide(w->t, k, w->rate, 1, now);

        if (d.result == LIM_ADMIT)
          w->admitted[p * w->keys + k]++;
        else if (d.result == LIM_FULL)
          w->full++;
      }
  }
  return NULL;
}

/* Runs nthreads workers over `keys` keys; returns the per-phase, per-key
 * admitted totals (caller frees) and the LIM_FULL count in *full. */
static uint64_t *hammer(struct lim_table *t, unsigned nthreads, unsigned keys,
                        unsigned passes, uint64_t rate, int random_keys,
                        uint64_t *full) {
  struct worker w[8];
  pthread_barrier_t bar;
  uint64_t *sum = calloc((size_t)PHASES * keys, sizeof *sum);

  assert_non_null(sum);
  assert_true(nthreads <= 8);
  assert_int_equal(pthread_barrier_init(&bar, NULL, nthreads), 0);
  *full = 0;
  for (unsigned i = 0; i < nthreads; i++) {
    w[i] = (struct worker){.t = t, .bar = &bar, .id = i, .keys = keys,
                           .passes = passes, .rate = rate,
                           .seed = random_keys ? 977 * (i + 1) : 0};
    w[i].admitted = calloc((size_t)PHASES * keys, sizeof *w[i].admitted);
    assert_non_null(w[i].admitted);
    assert_int_equal(pthread_create(&w[i].th, NULL, work, &w[i]), 0);
  }
  for (unsigned i = 0; i < nthreads; i++) {
    assert_int_equal(pthread_join(w[i].th, NULL), 0);
    for (size_t j = 0; j < (size_t)PHASES * keys; j++)
      sum[j] += w[i].admitted[j];
    *full += w[i].full;
    free(w[i].admitted);
  }
  pthread_barrier_destroy(&bar);
  return sum;
}

/* Fails unless each key's admissions in each phase equal what the model
 * admits when given the same number of requests one after another. */
static void check_exact(const uint64_t *sum, unsigned keys, uint64_t rate,
                        unsigned attempts) {
  for (unsigned k = 0; k < keys; k++) {
    struct lim_ref ref = {0, phase_now(0)};

    for (unsigned p = 0; p < PHASES; p++) {
      uint64_t want = 0;
      struct lim_decision d;

      for (unsigned a = 0; a < attempts; a++) {
        lim_ref_decide(&ref, rate, 1, phase_now(p), &d);
        want += d.result == LIM_ADMIT;
      }
      if (sum[p * keys + k] != want)
        fail_msg("key %u phase %u: %llu admitted, model %llu", k, p,
                 (unsigned long long)sum[p * keys + k],
                 (unsigned long long)want);
    }
  }
}

/* n threads, `passes` passes each over `keys` keys at `rate`, on a table
 * large enough never to reclaim: the totals must be the model's, and each
 * key must have been given exactly one slot. */
static void exact_run(unsigned n, unsigned keys, unsigned passes,
                      uint64_t rate) {
  struct lim_table *t = lim_table_new(1024, 4);
  uint64_t full, *sum;
  struct lim_stats st;

  assert_non_null(t);
  sum = hammer(t, n, keys, passes, rate, 0, &full);
  assert_int_equal(full, 0);
  check_exact(sum, keys, rate, passes * n);
  lim_table_stats(t, &st);
  assert_int_equal(st.keys, keys);
  free(sum);
  lim_table_free(t);
}

static void test_hot_key(void **state) {
  (void)state;
  for (unsigned n = 2; n <= 8; n *= 2)
    exact_run(n, 1, 2 * 1000 / n + 1, 1000); /* overload: > R requests */
}

static void test_many_keys(void **state) {
  (void)state;
  for (unsigned n = 2; n <= 8; n *= 2)
    exact_run(n, 512, 3, 5); /* 3n >= 6 requests a key: > R */
}

/* 600 keys on 128 slots: threads claim, reclaim and get LIM_FULL at once.
 * Totals are no longer deterministic, but no key may pass its bound, and
 * the counters must agree with what the threads saw. */
static void test_reclaim_under_contention(void **state) {
  (void)state;
  for (unsigned n = 2; n <= 8; n *= 2) {
    struct lim_table *t = lim_table_new(64, 1);
    uint64_t rate = 2, full, span = phase_now(PHASES - 1) - phase_now(0);
    unsigned keys = 600;
    uint64_t *sum;
    struct lim_stats st;

    assert_non_null(t);
    sum = hammer(t, n, keys, 4, rate, 1, &full);
    for (unsigned k = 0; k < keys; k++) {
      uint64_t total = 0;

      for (unsigned p = 0; p < PHASES; p++) {
        assert_true(sum[p * keys + k] <= rate); /* one burst a phase */
        total += sum[p * keys + k];
      }
      assert_true(total * LIM_T_S <= rate * span + rate * LIM_T_S);
    }
    lim_table_stats(t, &st);
    assert_int_equal(st.full, full);
    assert_int_equal(st.keys, st.slots);
    assert_true(st.reclaims > 0);
    assert_true(full > 0);
    free(sum);
    lim_table_free(t);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_hot_key),
      cmocka_unit_test(test_many_keys),
      cmocka_unit_test(test_reclaim_under_contention),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
