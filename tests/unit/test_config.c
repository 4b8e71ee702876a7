/* Unit tests for proxy/config.c: defaults, file, command line precedence,
 * and every rejection path with its message. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "uv_util.h"

static char path[64];

static const char *write_file(const char *text) {
  snprintf(path, sizeof(path), "/tmp/sl_cfg_test_%d.yaml", (int)getpid());
  FILE *f = fopen(path, "w");
  fputs(text, f);
  fclose(f);
  return path;
}

static int load(struct sl_config *c, const char *file, int argc, char **argv, char *err) {
  struct sl_cli cli = {.file = file, .argc = argc, .argv = argv};
  return sl_config_load(c, &cli, err, 256);
}

static void test_defaults_and_cli(void **state) {
  (void)state;
  struct sl_config c;
  char err[256];
  char *argv[] = {"--upstream", "127.0.0.1:9000", "--workers", "3", "--region", "cn-beijing"};
  assert_int_equal(load(&c, NULL, 6, argv, err), 0);
  assert_string_equal(c.listen.text, "127.0.0.1:8080");
  assert_string_equal(c.admin.text, "127.0.0.1:9901");
  assert_string_equal(c.redis, "127.0.0.1:6379");
  assert_string_equal(c.redis_prefix, "sluice:");
  assert_int_equal(c.flush_ms, 1000);
  assert_int_equal(c.max_body_bytes, 8u << 20);
  assert_int_equal(c.workers, 3);
  assert_string_equal(c.region, "cn-beijing");
  assert_int_equal(c.n_upstream, 1);
  assert_int_equal(c.n_upstream_llm, 0);
  char *tz[] = {"--upstream", "127.0.0.1:9000", "--billing-tz-offset-min", "-480", "--time-offset-s", "-86400"};
  assert_int_equal(load(&c, NULL, 6, tz, err), 0);
  assert_int_equal(c.billing_tz_offset_min, -480);
  assert_int_equal(c.time_offset_s, -86400);
  assert_int_equal(c.metering_on, 1);
  assert_string_equal(c.spool_dir, "/var/lib/sluice");
}

static void test_file_then_cli(void **state) {
  (void)state;
  struct sl_config c;
  char err[256];
  const char *f = write_file(
      "listen: 127.0.0.1:18080\n"
      "upstream: [127.0.0.1:9001, 127.0.0.1:9002]\n"
      "upstream_llm:\n  - 127.0.0.1:9100\n"
      "max-body-bytes: 1024\n"
      "redis: unix:/run/redis.sock\n");
  assert_int_equal(load(&c, f, 0, NULL, err), 0);
  assert_int_equal(c.n_upstream, 2);
  assert_string_equal(c.upstream[1].text, "127.0.0.1:9002");
  assert_int_equal(c.n_upstream_llm, 1);
  assert_int_equal(c.max_body_bytes, 1024);
  assert_string_equal(c.redis, "unix:/run/redis.sock");
  /* The command line replaces a list wholesale and overrides scalars. */
  char *argv[] = {"--upstream", "127.0.0.1:9003", "--upstream", "127.0.0.1:9004", "--listen", "127.0.0.1:18081"};
  assert_int_equal(load(&c, f, 6, argv, err), 0);
  assert_int_equal(c.n_upstream, 2);
  assert_string_equal(c.upstream[0].text, "127.0.0.1:9003");
  assert_string_equal(c.upstream[1].text, "127.0.0.1:9004");
  assert_string_equal(c.listen.text, "127.0.0.1:18081");
  assert_int_equal(c.n_upstream_llm, 1);
  unlink(f);
}

static void expect_error(const char *yaml, int argc, char **argv, const char *needle) {
  struct sl_config c;
  char err[256] = "";
  const char *f = yaml ? write_file(yaml) : NULL;
  assert_int_equal(load(&c, f, argc, argv, err), -1);
  if (!strstr(err, needle)) fail_msg("error '%s' does not mention '%s'", err, needle);
  if (f) unlink(f);
}

