/* The deployment dispatch (db.h): one client.h client, or a cluster router. */
#include "db.h"

#include <hiredis/async.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "addr.h"
#include "cluster_client.h"
#include "common.h"

struct sl_db {
  struct sl_redis_opts o;  /* the owner's (data, callbacks, gauges) */
  struct sl_redis *single; /* one server or Sentinel */
  struct sl_cluster *cl;   /* a cluster */
  int stopping;
  unsigned refs; /* 1 until sl_db_stop, + commands not answered yet: db outlives their callbacks */
};

/* One command in flight: the owner's callback. */
struct call {
  struct sl_db *db;
  sl_db_reply_fn *cb;
  void *priv;
};

static void unref(struct sl_db *db) {
  if (--db->refs == 0) free(db);
}

/* The callback of a call; owner NULL once stopping or (one server) when
 * its connection was dropped. */
static void answer(struct call *k, void *owner, const redisReply *reply) {
  struct sl_db *db = k->db;
  k->cb(db->stopping ? NULL : owner, k->priv, owner && !db->stopping ? reply : NULL);
  free(k);
  unref(db);
}

static void on_single_reply(redisAsyncContext *c, void *reply, void *priv) {
  struct call *k = priv;
  struct sl_db *db = sl_redis_owner(c, reply);
  answer(k, db ? k->db->o.data : NULL, reply);
}

static void on_cluster_reply(void *priv, const redisReply *reply) {
  struct call *k = priv;
  answer(k, k->db->o.data, reply);
}

/* client.h's callbacks, passed on to the owner */
static void on_ready(void *data) {
  struct sl_db *db = data;
  if (db->o.on_ready) db->o.on_ready(db->o.data);
}
static void on_down(void *data, const char *why) {
  struct sl_db *db = data;
  if (db->o.on_down) db->o.on_down(db->o.data, why);
}
static void describe(void *data, char *buf, size_t cap) {
  struct sl_db *db = data;
  if (db->o.describe)
    db->o.describe(db->o.data, buf, cap);
  else if (cap)
    buf[0] = '\0';
}

/* The first slot map: commands go straight to their masters. */
static void on_map(void *data) {
  struct sl_db *db = data;
  if (db->o.up) atomic_store_explicit(db->o.up, 1, memory_order_relaxed); /* read by /metrics only */
  on_ready(db);
}

int sl_db_init(struct sl_db **out, uv_loop_t *loop, const struct sl_redis_opts *opts) {
  struct sl_redis_url *url = sl_malloc(sizeof *url);
  char msg[300];
  int err = UV_EINVAL;
  if (sl_redis_url_parse(url, opts->addr, msg, sizeof msg) != 0) goto out;
  struct sl_db *db = sl_calloc(1, sizeof *db);
  db->o = *opts;
  db->refs = 1;
  if (url->kind != SL_REDIS_CLUSTER) {
    struct sl_redis_opts ro = *opts;
    ro.on_ready = on_ready;
    ro.on_down = on_down;
    ro.describe = opts->describe ? describe : NULL;
    ro.data = db;
    err = sl_redis_init(&db->single, loop, &ro);
  } else {
    struct sl_cluster_node seeds[SL_REDIS_SENTINELS_MAX];
    memset(seeds, 0, sizeof seeds);
    for (unsigned i = 0; i < url->n_hosts; i++) {
      snprintf(seeds[i].host, sizeof seeds[i].host, "%s", url->hosts[i].host);
      seeds[i].port = url->hosts[i].port;
    }
    struct sl_cluster_opts co = {
        .seeds = seeds,
        .nseeds = url->n_hosts,
        .timeout_ms = opts->timeout_ms,
        .log_subject = opts->log_subject,
        .on_map = on_map,
        .data = db,
    };
    err = sl_cluster_init(&db->cl, loop, &co);
  }
  if (err) {
    free(db);
    goto out;
  }
  *out = db;
out:
  free(url);
  return err;
}

void sl_db_start(struct sl_db *db) {
  if (db->single)
    sl_redis_start(db->single);
  else
    sl_cluster_start(db->cl);
}

void sl_db_stop(struct sl_db *db) {
  db->stopping = 1;
  if (db->single)
    sl_redis_stop(db->single);
  else
    sl_cluster_stop(db->cl);
  unref(db);
}

int sl_db_cluster(const struct sl_db *db) { return db->cl != NULL; }

int sl_db_ready(const struct sl_db *db) { return db->cl ? 1 : sl_redis_cmd(db->single) != NULL; }

enum sl_redis_state sl_db_state(const struct sl_db *db) {
  if (db->single) return sl_redis_state(db->single);
  return sl_cluster_map(db->cl) ? SL_REDIS_READY : SL_REDIS_CONNECTING;
}

int sl_db_command(struct sl_db *db, unsigned slot, sl_db_reply_fn *cb, void *priv, int argc, const char **argv,
                  const size_t *argvlen) {
  if (db->stopping) return UV_ENOTCONN;
  struct call *k = sl_malloc(sizeof *k);
  *k = (struct call){.db = db, .cb = cb, .priv = priv};
  int rc;
  if (db->single) {
    redisAsyncContext *c = sl_redis_cmd(db->single);
    rc = !c ? UV_ENOTCONN
            : redisAsyncCommandArgv(c, on_single_reply, k, argc, argv, argvlen) == REDIS_OK ? 0 : UV_ENOTCONN;
  } else {
    rc = sl_cluster_command(db->cl, slot, on_cluster_reply, k, argc, argv, argvlen);
  }
  if (rc) {
    free(k);
    return rc;
  }
  db->refs++;
  return 0;
}

