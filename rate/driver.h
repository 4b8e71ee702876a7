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
  struct sl_redis_url url; /* parsed: one server or Sentinel (addr.h) */
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
/* Connects to Redis. Returns the context, or NULL after printing why. */
redisContext *connect_redis(const struct common_opts *co);

/* Runs one command (argv of NUL-terminated strings). Returns the reply, or
 * NULL with err (errlen bytes) set when the connection failed or Redis
 * answered an error. The caller frees the reply. */
redisReply *command(redisContext *c, const struct strv *args, char *err, size_t errlen);
/* Whether a string reply holds a NUL byte. */
int has_nul(const redisReply *rep);

/* The subcommands: argv[1] is the subcommand's name. Return the exit status. */
int topup_main(int argc, char **argv);
int statement_main(int argc, char **argv);

#endif
