/* Unit tests for proxy/redis/cluster (Redis Cluster routing without I/O):
 * hash slots against values a real server gave, the CLUSTER SLOTS parser
 * with every reason it refuses a reply (and the old map kept each time),
 * MOVED / ASK parsing with its bounds, the error classes, and the cluster
 * form of the per-account key names (SPEC 10). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "cluster.h"
#include "keys.h"
#include "unit_resp.h"


static unsigned slot_of(const char *k) { return sl_cluster_key_slot(k, strlen(k)); }

static void test_crc16(void **state) {
  (void)state;
  /* the CRC-16/XMODEM check value, and the one Redis's cluster spec gives */
  assert_int_equal(sl_cluster_crc16("123456789", 9), 0x31c3);
  assert_int_equal(sl_cluster_crc16("", 0), 0);
  assert_int_equal(sl_cluster_crc16(NULL, 0), 0);
}

/* Every value below is what redis-server 7.0.15 (Debian 12) answered to
 * CLUSTER KEYSLOT: a throwaway `redis-server --port P --bind 127.0.0.1
 * --cluster-enabled yes --cluster-config-file /tmp/x/nodes.conf`, then
 * `redis-cli -p P CLUSTER KEYSLOT <key>` (the binary keys through
 * `printf '...' | redis-cli -p P -x CLUSTER KEYSLOT`). */
static void test_key_slot(void **state) {
  (void)state;
  static const struct {
    const char *key;
    unsigned slot;
  } known[] = {
      {"", 0},
      {"123456789", 12739},
      {"foo", 12182},
      {"bar", 5061},
      {"hello world", 15332},
      /* hash tags: the first '{', the first '}' after it, not empty */
      {"{user1000}.following", 3443},
      {"{user1000}.followers", 3443},
      {"foo{}{bar}", 8363},    /* "{}" is no tag: the whole key */
      {"foo{{bar}}zap", 4015}, /* tag "{bar" */
      {"foo{bar}{zap}", 5061}, /* tag "bar", as "bar" */
      {"{}", 15257},
      {"{", 4092},
      {"}", 12090},
      {"a{b", 13340},
      {"a}b{c}", 7365}, /* a '}' before the '{' does not count */
      {"{a", 10276},
      {"x{}y{z}", 15453}, /* the first '{' has an empty tag: no tag at all */
      /* sluice's names: the cluster form shares the UID's slot */
      {"usage:2024-01-01:{42}", 8000},
      {"42", 8000},
      {"sluice:usage:20240101:{u123}", 10594},
      {"{u123}", 10594},
      {"u123", 10594},
      {"sluice:usage:20240101:u123", 10477},
  };
  for (size_t i = 0; i < sizeof known / sizeof known[0]; i++) {
    if (slot_of(known[i].key) != known[i].slot)
      fail_msg("slot of '%s': %u, want %u", known[i].key, slot_of(known[i].key), known[i].slot);
  }
  assert_int_equal(sl_cluster_key_slot("\xff\x00" "a", 3), 13284);
  assert_int_equal(sl_cluster_key_slot("a\x00{\xff}", 5), 7920); /* a one-byte tag */
  assert_int_equal(sl_cluster_key_slot(NULL, 0), 0);
  /* only len bytes count: the tag's '}' beyond len is not seen */
  assert_int_equal(sl_cluster_key_slot("{user1000}", 9), slot_of("{user1000"));
}

/* ---- the slot map ---- */

/* Redis 7's shape: [start, end, [ip, port, id, [metadata]], replica...] */
#define SLOTS3                                                                                            \
  "*3\r\n"                                                                                                \
  "*4\r\n:0\r\n:5460\r\n"                                                                                 \
  "*4\r\n$9\r\n127.0.0.1\r\n:7000\r\n$40\r\naaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n*0\r\n"            \
  "*4\r\n$9\r\n127.0.0.1\r\n:7003\r\n$40\r\ndddddddddddddddddddddddddddddddddddddddd\r\n*0\r\n"            \
  "*3\r\n:5461\r\n:10922\r\n"                                                                             \
  "*4\r\n$9\r\n127.0.0.1\r\n:7001\r\n$40\r\nbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\r\n"                    \
  "*2\r\n$8\r\nhostname\r\n$5\r\nnode1\r\n"                                                              \
  "*3\r\n:10923\r\n:16383\r\n"                                                                            \
  "*3\r\n$3\r\n::1\r\n:7002\r\n$40\r\ncccccccccccccccccccccccccccccccccccccccc\r\n"

