/* The Redis Cluster router (cluster_client.h). */
#include "cluster_client.h"

#include <hiredis/async.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client.h"
#include "common.h"

/* One node: its client, and the commands that wait for it to be ready. */
struct conn {
  struct sl_cluster *cl;
  struct sl_redis *r;
  struct sl_cluster_node at;
  struct sl_link pending; /* struct req, in order */
};

/* One command, from sl_cluster_command to its callback. */
struct req {
  struct sl_link link; /* in a conn's pending or the router's delayed list */
  struct sl_cluster *cl;
  sl_cluster_reply_fn *cb;
  void *priv;
  unsigned slot, tries; /* tries: sends so far, and retries owed to a node down */
  int asking;           /* ASKING before the next send (an ASK redirect) */
  struct conn *to;      /* the next send goes here (a redirect), not to the map's master */
  uint64_t due_ms;      /* in delayed: when to route it again */
  int argc;
  const char **argv;    /* argv, argvlen and the bytes in this block */
  size_t *argvlen;
};

struct sl_cluster {
  uv_timer_t timer; /* retries of delayed commands, map reloads wanted */
  uv_loop_t *loop;
  struct sl_cluster_opts o;
  char subject[128];
  struct sl_cluster_node seeds[SL_CLUSTER_MAX_SEEDS];
  struct conn *conns[SL_CLUSTER_MAX_CONNS];
  unsigned nconns;
  struct sl_cluster_map *map, *next; /* next: where a CLUSTER SLOTS reply is read */
  int loading, reload;               /* a CLUSTER SLOTS outstanding; one wanted */
  int stopped;
  struct sl_link delayed;
  struct sl_cluster_stats stats;
};

static void route(struct req *q);
static void on_timer(uv_timer_t *t);

/* ---- requests ---- */

static void finish(struct req *q, const redisReply *reply) {
  q->cb(q->priv, reply);
  free(q);
}

static void arm(struct sl_cluster *cl, uint64_t due) {
  uint64_t now = uv_now(cl->loop);
  if (uv_is_active((uv_handle_t *)&cl->timer) && uv_timer_get_due_in(&cl->timer) <= (due > now ? due - now : 0))
    return;
  uv_timer_start(&cl->timer, on_timer, due > now ? due - now : 0, 0);
}

/* Routes q again later, or answers it NULL from the timer once its tries
 * are spent: never from inside sl_cluster_command. count: the wait counts
 * as a try (q was not sent: its node is down, or could not take it). */
static void delay(struct req *q, int count) {
  struct sl_cluster *cl = q->cl;
  unsigned ms = SL_CLUSTER_RETRY_MS << (q->tries > 4 ? 4 : q->tries);
  if (ms > 1000) ms = 1000;
  q->tries += count != 0;
  q->due_ms = uv_now(cl->loop) + ms;
  sl_list_push(&cl->delayed, &q->link);
  arm(cl, q->due_ms);
}

/* ---- nodes ---- */

static void conn_ready(void *data);
static void conn_down(void *data, const char *why);

/* The node at (host, port), connected (or connecting) from now on; NULL
 * when SL_CLUSTER_MAX_CONNS are. */
static struct conn *conn_get(struct sl_cluster *cl, const char *host, int port) {
  for (unsigned i = 0; i < cl->nconns; i++)
    if (cl->conns[i]->at.port == port && !strcmp(cl->conns[i]->at.host, host)) return cl->conns[i];
  if (cl->nconns == SL_CLUSTER_MAX_CONNS) return NULL;
  struct conn *n = sl_calloc(1, sizeof *n);
  n->cl = cl;
  snprintf(n->at.host, sizeof n->at.host, "%s", host);
  n->at.port = port;
  sl_list_init(&n->pending);
  char addr[SL_CLUSTER_HOST_MAX + 16], subject[SL_CLUSTER_HOST_MAX + 160];
  snprintf(addr, sizeof addr, strchr(host, ':') ? "[%s]:%d" : "%s:%d", host, port);
  snprintf(subject, sizeof subject, "%s %s is", cl->subject, addr);
  struct sl_redis_opts ro = {
      .addr = addr,
      .timeout_ms = cl->o.timeout_ms,
      .backoff_max_ms = 1000,
      .log_subject = subject,
      .on_ready = conn_ready,
      .on_down = conn_down,
      .data = n,
  };
  if (sl_redis_init(&n->r, cl->loop, &ro) != 0) { /* a host the parser refuses: cluster.c checked it */
    free(n);
    return NULL;
  }
  cl->conns[cl->nconns++] = n;
  sl_redis_start(n->r);
  return n;
}

