/* A Redis Cluster router on a libuv loop (issue 14): one client (client.h:
 * connect timeout, PING readiness, watchdog, backoff, "down" logging) per
 * master, the slot map loaded with CLUSTER SLOTS from the seeds and
 * reloaded when a node says MOVED or goes down, and each command sent to
 * the master of the slot the caller names. cluster.h has the pure parts
 * (slots, the map, redirects).
 *
 * A command answered MOVED is sent again to the node named (and the map
 * reloaded), ASK with ASKING first to the node named, TRYAGAIN and
 * CLUSTERDOWN after a delay (SL_CLUSTER_RETRY_MS, doubling), each at most
 * SL_CLUSTER_MAX_TRIES times in all: these errors say the command did not
 * run, so sending it again runs it once. A command whose connection is lost
 * after it was sent is not sent again (it may have run): the caller hears
 * NULL and decides (the flusher's batch ids make a replay safe).
 *
 * Everything runs on the loop's thread. Errors are 0 or a negative errno
 * (UV_E* codes). */
#ifndef SL_REDIS_CLUSTER_CLIENT_H
#define SL_REDIS_CLUSTER_CLIENT_H

#include <hiredis/hiredis.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "cluster.h"

#define SL_CLUSTER_MAX_TRIES 5    /* sends of one command at most (the first and the redirected or retried) */
#define SL_CLUSTER_RETRY_MS 100   /* first delay after TRYAGAIN, CLUSTERDOWN or a node down; doubles, up to 1 s */
#define SL_CLUSTER_MAX_CONNS 128  /* nodes connected at most (masters, seeds, nodes a redirect named) */
#define SL_CLUSTER_MAX_SEEDS 16

struct sl_cluster; /* opaque */

struct sl_cluster_opts {
  const struct sl_cluster_node *seeds; /* cluster://HOST:PORT[,...]: asked for the map (copied) */
  unsigned nseeds;                     /* 1..SL_CLUSTER_MAX_SEEDS */
  unsigned timeout_ms;                 /* each node's client: --redis-timeout-ms */
  const char *log_subject;             /* e.g. "metering: redis cluster"; a node's lines add "HOST:PORT is" */
  /* Optional, on the loop's thread: the first slot map is loaded (commands
   * go straight to their masters from now on). */
  void (*on_map)(void *data);
  void *data;
};

/* The router's counters (read on the loop's thread). */
struct sl_cluster_stats {
  uint64_t moved, ask, retried;     /* MOVED and ASK followed, TRYAGAIN / CLUSTERDOWN / down retried */
  uint64_t maps, maps_refused;      /* CLUSTER SLOTS replies taken, refused (the old map kept) */
  uint64_t gave_up;                 /* commands answered with their last cluster error after the tries */
};

/* The reply to a command: hiredis' reply (freed by the router once the
 * callback returns: copy what is kept), possibly an error reply (the
 * command's own, or the last MOVED / ASK / TRYAGAIN / CLUSTERDOWN once the
 * tries are spent); NULL when the command's fate is unknown (its connection
 * was lost after it was sent) or it was never sent (sl_cluster_stop, no
 * node reachable within the tries, more nodes than SL_CLUSTER_MAX_CONNS). */
typedef void sl_cluster_reply_fn(void *priv, const redisReply *reply);

/* Makes a router on loop (nothing connected yet). Returns 0 with *out set,
 * or UV_EINVAL (no seed, more than SL_CLUSTER_MAX_SEEDS, a seed's host
 * empty or its port not 1..65535). */
int sl_cluster_init(struct sl_cluster **out, uv_loop_t *loop, const struct sl_cluster_opts *o);
/* Connects to the seeds; the first that is ready is asked CLUSTER SLOTS. */
void sl_cluster_start(struct sl_cluster *cl);
/* Every command not answered yet is answered NULL (now, or while the
 * connections are dropped, before this returns unless it is called from a
 * reply callback of that connection), the connections are dropped and the
 * router is freed by the loop's close callbacks: the owner runs its loop
 * once more before closing it. */
void sl_cluster_stop(struct sl_cluster *cl);

/* Sends argv (argc strings of argvlen bytes each; copied) to the master of
 * slot (< SL_CLUSTER_SLOTS: sl_cluster_key_slot of the command's keys, all
 * in that slot); cb(priv, reply) is called once, later, never from inside
 * this call. Before the first map the command goes to a seed and follows
 * MOVED. Returns 0, or UV_EINVAL (argc < 1, slot out of range; cb is then
 * never called). */
int sl_cluster_command(struct sl_cluster *cl, unsigned slot, sl_cluster_reply_fn *cb, void *priv, int argc,
                       const char **argv, const size_t *argvlen);

/* Asks a ready node for the slot map again (at most one CLUSTER SLOTS at
 * a time; later when none is ready): for an owner that sees a master
 * unreachable on connections of its own. */
void sl_cluster_refresh(struct sl_cluster *cl);

/* The current slot map, or NULL before the first one. */
const struct sl_cluster_map *sl_cluster_map(const struct sl_cluster *cl);
const struct sl_cluster_stats *sl_cluster_stats(const struct sl_cluster *cl);

#endif
