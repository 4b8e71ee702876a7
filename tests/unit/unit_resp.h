/* A hiredis reply from RESP text, for unit tests of reply handling (include
 * after cmocka.h). */
#ifndef SL_UNIT_RESP_H
#define SL_UNIT_RESP_H

#include <hiredis/hiredis.h>
#include <string.h>

static inline redisReply *resp(const char *text) {
  redisReader *rd = redisReaderCreate();
  void *r = NULL;
  assert_int_equal(redisReaderFeed(rd, text, strlen(text)), REDIS_OK);
  assert_int_equal(redisReaderGetReply(rd, &r), REDIS_OK);
  assert_non_null(r);
  redisReaderFree(rd);
  return r;
}

#endif
