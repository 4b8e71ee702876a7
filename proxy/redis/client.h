/* One Redis client for every sluice thread that talks to Redis (the
 * directory, the metering flusher, and every later user): the --redis
 * address (one server, or Sentinel: the master asked of the sentinels at
 * every connect, checked with ROLE, and followed at once on +switch-master),
 * connecting with a timeout (hiredis 0.14's async API has none),
 * readiness only once PING is answered PONG, a watchdog on outstanding
 * replies and an idle PING (--redis-timeout-ms), TCP keepalive, reconnect
 * with backoff, the "down" / "up again" log lines (the outage said once,
 * then at most every SL_REDIS_LOG_MS), and the state /metrics shows.
 *
 * The owner sends its commands with hiredis itself on sl_redis_cmd() (and
 * subscribes on sl_redis_sub()); every reply callback starts with
 * sl_redis_owner(), which says whether the connection is still wanted and
 * counts the reply as progress for the watchdog.
 *
 * Everything runs on the thread of the loop given at init. Errors are 0 or a
 * negative errno (UV_E* codes), as in libuv. */
#ifndef SL_REDIS_CLIENT_H
#define SL_REDIS_CLIENT_H

#include <hiredis/async.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#define SL_REDIS_LOG_MS 10000 /* while down, at most one line per this; also the stay up that resets the backoff */

struct sl_redis; /* opaque */

struct sl_redis_opts {
  const char *addr;        /* --redis: HOST:PORT, [V6]:PORT, unix:PATH or sentinel://...; addr.h */
  unsigned timeout_ms;     /* --redis-timeout-ms: connected and PONG within this; a reply outstanding at most this */
  int subscriber;          /* also keep a second connection for (P)SUBSCRIBE, up and down with the first */
  unsigned backoff_max_ms; /* reconnect backoff cap (0: 2000); a client whose users wait on it keeps it short */
  /* The subject of the log lines "sluice: <subject> down: <why> ...",
   * "... still down after", "... up again after" (copied; e.g.
   * "redis: 10.0.0.1:6379 is" or "metering: redis"). */
  const char *log_subject;
  /* The owner's /metrics, each may be NULL; written by the loop's thread. */
  _Atomic uint64_t *up;       /* gauge 0/1: ready */
  _Atomic uint64_t *attempts; /* connection attempts */
  _Atomic uint64_t *timeouts; /* connections dropped: no PONG or no reply within timeout_ms */
  /* Callbacks, on the loop's thread, never from sl_redis_stop. on_ready: the
   * server answered PING, commands may go. on_down: the connections are
   * gone (why: printable), their pending reply callbacks have run or will
   * run without an owner; a reconnect follows the backoff. */
  void (*on_ready)(void *data);
  void (*on_down)(void *data, const char *why);
  /* Optional: appends to a "down" line what waits meanwhile ("; 3 batches
   * wait"), NUL-terminated within cap. */
  void (*describe)(void *data, char *buf, size_t cap);
  void *data;
};

enum sl_redis_state { SL_REDIS_DOWN, SL_REDIS_CONNECTING, SL_REDIS_READY };

/* Makes a client on loop (not connected yet). Returns 0 with *out set, or a
 * negative errno (UV_EINVAL: a bad address); nothing is left behind then.
 * The caller's thread must be the loop's, or the loop must not run yet. */
int sl_redis_init(struct sl_redis **out, uv_loop_t *loop, const struct sl_redis_opts *o);
/* The first attempt now; from then on the client's timer reconnects. */
void sl_redis_start(struct sl_redis *r);
/* Drops the connections (no log line, no callback; pending reply callbacks
 * run without an owner) and closes the timer; r is freed by the loop's
 * close callback, so the owner runs its loop once more before closing it. */
void sl_redis_stop(struct sl_redis *r);

/* The command connection, or NULL unless ready. sl_redis_cmd, _sub, _state
 * and _stop also take a NULL client: one never ready (the directory with a
 * cluster:// address, where admission is off: it has no Redis yet). */
redisAsyncContext *sl_redis_cmd(struct sl_redis *r);
/* The subscriber connection (opts.subscriber), or NULL unless ready. */
redisAsyncContext *sl_redis_sub(struct sl_redis *r);
enum sl_redis_state sl_redis_state(const struct sl_redis *r);
/* The connected replicas the server's ROLE listed at connect and at the
 * last idle probe (0 when it is not a master), or -1 while not known. Ready
 * implies known (a single server: before the reply to any command of the
 * owner) unless the server refused ROLE. */
int sl_redis_replicas(const struct sl_redis *r);

/* In a reply callback on one of r's connections: the owner's data, or NULL
 * when the connection was dropped (the callback then only frees what it
 * owns). A reply (non-NULL) on the command connection counts as progress. */
void *sl_redis_owner(const redisAsyncContext *c, const void *reply);

/* Connects now if no attempt is under way, whatever the backoff says (the
 * flusher's final flush: Redis may be back since the last try). */
void sl_redis_connect_now(struct sl_redis *r);
/* From now on no line is logged (the owner is exiting and says what is
 * left itself). */
void sl_redis_quiet(struct sl_redis *r);

#endif