static void test_rejections(void **state) {
  (void)state;
  char *up[] = {"--upstream", "127.0.0.1:9000"};
  expect_error(NULL, 0, NULL, "no upstream");
  expect_error("upstream: 127.0.0.1:9000\nbogus: 1\n", 0, NULL, ":2: unknown option 'bogus'");
  expect_error("upstream: 127.0.0.1:9000\nworkers: zero\n", 0, NULL, ":2: workers: 'zero' is not an integer");
  expect_error("upstream: 127.0.0.1:9000\nworkers: 0\n", 0, NULL, "workers: '0' is not an integer in [1, 256]");
  expect_error("upstream: 127.0.0.1:9000\nworkers: -1\n", 0, NULL, "workers");
  expect_error("upstream: 127.0.0.1:99999\n", 0, NULL, "upstream: '127.0.0.1:99999' is not a usable HOST:PORT");
  expect_error("upstream: nohostport\n", 0, NULL, "not a usable HOST:PORT");
  expect_error("upstream: [[b]]\n", 0, NULL, "list items must be HOST:PORT strings");
  expect_error("listen: [127.0.0.1:1, 127.0.0.1:2]\n", 0, NULL, "listen takes a single value");
  expect_error("- just\n- a list\n", 0, NULL, "top level must be a mapping");
  expect_error("upstream: 127.0.0.1:9000\nregion: [unterminated\n", 0, NULL, ":");
  expect_error("upstream: 127.0.0.1:9000\nregion: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n", 0, NULL,
               "region: value longer than 63 bytes");
  expect_error("upstream: 127.0.0.1:9000\nmetering: maybe\n", 0, NULL, "metering: 'maybe' is neither 'on' nor 'off'");
  expect_error("upstream: 127.0.0.1:9000\nadmission: no\n", 0, NULL, "admission: 'no' is neither 'on' nor 'off'");
  expect_error("upstream: 127.0.0.1:9000\nlimiter-full: ajar\n", 0, NULL, "limiter-full: 'ajar'");
  expect_error("upstream: 127.0.0.1:9000\nredis: nowhere\n", 0, NULL, "redis: 'nowhere' is neither HOST:PORT");
  expect_error("upstream: 127.0.0.1:9000\nbilling-tz-offset-min: -721\n", 0, NULL,
               "billing-tz-offset-min: '-721' is not an integer in [-720, 840]");
  expect_error("upstream: 127.0.0.1:9000\nbilling-tz-offset-min: 841\n", 0, NULL, "[-720, 840]");
  char *bad_cli[] = {"--upstream", "127.0.0.1:9000", "--max-conns", "1x"};
  expect_error(NULL, 4, bad_cli, "max-conns: '1x' is not an integer");
  (void)up;
  struct sl_config c;
  char err[256];
  struct sl_cli cli = {.file = "/nonexistent/sluice.yaml", .argc = 2, .argv = up};
  assert_int_equal(sl_config_load(&c, &cli, err, sizeof(err)), -1);
  assert_non_null(strstr(err, "No such file"));
}

/* A --redis URL scheme + 16 hosts + tail is taken, one with 17 refused with
 * needle in the message. */
static void host_bound(const char *scheme, const char *tail, const char *needle) {
  struct sl_config c;
  char err[256], yaml[1200];
  int n = snprintf(yaml, sizeof(yaml), "upstream: 127.0.0.1:9000\nredis: %s", scheme);
  for (int i = 0; i < 17; i++) {
    n += snprintf(yaml + n, sizeof(yaml) - (size_t)n, "%s10.0.0.%d:7000", i ? "," : "", i);
    if (i == 15) {
      char ok[1300];
      snprintf(ok, sizeof(ok), "%.1200s%.32s\n", yaml, tail);
      assert_int_equal(load(&c, write_file(ok), 0, NULL, err), 0);
      unlink(path);
    }
  }
  snprintf(yaml + n, sizeof(yaml) - (size_t)n, "%s\n", tail);
  expect_error(yaml, 0, NULL, needle);
}

/* --redis sentinel://... (SPEC 10): in the file and on the command line,
 * with its bounds, and every malformed form refused with what is wrong. */
