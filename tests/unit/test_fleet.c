/* Unit tests for proxy/fleet (global limits) without a thread or Redis: the
 * table of coordinated keys at its bound, the workers' ask ring at its
 * bound and its once-a-second filter, the share a worker applies in each
 * mode, and replies to a sync (leases, releases, announcements, garbage). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fleet.h"
#include "limiter.h"
#include "unit_resp.h"

static size_t key_of(char *buf, unsigned uid) {
  return (size_t)snprintf(buf, 64, "u%u\x1ftext\x1f" "cn-shanghai", uid);
}

static uint64_t tag_of(unsigned uid) {
  char k[64];
  size_t n = key_of(k, uid);
  return lim_hash(k, n);
}

static void want(struct sl_fleet *f, unsigned worker, unsigned uid, uint64_t now_ms) {
  char k[64];
  size_t n = key_of(k, uid);
  sl_fleet_want(f, worker, lim_hash(k, n), k, n, 100, now_ms);
}


static int apply(struct sl_fleet *f, const uint32_t *idx, uint32_t n, const char *text) {
  redisReply *r = resp(text);
  int rc = sl_fleet_apply_reply_test(f, idx, n, r);
  freeReplyObject(r);
  return rc;
}

static void test_table_bound(void **state) {
  struct sl_fleet f;
  (void)state;
  assert_int_equal(sl_fleet_table_init_test(&f, 4, 1), 0);
  for (unsigned u = 0; u < 6; u++) want(&f, 0, u, 0);
  sl_fleet_take_wants_test(&f);
  /* four coordinated, two refused and counted: they keep R/N */
  assert_int_equal(f.nused, 4);
  assert_int_equal(atomic_load(&f.stats.keys_full), 2);
  assert_int_equal(atomic_load(&f.stats.coordinated), 4);
  unsigned found = 0;
  for (unsigned u = 0; u < 6; u++) found += sl_fleet_find(&f, tag_of(u)) != NULL;
  assert_int_equal(found, 4);
  sl_fleet_table_free_test(&f);
}

static void test_want_ring_bound_and_filter(void **state) {
  struct sl_fleet f;
  (void)state;
  assert_int_equal(sl_fleet_table_init_test(&f, 4096, 2), 0);
  /* the same key twice within a second: asked once; a second later, again */
  want(&f, 0, 7, 1000);
  want(&f, 0, 7, 1500);
  want(&f, 1, 7, 1500); /* another worker asks for itself */
  want(&f, 0, 7, 2000);
  sl_fleet_take_wants_test(&f);
  assert_int_equal(f.nused, 1);
  assert_int_equal(atomic_load(&f.stats.wants_dropped), 0);
  /* past the ring's capacity the asks are dropped and counted */
  for (unsigned u = 100; u < 100 + SL_FLEET_WANTS + 10; u++) want(&f, 0, u, 5000);
  assert_int_equal(atomic_load(&f.stats.wants_dropped), 10);
  sl_fleet_take_wants_test(&f);
  assert_int_equal(f.nused, 1 + SL_FLEET_WANTS);
  sl_fleet_table_free_test(&f);
}

