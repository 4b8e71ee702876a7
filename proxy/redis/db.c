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
