/* sluice-rate's Redis connection (driver.h): one server, the master the
 * sentinels name (sentinel.h), or a Redis Cluster (SPEC 10).
 *
 * A cluster is routed here, synchronously, with the pure parts of
 * proxy/redis/cluster.h: CLUSTER SLOTS read once from a seed (again after a
 * MOVED or a lost connection), a hiredis context per master opened when a
 * command first needs it, each command sent to the master of its key's slot
 * (EVAL / EVALSHA: the first key; SCRIPT: every master). ASK sends ASKING and
 * the command to the node named, once; TRYAGAIN, CLUSTERDOWN and a lost
 * connection wait RETRY_SLEEP_MS and try again. ATTEMPTS_MAX tries at most,
 * then the connection counts as broken (rconn_broken), as a lost single
 * server does. Pipelined commands (rconn_append) are queued and run one by
 * one as their replies are asked for: a cluster's commands of one pipeline
 * may live on different masters. Single-threaded. */
#include "driver.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "cluster.h" /* proxy/redis: slots, CLUSTER SLOTS, MOVED / ASK */
#include "rating.h"

#define ATTEMPTS_MAX 60     /* tries of one command: about 6 s of TRYAGAIN / CLUSTERDOWN / failover */
#define RETRY_SLEEP_MS 100

struct queued {
  int argc;
  char **argv; /* owned copies */
};

struct rconn {
  redisContext *c; /* one server or Sentinel's master; NULL for a cluster */
  /* A cluster: */
  struct sl_redis_url url;     /* the seeds */
  struct sl_cluster_map *map;  /* NULL until read, and after a MOVED or a lost node */
  redisContext *node[SL_CLUSTER_MAX_NODES]; /* by index in map->nodes; NULL: not connected */
  struct queued *q;            /* appended, not yet run: q[qhead..qn) */
  size_t qhead, qn, qcap;
  int broken;
  char errstr[300];
};