static void test_share_by_mode(void **state) {
  struct sl_fleet f;
  struct sl_fleet_slot *s;
  (void)state;
  assert_int_equal(sl_fleet_table_init_test(&f, 16, 1), 0);
  /* before Redis answers: alone, the whole limit; nothing counted */
  assert_int_equal(sl_fleet_share(&f, tag_of(1), 100, &s), SL_FLEET_PPM);
  assert_null(s);
  want(&f, 0, 1, 0);
  sl_fleet_take_wants_test(&f);
  uint32_t idx = f.used[0];
  /* three live instances, a lease of 60% for the key */
  assert_int_equal(apply(&f, &idx, 1, "*5\r\n:3\r\n$3\r\n1-0\r\n*0\r\n*0\r\n*4\r\n:600000\r\n:90000\r\n:3\r\n:0\r\n"), 0);
  assert_int_equal(sl_fleet_mode_of(atomic_load(&f.word)), SL_FLEET_SHARED);
  assert_int_equal(sl_fleet_share(&f, tag_of(1), 100, &s), 600000);
  assert_non_null(s);
  assert_int_equal(atomic_load(&s->attempts), 1);
  assert_int_equal(atomic_load(&s->limit), 100);
  assert_int_equal(atomic_load(&s->registered), 3);
  /* a key nobody coordinates: R/N */
  assert_int_equal(sl_fleet_share(&f, tag_of(2), 100, &s), SL_FLEET_PPM / 3);
  assert_null(s);
  /* fallback: every key R/N_last, coordinated or not */
  atomic_store(&f.word, (uint64_t)SL_FLEET_FALLBACK << 32 | (SL_FLEET_PPM / 3));
  assert_int_equal(sl_fleet_share(&f, tag_of(1), 100, &s), SL_FLEET_PPM / 3);
  assert_non_null(s);
  assert_int_equal(atomic_load(&s->attempts), 2); /* demand is still measured */
  /* alone again (a heartbeat's reply, no key in it): the whole limit, no
   * key synced; another instance: 1/N at once, synced as a new key */
  atomic_store(&f.word, (uint64_t)SL_FLEET_SHARED << 32 | SL_FLEET_PPM);
  assert_int_equal(apply(&f, NULL, 0, "*4\r\n:1\r\n$3\r\n1-0\r\n*0\r\n*0\r\n"), 0);
  assert_int_equal(sl_fleet_share(&f, tag_of(1), 100, &s), SL_FLEET_PPM);
  assert_int_equal(apply(&f, NULL, 0, "*4\r\n:2\r\n$3\r\n1-0\r\n*0\r\n*0\r\n"), 0);
  assert_int_equal(sl_fleet_share(&f, tag_of(1), 100, &s), SL_FLEET_PPM / 2);
  sl_fleet_table_free_test(&f);
}

static void test_replies(void **state) {
  struct sl_fleet f;
  struct sl_fleet_slot *s;
  (void)state;
  assert_int_equal(sl_fleet_table_init_test(&f, 16, 1), 0);
  want(&f, 0, 1, 0);
  want(&f, 0, 2, 0);
  sl_fleet_take_wants_test(&f);
  uint32_t idx[2] = {f.used[0], f.used[1]};
  uint64_t t0 = atomic_load(&f.slots[idx[0]].tag);
  /* garbage changes nothing and is counted */
  const char *bad[] = {"-ERR busy\r\n", ":1\r\n", "*4\r\n:2\r\n$1\r\nx\r\n*0\r\n*0\r\n",
                       "*6\r\n:0\r\n$1\r\nx\r\n*0\r\n*0\r\n*0\r\n*0\r\n",
                       "*6\r\n:2\r\n:5\r\n*0\r\n*0\r\n*0\r\n*0\r\n"};
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) assert_int_equal(apply(&f, idx, 2, bad[i]), -1);
  assert_int_equal(atomic_load(&f.stats.sync_errors), 5);
  assert_int_equal(sl_fleet_mode_of(atomic_load(&f.word)), SL_FLEET_FALLBACK);
  /* a lease out of range is ignored; a release frees the slot; an
   * announcement makes a slot (with no demand here); bad names are skipped */
  assert_int_equal(apply(&f, idx, 2,
                         "*6\r\n:2\r\n$3\r\n7-1\r\n*3\r\n$19\r\nu9:text:cn-shanghai\r\n$4\r\nu9::\r\n$2\r\n::\r\n"
                         "*1\r\n$5\r\nh/1/x\r\n"
                         "*4\r\n:2000000\r\n:0\r\n:1\r\n:0\r\n*4\r\n:0\r\n:0\r\n:0\r\n:1\r\n"),
                   0);
  assert_string_equal(f.ann_last, "7-1");
  assert_true(atomic_load(&f.slots[idx[0]].share) <= SL_FLEET_PPM);
  assert_int_equal(atomic_load(&f.slots[idx[0]].tag), t0);
  assert_null(sl_fleet_find(&f, tag_of(2)));
  assert_int_equal(atomic_load(&f.stats.releases), 1);
  assert_non_null(s = sl_fleet_find(&f, tag_of(9)));
  assert_int_equal(f.nused, 2);
  char inst[256];
  sl_fleet_instances(&f, inst, sizeof(inst));
  assert_string_equal(inst, "[\"h/1/x\"]");
  /* the released key comes back when asked again (its slot reused) */
  want(&f, 0, 2, 5000);
  sl_fleet_take_wants_test(&f);
  assert_non_null(sl_fleet_find(&f, tag_of(2)));
  assert_int_equal(f.nused, 3);
  sl_fleet_table_free_test(&f);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_table_bound),
      cmocka_unit_test(test_want_ring_bound_and_filter),
      cmocka_unit_test(test_share_by_mode),
      cmocka_unit_test(test_replies),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
