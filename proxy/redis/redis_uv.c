#include "redis_uv.h"

#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>

struct sl_redis_ev {
  redisAsyncContext *ac;
  uv_poll_t poll;
  int events;  /* what hiredis asked for */
  int stalled; /* too much buffered: reads paused (see redis_uv.h) */
  int pubsub;  /* the top-level reply being read is a pub/sub array */
  redisReplyObjectFunctions *orig;
  char why[96];
};

static void on_poll(uv_poll_t *h, int status, int events);

static void apply(struct sl_redis_ev *e) {
  int ev = e->stalled ? e->events & ~UV_READABLE : e->events;
  if (ev)
    uv_poll_start(&e->poll, ev, on_poll);
  else
    uv_poll_stop(&e->poll);
}

static void on_poll(uv_poll_t *h, int status, int events) {
  struct sl_redis_ev *e = h->data;
  if (status < 0) {
    /* An error on the socket: let hiredis find it (SO_ERROR on a connect,
     * a failed read otherwise) and run its callbacks. */
    events = e->events ? e->events : UV_WRITABLE;
  }
  if (e->ac && (events & UV_READABLE)) {
    redisAsyncHandleRead(e->ac);
    /* The reader holds a reply until it is complete: bound what one reply
     * may take (the context may be gone after the callbacks ran). */
    if (e->ac && !e->stalled && e->ac->c.reader->len > SL_REDIS_MAX_BUFFER) {
      e->stalled = 1;
      snprintf(e->why, sizeof(e->why), "a reply over %u MiB", SL_REDIS_MAX_BUFFER >> 20);
      apply(e);
    }
  }
  if (e->ac && (events & UV_WRITABLE)) redisAsyncHandleWrite(e->ac);
}

static void update(struct sl_redis_ev *e, int add, int del) {
  e->events = (e->events | add) & ~del;
  apply(e);
}

static void add_read(void *p) { update(p, UV_READABLE, 0); }
static void del_read(void *p) { update(p, 0, UV_READABLE); }
static void add_write(void *p) { update(p, UV_WRITABLE, 0); }
static void del_write(void *p) { update(p, 0, UV_WRITABLE); }

static void on_closed(uv_handle_t *h) { free(h->data); }

static void cleanup(void *p) {
  struct sl_redis_ev *e = p;
  e->ac = NULL; /* hiredis frees the context right after this */
  uv_close((uv_handle_t *)&e->poll, on_closed);
}

/* ---- the reply guard (runs inside hiredis' reader, on the loop's thread) ---- */

/* The first element of a pub/sub message names its kind; we only ever
 * subscribe, so only these can be meant (hiredis reads element[2] of an
 * unsubscribe reply without checking that it exists). */
static int pubsub_kind_ok(const char *s, size_t n) {
  return (n == 7 && !strncasecmp(s, "message", 7)) || (n == 8 && !strncasecmp(s, "pmessage", 8)) ||
         (n == 9 && !strncasecmp(s, "subscribe", 9)) || (n == 10 && !strncasecmp(s, "psubscribe", 10));
}

/* Whether an object of type `kind` (array: `elements`) may be built at task
 * t. Returns NULL or why not: what hiredis 0.14's async layer would assert
 * on (async.c, redisProcessCallbacks and __redisGetSubscribeCallback). */
static const char *check(struct sl_redis_ev *e, const redisReadTask *t, int kind, long long elements) {
  const redisAsyncContext *ac = e->ac;
  if (!ac) return NULL;
  if (!t->parent) {
    e->pubsub = 0;
    if (ac->replies.head) return NULL;          /* a command waits for it */
    if (kind == REDIS_REPLY_ERROR) return NULL; /* hiredis closes the connection with it */
    if (!(ac->c.flags & REDIS_SUBSCRIBED)) return "a reply no command asked for (not a Redis server?)";
    if (kind != REDIS_REPLY_ARRAY) return NULL; /* goes to no callback */
    if (elements < 3) return "a malformed pub/sub message";
    e->pubsub = 1;
    return NULL;
  }
  if (e->pubsub && !t->parent->parent && t->idx < 2 && kind != REDIS_REPLY_STRING)
    return "a malformed pub/sub message";
  return NULL;
}

static void *refuse(struct sl_redis_ev *e, const char *why) {
  if (!e->why[0]) snprintf(e->why, sizeof(e->why), "%s", why);
  return NULL; /* the reader reports it as an error and hiredis disconnects */
}

static void *g_string(const redisReadTask *t, char *s, size_t n) {
  struct sl_redis_ev *e = t->privdata;
  const char *why = check(e, t, t->type, 0); /* a bulk string, a status or an error line */
  if (!why && e->pubsub && t->parent && !t->parent->parent && t->idx == 0 && !pubsub_kind_ok(s, n))
    why = "an unexpected pub/sub message";
  return why ? refuse(e, why) : e->orig->createString(t, s, n);
}

static void *g_array(const redisReadTask *t, int elements) {
  struct sl_redis_ev *e = t->privdata;
  const char *why = sl_redis_array_ok(elements) ? check(e, t, REDIS_REPLY_ARRAY, elements)
                                                : "an array reply of more elements than any sluice asks for";
  return why ? refuse(e, why) : e->orig->createArray(t, elements);
}

static void *g_integer(const redisReadTask *t, long long v) {
  struct sl_redis_ev *e = t->privdata;
  const char *why = check(e, t, REDIS_REPLY_INTEGER, 0);
  return why ? refuse(e, why) : e->orig->createInteger(t, v);
}

static void *g_nil(const redisReadTask *t) {
  struct sl_redis_ev *e = t->privdata;
  const char *why = check(e, t, REDIS_REPLY_NIL, 0);
  return why ? refuse(e, why) : e->orig->createNil(t);
}

/* freeObject takes no task: it must be hiredis' own (checked at attach). */
static redisReplyObjectFunctions guard_fns = {g_string, g_array, g_integer, g_nil, freeReplyObject};

int sl_redis_attach(redisAsyncContext *ac, uv_loop_t *loop) {
  if (ac->ev.data) return REDIS_ERR;
  redisReader *r = ac->c.reader;
  if (!r || !r->fn || r->fn->freeObject != freeReplyObject || !r->fn->createString || !r->fn->createArray ||
      !r->fn->createInteger || !r->fn->createNil)
    return REDIS_ERR; /* not the reader this guard was written for */
  struct sl_redis_ev *e = calloc(1, sizeof(*e));
  if (!e) return REDIS_ERR;
  if (uv_poll_init(loop, &e->poll, ac->c.fd) != 0) {
    free(e);
    return REDIS_ERR;
  }
  e->ac = ac;
  e->poll.data = e;
  e->orig = r->fn;
  r->fn = &guard_fns;
  r->privdata = e; /* copied into every read task */
  ac->ev.addRead = add_read;
  ac->ev.delRead = del_read;
  ac->ev.addWrite = add_write;
  ac->ev.delWrite = del_write;
  ac->ev.cleanup = cleanup;
  ac->ev.data = e;
  return REDIS_OK;
}

const char *sl_redis_refused(const redisAsyncContext *ac) {
  const struct sl_redis_ev *e = ac->ev.data;
  return e && e->why[0] ? e->why : NULL;
}
