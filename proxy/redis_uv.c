#include "redis_uv.h"

#include <stdlib.h>

struct sl_redis_ev {
  redisAsyncContext *ac;
  uv_poll_t poll;
  int events;
};

static void on_poll(uv_poll_t *h, int status, int events) {
  struct sl_redis_ev *e = h->data;
  if (status < 0) {
    /* An error on the socket: let hiredis find it (SO_ERROR on a connect,
     * a failed read otherwise) and run its callbacks. */
    events = e->events ? e->events : UV_WRITABLE;
  }
  if (e->ac && (events & UV_READABLE)) redisAsyncHandleRead(e->ac);
  if (e->ac && (events & UV_WRITABLE)) redisAsyncHandleWrite(e->ac);
}

static void update(struct sl_redis_ev *e, int add, int del) {
  e->events = (e->events | add) & ~del;
  if (e->events)
    uv_poll_start(&e->poll, e->events, on_poll);
  else
    uv_poll_stop(&e->poll);
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

int sl_redis_attach(redisAsyncContext *ac, uv_loop_t *loop) {
  if (ac->ev.data) return REDIS_ERR;
  struct sl_redis_ev *e = calloc(1, sizeof(*e));
  if (!e) return REDIS_ERR;
  if (uv_poll_init(loop, &e->poll, ac->c.fd) != 0) {
    free(e);
    return REDIS_ERR;
  }
  e->ac = ac;
  e->poll.data = e;
  ac->ev.addRead = add_read;
  ac->ev.delRead = del_read;
  ac->ev.addWrite = add_write;
  ac->ev.delWrite = del_write;
  ac->ev.cleanup = cleanup;
  ac->ev.data = e;
  return REDIS_OK;
}