static void test_redis_sentinel(void **state) {
  (void)state;
  struct sl_config c;
  char err[256];
  const char *f = write_file("upstream: 127.0.0.1:9000\n"
                             "redis: sentinel://127.0.0.1:26379,[::1]:26380,s3.example:26381/my-master.1\n"
                             "redis-wait-replicas: 0\n");
  assert_int_equal(load(&c, f, 0, NULL, err), 0);
  assert_string_equal(c.redis, "sentinel://127.0.0.1:26379,[::1]:26380,s3.example:26381/my-master.1");
  assert_int_equal(c.redis_wait_replicas, 0);
  assert_int_equal(c.redis_wait_ms, 1000);
  unlink(f);
  char *cli[] = {"--upstream", "127.0.0.1:9000", "--redis", "sentinel://10.0.0.1:5000/m", "--redis-wait-ms", "250"};
  assert_int_equal(load(&c, NULL, 6, cli, err), 0);
  assert_int_equal(c.redis_wait_replicas, -1); /* auto */
  assert_int_equal(c.redis_wait_ms, 250);
  /* 16 sentinels are taken, a 17th is not */
  host_bound("sentinel://", "/m", "names more than 16 sentinels");
  const char *up = "upstream: 127.0.0.1:9000\nredis: ";
  static const struct {
    const char *value, *needle;
  } bad[] = {
      {"sentinel://127.0.0.1:26379", "names no master (sentinel://HOST:PORT[,HOST:PORT...]/MASTER)"},
      {"sentinel://127.0.0.1:26379/", "names no master"},
      {"sentinel:///m", "names no sentinel"},
      {"sentinel://127.0.0.1:26379,/m", "has an empty sentinel address"},
      {"sentinel://a:1,,b:2/m", "has an empty sentinel address"},
      {"sentinel://127.0.0.1/m", "sentinel '127.0.0.1' is not HOST:PORT"},
      {"sentinel://127.0.0.1:0/m", "sentinel '127.0.0.1:0' is not HOST:PORT"},
      {"sentinel://127.0.0.1:70000/m", "is not HOST:PORT"},
      {"sentinel://unix:/tmp/s.sock/m", "is not HOST:PORT"},
      {"sentinel://127.0.0.1:26379/my master", "the master name holds ' '"},
      {"sentinel://127.0.0.1:26379/a/b", "sentinel '127.0.0.1:26379/a' is not HOST:PORT"},
      {"sentinel://127.0.0.1:26379/m\\x01", "the master name holds"},
      {"sentinel://127.0.0.1:26379/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
       "the master name is longer than 64 bytes"},
      {"redis://127.0.0.1:6379", "the scheme 'redis://' is not supported"},
      {"127.0.0.1:", "is neither HOST:PORT, unix:PATH, sentinel://"},
      {"cluster://", "names no cluster node (cluster://HOST:PORT[,HOST:PORT...])"},
      {"cluster://127.0.0.1:7000,", "has an empty cluster node address"},
      {"cluster://a:1,,b:2", "has an empty cluster node address"},
      {"cluster://127.0.0.1", "cluster node '127.0.0.1' is not HOST:PORT"},
      {"cluster://127.0.0.1:0", "is not HOST:PORT"},
      {"cluster://unix:/tmp/r.sock", "cluster node 'unix:/tmp/r.sock' is not HOST:PORT"},
      {"cluster://127.0.0.1:7000/m", "cluster node '127.0.0.1:7000/m' is not HOST:PORT"},
  };
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    char y[512];
    snprintf(y, sizeof(y), "%s'%s'\n", up, bad[i].value);
    expect_error(y, 0, NULL, bad[i].needle);
  }
  /* cluster://: seeds as sentinels are, 16 at most */
  char *cl[] = {"--upstream", "127.0.0.1:9000", "--redis", "cluster://127.0.0.1:7000,[::1]:7001,n3.example:7002",
                "--admission", "off"};
  assert_int_equal(load(&c, NULL, 6, cl, err), 0);
  assert_string_equal(c.redis, "cluster://127.0.0.1:7000,[::1]:7001,n3.example:7002");
  host_bound("cluster://", "\nadmission: off", "names more than 16 cluster nodes");
  /* the directory and the global limits route by slot: admission on, global limits on (the default) */
  char *cl_adm[] = {"--upstream", "127.0.0.1:9000", "--redis", "cluster://127.0.0.1:7000"};
  assert_int_equal(load(&c, NULL, 4, cl_adm, err), 0);
  assert_true(c.admission_on && c.global_limits);
  char *cl_dir[] = {"--upstream", "127.0.0.1:9000", "--redis", "cluster://127.0.0.1:7000", "--global-limits", "off"};
  assert_int_equal(load(&c, NULL, 6, cl_dir, err), 0);
  char *wait_bad[] = {"--upstream", "127.0.0.1:9000", "--redis-wait-replicas", "-2"};
  expect_error(NULL, 4, wait_bad, "redis-wait-replicas: '-2' is not an integer in [-1, 16]");
  char *wait_ms_bad[] = {"--upstream", "127.0.0.1:9000", "--redis-wait-ms", "0"};
  expect_error(NULL, 4, wait_ms_bad, "redis-wait-ms: '0' is not an integer in [1, 600000]");
}

