/* Unit tests for proxy/dir.c (snapshots, copy-on-write, bounds, reclaim)
 * and proxy/ring.c (the bounded lookup queue). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>

#include "dir.h"
#include "ring.h"

static const uint32_t qps[3] = {100, 100, 50};
static const uint8_t tier[3] = {0, 1, 1};

static struct sl_acct *acct(const char *ak, const char *uid, uint32_t npkgs) {
  struct sl_acct *a = sl_acct_new(ak, strlen(ak), npkgs);
  a->kind = uid ? SL_ACCT_FOUND : SL_ACCT_NOT_FOUND;
  a->valid_until_ms = uid ? UINT64_MAX : 1000;
  if (uid) {
    a->uid_len = (uint8_t)strlen(uid);
    memcpy(a->uid, uid, a->uid_len);
  }
  return a;
}

static const struct sl_acct *find(const struct sl_dir_snap *s, const char *ak) {
  return sl_dir_find(s, ak, strlen(ak), sl_dir_hash(ak, strlen(ak)));
}

static void test_put_find_publish(void **state) {
  (void)state;
  struct sl_dir_builder b;
  assert_int_equal(sl_dir_builder_init(&b, 1000, qps, tier, 3), 0);
  const struct sl_dir_snap *v1 = atomic_load(&b.current);
  assert_int_equal(v1->version, 1);
  assert_int_equal(v1->feature_qps[2], 50);
  sl_dir_put(&b, acct("AK1", "u1", 0));
  sl_dir_put(&b, acct("AK2", NULL, 0));
  assert_null(find(v1, "AK1")); /* nothing is visible before publish */
  const struct sl_dir_snap *v2 = sl_dir_publish(&b);
  assert_int_equal(v2->version, 2);
  assert_int_equal(v2->naccts, 2);
  assert_string_equal(find(v2, "AK1")->uid, "u1");
  assert_int_equal(find(v2, "AK2")->kind, SL_ACCT_NOT_FOUND);
  assert_null(find(v2, "AK3"));
  assert_null(find(v1, "AK1")); /* v1 is immutable: readers holding it see it unchanged */
  /* replace: v2 keeps the old record until reclaimed */
  sl_dir_put(&b, acct("AK1", "u9", 0));
  const struct sl_dir_snap *v3 = sl_dir_publish(&b);
  assert_string_equal(find(v3, "AK1")->uid, "u9");
  assert_string_equal(find(v2, "AK1")->uid, "u1");
  assert_int_equal(v3->naccts, 2);
  assert_int_equal(sl_dir_publish(&b), v3); /* nothing built: same snapshot */
  sl_dir_reclaim(&b, 3); /* every reader is at v3: v1, v2 and the old record go */
  assert_int_equal(b.nretired, 0);
  assert_int_equal(sl_dir_remove(&b, "AK2", 3, sl_dir_hash("AK2", 3)), 1);
  assert_int_equal(sl_dir_remove(&b, "AK2", 3, sl_dir_hash("AK2", 3)), 0);
  const struct sl_dir_snap *v4 = sl_dir_publish(&b);
  assert_null(find(v4, "AK2"));
  assert_non_null(find(v4, "AK1"));
  sl_dir_builder_free(&b);
}

static void test_many_and_bound(void **state) {
  (void)state;
  struct sl_dir_builder b;
  sl_dir_builder_init(&b, 5000, qps, tier, 3);
  char ak[32];
  for (int i = 0; i < 5000; i++) {
    snprintf(ak, sizeof(ak), "AK%d", i);
    struct sl_acct *a = acct(ak, "u", 0);
    a->loaded_ms = (uint64_t)i + 1;
    sl_dir_put(&b, a);
    if (i % 1000 == 999) sl_dir_publish(&b);
  }
  const struct sl_dir_snap *s = sl_dir_publish(&b);
  assert_int_equal(s->naccts, 5000);
  for (int i = 0; i < 5000; i++) {
    snprintf(ak, sizeof(ak), "AK%d", i);
    assert_non_null(find(s, ak));
  }
  /* At the bound a new account evicts one record and the count holds. */
  for (int i = 5000; i < 5100; i++) {
    snprintf(ak, sizeof(ak), "AK%d", i);
    struct sl_acct *a = acct(ak, "u", 0);
    a->loaded_ms = 100000;
    sl_dir_put(&b, a);
  }
  s = sl_dir_publish(&b);
  assert_int_equal(s->naccts, 5000);
  assert_int_equal(b.evictions, 100);
  for (int i = 5000; i < 5100; i++) {
    snprintf(ak, sizeof(ak), "AK%d", i);
    assert_non_null(find(s, ak));
  }
  sl_dir_reclaim(&b, s->version);
  sl_dir_builder_free(&b);
}