static struct sl_cluster_map *new_map(void) {
  struct sl_cluster_map *m = calloc(1, sizeof *m);
  assert_non_null(m);
  return m;
}

static int parse(struct sl_cluster_map *m, const char *text, const char *origin, char *err, size_t cap) {
  redisReply *r = resp(text);
  int rc = sl_cluster_map_parse(m, r, origin, err, cap);
  freeReplyObject(r);
  return rc;
}

static void test_map_valid(void **state) {
  (void)state;
  struct sl_cluster_map *m = new_map();
  char err[256] = "";
  assert_int_equal(parse(m, SLOTS3, NULL, err, sizeof err), 0);
  assert_int_equal(m->nnodes, 3);
  assert_string_equal(sl_cluster_map_node(m, 0)->host, "127.0.0.1");
  assert_int_equal(sl_cluster_map_node(m, 0)->port, 7000);
  assert_int_equal(sl_cluster_map_node(m, 5460)->port, 7000);
  assert_int_equal(sl_cluster_map_node(m, 5461)->port, 7001);
  assert_int_equal(sl_cluster_map_node(m, 10922)->port, 7001);
  assert_string_equal(sl_cluster_map_node(m, 10923)->host, "::1");
  assert_int_equal(sl_cluster_map_node(m, 16383)->port, 7002);
  assert_int_equal(sl_cluster_map_find(m, "::1", 7002), 2);
  assert_int_equal(sl_cluster_map_find(m, "127.0.0.1", 7003), -1); /* a replica: not kept, counted */
  assert_int_equal(sl_cluster_map_node(m, 0)->replicas, 1);
  assert_int_equal(sl_cluster_map_node(m, 5461)->replicas, 0);
  assert_int_equal(sl_cluster_map_find(m, "127.0.0.1", 7002), -1);
  free(m);
}

static void test_map_dedup_and_gaps(void **state) {
  (void)state;
  struct sl_cluster_map *m = new_map();
  char err[256] = "";
  /* one master in two ranges (after a reshard), slots 101..199 and 301.. unserved;
   * the oldest shape (no id), a NIL and an empty endpoint: the origin */
  const char *t = "*3\r\n"
                  "*3\r\n:0\r\n:100\r\n*2\r\n$9\r\n127.0.0.1\r\n:7000\r\n"
                  "*3\r\n:200\r\n:250\r\n*3\r\n$-1\r\n:7001\r\n$1\r\nx\r\n"
                  "*3\r\n:251\r\n:300\r\n*2\r\n$9\r\n127.0.0.1\r\n:7000\r\n";
  assert_int_equal(parse(m, t, "10.0.0.9", err, sizeof err), 0);
  assert_int_equal(m->nnodes, 2);
  assert_int_equal(sl_cluster_map_node(m, 100)->port, 7000);
  assert_null(sl_cluster_map_node(m, 101));
  assert_null(sl_cluster_map_node(m, 199));
  assert_string_equal(sl_cluster_map_node(m, 200)->host, "10.0.0.9");
  assert_int_equal(sl_cluster_map_node(m, 200)->port, 7001);
  assert_int_equal(sl_cluster_map_node(m, 251)->port, 7000);
  assert_int_equal(m->slot[251], m->slot[0]);
  assert_null(sl_cluster_map_node(m, 301));
  assert_null(sl_cluster_map_node(m, 16383));
  /* the empty-string form of an unknown endpoint */
  assert_int_equal(parse(m, "*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$0\r\n\r\n:7005\r\n", "h.example", err, sizeof err), 0);
  assert_int_equal(m->nnodes, 1);
  assert_string_equal(sl_cluster_map_node(m, 9)->host, "h.example");
  free(m);
}