static void test_upstream_bound(void **state) {
  (void)state;
  char yaml[4096] = "upstream:\n";
  for (int i = 0; i <= SL_MAX_UPSTREAMS; i++) {
    char line[40];
    snprintf(line, sizeof(line), "  - 127.0.0.1:%d\n", 9000 + i);
    strcat(yaml, line);
  }
  expect_error(yaml, 0, NULL, "more than 32 addresses");
}

static void test_addr_parse(void **state) {
  (void)state;
  struct sl_addr a;
  assert_int_equal(sl_addr_parse(&a, "[::1]:8080"), 0);
  assert_int_equal(a.sa.ss_family, AF_INET6);
  assert_int_equal(sl_addr_parse(&a, "localhost:80"), 0);
  assert_int_equal(sl_addr_parse(&a, ":80"), -1);
  assert_int_equal(sl_addr_parse(&a, "127.0.0.1:"), -1);
  assert_int_equal(sl_addr_parse(&a, "127.0.0.1:0"), -1);
  assert_int_equal(sl_addr_parse(&a, "[::1]8080"), -1);
}

static void test_cpu_list(void **state) {
  (void)state;
  cpu_set_t c;
  assert_int_equal(sl_cpu_list_parse("0-2,5,7", &c, 8), 0);
  assert_int_equal(CPU_COUNT(&c), 5);
  assert_true(CPU_ISSET(0, &c) && CPU_ISSET(2, &c) && CPU_ISSET(5, &c) && CPU_ISSET(7, &c));
  assert_false(CPU_ISSET(3, &c) || CPU_ISSET(6, &c));
  assert_int_equal(sl_cpu_list_parse("3", &c, 4), 0);
  assert_int_equal(CPU_COUNT(&c), 1);
  const char *bad[] = {"", "4", "0-4", "2-1", "-1", "1-", "1,", ",1", "1,,2", "a", "1 2", "0x1", "99999999999999999999"};
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) assert_int_equal(sl_cpu_list_parse(bad[i], &c, 4), -1);
}

static void test_cli_parse(void **state) {
  (void)state;
  struct sl_cli cli;
  char *ok[] = {"sluice", "-c", "f.yaml", "-t", "--workers", "2"};
  assert_int_equal(sl_cli_parse(&cli, 6, ok), SL_CLI_RUN);
  assert_string_equal(cli.file, "f.yaml");
  assert_int_equal(cli.check_only, 1);
  assert_int_equal(cli.argc, 2);
  free(cli.argv);
  char *unknown[] = {"sluice", "--frobnicate", "1"};
  assert_int_equal(sl_cli_parse(&cli, 3, unknown), SL_CLI_EXIT_ERR);
  free(cli.argv);
  char *missing[] = {"sluice", "--workers"};
  assert_int_equal(sl_cli_parse(&cli, 2, missing), SL_CLI_EXIT_ERR);
  free(cli.argv);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_defaults_and_cli), cmocka_unit_test(test_file_then_cli),
      cmocka_unit_test(test_rejections),       cmocka_unit_test(test_upstream_bound),
      cmocka_unit_test(test_addr_parse),       cmocka_unit_test(test_cli_parse),
      cmocka_unit_test(test_redis_sentinel),   cmocka_unit_test(test_cpu_list),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