static void sleep_ms(unsigned ms) {
  struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

static redisContext *open_node(const char *host, int port, char *err, size_t errlen) {
  struct timeval ct = {.tv_sec = CONNECT_TIMEOUT_S}, cmd = {.tv_sec = COMMAND_TIMEOUT_S};
  redisContext *c = redisConnectWithTimeout(host, port, ct);
  if (c == NULL || c->err) {
    snprintf(err, errlen, "cannot connect to %.100s:%d: %.100s", host, port, c ? c->errstr : "out of memory");
    if (c) redisFree(c);
    return NULL;
  }
  redisSetTimeout(c, cmd);
  return c;
}

/* Forgets the slot map and closes every master's connection. */
static void drop_map(struct rconn *k) {
  for (unsigned i = 0; i < SL_CLUSTER_MAX_NODES; i++)
    if (k->node[i]) {
      redisFree(k->node[i]);
      k->node[i] = NULL;
    }
  free(k->map);
  k->map = NULL;
}

/* Reads the slot map from the seeds, in the order given. Returns 0, or -1
 * with k->errstr set. */
static int load_map(struct rconn *k) {
  drop_map(k);
  struct sl_cluster_map *m = rate__xrealloc(NULL, sizeof(*m));
  for (unsigned i = 0; i < k->url.n_hosts; i++) {
    const struct sl_redis_hostport *s = &k->url.hosts[i];
    char why[240];
    redisContext *c = open_node(s->host, s->port, why, sizeof(why));
    if (c == NULL) {
      snprintf(k->errstr, sizeof(k->errstr), "cluster seed: %.240s", why);
      continue;
    }
    redisReply *r = redisCommand(c, "CLUSTER SLOTS");
    int e = r ? sl_cluster_map_parse(m, r, s->host, why, sizeof(why)) : -1;
    if (r == NULL) snprintf(why, sizeof(why), "%s", c->errstr[0] ? c->errstr : "connection lost");
    if (r) freeReplyObject(r);
    redisFree(c);
    if (e == 0) {
      k->map = m;
      return 0;
    }
    snprintf(k->errstr, sizeof(k->errstr), "CLUSTER SLOTS from %.100s:%d: %.150s", s->host, s->port, why);
  }
  free(m);
  return -1;
}

/* The key a command is routed by: EVAL / EVALSHA's first key, else the
 * first argument ("" when none). */
static const char *route_key(int argc, char **argv) {
  if (argc >= 4 && (!strcasecmp(argv[0], "EVAL") || !strcasecmp(argv[0], "EVALSHA")) && strcmp(argv[2], "0") != 0)
    return argv[3];
  return argc >= 2 ? argv[1] : "";
}

/* Sends argv to c (after ASKING when asking) and reads its reply. Returns
 * the reply, or NULL when the connection failed (why in err). */
static redisReply *send_on(redisContext *c, int asking, int argc, char **argv, char *err, size_t errlen) {
  redisReply *r = NULL;
  if (asking) redisAppendCommand(c, "ASKING");
  redisAppendCommandArgv(c, argc, (const char **)argv, NULL);
  if (asking && redisGetReply(c, (void **)&r) == REDIS_OK) {
    freeReplyObject(r);
    r = NULL;
  }
  if (c->err == 0 && redisGetReply(c, (void **)&r) != REDIS_OK) r = NULL;
  if (r == NULL) snprintf(err, errlen, "%s", c->errstr[0] ? c->errstr : "connection lost");
  return r;
}

/* Runs one command on the cluster, following MOVED and ASK. Returns its
 * reply (an error reply too, when it is the command's own), or NULL with
 * k->broken and k->errstr set once ATTEMPTS_MAX tries have failed. */
static redisReply *cluster_run(struct rconn *k, int argc, char **argv) {
  const char *key = route_key(argc, argv);
  unsigned slot = sl_cluster_key_slot(key, strlen(key));
  struct sl_cluster_redirect ask = {.kind = SL_CLUSTER_ERR_OTHER};
  char why[240] = "";
  for (int attempt = 0; attempt < ATTEMPTS_MAX; attempt++) {
    if (k->map == NULL && load_map(k) != 0) {
      sleep_ms(RETRY_SLEEP_MS);
      continue;
    }
    int idx = ask.kind == SL_CLUSTER_ERR_ASK ? sl_cluster_map_find(k->map, ask.host, ask.port) : k->map->slot[slot];
    redisContext *c = NULL, *tmp = NULL;
    if (idx < 0) { /* an ASK to a node the map does not know yet */
      c = tmp = open_node(ask.host, ask.port, why, sizeof(why));
    } else if (idx == SL_CLUSTER_NO_NODE) {
      snprintf(why, sizeof(why), "no master serves slot %u", slot);
    } else {
      const struct sl_cluster_node *n = &k->map->nodes[idx];
      if (k->node[idx] == NULL) k->node[idx] = open_node(n->host, n->port, why, sizeof(why));
      c = k->node[idx];
    }
    if (c == NULL) {
      drop_map(k);
      ask.kind = SL_CLUSTER_ERR_OTHER;
      sleep_ms(RETRY_SLEEP_MS);
      continue;
    }
    int asking = ask.kind == SL_CLUSTER_ERR_ASK;
    ask.kind = SL_CLUSTER_ERR_OTHER;
    redisReply *r = send_on(c, asking, argc, argv, why, sizeof(why));
    const char *host = idx >= 0 ? k->map->nodes[idx].host : ask.host;
    char from[SL_CLUSTER_HOST_MAX];
    snprintf(from, sizeof(from), "%s", host);
    if (tmp) redisFree(tmp);
    if (r == NULL) { /* the node is gone: a failover, perhaps */
      drop_map(k);
      sleep_ms(RETRY_SLEEP_MS);
      continue;
    }
    if (r->type != REDIS_REPLY_ERROR) return r;
    enum sl_cluster_err kind = sl_cluster_error_kind(r->str, r->len);
    snprintf(why, sizeof(why), "%.*s", (int)(r->len < 200 ? r->len : 200), r->str);
    if (kind == SL_CLUSTER_ERR_OTHER) return r;
    struct sl_cluster_redirect rd;
    int parsed = kind == SL_CLUSTER_ERR_MOVED || kind == SL_CLUSTER_ERR_ASK ? sl_cluster_parse_redirect(r->str, r->len,
                                                                                                       &rd) == 0 : 0;
    freeReplyObject(r);
    if (kind == SL_CLUSTER_ERR_ASK && parsed) {
      ask = rd;
      if (ask.host[0] == '\0') snprintf(ask.host, sizeof(ask.host), "%s", from); /* ":port": that node */
    } else if (kind == SL_CLUSTER_ERR_MOVED) {
      drop_map(k); /* read again: more than this slot may have moved */
    } else {
      sleep_ms(RETRY_SLEEP_MS); /* TRYAGAIN, CLUSTERDOWN, or a redirect we cannot read */
    }
  }
  k->broken = 1;
  snprintf(k->errstr, sizeof(k->errstr), "cluster: %.20s gave up after %d tries: %.200s", argv[0], ATTEMPTS_MAX,
           why);
  return NULL;
}

/* SCRIPT ...: on every master (a script is loaded per node). Returns the
 * first master's reply, or an error reply / NULL as cluster_run does. */
static redisReply *cluster_all(struct rconn *k, int argc, char **argv) {
  if (k->map == NULL && load_map(k) != 0) {
    k->broken = 1;
    return NULL;
  }
  redisReply *first = NULL;
  for (unsigned i = 0; i < k->map->nnodes; i++) {
    char why[240];
    const struct sl_cluster_node *n = &k->map->nodes[i];
    if (k->node[i] == NULL) k->node[i] = open_node(n->host, n->port, why, sizeof(why));
    redisReply *r = k->node[i] ? send_on(k->node[i], 0, argc, argv, why, sizeof(why)) : NULL;
    if (r == NULL) {
      k->broken = 1;
      snprintf(k->errstr, sizeof(k->errstr), "cluster: %.20s on %.100s:%d: %.150s", argv[0], n->host, n->port, why);
      if (first) freeReplyObject(first);
      return NULL;
    }
    if (first == NULL || r->type == REDIS_REPLY_ERROR) {
      if (first) freeReplyObject(first);
      first = r;
      if (r->type == REDIS_REPLY_ERROR) return r;
    } else {
      freeReplyObject(r);
    }
  }
  return first;
}

/* One node's SCAN loop (c: its connection). Returns 0 or -1 with why set. */
static int scan_node(redisContext *c, const char *match, const char *type, void (*each)(const char *, size_t, void *),
                     void *arg, char *why, size_t whylen) {
  char cursor[32] = "0";
  do {
    char *argv[] = {"SCAN", cursor, "MATCH", (char *)match, "TYPE", (char *)type, "COUNT", "1000"};
    redisReply *r = send_on(c, 0, 8, argv, why, whylen);
    if (r == NULL) return -1;
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 || r->element[0]->type != REDIS_REPLY_STRING ||
        r->element[0]->len >= sizeof(cursor) || r->element[1]->type != REDIS_REPLY_ARRAY) {
      snprintf(why, whylen, "%s", r->type == REDIS_REPLY_ERROR ? r->str : "an unexpected SCAN reply");
      freeReplyObject(r);
      return -1;
    }
    memcpy(cursor, r->element[0]->str, r->element[0]->len + 1);
    for (size_t i = 0; i < r->element[1]->elements; i++) {
      const redisReply *e = r->element[1]->element[i];
      if (e->type == REDIS_REPLY_STRING) each(e->str, e->len, arg);
    }
    freeReplyObject(r);
  } while (strcmp(cursor, "0") != 0);
  return 0;
}