static void route(struct req *q);

static void on_slots(redisAsyncContext *c, void *reply, void *priv) {
  struct sl_cluster *cl = priv; /* alive: sl_cluster_stop drops the connections before freeing it */
  struct conn *n = sl_redis_owner(c, reply);
  cl->loading = 0;
  if (!n) { /* dropped: ask another node */
    if (!cl->stopped) cl->reload = 1;
    return;
  }
  char err[200];
  if (sl_cluster_map_parse(cl->next, reply, n->at.host, err, sizeof err) != 0) {
    cl->stats.maps_refused++;
    fprintf(stderr, "sluice: %s: the slot map from %s:%d is refused, the old one kept: %s\n", cl->subject,
            n->at.host, n->at.port, err);
    return;
  }
  struct sl_cluster_map *old = cl->map;
  int first = old == NULL;
  cl->map = cl->next;
  cl->next = old ? old : sl_malloc(sizeof *cl->next);
  cl->stats.maps++;
  for (unsigned i = 0; i < cl->map->nnodes; i++) /* every master connects now, not at its first command */
    conn_get(cl, cl->map->nodes[i].host, cl->map->nodes[i].port);
  /* Commands that wait for a node that is down were never sent: they go
   * where this map says (its slots may have failed over to a replica). */
  struct sl_link again;
  sl_list_init(&again);
  for (unsigned i = 0; i < cl->nconns; i++) {
    struct conn *c2 = cl->conns[i];
    if (sl_redis_cmd(c2->r)) continue;
    while (!sl_list_empty(&c2->pending)) {
      struct sl_link *l = c2->pending.next;
      sl_list_remove(l);
      sl_list_push(&again, l);
    }
  }
  while (!sl_list_empty(&again)) {
    struct req *q = sl_container_of(again.next, struct req, link);
    sl_list_remove(&q->link);
    route(q);
  }
  if (first && cl->o.on_map) cl->o.on_map(cl->o.data);
}

/* Asks a ready node for the slot map; later (conn_ready, the timer) when
 * none is ready or one is being asked. */
static void reload(struct sl_cluster *cl) {
  cl->reload = 1;
  if (cl->loading || cl->stopped) return;
  for (unsigned i = 0; i < cl->nconns; i++) {
    redisAsyncContext *ac = sl_redis_cmd(cl->conns[i]->r);
    if (ac && redisAsyncCommand(ac, on_slots, cl, "CLUSTER SLOTS") == REDIS_OK) {
      cl->loading = 1;
      cl->reload = 0;
      return;
    }
  }
}

static void on_asking(redisAsyncContext *c, void *reply, void *priv) {
  (void)priv;
  sl_redis_owner(c, reply); /* progress; a refused ASKING shows in the command's own reply */
}

static void on_reply(redisAsyncContext *c, void *reply, void *priv);

static void send_to(redisAsyncContext *ac, struct req *q) {
  if (q->asking && redisAsyncCommand(ac, on_asking, NULL, "ASKING") != REDIS_OK) {
    delay(q, 1);
    return;
  }
  q->asking = 0;
  q->tries++;
  if (redisAsyncCommandArgv(ac, on_reply, q, q->argc, q->argv, q->argvlen) != REDIS_OK) delay(q, 0);
}

static void conn_ready(void *data) {
  struct conn *n = data;
  redisAsyncContext *ac = sl_redis_cmd(n->r);
  while (!sl_list_empty(&n->pending) && ac) {
    struct req *q = sl_container_of(n->pending.next, struct req, link);
    sl_list_remove(&q->link);
    send_to(ac, q);
  }
  if (n->cl->reload || !n->cl->map) reload(n->cl);
}

