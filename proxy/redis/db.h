/* The one way sluice's threads send commands to Redis, whatever the
 * deployment --redis names (SPEC 10): one server or Sentinel (client.h: one
 * connection, every slot on it) or a Redis Cluster (cluster_client.h: each
 * command to the master of its slot). A user names the slot its command's
 * keys are in (sl_db_uid_slot for an account's keys, sl_db_key_slot for a
 * key without a UID) and builds its key names with sl_db_uid_key; with one
 * server the slot is ignored and the names are keys.h's exactly.
 *
 * Everything runs on the loop's thread. Errors are 0 or a negative errno
 * (UV_E* codes). */
#ifndef SL_REDIS_DB_H
#define SL_REDIS_DB_H

#include <hiredis/hiredis.h>
#include <stddef.h>

#include "client.h"
#include "cluster.h"

struct sl_db; /* opaque */

/* A command's reply. owner: opts.data, or NULL when the command's
 * connection was dropped with one server (opts.on_down says so) or the db
 * is stopping: the callback then only frees what priv owns. reply: NULL
 * when its fate is unknown (the connection was lost after it was sent, or
 * the cluster's tries are spent), else hiredis' reply (freed after the
 * callback returns), possibly an error reply. */
typedef void sl_db_reply_fn(void *owner, void *priv, const redisReply *reply);

/* Makes a db on loop for opts->addr (client.h's options: on_ready once
 * commands may go; on_down only with one server, as client.h says; with
 * a cluster each lost command is answered NULL instead, and on_ready is
 * called when the first slot map is loaded). subscriber: one server only
 * (sl_db_sub). Returns 0 with *out set, or a negative errno (UV_EINVAL: a
 * bad address). */
int sl_db_init(struct sl_db **out, uv_loop_t *loop, const struct sl_redis_opts *opts);
void sl_db_start(struct sl_db *db);
/* Drops everything; commands not answered are answered (owner NULL); db is
 * freed by the loop's close callbacks. */
void sl_db_stop(struct sl_db *db);

/* 1 for a Redis Cluster: key names carry the UID as a hash tag. */
int sl_db_cluster(const struct sl_db *db);
/* Whether commands may be sent now (one server: ready; a cluster: always,
 * commands wait in the router for their node). */
int sl_db_ready(const struct sl_db *db);
enum sl_redis_state sl_db_state(const struct sl_db *db);

/* Sends argv to the node of slot (ignored with one server); cb once, later,
 * never from inside this call. Two commands to one slot go on one
 * connection in order while its node does not change (WAIT after a write
 * counts that write). Returns 0, or UV_ENOTCONN (not ready: cb is never
 * called) or UV_EINVAL. */
int sl_db_command(struct sl_db *db, unsigned slot, sl_db_reply_fn *cb, void *priv, int argc, const char **argv,
                  const size_t *argvlen);

/* A Lua script called by its SHA-1 (EVALSHA): Redis then reads 40 bytes
 * instead of the script's text and hashes nothing per call (a lookup's
 * script is over a kilobyte). text must outlive every call of it. */
struct sl_db_script {
  const char *text;
  size_t len;
  char sha[41];
};
void sl_db_script_init(struct sl_db_script *s, const char *text, size_t len);
/* EVALSHA s, then argv[0..argc) (numkeys, keys, args), as sl_db_command.
 * Where Redis lacks the script (restarted, a promoted replica, SCRIPT
 * FLUSH: NOSCRIPT) the call goes once more as EVAL, which loads it; cb sees
 * that one's reply only. */
int sl_db_eval(struct sl_db *db, unsigned slot, const struct sl_db_script *s, sl_db_reply_fn *cb, void *priv,
               int argc, const char **argv, const size_t *argvlen);
/* The SHA-1 (FIPS 180-4) of len bytes, in hex: EVALSHA's name of a script. */
void sl_db_sha1_hex(const char *data, size_t len, char out[41]);

/* The slot of an account's keys, and of a key without a UID. */
static inline unsigned sl_db_uid_slot(const char *uid, size_t len) { return sl_cluster_uid_slot(uid, len); }
static inline unsigned sl_db_key_slot(const char *key, size_t len) { return sl_cluster_key_slot(key, len); }
/* <head><uid><tail>, or <head>{<uid>}<tail> in a cluster: cluster.h's
 * sl_cluster_uid_key. */
static inline int sl_db_uid_key(const struct sl_db *db, char *out, size_t cap, const char *head, size_t headlen,
                                const char *uid, size_t uidlen, const char *tail, size_t taillen) {
  return sl_cluster_uid_key(out, cap, sl_db_cluster(db), head, headlen, uid, uidlen, tail, taillen);
}

/* Replicas the master of slot has (one server: client.h's ROLE count; a
 * cluster: what CLUSTER SLOTS listed), or -1 while not known. */
int sl_db_replicas(const struct sl_db *db, unsigned slot);

/* A cluster's current slot map (NULL before the first, and with one
 * server): its masters, for connections of the owner's own (the
 * directory's subscribers). Valid until the loop runs again. */
const struct sl_cluster_map *sl_db_map(const struct sl_db *db);

/* A cluster: the slot map asked for again (sl_cluster_refresh); nothing
 * with one server. */
void sl_db_refresh(struct sl_db *db);

/* One server only (NULL in a cluster): the client, for its subscriber
 * connection and the final flush's sl_redis_connect_now / quiet. */
struct sl_redis *sl_db_single(struct sl_db *db);

#endif