/* Each refused reply: the error, a reason, and the map as it was. */
static void refused(const char *text, const char *origin, int want, const char *reason) {
  struct sl_cluster_map *m = new_map(), *before = new_map();
  char err[256] = "";
  assert_int_equal(parse(m, SLOTS3, NULL, err, sizeof err), 0);
  memcpy(before, m, sizeof *m);
  int rc = parse(m, text, origin, err, sizeof err);
  if (rc != want) fail_msg("rc %d, want %d for %s (err: %s)", rc, want, reason, err);
  if (strstr(err, reason) == NULL) fail_msg("err '%s' lacks '%s'", err, reason);
  assert_memory_equal(m, before, sizeof *m);
  free(before);
  free(m);
}

#define M7000 "*2\r\n$9\r\n127.0.0.1\r\n:7000\r\n"

static void test_map_refused(void **state) {
  (void)state;
  refused("-ERR This instance has cluster support disabled\r\n", NULL, UV_EINVAL, "error reply: ERR This");
  refused(":1\r\n", NULL, UV_EINVAL, "not an array");
  refused("$2\r\nok\r\n", NULL, UV_EINVAL, "not an array");
  refused("*-1\r\n", NULL, UV_EINVAL, "not an array");
  refused("*0\r\n", NULL, UV_EINVAL, "no slot is served");
  /* a range's shape */
  refused("*1\r\n:5\r\n", NULL, UV_EINVAL, "range 0 is not an array");
  refused("*1\r\n*2\r\n:0\r\n:5\r\n", NULL, UV_EINVAL, "range 0 is not an array");
  refused("*1\r\n*3\r\n$1\r\n0\r\n:5\r\n" M7000, NULL, UV_EINVAL, "not an integer");
  refused("*1\r\n*3\r\n:0\r\n$1\r\n5\r\n" M7000, NULL, UV_EINVAL, "not an integer");
  refused("*1\r\n*3\r\n:-1\r\n:5\r\n" M7000, NULL, UV_EINVAL, "-1-5 is not a range");
  refused("*1\r\n*3\r\n:0\r\n:16384\r\n" M7000, NULL, UV_EINVAL, "0-16384 is not a range");
  refused("*1\r\n*3\r\n:6\r\n:5\r\n" M7000, NULL, UV_EINVAL, "6-5 is not a range");
  refused("*1\r\n*3\r\n:9223372036854775807\r\n:5\r\n" M7000, NULL, UV_EINVAL, "is not a range");
  refused("*2\r\n*3\r\n:0\r\n:10\r\n" M7000 "*3\r\n:10\r\n:20\r\n" M7000, NULL, UV_EINVAL,
          "range 1: slot 10 is in an earlier range");
  /* a node's shape */
  refused("*1\r\n*3\r\n:0\r\n:5\r\n$9\r\n127.0.0.1\r\n", NULL, UV_EINVAL, "the master is not an array");
  refused("*1\r\n*3\r\n:0\r\n:5\r\n*1\r\n$9\r\n127.0.0.1\r\n", NULL, UV_EINVAL, "the master is not an array");
  refused("*1\r\n*3\r\n:0\r\n:5\r\n*2\r\n$9\r\n127.0.0.1\r\n$4\r\n7000\r\n", NULL, UV_EINVAL, "port is not");
  refused("*1\r\n*3\r\n:0\r\n:5\r\n*2\r\n$9\r\n127.0.0.1\r\n:0\r\n", NULL, UV_EINVAL, "port is not");
  refused("*1\r\n*3\r\n:0\r\n:5\r\n*2\r\n$9\r\n127.0.0.1\r\n:65536\r\n", NULL, UV_EINVAL, "port is not");
  refused("*1\r\n*3\r\n:0\r\n:5\r\n*3\r\n$9\r\n127.0.0.1\r\n:7000\r\n:1\r\n", NULL, UV_EINVAL, "id is not a string");
  refused("*1\r\n*3\r\n:0\r\n:5\r\n*2\r\n:1\r\n:7000\r\n", NULL, UV_EINVAL, "endpoint is not a string");
  refused("*1\r\n*3\r\n:0\r\n:5\r\n*2\r\n*0\r\n:7000\r\n", NULL, UV_EINVAL, "endpoint is not a string");
  refused("*1\r\n*3\r\n:0\r\n:5\r\n*2\r\n$-1\r\n:7000\r\n", NULL, UV_EINVAL, "origin is unknown");
  refused("*1\r\n*3\r\n:0\r\n:5\r\n*2\r\n$0\r\n\r\n:7000\r\n", NULL, UV_EINVAL, "origin is unknown");
  refused("*1\r\n*3\r\n:0\r\n:5\r\n*2\r\n$-1\r\n:7000\r\n", "bad host", UV_EINVAL, "'bad host' is not a host");
  /* "?": hostname endpoints configured without a hostname */
  refused("*1\r\n*3\r\n:0\r\n:5\r\n*2\r\n$1\r\n?\r\n:7000\r\n", NULL, UV_EINVAL, "'?' is not a host");
  refused("*1\r\n*3\r\n:0\r\n:5\r\n*2\r\n$5\r\na\r\nb1\r\n:7000\r\n", NULL, UV_EINVAL, "is not a host");
  refused("*1\r\n*3\r\n:0\r\n:5\r\n*2\r\n$11\r\n[::1]:7000x\r\n:7000\r\n", NULL, UV_EINVAL, "is not a host");
  /* a replica is checked as the master is */
  refused("*1\r\n*4\r\n:0\r\n:5\r\n" M7000 ":3\r\n", NULL, UV_EINVAL, "a replica is not an array");
  refused("*1\r\n*4\r\n:0\r\n:5\r\n" M7000 "*2\r\n$1\r\nr\r\n:-3\r\n", NULL, UV_EINVAL, "a replica's port");
  /* a host of 255 bytes fits, one of 256 does not */
  char host[300], text[700];
  memset(host, 'h', 256);
  host[256] = '\0';
  snprintf(text, sizeof text, "*1\r\n*3\r\n:0\r\n:5\r\n*2\r\n$256\r\n%s\r\n:7000\r\n", host);
  refused(text, NULL, UV_EINVAL, "is not a host");
  struct sl_cluster_map *m = new_map();
  snprintf(text, sizeof text, "*1\r\n*3\r\n:0\r\n:5\r\n*2\r\n$255\r\n%.255s\r\n:7000\r\n", host);
  assert_int_equal(parse(m, text, NULL, NULL, 0), 0); /* no err buffer: fine */
  assert_int_equal(strlen(sl_cluster_map_node(m, 5)->host), 255);
  free(m);
}

