/* Fuzzes what takes the replies to the global limits' sync script
 * (proxy/fleet/fleet.c): the reply's shape, the announced key names (built
 * back into bucket keys and inserted), and each key's lease. Byte 0 says
 * how many of the table's keys the sync named (0-3); the rest is RESP fed
 * to hiredis's reader (as the fleet's connection has it) and every reply is
 * applied. Never a crash or a leak, and the table stays sound: no share
 * above the whole limit, no more keys than the cap, every slot in use
 * found by its tag, the mode and default share in range. */
#include <hiredis/hiredis.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fleet.h"
#include "fuzz.h"
#include "limiter.h"
#include "redis_uv.h"

#define CAP 6

static redisReplyObjectFunctions guarded;
static void *(*hiredis_array)(const redisReadTask *, int);
static void *guarded_array(const redisReadTask *t, int elements) {
  return sl_redis_array_ok(elements) ? hiredis_array(t, elements) : NULL;
}

static void check(struct sl_fleet *f) {
  uint64_t w = atomic_load(&f->word);
  FZ_CHECK((uint32_t)w >= 1 && (uint32_t)w <= SL_FLEET_PPM);
  FZ_CHECK(sl_fleet_mode_of(w) >= SL_FLEET_SHARED && sl_fleet_mode_of(w) <= SL_FLEET_JOINING);
  FZ_CHECK(f->nused <= f->cap);
  for (uint32_t i = 0; i < f->nused; i++) {
    struct sl_fleet_slot *s = &f->slots[f->used[i]];
    uint64_t tag = atomic_load(&s->tag);
    FZ_CHECK(tag != 0 && tag != SL_FLEET_TOMB);
    FZ_CHECK(sl_fleet_find(f, tag) == s);
    FZ_CHECK(atomic_load(&s->share) <= SL_FLEET_PPM);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  /* One table for the whole run (made once, emptied per input): making
   * one costs more than most inputs. */
  static struct sl_fleet f;
  static int made;
  if (!made) {
    if (sl_fleet_table_init_test(&f, CAP, 1) != 0) abort();
    made = 1;
  }
  sl_fleet_table_reset_test(&f);
  /* three keys coordinated here, as workers would ask */
  const char *keys[] = {"u1\x1ftext\x1f" "cn-shanghai", "u2\x1fimage\x1f" "cn-beijing", "u3\x1fguard\x1f" "ap-southeast-1"};
  uint32_t idx[3];
  for (int i = 0; i < 3; i++) {
    size_t kl = strlen(keys[i]);
    sl_fleet_want(&f, 0, lim_hash(keys[i], kl), keys[i], kl, 100, 0);
  }
  sl_fleet_take_wants_test(&f);
  FZ_CHECK(f.nused == 3);
  for (int i = 0; i < 3; i++) idx[i] = f.used[i];
  uint32_t n = data[0] & 3;
  redisReader *rd = redisReaderCreate();
  if (!rd) abort();
  if (!guarded.createArray) {
    guarded = *rd->fn;
    hiredis_array = rd->fn->createArray;
    guarded.createArray = guarded_array;
  }
  rd->fn = &guarded;
  char *chunk = fz_dup(data + 1, size - 1);
  if (redisReaderFeed(rd, chunk, size - 1) == REDIS_OK) {
    void *reply = NULL;
    while (redisReaderGetReply(rd, &reply) == REDIS_OK && reply) {
      sl_fleet_apply_reply_test(&f, idx, n, reply);
      freeReplyObject(reply);
      reply = NULL;
      check(&f);
    }
  }
  free(chunk);
  redisReaderFree(rd);
  return 0;
}
