/* Fuzzes what reads the replies to the metering flusher's commands (a
 * cluster's scripts, one server's marker GET and transaction EXEC, PING):
 * hiredis 0.14's reply reader, as the flusher's connection uses it, and the
 * sl_flusher_*_kind functions, which decide from a reply whether a batch
 * was applied, was a duplicate, or must be sent again. Byte 0 chooses how
 * the rest is fed (in one piece, or in pieces of 1-8 bytes); every reply
 * the reader builds is classified. Never a crash or a leak, and the
 * classification is the one the flusher's exactly-once rests on: a script's
 * applied only for the integer 1 and duplicate only for 0; a marker found
 * only as a string; a transaction applied only as an array of the size
 * sent. */
#include <hiredis/hiredis.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "flusher.h"
#include "fuzz.h"
#include "redis_uv.h"

static void classify(const redisReply *r) {
  int k = sl_flusher_reply_kind(r);
  if (r->type == REDIS_REPLY_INTEGER && r->integer == 1)
    FZ_CHECK(k == SL_REPLY_APPLIED);
  else if (r->type == REDIS_REPLY_INTEGER && r->integer == 0)
    FZ_CHECK(k == SL_REPLY_DUPLICATE);
  else
    FZ_CHECK(k == SL_REPLY_ERROR);
  /* one server: the marker's GET (applied only when a string is there),
   * the transaction's EXEC (applied only for an array of a reply per
   * command sent; nil: read the marker again) */
  k = sl_flusher_marker_kind(r);
  FZ_CHECK(r->type == REDIS_REPLY_NIL ? k == SL_REPLY_NOT_YET
           : r->type == REDIS_REPLY_STRING ? k == SL_REPLY_DUPLICATE
                                           : k == SL_REPLY_ERROR);
  size_t cmds = r->type == REDIS_REPLY_ARRAY && r->elements % 2 ? r->elements : 3;
  k = sl_flusher_exec_kind(r, cmds);
  FZ_CHECK(r->type == REDIS_REPLY_NIL ? k == SL_REPLY_AGAIN
           : r->type == REDIS_REPLY_ARRAY && r->elements == cmds ? k == SL_REPLY_APPLIED
                                                                 : k == SL_REPLY_ERROR);
  /* nested replies are never taken for a batch's answer */
  if (r->type == REDIS_REPLY_ARRAY)
    for (size_t i = 0; i < r->elements; i++)
      if (r->element[i]) FZ_CHECK(sl_flusher_reply_kind(r->element[i]) != SL_REPLY_LOST);
}

/* The reader as sluice's connections have it: redis_uv.c's guard refuses
 * an array header over SL_REDIS_MAX_ELEMENTS before hiredis allocates it. */
static redisReplyObjectFunctions guarded;
static void *(*hiredis_array)(const redisReadTask *, int);
static void *guarded_array(const redisReadTask *t, int elements) {
  return sl_redis_array_ok(elements) ? hiredis_array(t, elements) : NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  FZ_CHECK(sl_flusher_reply_kind(NULL) == SL_REPLY_LOST);
  FZ_CHECK(sl_flusher_marker_kind(NULL) == SL_REPLY_LOST);
  FZ_CHECK(sl_flusher_exec_kind(NULL, 3) == SL_REPLY_LOST);
  if (size < 1) return 0;
  unsigned piece = data[0] & 7 ? (data[0] & 7) : 0; /* 0: in one piece */
  const char *p = (const char *)data + 1;
  size_t n = size - 1;
  redisReader *rd = redisReaderCreate();
  if (!rd) abort();
  if (!guarded.createArray) {
    guarded = *rd->fn;
    hiredis_array = rd->fn->createArray;
    guarded.createArray = guarded_array;
  }
  rd->fn = &guarded;
  int broken = 0;
  while (n && !broken) {
    size_t k = piece && piece < n ? piece : n;
    char *chunk = fz_dup(p, k); /* the reader copies it; ASan sees a read past it */
    if (redisReaderFeed(rd, chunk, k) != REDIS_OK) broken = 1;
    free(chunk);
    p += k;
    n -= k;
    for (;;) {
      void *reply = NULL;
      if (redisReaderGetReply(rd, &reply) != REDIS_OK) { /* a protocol error: the flusher drops the connection */
        broken = 1;
        break;
      }
      if (!reply) break;
      classify(reply);
      freeReplyObject(reply);
    }
  }
  redisReaderFree(rd);
  return 0;
}
