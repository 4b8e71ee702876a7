/* Unit tests for proxy/redis/addr.c and sentinel.c: the --redis URL as
 * parsed, and what sentinels' and ROLE's replies are taken to mean (replies
 * built by hand as hiredis builds them). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include "addr.h"
#include "sentinel.h"

static void test_url_parse(void **state) {
  (void)state;
  struct sl_redis_url u;
  char err[256];
  assert_int_equal(sl_redis_url_parse(&u, "127.0.0.1:6379", err, sizeof(err)), 0);
  assert_int_equal(u.kind, SL_REDIS_SERVER);
  assert_string_equal(u.server.host, "127.0.0.1");
  assert_int_equal(u.server.port, 6379);
  assert_int_equal(sl_redis_url_parse(&u, "unix:/run/redis.sock", err, sizeof(err)), 0);
  assert_string_equal(u.server.host, "/run/redis.sock");
  assert_int_equal(u.server.port, 0);
  assert_int_equal(sl_redis_url_parse(&u, "sentinel://127.0.0.1:26379,[::1]:26380,s3:1/mymaster", err, sizeof(err)), 0);
  assert_int_equal(u.kind, SL_REDIS_SENTINEL);
  assert_int_equal(u.n_hosts, 3);
  assert_string_equal(u.hosts[0].host, "127.0.0.1");
  assert_int_equal(u.hosts[0].port, 26379);
  assert_string_equal(u.hosts[1].host, "::1");
  assert_int_equal(u.hosts[1].port, 26380);
  assert_string_equal(u.hosts[2].host, "s3");
  assert_string_equal(u.master, "mymaster");
  /* the bound on the master name is inclusive */
  char url[128] = "sentinel://h:1/";
  memset(url + strlen(url), 'm', SL_REDIS_MASTER_MAX);
  assert_int_equal(sl_redis_url_parse(&u, url, err, sizeof(err)), 0);
  strcat(url, "m");
  assert_int_equal(sl_redis_url_parse(&u, url, err, sizeof(err)), -1);
  assert_non_null(strstr(err, "longer than 64 bytes"));
  assert_int_equal(sl_redis_url_parse(&u, "sentinel://h:1", err, sizeof(err)), -1);
  assert_non_null(strstr(err, "redis: 'sentinel://h:1' names no master"));
  assert_int_equal(sl_redis_url_parse(&u, "redis://h:1", err, 8), -1); /* a short err buffer: cut, terminated */
  assert_int_equal(strlen(err), 7);
  /* cluster://: the seeds in order */
  assert_int_equal(sl_redis_url_parse(&u, "cluster://127.0.0.1:7000,[::1]:7001", err, sizeof(err)), 0);
  assert_int_equal(u.kind, SL_REDIS_CLUSTER);
  assert_int_equal(u.n_hosts, 2);
  assert_int_equal(u.hosts[1].port, 7001);
  assert_string_equal(u.hosts[1].host, "::1"); /* and the first as a sentinel's above */
  assert_int_equal(sl_redis_url_parse(&u, "cluster://", err, sizeof(err)), -1);
  assert_non_null(strstr(err, "names no cluster node"));
}

static redisReply *str(int type, const char *s) {
  redisReply *r = calloc(1, sizeof(*r));
  r->type = type;
  r->str = strdup(s);
  r->len = strlen(s);
  return r;
}

static redisReply *arr(size_t n, ...) {
  redisReply *r = calloc(1, sizeof(*r));
  r->type = REDIS_REPLY_ARRAY;
  r->elements = n;
  r->element = calloc(n ? n : 1, sizeof(*r->element));
  va_list ap;
  va_start(ap, n);
  for (size_t i = 0; i < n; i++) r->element[i] = va_arg(ap, redisReply *);
  va_end(ap);
  return r;
}

static redisReply *num(long long v) {
  redisReply *r = calloc(1, sizeof(*r));
  r->type = REDIS_REPLY_INTEGER;
  r->integer = v;
  return r;
}

#define S(s) str(REDIS_REPLY_STRING, s)