static void test_suspended_and_limits(void **state) {
  (void)state;
  struct sl_dir_builder b;
  sl_dir_builder_init(&b, 10, qps, tier, 3);
  const char *uids[] = {"1001", "1002", "1001", ""};
  size_t lens[] = {4, 4, 4, 0};
  sl_dir_set_suspended(&b, sl_strset_new(uids, lens, 4));
  sl_dir_set_feature(&b, 0, 300, 0, 1);
  struct sl_acct *a = acct("AK", "1001", 3);
  a->pkgs[0] = (struct sl_pkg){.feature = 0, .qps = 50, .starts_at = 100, .expires_at = 200, .region_len = 11};
  memcpy(a->pkgs[0].region, "cn-shanghai", 11);
  a->pkgs[1] = (struct sl_pkg){.feature = 0, .qps = 7, .starts_at = 0, .expires_at = 150, .region_len = 11};
  memcpy(a->pkgs[1].region, "cn-shanghai", 11);
  a->pkgs[2] = (struct sl_pkg){.feature = 0, .qps = 1000, .starts_at = 0, .expires_at = 1000, .region_len = 10};
  memcpy(a->pkgs[2].region, "cn-beijing", 10);
  sl_dir_put(&b, a);
  const struct sl_dir_snap *s = sl_dir_publish(&b);
  assert_true(sl_dir_is_suspended(s, "1001", 4));
  assert_true(sl_dir_is_suspended(s, "1002", 4));
  assert_false(sl_dir_is_suspended(s, "100", 3));
  assert_false(sl_dir_is_suspended(s, "", 0));
  assert_int_equal(s->suspended->n, 2);
  const struct sl_acct *f = find(s, "AK");
  assert_int_equal(sl_dir_limit(s, f, 0, "cn-shanghai", 11, 99), 307);  /* default override + pkg 1 */
  assert_int_equal(sl_dir_limit(s, f, 0, "cn-shanghai", 11, 100), 357); /* pkg 0 starts */
  assert_int_equal(sl_dir_limit(s, f, 0, "cn-shanghai", 11, 150), 350); /* pkg 1 expired */
  assert_int_equal(sl_dir_limit(s, f, 0, "cn-shanghai", 11, 200), 300); /* expires_at is exclusive */
  assert_int_equal(sl_dir_limit(s, f, 0, "cn-beijing", 10, 200), 1300);
  assert_int_equal(sl_dir_limit(s, f, 1, "cn-shanghai", 11, 120), 100); /* other feature: default only */
  /* replacing the set keeps the old one for readers until reclaimed */
  const char *none[] = {"x"};
  size_t one[] = {1};
  sl_dir_set_suspended(&b, sl_strset_new(none, one, 1));
  const struct sl_dir_snap *s2 = sl_dir_publish(&b);
  assert_false(sl_dir_is_suspended(s2, "1001", 4));
  assert_true(sl_dir_is_suspended(s, "1001", 4));
  sl_dir_builder_free(&b);
}

static void test_ring_bound(void **state) {
  (void)state;
  struct sl_ring r;
  assert_int_equal(sl_ring_init(&r, 3, 8), -EINVAL);
  assert_int_equal(sl_ring_init(&r, 4, sizeof(uint64_t)), 0);
  uint64_t v;
  assert_int_equal(sl_ring_pop(&r, &v), -EAGAIN);
  for (uint64_t i = 0; i < 4; i++) assert_int_equal(sl_ring_push(&r, &i), 0);
  uint64_t x = 99;
  assert_int_equal(sl_ring_push(&r, &x), -ENOBUFS); /* full: refused, nothing lost */
  for (uint64_t i = 0; i < 4; i++) {
    assert_int_equal(sl_ring_pop(&r, &v), 0);
    assert_int_equal(v, i);
  }
  assert_int_equal(sl_ring_pop(&r, &v), -EAGAIN);
  for (uint64_t i = 10; i < 1000; i++) { /* wraps many laps */
    assert_int_equal(sl_ring_push(&r, &i), 0);
    assert_int_equal(sl_ring_pop(&r, &v), 0);
    assert_int_equal(v, i);
  }
  sl_ring_free(&r);
}

#define PRODUCERS 4
#define PER_PRODUCER 20000
static struct sl_ring mt_ring;

static void *producer(void *arg) {
  uint64_t id = (uint64_t)(uintptr_t)arg;
  for (uint64_t i = 0; i < PER_PRODUCER; i++) {
    uint64_t v = id << 32 | i;
    while (sl_ring_push(&mt_ring, &v) != 0) sched_yield();
  }
  return NULL;
}

static void test_ring_threads(void **state) {
  (void)state;
  assert_int_equal(sl_ring_init(&mt_ring, 64, sizeof(uint64_t)), 0);
  pthread_t t[PRODUCERS];
  for (uintptr_t i = 0; i < PRODUCERS; i++) pthread_create(&t[i], NULL, producer, (void *)i);
  uint64_t next[PRODUCERS] = {0};
  for (uint64_t got = 0; got < PRODUCERS * PER_PRODUCER;) {
    uint64_t v;
    if (sl_ring_pop(&mt_ring, &v) != 0) {
      sched_yield();
      continue;
    }
    unsigned id = (unsigned)(v >> 32);
    assert_true(id < PRODUCERS);
    assert_int_equal(v & 0xffffffff, next[id]); /* each producer's items arrive once, in order */
    next[id]++;
    got++;
  }
  for (int i = 0; i < PRODUCERS; i++) pthread_join(t[i], NULL);
  sl_ring_free(&mt_ring);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_put_find_publish), cmocka_unit_test(test_many_and_bound),
      cmocka_unit_test(test_suspended_and_limits), cmocka_unit_test(test_ring_bound),
      cmocka_unit_test(test_ring_threads),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