/* 64 masters fit; a 65th is refused with UV_ENOSPC (and the old map kept). */
static void test_map_bound(void **state) {
  (void)state;
  size_t cap = 80 * 100;
  char *t = malloc(cap);
  assert_non_null(t);
  for (int n = 64; n <= 65; n++) {
    size_t o = (size_t)snprintf(t, cap, "*%d\r\n", n);
    for (int i = 0; i < n; i++)
      o += (size_t)snprintf(t + o, cap - o, "*3\r\n:%d\r\n:%d\r\n*2\r\n$9\r\n127.0.0.1\r\n:%d\r\n", i * 100,
                            i * 100 + 99, 7000 + i);
    if (n == 64) {
      struct sl_cluster_map *m = new_map();
      assert_int_equal(parse(m, t, NULL, NULL, 0), 0);
      assert_int_equal(m->nnodes, 64);
      assert_int_equal(sl_cluster_map_node(m, 6399)->port, 7063);
      assert_null(sl_cluster_map_node(m, 6400));
      free(m);
    } else {
      refused(t, NULL, UV_ENOSPC, "more than 64 masters");
    }
  }
  free(t);
}

static void test_error_kind(void **state) {
  (void)state;
#define K(s) sl_cluster_error_kind(s, strlen(s))
  assert_int_equal(K("MOVED 1 a:1"), SL_CLUSTER_ERR_MOVED);
  assert_int_equal(K("ASK 1 a:1"), SL_CLUSTER_ERR_ASK);
  assert_int_equal(K("TRYAGAIN Multiple keys request during rehashing of slot"), SL_CLUSTER_ERR_TRYAGAIN);
  assert_int_equal(K("CLUSTERDOWN The cluster is down"), SL_CLUSTER_ERR_CLUSTERDOWN);
  assert_int_equal(K("CLUSTERDOWN Hash slot not served"), SL_CLUSTER_ERR_CLUSTERDOWN);
  assert_int_equal(K("TRYAGAIN"), SL_CLUSTER_ERR_TRYAGAIN);
  assert_int_equal(K("MOVEDX 1 a:1"), SL_CLUSTER_ERR_OTHER);
  assert_int_equal(K("ASKING"), SL_CLUSTER_ERR_OTHER);
  assert_int_equal(K("ERR unknown command"), SL_CLUSTER_ERR_OTHER);
  assert_int_equal(K("moved 1 a:1"), SL_CLUSTER_ERR_OTHER);
  assert_int_equal(K(""), SL_CLUSTER_ERR_OTHER);
  assert_int_equal(sl_cluster_error_kind(NULL, 0), SL_CLUSTER_ERR_OTHER);
  assert_int_equal(sl_cluster_error_kind("MOVED", 4), SL_CLUSTER_ERR_OTHER); /* only len bytes */
#undef K
}