/* An EVALSHA in flight, with its args kept for the EVAL that follows a
 * NOSCRIPT (one allocation: the lengths, then the bytes). */
struct eval_call {
  struct sl_db *db;
  const struct sl_db_script *s;
  unsigned slot;
  sl_db_reply_fn *cb;
  void *priv;
  int argc, as_text;
  size_t *lens;
  char *bytes;
};

static void on_eval_reply(void *owner, void *priv, const redisReply *reply);

static int send_eval(struct eval_call *e) {
  const char **argv = sl_malloc(((size_t)e->argc + 2) * sizeof *argv);
  size_t *lens = sl_malloc(((size_t)e->argc + 2) * sizeof *lens);
  argv[0] = e->as_text ? "EVAL" : "EVALSHA", lens[0] = e->as_text ? 4 : 7;
  argv[1] = e->as_text ? e->s->text : e->s->sha, lens[1] = e->as_text ? e->s->len : 40;
  const char *p = e->bytes;
  for (int i = 0; i < e->argc; i++) {
    argv[2 + i] = p, lens[2 + i] = e->lens[i];
    p += e->lens[i];
  }
  /* (both clients format the command before returning: the arrays go) */
  int rc = sl_db_command(e->db, e->slot, on_eval_reply, e, e->argc + 2, argv, lens);
  free(argv);
  free(lens);
  return rc;
}

static void on_eval_reply(void *owner, void *priv, const redisReply *reply) {
  struct eval_call *e = priv;
  if (owner && reply && reply->type == REDIS_REPLY_ERROR && !e->as_text && strncmp(reply->str, "NOSCRIPT", 8) == 0) {
    e->as_text = 1;
    if (send_eval(e) == 0) return;
    reply = NULL; /* not sent: as a lost connection's */
  }
  e->cb(owner, e->priv, reply);
  free(e);
}

int sl_db_eval(struct sl_db *db, unsigned slot, const struct sl_db_script *s, sl_db_reply_fn *cb, void *priv,
               int argc, const char **argv, const size_t *argvlen) {
  size_t total = 0;
  for (int i = 0; i < argc; i++) total += argvlen[i];
  struct eval_call *e = sl_malloc(sizeof *e + (size_t)argc * sizeof(size_t) + total);
  *e = (struct eval_call){.db = db, .s = s, .slot = slot, .cb = cb, .priv = priv, .argc = argc};
  e->lens = (size_t *)(e + 1);
  e->bytes = (char *)(e->lens + argc);
  char *p = e->bytes;
  for (int i = 0; i < argc; i++) {
    e->lens[i] = argvlen[i];
    memcpy(p, argv[i], argvlen[i]);
    p += argvlen[i];
  }
  int rc = send_eval(e);
  if (rc) free(e);
  return rc;
}

static uint32_t rol(uint32_t x, int n) { return x << n | x >> (32 - n); }
static void sha1_block(uint32_t h[5], const unsigned char *p) {
  uint32_t w[80], a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
  for (int i = 0; i < 16; i++)
    w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
  for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
  for (int i = 0; i < 80; i++) {
    uint32_t fn, k;
    if (i < 20) fn = (b & c) | (~b & d), k = 0x5a827999;
    else if (i < 40) fn = b ^ c ^ d, k = 0x6ed9eba1;
    else if (i < 60) fn = (b & c) | (b & d) | (c & d), k = 0x8f1bbcdc;
    else fn = b ^ c ^ d, k = 0xca62c1d6;
    uint32_t t = rol(a, 5) + fn + e + k + w[i];
    e = d, d = c, c = rol(b, 30), b = a, a = t;
  }
  h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e;
}

void sl_db_sha1_hex(const char *data, size_t len, char out[41]) {
  uint32_t h[5] = {0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476, 0xc3d2e1f0};
  unsigned char blk[64];
  size_t i = 0;
  for (; len - i >= 64; i += 64) sha1_block(h, (const unsigned char *)data + i);
  size_t r = len - i;
  memcpy(blk, data + i, r);
  blk[r++] = 0x80;
  if (r > 56) {
    memset(blk + r, 0, 64 - r);
    sha1_block(h, blk);
    r = 0;
  }
  memset(blk + r, 0, 56 - r);
  uint64_t bits = (uint64_t)len * 8;
  for (int j = 0; j < 8; j++) blk[56 + j] = (unsigned char)(bits >> (56 - 8 * j));
  sha1_block(h, blk);
  for (int j = 0; j < 20; j++) snprintf(out + 2 * j, 3, "%02x", (unsigned)(h[j / 4] >> (24 - 8 * (j % 4))) & 0xff);
}

void sl_db_script_init(struct sl_db_script *s, const char *text, size_t len) {
  s->text = text;
  s->len = len;
  sl_db_sha1_hex(text, len, s->sha);
}

int sl_db_replicas(const struct sl_db *db, unsigned slot) {
  if (db->single) return sl_redis_replicas(db->single);
  const struct sl_cluster_map *m = sl_cluster_map(db->cl);
  const struct sl_cluster_node *n = m ? sl_cluster_map_node(m, slot) : NULL;
  return n ? (int)n->replicas : -1;
}

const struct sl_cluster_map *sl_db_map(const struct sl_db *db) { return db->cl ? sl_cluster_map(db->cl) : NULL; }

void sl_db_refresh(struct sl_db *db) {
  if (db->cl && !db->stopping) sl_cluster_refresh(db->cl);
}

struct sl_redis *sl_db_single(struct sl_db *db) { return db->single; }
