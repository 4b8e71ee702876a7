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

#include "db.h"
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
   * announcement makes a slot (with no demand here); bad names are skipped;
   * the instances are shown by id, without their session */
  assert_int_equal(apply(&f, idx, 2,
                         "*6\r\n:2\r\n$3\r\n7-1\r\n*6\r\n$19\r\nu9:text:cn-shanghai\r\n$1\r\na\r\n"
                         "$4\r\nu9::\r\n$1\r\na\r\n$2\r\n::\r\n$2\r\nan\r\n"
                         "*1\r\n$7\r\nh/1/x#3\r\n"
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

/* The scripts are called by SHA-1 (EVALSHA): FIPS 180's examples, and
 * lengths around the padding's block boundary. */
static void test_sha1(void **state) {
  char h[41];
  (void)state;
  sl_db_sha1_hex("abc", 3, h);
  assert_string_equal(h, "a9993e364706816aba3e25717850c26c9cd0d89d");
  sl_db_sha1_hex("", 0, h);
  assert_string_equal(h, "da39a3ee5e6b4b0d3255bfef95601890afd80709");
  const char *m = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"; /* 56 bytes: two blocks */
  sl_db_sha1_hex(m, strlen(m), h);
  assert_string_equal(h, "84983e441c3bd26ebaae4aa1f95129e5e54670f1");
  char a[1000];
  memset(a, 'a', sizeof a);
  sl_db_sha1_hex(a, 64, h); /* one whole block, then the padding's */
  assert_string_equal(h, "0098ba824b5c16427bd7a1122a5a442a25ec644d");
}

/* n decisions on the key of uid over the last dt_ms, measured. */
static void load(struct sl_fleet *f, unsigned uid, unsigned n, uint64_t now, uint64_t dt_ms) {
  struct sl_fleet_slot *s;
  for (unsigned i = 0; i < n; i++) sl_fleet_share(f, tag_of(uid), 100, &s);
  sl_fleet_measure_test(f, now, dt_ms);
}

/* One key's lease reply: lease, fleet demand, registered (3), state. */
static int lease(struct sl_fleet *f, uint32_t idx, unsigned ppm, unsigned st) {
  char text[160];
  snprintf(text, sizeof text, "*5\r\n:3\r\n$3\r\n1-0\r\n*0\r\n*0\r\n*4\r\n:%u\r\n:90000\r\n:3\r\n:%u\r\n", ppm, st);
  return apply(f, &idx, 1, text);
}

/* When a coordinated key is synced (docs/limits.md, "Redis cost"): a lease
 * counts as long as its instance heartbeats, so a steady key is synced only
 * at the refresh epochs (5 s), a demand move only when it changes the
 * share (above the noise), a nudge from another instance at the next
 * tick; a lost sync is sent again, as it was. */
static void test_due(void **state) {
  struct sl_fleet f;
  (void)state;
  assert_int_equal(sl_fleet_table_init_test(&f, 16, 1), 0);
  want(&f, 0, 1, 0);
  sl_fleet_take_wants_test(&f);
  uint32_t idx = f.used[0];
  uint64_t t = 10000;
  /* 30 requests a second here; new: synced as moved (the others are nudged if that frees share) */
  for (int i = 0; i < 4; i++) load(&f, 1, 3, t += 100, 100);
  assert_int_equal(sl_fleet_due_test(&f, idx, t), '1');
  /* granted 40% (want 37.5%, not cut): steady, not due until the refresh epoch 5 s later */
  assert_int_equal(lease(&f, idx, 400000, 0), 0);
  for (int i = 0; i < 49; i++) {
    load(&f, 1, 3, t += 100, 100);
    assert_int_equal(sl_fleet_due_test(&f, idx, t), 0);
  }
  load(&f, 1, 3, t += 100, 100);
  assert_int_equal(sl_fleet_due_test(&f, idx, t), '0');
  /* noise of a few requests a tick is no move */
  load(&f, 1, 5, t += 100, 100);
  assert_int_equal(sl_fleet_due_test(&f, idx, t), 0);
  load(&f, 1, 2, t += 100, 100);
  assert_int_equal(sl_fleet_due_test(&f, idx, t), 0);
  /* the load moves here (200/s): synced at the next tick, as moved */
  load(&f, 1, 20, t += 100, 100);
  assert_int_equal(sl_fleet_due_test(&f, idx, t), '1');
  /* cut at the water level (contended, capped): more demand changes nothing */
  assert_int_equal(lease(&f, idx, 500000, 4 | 8), 0);
  load(&f, 1, 30, t += 100, 100);
  load(&f, 1, 30, t += 100, 100);
  assert_int_equal(sl_fleet_due_test(&f, idx, t), 0);
  /* another instance's sync nudged it: at the next tick */
  assert_int_equal(apply(&f, NULL, 0,
                         "*4\r\n:3\r\n$3\r\n2-0\r\n*2\r\n$19\r\nu1:text:cn-shanghai\r\n$1\r\nn\r\n*0\r\n"),
                   0);
  assert_int_equal(sl_fleet_due_test(&f, idx, t += 100), '0');
  assert_int_equal(sl_fleet_due_test(&f, idx, t += 100), 0);
  /* the demand falls away while others are cut: it gives back, as moved,
   * once the smoothed demand is a quarter below its lease (in 0.4 s) */
  assert_int_equal(lease(&f, idx, 500000, 4 | 8), 0);
  int ticks = 0, why = 0;
  while (!why && ticks < 10) {
    load(&f, 1, 0, t += 100, 100);
    why = sl_fleet_due_test(&f, idx, t);
    ticks++;
  }
  assert_int_equal(why, '1');
  assert_true(ticks <= 4);
  /* short of its target: again a tick and a half later, as a retry (no nudge) */
  assert_int_equal(lease(&f, idx, 100000, 2), 0);
  assert_int_equal(sl_fleet_due_test(&f, idx, t += 100), 0);
  assert_int_equal(sl_fleet_due_test(&f, idx, t += 100), '3');
  /* a lost reply: again at the next tick, with the flag it had */
  assert_int_equal(apply(&f, &idx, 1, "-ERR busy\r\n"), -1);
  assert_int_equal(sl_fleet_due_test(&f, idx, t += 100), '3');
  /* idle here for 5 s: offered back, then (refused) again only with the
   * refreshes; the demand is none two ticks after the load stops */
  assert_int_equal(lease(&f, idx, 100000, 0), 0);
  load(&f, 1, 5, t += 100, 100);
  load(&f, 1, 5, t += 100, 100);
  uint64_t idle0 = t, last = 0;
  int offers = 0;
  while (t - idle0 < 10000) {
    load(&f, 1, 0, t += 100, 100);
    int w = sl_fleet_due_test(&f, idx, t);
    assert_true(w == 0 || w == '2' || t - idle0 < 5000);
    if (w != '2') continue;
    assert_true(t - idle0 >= 5000);
    assert_true(!last || t - last >= 900); /* refused: again with a refresh (one not synced for a second) */
    last = t;
    offers++;
  }
  assert_true(offers >= 2 && offers <= 4);
  sl_fleet_table_free_test(&f);
}

/* A session's leases count while it heartbeats: alone in the fleet (keys
 * not synced) a new session starts, and the next heartbeat drops the old
 * one from the zset. */
static void test_sessions(void **state) {
  struct sl_fleet f;
  (void)state;
  assert_int_equal(sl_fleet_table_init_test(&f, 16, 1), 0);
  assert_string_equal(f.member, "test/1/00000000#1");
  assert_int_equal(apply(&f, NULL, 0, "*4\r\n:2\r\n$3\r\n1-0\r\n*0\r\n*0\r\n"), 0);
  assert_string_equal(f.member, "test/1/00000000#1");
  assert_int_equal(apply(&f, NULL, 0, "*4\r\n:1\r\n$3\r\n1-0\r\n*0\r\n*0\r\n"), 0);
  assert_string_equal(f.member, "test/1/00000000#2");
  assert_string_equal(f.old_members, "test/1/00000000#1");
  sl_fleet_table_free_test(&f);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_table_bound),
      cmocka_unit_test(test_want_ring_bound_and_filter),
      cmocka_unit_test(test_share_by_mode),
      cmocka_unit_test(test_replies),
      cmocka_unit_test(test_sha1),
      cmocka_unit_test(test_due),
      cmocka_unit_test(test_sessions),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