static void test_master_reply(void **state) {
  (void)state;
  struct sl_redis_hostport m;
  char why[200];
  redisReply *r = arr(2, S("127.0.0.1"), S("6380"));
  assert_int_equal(sl_sentinel_master_reply(r, &m, why, sizeof(why)), 0);
  assert_string_equal(m.host, "127.0.0.1");
  assert_int_equal(m.port, 6380);
  freeReplyObject(r);
  redisReply nil = {.type = REDIS_REPLY_NIL};
  assert_int_equal(sl_sentinel_master_reply(&nil, &m, why, sizeof(why)), -1);
  assert_non_null(strstr(why, "does not know the master"));
  r = str(REDIS_REPLY_ERROR, "ERR unknown command 'SENTINEL'");
  assert_int_equal(sl_sentinel_master_reply(r, &m, why, sizeof(why)), -1);
  assert_non_null(strstr(why, "ERR unknown command"));
  freeReplyObject(r);
  r = arr(2, S("127.0.0.1"), S("0"));
  assert_int_equal(sl_sentinel_master_reply(r, &m, why, sizeof(why)), -1);
  freeReplyObject(r);
  r = arr(2, S(""), S("6379"));
  assert_int_equal(sl_sentinel_master_reply(r, &m, why, sizeof(why)), -1);
  freeReplyObject(r);
  r = arr(1, S("127.0.0.1"));
  assert_int_equal(sl_sentinel_master_reply(r, &m, why, sizeof(why)), -1);
  assert_non_null(strstr(why, "not [ip, port]"));
  freeReplyObject(r);
  assert_int_equal(sl_sentinel_master_reply(NULL, &m, why, sizeof(why)), -1);
}

static void test_role_reply(void **state) {
  (void)state;
  int n = -1;
  char why[200];
  redisReply *r = arr(3, S("master"), num(100), arr(1, arr(3, S("127.0.0.1"), S("6380"), S("100"))));
  assert_int_equal(sl_redis_role_reply(r, &n, why, sizeof(why)), 1);
  assert_int_equal(n, 1);
  freeReplyObject(r);
  r = arr(3, S("master"), num(0), arr(0));
  assert_int_equal(sl_redis_role_reply(r, &n, why, sizeof(why)), 1);
  assert_int_equal(n, 0);
  freeReplyObject(r);
  r = arr(5, S("slave"), S("127.0.0.1"), num(6379), S("connected"), num(100));
  assert_int_equal(sl_redis_role_reply(r, &n, why, sizeof(why)), 0);
  assert_string_equal(why, "ROLE says slave");
  freeReplyObject(r);
  r = arr(2, S("sentinel"), arr(1, S("mymaster")));
  assert_int_equal(sl_redis_role_reply(r, &n, why, sizeof(why)), 0);
  freeReplyObject(r);
  r = str(REDIS_REPLY_ERROR, "NOPERM");
  assert_int_equal(sl_redis_role_reply(r, &n, why, sizeof(why)), -1);
  assert_non_null(strstr(why, "NOPERM"));
  freeReplyObject(r);
  r = arr(2, S("master"), num(0)); /* no list */
  assert_int_equal(sl_redis_role_reply(r, &n, why, sizeof(why)), -1);
  freeReplyObject(r);
  r = str(REDIS_REPLY_STATUS, "PONG");
  assert_int_equal(sl_redis_role_reply(r, &n, why, sizeof(why)), -1);
  freeReplyObject(r);
}

static void test_switch_msg(void **state) {
  (void)state;
  struct sl_redis_hostport m;
  redisReply *r = arr(3, S("message"), S("+switch-master"), S("mymaster 127.0.0.1 6379 127.0.0.2 6380"));
  assert_int_equal(sl_sentinel_switch_msg(r, "mymaster", &m), 1);
  assert_string_equal(m.host, "127.0.0.2");
  assert_int_equal(m.port, 6380);
  assert_int_equal(sl_sentinel_switch_msg(r, "other", &m), 0);
  assert_int_equal(sl_sentinel_switch_msg(r, "mymaste", &m), 0);
  freeReplyObject(r);
  static const char *const bad[] = {"mymaster 127.0.0.1 6379 127.0.0.2", "mymaster 127.0.0.1 6379 127.0.0.2 6380 x",
                                    "mymaster 127.0.0.1 6379 127.0.0.2 0", "mymaster 127.0.0.1 6379  6380", ""};
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    r = arr(3, S("message"), S("+switch-master"), S(bad[i]));
    assert_int_equal(sl_sentinel_switch_msg(r, "mymaster", &m), 0);
    freeReplyObject(r);
  }
  r = arr(3, S("subscribe"), S("+switch-master"), num(1));
  assert_int_equal(sl_sentinel_switch_msg(r, "mymaster", &m), 0);
  freeReplyObject(r);
  r = arr(3, S("message"), S("+sdown"), S("mymaster 127.0.0.1 6379 127.0.0.2 6380"));
  assert_int_equal(sl_sentinel_switch_msg(r, "mymaster", &m), 0);
  freeReplyObject(r);
  assert_int_equal(sl_sentinel_switch_msg(NULL, "mymaster", &m), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_url_parse),
      cmocka_unit_test(test_master_reply),
      cmocka_unit_test(test_role_reply),
      cmocka_unit_test(test_switch_msg),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
