/*
 * Helpers shared by the limiter tests: string keys, a checked decision, and
 * an independent reference model of the limiter's semantics.
 */
#ifndef SLUICE_TESTS_LIM_TEST_H
#define SLUICE_TESTS_LIM_TEST_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

#include "limiter.h"

#define LIM_T_S UINT64_C(1000000000)

/* Writes the key of user `uid` into buf (>= 48 bytes); returns its length. */
static inline size_t lim_t_key(char *buf, unsigned uid) {
  return (size_t)snprintf(buf, 48, "uid:%u|feature:search|region:eu-west", uid);
}

/* Decides for key `uid`; fails the test unless lim_decide() returns 0. */
static inline struct lim_decision lim_t_decide(struct lim_table *t,
                                               unsigned uid, uint64_t rate,
                                               uint32_t cost, uint64_t now) {
  char k[48];
  size_t n = lim_t_key(k, uid);
  struct lim_decision d;

  assert_int_equal(lim_decide(t, k, n, lim_hash(k, n), rate, cost, now, &d), 0);
  return d;
}

/* The reference model: the continuous-state leaky bucket, the textbook
 * equivalent of GCRA's virtual scheduling. It keeps the bucket's debt in ns
 * (how far the bucket is from full), drained one ns per ns; a request of
 * cost c adds c * I if the debt stays within tau. Time must not go back. */
struct lim_ref {
  uint64_t debt; /* ns */
  uint64_t last; /* ns, time of the previous call */
};

static inline void lim_ref_decide(struct lim_ref *r, uint64_t rate,
                                  uint32_t cost, uint64_t now,
                                  struct lim_decision *d) {
  uint64_t interval, tau, need;

  r->debt = now - r->last >= r->debt ? 0 : r->debt - (now - r->last);
  r->last = now;
  memset(d, 0, sizeof *d);
  if (rate == 0) {
    d->result = LIM_REJECT;
    d->retry_after_ns = LIM_NEVER;
    return;
  }
  if (rate > LIM_RATE_MAX)
    rate = LIM_RATE_MAX;
  interval = (LIM_T_S + rate - 1) / rate; /* rounded up: never above R */
  tau = rate * interval;                  /* R requests fit at once */
  need = (uint64_t)cost * interval;
  d->limit = rate;
  if (cost <= rate && r->debt + need <= tau) {
    r->debt += need;
    d->result = LIM_ADMIT;
  } else {
    d->result = LIM_REJECT;
    d->retry_after_ns = cost > rate ? LIM_NEVER : r->debt + need - tau;
  }
  d->reset_ns = r->debt;
  d->remaining = r->debt < tau ? (tau - r->debt) / interval : 0;
  if (d->result == LIM_ADMIT && d->remaining == 0)
    d->retry_after_ns = r->debt + interval - tau;
}

/* Fails the test unless two decisions say the same in every field. */
static inline void lim_t_same(const struct lim_decision *a,
                              const struct lim_decision *b) {
  assert_int_equal(a->result, b->result);
  assert_int_equal(a->limit, b->limit);
  assert_int_equal(a->remaining, b->remaining);
  assert_int_equal(a->retry_after_ns, b->retry_after_ns);
  assert_int_equal(a->reset_ns, b->reset_ns);
}

/* xorshift64*: a small deterministic generator for the tests. */
static inline uint64_t lim_t_rand(uint64_t *s) {
  *s ^= *s >> 12;
  *s ^= *s << 25;
  *s ^= *s >> 27;
  return *s * UINT64_C(2685821657736338717);
}

#endif
