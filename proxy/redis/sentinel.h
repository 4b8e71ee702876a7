/* Redis Sentinel (SPEC 10): what the sentinels' and a server's replies
 * mean, shared by the event-loop client (client.c) and sluice-rate's
 * synchronous connect (below). No state: every function reads a reply, or
 * connects and returns. */
#ifndef SL_REDIS_SENTINEL_H
#define SL_REDIS_SENTINEL_H

#include <hiredis/hiredis.h>
#include <stddef.h>

#include "addr.h"

/* The pub/sub channel on which sentinels announce a new master:
 * "<name> <old ip> <old port> <new ip> <new port>". */
#define SL_SENTINEL_SWITCH_CHANNEL "+switch-master"

/* The reply to SENTINEL get-master-addr-by-name: returns 0 with the
 * master's address in *out, or -1 with why (whylen bytes): the sentinel
 * does not know the master (nil), an error, or not [ip, port]. */
int sl_sentinel_master_reply(const redisReply *r, struct sl_redis_hostport *out, char *why, size_t whylen);

/* The reply to ROLE: returns 1 for a master, with *replicas the number of
 * connected replicas it lists; 0 for another role (why names it, e.g.
 * "ROLE says slave"); -1 when the reply is not ROLE's (an error, another
 * shape; why says which). */
int sl_redis_role_reply(const redisReply *r, int *replicas, char *why, size_t whylen);

/* A pub/sub reply on a sentinel connection: returns 1 when it is a
 * +switch-master message for master, with the new address in *out; 0 for
 * anything else (another master, the subscribe confirmation, junk). */
int sl_sentinel_switch_msg(const redisReply *r, const char *master, struct sl_redis_hostport *out);

/* Connects synchronously to what u names (sluice-rate): the server itself,
 * or, for Sentinel, the master the sentinels name, asked in turn, each
 * within timeout_ms for its connect and its reply, and then checked with
 * ROLE to be a master. Returns the context (the caller sets its command
 * timeout and frees it), or NULL with err (errlen bytes) saying why the
 * last try failed. */
redisContext *sl_redis_connect_sync(const struct sl_redis_url *u, unsigned timeout_ms, char *err, size_t errlen);

#endif