/* The node is gone (its commands in flight are answered NULL by hiredis):
 * those that wait for it are routed again after a delay, by a map asked
 * afresh (a failover moves its slots to a replica). */
static void conn_down(void *data, const char *why) {
  (void)why;
  struct conn *n = data;
  struct sl_cluster *cl = n->cl;
  while (!sl_list_empty(&n->pending)) {
    struct req *q = sl_container_of(n->pending.next, struct req, link);
    sl_list_remove(&q->link);
    cl->stats.retried++;
    delay(q, 1);
  }
  reload(cl);
}

/* ---- routing ---- */

/* Sends q to the node of its redirect, or of its slot's master, or (no map
 * yet, or no master for the slot) any node: that node's MOVED says where. */
static void route(struct req *q) {
  struct sl_cluster *cl = q->cl;
  struct conn *n = q->to;
  q->to = NULL;
  if (!n) {
    const struct sl_cluster_node *m = cl->map ? sl_cluster_map_node(cl->map, q->slot) : NULL;
    if (m) n = conn_get(cl, m->host, m->port);
    for (unsigned i = 0; !n && i < cl->nconns; i++) /* a ready one first */
      if (sl_redis_cmd(cl->conns[i]->r)) n = cl->conns[i];
    if (!n && cl->nconns) n = cl->conns[0];
  }
  if (!n) {
    delay(q, 1);
    return;
  }
  redisAsyncContext *ac = sl_redis_cmd(n->r);
  if (ac)
    send_to(ac, q);
  else
    sl_list_push(&n->pending, &q->link);
}

static void on_reply(redisAsyncContext *c, void *reply, void *priv) {
  struct req *q = priv;
  struct conn *n = sl_redis_owner(c, reply);
  const redisReply *r = reply;
  if (!n || !r || r->type != REDIS_REPLY_ERROR) {
    finish(q, n ? r : NULL);
    return;
  }
  struct sl_cluster *cl = n->cl;
  enum sl_cluster_err kind = sl_cluster_error_kind(r->str, r->len);
  if (kind == SL_CLUSTER_ERR_OTHER) {
    finish(q, r);
    return;
  }
  if (q->tries >= SL_CLUSTER_MAX_TRIES) {
    cl->stats.gave_up++;
    finish(q, r);
    return;
  }
  if (kind == SL_CLUSTER_ERR_TRYAGAIN || kind == SL_CLUSTER_ERR_CLUSTERDOWN) {
    cl->stats.retried++;
    delay(q, 0); /* the send was counted */
    return;
  }
  struct sl_cluster_redirect rd;
  if (sl_cluster_parse_redirect(r->str, r->len, &rd) != 0 ||
      !(q->to = conn_get(cl, rd.host[0] ? rd.host : n->at.host, rd.port))) {
    finish(q, r); /* a redirect we cannot follow: the caller sees it */
    return;
  }
  if (kind == SL_CLUSTER_ERR_ASK) {
    cl->stats.ask++;
    q->asking = 1;
  } else {
    cl->stats.moved++;
    reload(cl);
  }
  route(q);
}

static void on_timer(uv_timer_t *t) {
  struct sl_cluster *cl = sl_container_of(t, struct sl_cluster, timer);
  uint64_t now = uv_now(cl->loop), next = 0;
  struct sl_link due;
  sl_list_init(&due);
  for (struct sl_link *l = cl->delayed.next, *nx; l != &cl->delayed; l = nx) {
    nx = l->next;
    struct req *q = sl_container_of(l, struct req, link);
    if (q->due_ms <= now) {
      sl_list_remove(l);
      sl_list_push(&due, l);
    } else if (!next || q->due_ms < next) {
      next = q->due_ms;
    }
  }
  if (cl->reload) reload(cl);
  while (!sl_list_empty(&due)) {
    struct req *q = sl_container_of(due.next, struct req, link);
    sl_list_remove(&q->link);
    if (q->tries >= SL_CLUSTER_MAX_TRIES) {
      cl->stats.gave_up++;
      finish(q, NULL);
    } else {
      route(q);
    }
  }
  if (next) arm(cl, next);
  else if (cl->reload) arm(cl, now + SL_CLUSTER_RETRY_MS);
}