static int redirect(const char *s, struct sl_cluster_redirect *r) {
  return sl_cluster_parse_redirect(s, strlen(s), r);
}

static void test_redirect(void **state) {
  (void)state;
  struct sl_cluster_redirect r;
  assert_int_equal(redirect("MOVED 3999 127.0.0.1:6381", &r), 0);
  assert_int_equal(r.kind, SL_CLUSTER_ERR_MOVED);
  assert_int_equal(r.slot, 3999);
  assert_string_equal(r.host, "127.0.0.1");
  assert_int_equal(r.port, 6381);
  assert_int_equal(redirect("ASK 3999 127.0.0.1:6381", &r), 0);
  assert_int_equal(r.kind, SL_CLUSTER_ERR_ASK);
  assert_int_equal(r.slot, 3999);
  assert_int_equal(redirect("MOVED 0 [::1]:6381", &r), 0);
  assert_int_equal(r.slot, 0);
  assert_string_equal(r.host, "::1");
  assert_int_equal(r.port, 6381);
  assert_int_equal(redirect("MOVED 16383 ::1:65535", &r), 0); /* as Redis writes IPv6 */
  assert_int_equal(r.slot, 16383);
  assert_string_equal(r.host, "::1");
  assert_int_equal(r.port, 65535);
  assert_int_equal(redirect("ASK 7 fe80::1%eth0:1", &r), 0);
  assert_string_equal(r.host, "fe80::1%eth0");
  assert_int_equal(r.port, 1);
  assert_int_equal(redirect("MOVED 12 redis-2.svc.cluster.local:6379", &r), 0);
  assert_string_equal(r.host, "redis-2.svc.cluster.local");
  assert_int_equal(redirect("MOVED 12 :6380", &r), 0); /* unknown endpoint: the node that answered */
  assert_string_equal(r.host, "");
  assert_int_equal(r.port, 6380);
  assert_int_equal(redirect("MOVED 00012 h:06380", &r), 0); /* five digits at most, zeros or not */
  assert_int_equal(r.slot, 12);
  assert_int_equal(r.port, 6380);
  /* only len bytes are read */
  assert_int_equal(sl_cluster_parse_redirect("MOVED 1 h:6380 trailing", 14, &r), 0);
  assert_int_equal(r.port, 6380);

  static const char *bad[] = {
      "",
      "MOVED",
      "MOVED ",
      "MOVED 1",
      "MOVED 1 ",
      "MOVED  1 h:1",        /* two spaces */
      "MOVED 1  h:1",
      "MOVED 1 h:1 ",        /* trailing */
      "MOVED 1 h:1\r\n",
      "moved 1 h:1",
      "ASKING 1 h:1",
      "TRYAGAIN 1 h:1",
      "MOVED x h:1",
      "MOVED -1 h:1",
      "MOVED +1 h:1",
      "MOVED 16384 h:1",     /* slot out of range */
      "MOVED 99999 h:1",
      "MOVED 000001 h:1",    /* six digits */
      "MOVED 1 h",           /* no port */
      "MOVED 1 h:",
      "MOVED 1 h:0",
      "MOVED 1 h:65536",
      "MOVED 1 h:99999",
      "MOVED 1 h:000001",
      "MOVED 1 h:-1",
      "MOVED 1 h:1x",
      "MOVED 1 h:+1",
      "MOVED 1 []:1",        /* empty brackets */
      "MOVED 1 [::1]",
      "MOVED 1 [::1]:",
      "MOVED 1 [::1]6381",
      "MOVED 1 [::1:6381",
      "MOVED 1 [::1]:6381]",
      "MOVED 1 [::1]]:6381",
      "MOVED 1 ?:6381",      /* hostname endpoints without a hostname */
      "MOVED 1 h/x:6381",
      "MOVED 1 h x:6381",
      "MOVED 1 [a b]:6381",
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
    if (redirect(bad[i], &r) != UV_EINVAL) fail_msg("'%s' accepted", bad[i]);
  assert_int_equal(sl_cluster_parse_redirect("MOVED 1 h\0:1", 12, &r), UV_EINVAL); /* a NUL in the host */
  /* a host of 255 bytes fits, 256 does not */
  char s[400];
  memset(s, 0, sizeof s);
  memcpy(s, "ASK 1 ", 6);
  memset(s + 6, 'h', 255);
  memcpy(s + 6 + 255, ":1", 2);
  assert_int_equal(redirect(s, &r), 0);
  assert_int_equal(strlen(r.host), 255);
  memset(s + 6, 'h', 256);
  memcpy(s + 6 + 256, ":1", 2);
  assert_int_equal(redirect(s, &r), UV_EINVAL);
}

/* ---- key names ---- */

static void test_uid_key(void **state) {
  (void)state;
  char k[128];
  const char *head = "sluice:" SL_KEY_USAGE "20240101:";
  /* one server or Sentinel: keys.h's names exactly */
  assert_int_equal(sl_cluster_uid_key(k, sizeof k, 0, head, strlen(head), "u123", 4, "", 0), 26);
  assert_string_equal(k, "sluice:usage:20240101:u123");
  /* cluster: the UID as the hash tag, the slot the UID's */
  int n = sl_cluster_uid_key(k, sizeof k, 1, head, strlen(head), "u123", 4, "", 0);
  assert_int_equal(n, 28);
  assert_string_equal(k, "sluice:usage:20240101:{u123}");
  assert_int_equal(sl_cluster_key_slot(k, (size_t)n), 10594); /* CLUSTER KEYSLOT, see test_key_slot */
  assert_int_equal(sl_cluster_uid_slot("u123", 4), 10594);
  /* a tail after the UID; every key of the account in one slot */
  n = sl_cluster_uid_key(k, sizeof k, 1, "sluice:" SL_KEY_QPSPKG, SL_KEYLEN("sluice:" SL_KEY_QPSPKG), "u123", 4,
                         ":p1", 3);
  assert_string_equal(k, "sluice:qpspkg:{u123}:p1");
  assert_int_equal(sl_cluster_key_slot(k, (size_t)n), sl_cluster_uid_slot("u123", 4));
  n = sl_cluster_uid_key(k, sizeof k, 1, SL_KEY_SHARE, SL_KEYLEN(SL_KEY_SHARE), "u123", 4, ":text:cn-shanghai", 18);
  assert_string_equal(k, "share:{u123}:text:cn-shanghai");
  assert_int_equal(sl_cluster_key_slot(k, (size_t)n), sl_cluster_uid_slot("u123", 4));
  /* an empty head and tail */
  assert_int_equal(sl_cluster_uid_key(k, sizeof k, 1, NULL, 0, "7", 1, NULL, 0), 3);
  assert_string_equal(k, "{7}");
  /* the length bound: the key and its NUL within cap */
  assert_int_equal(sl_cluster_uid_key(k, 7, 1, "ab", 2, "cd", 2, "", 0), 6);
  assert_int_equal(sl_cluster_uid_key(k, 6, 1, "ab", 2, "cd", 2, "", 0), UV_ENOSPC);
  assert_int_equal(sl_cluster_uid_key(k, 5, 0, "ab", 2, "cd", 2, "", 0), 4);
  assert_int_equal(sl_cluster_uid_key(k, 4, 0, "ab", 2, "cd", 2, "", 0), UV_ENOSPC);
  assert_int_equal(sl_cluster_uid_key(k, 0, 0, "", 0, "", 0, "", 0), UV_ENOSPC);
  /* a UID that would not be the tag */
  assert_int_equal(sl_cluster_uid_key(k, sizeof k, 1, "a:", 2, "", 0, "", 0), UV_EINVAL);
  assert_int_equal(sl_cluster_uid_key(k, sizeof k, 1, "a:", 2, "u}1", 3, "", 0), UV_EINVAL);
  assert_int_equal(sl_cluster_uid_key(k, sizeof k, 1, "a:", 2, "u{1", 3, "", 0), UV_EINVAL);
  assert_int_equal(sl_cluster_uid_key(k, sizeof k, 1, "{p}:a:", 6, "u1", 2, "", 0), UV_EINVAL);
  /* a '{' in the tail is after the tag: harmless */
  assert_int_equal(sl_cluster_uid_key(k, sizeof k, 1, "a:", 2, "u1", 2, ":{x}", 4), 10);
  assert_int_equal(sl_cluster_key_slot(k, 10), sl_cluster_uid_slot("u1", 2));
  /* single-server mode copies whatever it is given */
  assert_int_equal(sl_cluster_uid_key(k, sizeof k, 0, "a:", 2, "u{1", 3, "", 0), 5);
}

/* Metering's grouping (issue 14): a batch's items sorted by the master of
 * their slot in the map, then slot, then index; the runs of one master and
 * of one slot; no map (or a slot no master serves) sorts last, by slot. */
static void test_group(void **state) {
  (void)state;
  struct sl_cluster_map *m = new_map();
  char err[256] = "";
  assert_int_equal(parse(m, SLOTS3, NULL, err, sizeof err), 0); /* 0-5460, 5461-10922, 10923-16383 */
  m->slot[9000] = SL_CLUSTER_NO_NODE;                            /* as if no master served it */
  /* item i's slot */
  static const unsigned slot[] = {12000, 100, 6000, 100, 16383, 5460, 9000, 6000, 0, 12000};
  enum { N = sizeof slot / sizeof slot[0] };
  uint64_t k[N];
  for (uint32_t i = 0; i < N; i++) k[i] = sl_cluster_group_key(m, slot[i], i);
  assert_int_equal(sl_cluster_group_node(k[2]), 1);
  assert_int_equal(sl_cluster_group_slot(k[2]), 6000);
  assert_int_equal(sl_cluster_group_index(k[2]), 2);
  assert_int_equal(sl_cluster_group_node(k[6]), SL_CLUSTER_NO_NODE);
  sl_cluster_group_sort(k, N);
  /* master 0: slots 0, 100 (items 1, 3), 5460; master 1: 6000 (2, 7);
   * master 2: 12000 (0, 9), 16383; none: 9000 */
  static const uint32_t want[N] = {8, 1, 3, 5, 2, 7, 0, 9, 4, 6};
  for (uint32_t i = 0; i < N; i++) assert_int_equal(sl_cluster_group_index(k[i]), want[i]);
  assert_int_equal(sl_cluster_group_end(k, N, 0, 0), 4); /* master 0's four items */
  assert_int_equal(sl_cluster_group_end(k, N, 0, 1), 1); /* slot 0 */
  assert_int_equal(sl_cluster_group_end(k, N, 1, 1), 3); /* slot 100: two items */
  assert_int_equal(sl_cluster_group_end(k, N, 4, 0), 6); /* master 1: one slot, two items */
  assert_int_equal(sl_cluster_group_end(k, N, 4, 1), 6);
  assert_int_equal(sl_cluster_group_end(k, N, 6, 0), 9);
  assert_int_equal(sl_cluster_group_end(k, N, 9, 0), N); /* the last run ends at n */
  assert_int_equal(sl_cluster_group_end(k, N, 9, 1), N);
  /* no map: by slot alone, every item's node "none" */
  for (uint32_t i = 0; i < N; i++) k[i] = sl_cluster_group_key(NULL, slot[i], i);
  sl_cluster_group_sort(k, N);
  static const uint32_t by_slot[N] = {8, 1, 3, 5, 2, 7, 6, 0, 9, 4};
  for (uint32_t i = 0; i < N; i++) {
    assert_int_equal(sl_cluster_group_index(k[i]), by_slot[i]);
    assert_int_equal(sl_cluster_group_node(k[i]), SL_CLUSTER_NO_NODE);
  }
  assert_int_equal(sl_cluster_group_end(k, N, 0, 0), N);
  assert_int_equal(sl_cluster_group_end(k, N, 4, 1), 6);
  sl_cluster_group_sort(k, 0); /* nothing to sort */
  free(m);
}

/* The slot tags: every slot has one, of 1..3 characters of [0-9A-Za-z],
 * hashing to its slot alone and inside a key of several braces (the first
 * pair is the tag); a few pinned, since the order may never change (names
 * built from them outlive a version: metering's high-water marks). */
static void test_slot_tags(void **state) {
  (void)state;
  char(*tags)[SL_CLUSTER_TAG_SIZE] = calloc(SL_CLUSTER_SLOTS, SL_CLUSTER_TAG_SIZE);
  assert_non_null(tags);
  sl_cluster_slot_tags(tags);
  for (unsigned s = 0; s < SL_CLUSTER_SLOTS; s++) {
    size_t n = strnlen(tags[s], SL_CLUSTER_TAG_SIZE);
    assert_in_range(n, 1, SL_CLUSTER_TAG_SIZE - 1);
    assert_int_equal(strspn(tags[s], "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"), n);
    assert_int_equal(sl_cluster_crc16(tags[s], n) & (SL_CLUSTER_SLOTS - 1), s);
    char key[64];
    int kl = snprintf(key, sizeof key, "sluice:meter:hwm:{%s}:inst{x}:00ff", tags[s]);
    assert_int_equal(sl_cluster_key_slot(key, (size_t)kl), s);
    if (s % 97 == 0 || s == SL_CLUSTER_SLOTS - 1) { /* one slot's alone: the same tag */
      char one[SL_CLUSTER_TAG_SIZE];
      sl_cluster_slot_tag(s, one);
      assert_string_equal(one, tags[s]);
    }
  }
  assert_string_equal(tags[0], "06S");
  assert_string_equal(tags[1], "Qi");
  assert_string_equal(tags[5474], "0bi");
  assert_string_equal(tags[16383], "6ZJ");
  free(tags);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_crc16),       cmocka_unit_test(test_key_slot),
      cmocka_unit_test(test_map_valid),   cmocka_unit_test(test_map_dedup_and_gaps),
      cmocka_unit_test(test_map_refused), cmocka_unit_test(test_map_bound),
      cmocka_unit_test(test_error_kind),  cmocka_unit_test(test_redirect),
      cmocka_unit_test(test_uid_key),     cmocka_unit_test(test_group),
      cmocka_unit_test(test_slot_tags),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
