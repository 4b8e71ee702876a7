/* The upstream side as an HTTP client (h2o's httpclient is the model): a
 * caller hands over a request (its bytes, already serialised) and a set of
 * callbacks, and gets the response back through them. Per-worker pools of
 * keep-alive connections, round robin, passive health (eject after
 * max-fails, probe after fail-timeout), connect and response timeouts, and
 * retries on another connection live here; the caller never sees a
 * connection, and this side never reads the caller's state.
 *
 * Contract: after sl_upstream_start returns 0, exactly one of on_done or
 * on_error follows, unless the caller calls sl_upstream_cancel first; before
 * either, on_head once, then on_body and on_flush any number of times. When
 * on_done or on_error runs, the request is already detached (r->conn is
 * NULL), so the callback may start the next request on the same struct. A
 * start that finds no usable member, or whose every connect fails at once,
 * returns a negative errno and calls nothing; a start that returns 0 may
 * already have called on_error (a kept-alive connection that fails as the
 * request is written, with no retry left), so the caller must not touch
 * the request's state after it without checking.
 * Everything runs on the worker's loop thread. */
#ifndef SL_UPSTREAM_H
#define SL_UPSTREAM_H

#include <llhttp.h>
#include <stdint.h>
#include <uv.h>

#include "common.h"
#include "config.h"
#include "respparse.h"

#define SL_POOL_DEFAULT 0
#define SL_POOL_LLM 1
#define SL_NPOOLS 2

struct sl_worker;

struct sl_upstream_cbs {
  void (*on_head)(void *ctx, const struct sl_resp_head *head); /* valid during the call only */
  /* A piece of the body; -1 when the caller cannot take it (the exchange
   * then fails: the connection is closed). */
  int (*on_body)(void *ctx, const char *p, size_t n);
  /* After the pieces of one read: returns 1 when the caller is not ready
   * for more (its client is slow); reading stops until sl_upstream_resume. */
  int (*on_flush)(void *ctx);
  void (*on_done)(void *ctx);
  /* The backend failed (after any retry): status 502 or 504, a Code and a
   * Message for the caller's answer. */
  void (*on_error)(void *ctx, int status, const char *code, const char *msg);
};

/* One request, owned by the caller (embedded in it), valid until on_done,
 * on_error or sl_upstream_cancel. */
struct sl_upreq {
  uv_buf_t bufs[2]; /* the request: head, then body (nbufs 2) */
  unsigned nbufs;
  int pool;                 /* SL_POOL_* */
  unsigned head_method : 1; /* its response has no body */
  const struct sl_upstream_cbs *cbs;
  void *ctx;
  /* upstream.c's */
  struct sl_upconn *conn; /* NULL when not in flight */
  unsigned retries;
};

/* One upstream address as seen by one worker (health is per worker, so no
 * sharing: a worker learns of a dead backend from its own traffic). */
struct sl_upaddr {
  struct sl_addr addr;
  unsigned fails;      /* consecutive */
  uint64_t down_until; /* loop ms; 0 when healthy */
  struct sl_link idle; /* idle keep-alive connections */
  unsigned nidle;
};

/* A pool is replaced, not edited, when a reload changes its addresses;
 * connections hold a reference so the old one lives until they finish. */
struct sl_pool {
  struct sl_upaddr addrs[SL_MAX_UPSTREAMS];
  unsigned n;
  unsigned rr;
  unsigned refs;
};

enum sl_up_state {
  SL_UP_CONNECTING,
  SL_UP_IDLE,
  SL_UP_BUSY, /* request written or being written, response due */
  SL_UP_CLOSING,
};

struct sl_upconn {
  uv_tcp_t tcp;
  uv_connect_t connect_req;
  uv_write_t write_req;
  struct sl_worker *w;
  struct sl_pool *pool;
  struct sl_upaddr *ua;
  struct sl_link link;  /* in ua->idle while idle */
  struct sl_link all;   /* in w->upconns, for timeouts and shutdown */
  struct sl_upreq *req; /* request being served, NULL when idle or cancelled */
  enum sl_up_state state;
  uint64_t deadline; /* loop ms; 0 = none */
  uint64_t started_ns;
  unsigned requests; /* served on this connection */
  struct sl_resp resp; /* the response being read (http/respparse.h) */
  unsigned got_bytes : 1; /* any response byte for the current request */
  unsigned write_pending : 1;
  unsigned paused : 1; /* the caller is not ready for more: reading stopped */
};

/* Starts r on a connection of pool r->pool. Returns 0, UV_EAGAIN when no
 * member of the pool is usable now (the caller answers 503), or another
 * negative errno when every connect failed at once (502). */
int sl_upstream_start(struct sl_worker *w, struct sl_upreq *r);
/* Detaches r (its client went away): a half-read response makes the
 * connection useless, so it is closed. No callback follows. */
void sl_upstream_cancel(struct sl_upreq *r);
/* The caller is ready for more of r's response (after on_flush said 1). */
void sl_upstream_resume(struct sl_upreq *r);
/* Builds or rebuilds the worker's pools from its configuration. */
void sl_worker_pools_build(struct sl_worker *w);
void sl_upconn_sweep(struct sl_upconn *u, uint64_t now);
void sl_upstream_close_idle(struct sl_worker *w);

#endif