/* ---- API ---- */

int sl_cluster_init(struct sl_cluster **out, uv_loop_t *loop, const struct sl_cluster_opts *o) {
  if (o->nseeds < 1 || o->nseeds > SL_CLUSTER_MAX_SEEDS) return UV_EINVAL;
  for (unsigned i = 0; i < o->nseeds; i++)
    if (!o->seeds[i].host[0] || o->seeds[i].port < 1 || o->seeds[i].port > 65535) return UV_EINVAL;
  struct sl_cluster *cl = sl_calloc(1, sizeof *cl);
  cl->loop = loop;
  cl->o = *o;
  memcpy(cl->seeds, o->seeds, o->nseeds * sizeof *o->seeds);
  cl->o.seeds = cl->seeds;
  snprintf(cl->subject, sizeof cl->subject, "%s", o->log_subject ? o->log_subject : "redis cluster");
  cl->o.log_subject = cl->subject;
  cl->next = sl_malloc(sizeof *cl->next);
  sl_list_init(&cl->delayed);
  uv_timer_init(loop, &cl->timer);
  *out = cl;
  return 0;
}

void sl_cluster_start(struct sl_cluster *cl) {
  for (unsigned i = 0; i < cl->o.nseeds; i++) conn_get(cl, cl->seeds[i].host, cl->seeds[i].port);
}

static void on_closed(uv_handle_t *h) {
  struct sl_cluster *cl = sl_container_of((uv_timer_t *)h, struct sl_cluster, timer);
  for (unsigned i = 0; i < cl->nconns; i++) free(cl->conns[i]);
  free(cl->map);
  free(cl->next);
  free(cl);
}

void sl_cluster_stop(struct sl_cluster *cl) {
  cl->stopped = 1;
  for (unsigned i = 0; i < cl->nconns; i++) {
    struct conn *n = cl->conns[i];
    while (!sl_list_empty(&n->pending)) {
      struct req *q = sl_container_of(n->pending.next, struct req, link);
      sl_list_remove(&q->link);
      finish(q, NULL);
    }
  }
  while (!sl_list_empty(&cl->delayed)) {
    struct req *q = sl_container_of(cl->delayed.next, struct req, link);
    sl_list_remove(&q->link);
    finish(q, NULL);
  }
  for (unsigned i = 0; i < cl->nconns; i++) sl_redis_stop(cl->conns[i]->r); /* in flight: answered NULL */
  uv_close((uv_handle_t *)&cl->timer, on_closed);
}

int sl_cluster_command(struct sl_cluster *cl, unsigned slot, sl_cluster_reply_fn *cb, void *priv, int argc,
                       const char **argv, const size_t *argvlen) {
  if (argc < 1 || slot >= SL_CLUSTER_SLOTS || cl->stopped) return UV_EINVAL;
  size_t bytes = 0;
  for (int i = 0; i < argc; i++) bytes += argvlen[i];
  struct req *q = sl_malloc(sizeof *q + (size_t)argc * (sizeof(char *) + sizeof(size_t)) + bytes + 1);
  memset(q, 0, sizeof *q);
  q->cl = cl;
  q->cb = cb;
  q->priv = priv;
  q->slot = slot;
  q->argc = argc;
  q->argv = (const char **)(q + 1);
  q->argvlen = (size_t *)(q->argv + argc);
  char *b = (char *)(q->argvlen + argc);
  for (int i = 0; i < argc; i++) {
    if (argvlen[i]) memcpy(b, argv[i], argvlen[i]);
    q->argv[i] = b;
    q->argvlen[i] = argvlen[i];
    b += argvlen[i];
  }
  route(q);
  return 0;
}

void sl_cluster_refresh(struct sl_cluster *cl) {
  if (!cl->stopped) reload(cl);
}

const struct sl_cluster_map *sl_cluster_map(const struct sl_cluster *cl) { return cl->map; }
const struct sl_cluster_stats *sl_cluster_stats(const struct sl_cluster *cl) { return &cl->stats; }
