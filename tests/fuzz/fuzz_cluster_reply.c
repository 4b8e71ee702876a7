/* Fuzzes Redis Cluster routing's parsers (proxy/redis/cluster.c). Byte 0
 * picks the input's form: bit 0 clear, the rest is RESP fed to hiredis's
 * reader (guarded as sluice's connections are) and every reply is read as
 * a CLUSTER SLOTS reply (bit 1: with an origin host for unknown endpoints),
 * its text, when it has one, also as a redirect; bit 0 set, the rest is an
 * error text for the redirect parser, then split at 0x1f into the head, UID
 * and tail of a key name. Never a crash or a leak, and:
 *   - a map accepted has 1..64 distinct masters, each host 1..255 bytes and
 *     port 1..65535, and every slot names one of them or none; a map
 *     refused is untouched and its reason is set;
 *   - a redirect accepted has a slot below 16384, a port in 1..65535, a
 *     host that fits, is classified as its kind, and written back as
 *     "KIND slot host:port" parses to the same;
 *   - a key's slot is below 16384, and a cluster key built from a UID hashes
 *     to the UID's slot. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cluster.h"
#include "fuzz.h"
#include "fuzz_resp.h"

static void check_map(const struct sl_cluster_map *m) {
  FZ_CHECK(m->nnodes >= 1 && m->nnodes <= SL_CLUSTER_MAX_NODES);
  for (unsigned i = 0; i < m->nnodes; i++) {
    size_t hl = strnlen(m->nodes[i].host, SL_CLUSTER_HOST_MAX);
    FZ_CHECK(hl >= 1 && hl < SL_CLUSTER_HOST_MAX);
    FZ_CHECK(m->nodes[i].port >= 1 && m->nodes[i].port <= 65535);
    FZ_CHECK(sl_cluster_map_find(m, m->nodes[i].host, m->nodes[i].port) == (int)i); /* each once */
  }
  for (unsigned s = 0; s < SL_CLUSTER_SLOTS; s++)
    FZ_CHECK(m->slot[s] == SL_CLUSTER_NO_NODE || m->slot[s] < m->nnodes);
}

static void check_redirect(const char *s, size_t n) {
  struct sl_cluster_redirect r, again;
  if (sl_cluster_parse_redirect(s, n, &r) != 0) return;
  FZ_CHECK(r.kind == SL_CLUSTER_ERR_MOVED || r.kind == SL_CLUSTER_ERR_ASK);
  FZ_CHECK(sl_cluster_error_kind(s, n) == r.kind);
  FZ_CHECK(r.slot < SL_CLUSTER_SLOTS);
  FZ_CHECK(r.port >= 1 && r.port <= 65535);
  FZ_CHECK(strnlen(r.host, SL_CLUSTER_HOST_MAX) < SL_CLUSTER_HOST_MAX);
  char back[SL_CLUSTER_HOST_MAX + 32];
  int bn = snprintf(back, sizeof back, "%s %u %s:%d", r.kind == SL_CLUSTER_ERR_MOVED ? "MOVED" : "ASK", r.slot,
                    r.host, r.port);
  FZ_CHECK(bn > 0 && (size_t)bn < sizeof back);
  FZ_CHECK(sl_cluster_parse_redirect(back, (size_t)bn, &again) == 0);
  FZ_CHECK(again.kind == r.kind && again.slot == r.slot && again.port == r.port && !strcmp(again.host, r.host));
}

static void slots(const uint8_t *data, size_t size, const char *origin) {
  static struct sl_cluster_map m, before; /* 33 KiB each: not on the stack */
  char err[160];
  redisReader *rd = fz_guarded_reader();
  char *chunk = fz_dup(data, size);
  if (redisReaderFeed(rd, chunk, size) == REDIS_OK) {
    void *reply = NULL;
    while (redisReaderGetReply(rd, &reply) == REDIS_OK && reply) {
      const redisReply *r = reply;
      memcpy(&before, &m, sizeof m);
      err[0] = '\0';
      int rc = sl_cluster_map_parse(&m, r, origin, err, sizeof err);
      if (rc == 0) {
        check_map(&m);
      } else {
        FZ_CHECK(rc == UV_EINVAL || rc == UV_ENOSPC);
        FZ_CHECK(err[0] != '\0' && memchr(err, '\0', sizeof err) != NULL);
        FZ_CHECK(!memcmp(&before, &m, sizeof m));
      }
      if (r->type == REDIS_REPLY_ERROR || r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS)
        check_redirect(r->str, r->len);
      freeReplyObject(reply);
      reply = NULL;
    }
  }
  free(chunk);
  redisReaderFree(rd);
}

static void text(const uint8_t *data, size_t size) {
  char *s = fz_dup(data, size); /* exactly size bytes: a read past them is caught */
  check_redirect(s, size);
  FZ_CHECK(sl_cluster_key_slot(s, size) < SL_CLUSTER_SLOTS);
  free(s);
  const uint8_t *p = data, *head, *uid, *tail;
  size_t n = size, hl, ul, tl;
  fz_field(&p, &n, 0x1f, &head, &hl);
  fz_field(&p, &n, 0x1f, &uid, &ul);
  tail = p;
  tl = n;
  char key[512];
  for (int cluster = 0; cluster <= 1; cluster++) {
    int kl = sl_cluster_uid_key(key, sizeof key, cluster, (const char *)head, hl, (const char *)uid, ul,
                                (const char *)tail, tl);
    if (kl < 0) {
      FZ_CHECK(kl == UV_ENOSPC || (cluster && kl == UV_EINVAL));
      continue;
    }
    FZ_CHECK((size_t)kl < sizeof key && key[kl] == '\0' && (size_t)kl == hl + ul + tl + (cluster ? 2 : 0));
    if (cluster) FZ_CHECK(sl_cluster_key_slot(key, (size_t)kl) == sl_cluster_uid_slot((const char *)uid, ul));
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  if (data[0] & 1)
    text(data + 1, size - 1);
  else
    slots(data + 1, size - 1, (data[0] & 2) ? "10.0.0.1" : NULL);
  return 0;
}