int rconn_scan(struct rconn *k, const char *match, const char *type, void (*each)(const char *, size_t, void *),
               void *arg) {
  char why[240];
  if (k->c) {
    if (scan_node(k->c, match, type, each, arg, why, sizeof(why)) == 0) return 0;
    snprintf(k->errstr, sizeof(k->errstr), "SCAN: %.200s", why);
    return -1;
  }
  if (k->map == NULL && load_map(k) != 0) {
    k->broken = 1;
    return -1;
  }
  for (unsigned i = 0; i < k->map->nnodes; i++) {
    const struct sl_cluster_node *n = &k->map->nodes[i];
    if (k->node[i] == NULL) k->node[i] = open_node(n->host, n->port, why, sizeof(why));
    if (k->node[i] == NULL || scan_node(k->node[i], match, type, each, arg, why, sizeof(why)) != 0) {
      k->broken = 1;
      snprintf(k->errstr, sizeof(k->errstr), "cluster: SCAN on %.100s:%d: %.150s", n->host, n->port, why);
      return -1;
    }
  }
  return 0;
}

struct rconn *connect_redis(const struct common_opts *co) {
  struct rconn *k = rate__xrealloc(NULL, sizeof(*k));
  memset(k, 0, sizeof(*k));
  if (co->url.kind == SL_REDIS_CLUSTER) {
    k->url = co->url;
    if (load_map(k) == 0) return k;
    fprintf(stderr, "sluice-rate: cannot connect to Redis Cluster at %s: %s\n", co->redis, k->errstr);
    free(k);
    return NULL;
  }
  char err[600];
  /* Sentinel: the master the sentinels name, checked with ROLE (sentinel.h) */
  k->c = sl_redis_connect_sync(&co->url, CONNECT_TIMEOUT_S * 1000, err, sizeof(err));
  if (k->c == NULL) {
    fprintf(stderr, "sluice-rate: cannot connect to Redis at %s: %s\n", co->redis, err);
    free(k);
    return NULL;
  }
  struct timeval ct = {.tv_sec = COMMAND_TIMEOUT_S};
  redisSetTimeout(k->c, ct);
  return k;
}

