/* What the parts of the sluice-rate executable share (main.c: the daily
 * rating and --due; topup.c; statement.c): owned string vectors, the
 * command line, the Redis connection. Not part of the rating library
 * (rating.h), which does no I/O. Single-threaded. */
#ifndef RATE_DRIVER_H
#define RATE_DRIVER_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <hiredis/hiredis.h>

#include "sentinel.h"

#define EXIT_USAGE 2
#define CONNECT_TIMEOUT_S 5
#define COMMAND_TIMEOUT_S 30

/* A growable vector of owned NUL-terminated strings. */
struct strv {
  char **v;
  size_t n, cap;
};
void strv_push(struct strv *s, char *owned);
void strv_pushf(struct strv *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void strv_push_dec(struct strv *s, int64_t v);   /* rate_dec_format */
void strv_push_money(struct strv *s, int64_t v); /* rate_money_format */
void strv_free(struct strv *s);
/* A newly allocated formatted string; the caller frees it. Aborts when out
 * of memory. */
char *xformat(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* The options every subcommand shares. */
struct common_opts {
  const char *redis;      /* as given */
  struct sl_redis_url url; /* parsed: one server, Sentinel or a cluster (addr.h) */
  const char *prefix;
  int tz_offset_min;
};

/* One option of a subcommand: a flag (*flag = 1) or a value (*val). */
struct opt_spec {
  const char *name; /* "--day" */
  int *flag;
  const char **val;
};
/* Parses argv[first..] against specs and the common options (--redis,
 * --redis-prefix, --tz-offset-min when tz is non-zero). Returns 0, 1 for
 * --help, or -1 after printing the error on stderr. */
int parse_opts(int argc, char **argv, int first, const struct opt_spec *specs, struct common_opts *co, int tz);
/* sluice-rate's Redis (rconn.c): one server, Sentinel's master, or a Redis
 * Cluster routed by key slot (MOVED / ASK followed). */
struct rconn;
/* Connects to what co->url names. Returns the connection (rconn_free), or
 * NULL after printing why. */
struct rconn *connect_redis(const struct common_opts *co);
void rconn_free(struct rconn *k);
int rconn_cluster(const struct rconn *k);
/* Whether the connection is lost (a cluster: a command failed all its
 * tries); rconn_errstr says why. */
int rconn_broken(const struct rconn *k);
const char *rconn_errstr(const struct rconn *k);
/* Pipelining: queues a command (argv of NUL-terminated strings, copied);
 * rconn_get_reply returns the replies in order: REDIS_OK with *out (the
 * caller frees it), or REDIS_ERR when the connection failed. */
int rconn_append(struct rconn *k, int argc, const char **argv);
int rconn_get_reply(struct rconn *k, redisReply **out);
/* Runs one command (argv of NUL-terminated strings). Returns the reply, or
 * NULL with err (errlen bytes) set when the connection failed or Redis
 * answered an error. The caller frees the reply. */
redisReply *command(struct rconn *k, const struct strv *args, char *err, size_t errlen);
/* SCAN MATCH match TYPE type over the whole keyspace (every master of a
 * cluster), COUNT 1000 a step: each(key, len, arg) for every key found.
 * Only with nothing queued. Returns 0, or -1 (rconn_errstr says why). */
int rconn_scan(struct rconn *k, const char *match, const char *type, void (*each)(const char *, size_t, void *),
               void *arg);
/* A per-account key: <prefix><name><uid><tail>, or in a cluster
 * <prefix><name>{<uid>}<tail> (SPEC 10: one account's keys in one slot).
 * The caller frees it. */
char *acct_key(const struct common_opts *co, const char *name, const char *uid, const char *tail);

/* Redis Cluster: the account's outbox (P outbox:{uid}, keys.h), where its
 * scripts leave what they cannot write to keys of other slots: each entry
 * is applied (op alert: XADD P alerts; suspend / lift: SADD / SREM
 * P suspended and a PUBLISH of it on P changes), then deleted; a crash in
 * between applies it again (docs/rating.md). Returns 0 once the outbox is
 * empty, or -1 with err set. */
int outbox_drain(struct rconn *k, const struct common_opts *co, const char *uid, char *err, size_t errlen);
/* Sets *member to whether uid is in P suspended. Returns 0 or -1 with err. */
int suspended_member(struct rconn *k, const struct common_opts *co, const char *uid, int *member, char *err,
                     size_t errlen);
/* Whether a string reply holds a NUL byte. */
int has_nul(const redisReply *rep);

/* The subcommands: argv[1] is the subcommand's name. Return the exit status. */
int topup_main(int argc, char **argv);
int statement_main(int argc, char **argv);

#endif
