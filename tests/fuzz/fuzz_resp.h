/* RESP from fuzz bytes for the harnesses of reply parsers: a hiredis
 * reader guarded as sluice's connections are (proxy/redis/redis_uv.h), so
 * that an array header of millions of elements is refused as on a real
 * connection instead of allocating gigabytes before any element comes. */
#ifndef SL_FUZZ_RESP_H
#define SL_FUZZ_RESP_H

#include <hiredis/hiredis.h>
#include <stdlib.h>

#include "redis_uv.h"

static redisReplyObjectFunctions fz_guarded_fn;
static void *(*fz_hiredis_array)(const redisReadTask *, int);
static void *fz_guarded_array(const redisReadTask *t, int elements) {
  return sl_redis_array_ok(elements) ? fz_hiredis_array(t, elements) : NULL;
}

/* A reader (freed with redisReaderFree) with the guard; aborts when out of
 * memory. */
static inline redisReader *fz_guarded_reader(void) {
  redisReader *rd = redisReaderCreate();
  if (!rd) abort();
  if (!fz_guarded_fn.createArray) {
    fz_guarded_fn = *rd->fn;
    fz_hiredis_array = rd->fn->createArray;
    fz_guarded_fn.createArray = fz_guarded_array;
  }
  rd->fn = &fz_guarded_fn;
  return rd;
}

#endif