void rconn_free(struct rconn *k) {
  if (k == NULL) return;
  if (k->c) redisFree(k->c);
  drop_map(k);
  for (size_t i = k->qhead; i < k->qn; i++) {
    for (int j = 0; j < k->q[i].argc; j++) free(k->q[i].argv[j]);
    free(k->q[i].argv);
  }
  free(k->q);
  free(k);
}

int rconn_cluster(const struct rconn *k) { return k->c == NULL; }

int rconn_broken(const struct rconn *k) { return k->c ? k->c->err != 0 : k->broken; }

const char *rconn_errstr(const struct rconn *k) {
  if (k->c) return k->c->errstr[0] ? k->c->errstr : "connection lost";
  return k->errstr[0] ? k->errstr : "connection lost";
}

int rconn_append(struct rconn *k, int argc, const char **argv) {
  if (k->c) return redisAppendCommandArgv(k->c, argc, argv, NULL);
  if (k->qhead == k->qn) k->qhead = k->qn = 0;
  k->q = rate__grow(k->q, k->qn, &k->qcap, sizeof(*k->q));
  struct queued *e = &k->q[k->qn++];
  e->argc = argc;
  e->argv = rate__xrealloc(NULL, (size_t)argc * sizeof(*e->argv));
  for (int i = 0; i < argc; i++) e->argv[i] = rate__xstrndup(argv[i], strlen(argv[i]));
  return REDIS_OK;
}

static redisReply *cluster_command(struct rconn *k, int argc, char **argv) {
  if (k->broken) return NULL;
  if (argc > 0 && !strcasecmp(argv[0], "SCRIPT")) return cluster_all(k, argc, argv);
  return cluster_run(k, argc, argv);
}

int rconn_get_reply(struct rconn *k, redisReply **out) {
  *out = NULL;
  if (k->c) return redisGetReply(k->c, (void **)out);
  if (k->qhead == k->qn) {
    snprintf(k->errstr, sizeof(k->errstr), "no command pending");
    return REDIS_ERR;
  }
  struct queued *e = &k->q[k->qhead++];
  *out = cluster_command(k, e->argc, e->argv);
  for (int j = 0; j < e->argc; j++) free(e->argv[j]);
  free(e->argv);
  return *out ? REDIS_OK : REDIS_ERR;
}

redisReply *command(struct rconn *k, const struct strv *args, char *err, size_t errlen) {
  redisReply *rep = k->c ? redisCommandArgv(k->c, (int)args->n, (const char **)args->v, NULL)
                         : cluster_command(k, (int)args->n, args->v);
  if (rep == NULL) {
    snprintf(err, errlen, "redis: %s", rconn_errstr(k));
    return NULL;
  }
  if (rep->type == REDIS_REPLY_ERROR) {
    snprintf(err, errlen, "redis: %s: %s", args->v[0], rep->str);
    freeReplyObject(rep);
    return NULL;
  }
  return rep;
}

char *acct_key(const struct common_opts *co, const char *name, const char *uid, const char *tail) {
  int cl = co->url.kind == SL_REDIS_CLUSTER;
  return xformat("%s%s%s%s%s%s", co->prefix, name, cl ? "{" : "", uid, cl ? "}" : "", tail);
}
