/* Unit tests of the upstream client (proxy/upstream.h) against a fake peer:
 * a libuv server in the same loop that answers each request with a scripted
 * reply. They hold the callback contract: on_head once, then body pieces,
 * then exactly one of on_done or on_error (with the request detached first),
 * nothing after a cancel, a synchronous failure returned and never called
 * back, and a stale keep-alive connection retried on a fresh one. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "proxy.h"

/* ---- the fake peer ---- */

struct peer {
  uv_tcp_t server;
  int port;
  const char *reply;  /* sent for each request head received */
  int drop_after;     /* after this many replies on a connection, close it at the next request (0: never) */
  int accepted, heads;
};

struct peer_conn {
  uv_tcp_t tcp;
  struct peer *p;
  char buf[8192];
  size_t len;
  int replies;
};

static void pc_free(uv_handle_t *h) { free(h->data); }

static void pc_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b) {
  (void)hint;
  struct peer_conn *pc = h->data;
  *b = uv_buf_init(pc->buf + pc->len, (unsigned)(sizeof(pc->buf) - pc->len));
}

static void pc_written(uv_write_t *w, int status) {
  (void)status;
  free(w);
}

static void pc_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
  (void)b;
  struct peer_conn *pc = s->data;
  if (n < 0) {
    uv_close((uv_handle_t *)s, pc_free);
    return;
  }
  pc->len += (size_t)n;
  char *end;
  while ((end = memmem(pc->buf, pc->len, "\r\n\r\n", 4)) != NULL) {
    size_t used = (size_t)(end + 4 - pc->buf); /* requests here carry no body */
    memmove(pc->buf, pc->buf + used, pc->len - used);
    pc->len -= used;
    pc->p->heads++;
    if (pc->p->drop_after && pc->replies >= pc->p->drop_after) {
      /* a keep-alive connection the server closes as the request arrives */
      uv_close((uv_handle_t *)s, pc_free);
      return;
    }
    uv_write_t *w = malloc(sizeof(*w));
    uv_buf_t out = uv_buf_init((char *)pc->p->reply, (unsigned)strlen(pc->p->reply));
    uv_write(w, s, &out, 1, pc_written);
    pc->replies++;
  }
}

static void peer_accept(uv_stream_t *srv, int status) {
  assert_int_equal(status, 0);
  struct peer *p = srv->data;
  struct peer_conn *pc = calloc(1, sizeof(*pc));
  pc->p = p;
  uv_tcp_init(srv->loop, &pc->tcp);
  pc->tcp.data = pc;
  assert_int_equal(uv_accept(srv, (uv_stream_t *)&pc->tcp), 0);
  p->accepted++;
  uv_read_start((uv_stream_t *)&pc->tcp, pc_alloc, pc_read);
}

static void peer_start(uv_loop_t *loop, struct peer *p) {
  struct sockaddr_in a;
  uv_ip4_addr("127.0.0.1", 0, &a);
  uv_tcp_init(loop, &p->server);
  p->server.data = p;
  assert_int_equal(uv_tcp_bind(&p->server, (const struct sockaddr *)&a, 0), 0);
  assert_int_equal(uv_listen((uv_stream_t *)&p->server, 16, peer_accept), 0);
  struct sockaddr_storage ss;
  int sl = sizeof(ss);
  uv_tcp_getsockname(&p->server, (struct sockaddr *)&ss, &sl);
  p->port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
}

/* ---- the caller ---- */

struct caller {
  struct sl_upreq r;
  int heads, dones, errors, status, err_status;
  size_t body;
  int detached_at_end; /* r.conn was NULL when on_done/on_error ran */
  uv_loop_t *loop;
};

static void c_head(void *ctx, const struct sl_resp_head *h) {
  struct caller *c = ctx;
  c->heads++;
  c->status = h->status;
}
static int c_body(void *ctx, const char *p, size_t n) {
  (void)p;
  ((struct caller *)ctx)->body += n;
  return 0;
}
static int c_flush(void *ctx) {
  (void)ctx;
  return 0;
}
static void c_done(void *ctx) {
  struct caller *c = ctx;
  c->dones++;
  c->detached_at_end = c->r.conn == NULL;
  uv_stop(c->loop);
}
static void c_error(void *ctx, int status, const char *code, const char *msg) {
  (void)code;
  (void)msg;
  struct caller *c = ctx;
  c->errors++;
  c->err_status = status;
  c->detached_at_end = c->r.conn == NULL;
  uv_stop(c->loop);
}
static const struct sl_upstream_cbs cbs = {c_head, c_body, c_flush, c_done, c_error};

static const char request[] = "GET /x HTTP/1.1\r\nHost: a\r\n\r\n";

struct fixture {
  struct sl_config cfg;
  struct sl_worker w;
  struct peer peer;
};

static void fixture_init(struct fixture *f, const char *reply, int drop_after, int upstream_port) {
  memset(f, 0, sizeof(*f));
  assert_int_equal(uv_loop_init(&f->w.loop), 0);
  f->peer.reply = reply;
  f->peer.drop_after = drop_after;
  peer_start(&f->w.loop, &f->peer);
  char up[32];
  snprintf(up, sizeof(up), "127.0.0.1:%d", upstream_port ? upstream_port : f->peer.port);
  char *argv[] = {"--upstream", up, "--response-timeout-ms", "2000"};
  struct sl_cli cli = {.argc = 4, .argv = argv};
  char err[256];
  assert_int_equal(sl_config_load(&f->cfg, &cli, err, sizeof(err)), 0);
  f->w.cfg = &f->cfg;
  sl_list_init(&f->w.upconns);
  sl_worker_pools_build(&f->w);
}

/* Closes what is left: the peer's server and connections (the upstream's
 * idle connections are closed first, by the upstream module). */
static void close_rest(uv_handle_t *h, void *arg) {
  struct fixture *f = arg;
  if (uv_is_closing(h)) return;
  uv_close(h, h == (uv_handle_t *)&f->peer.server ? NULL : pc_free);
}

static void fixture_end(struct fixture *f) {
  sl_upstream_close_idle(&f->w);
  uv_walk(&f->w.loop, close_rest, f);
  uv_run(&f->w.loop, UV_RUN_DEFAULT); /* every handle closing: returns once they are */
  for (int k = 0; k < SL_NPOOLS; k++)
    if (f->w.pools[k] && --f->w.pools[k]->refs == 0) free(f->w.pools[k]);
  assert_int_equal(uv_loop_close(&f->w.loop), 0);
}

static void caller_init(struct fixture *f, struct caller *c) {
  memset(c, 0, sizeof(*c));
  c->loop = &f->w.loop;
  c->r.bufs[0] = uv_buf_init((char *)request, sizeof(request) - 1);
  c->r.nbufs = 1;
  c->r.pool = SL_POOL_DEFAULT;
  c->r.cbs = &cbs;
  c->r.ctx = c;
}

static void caller_start(struct fixture *f, struct caller *c) {
  caller_init(f, c);
  assert_int_equal(sl_upstream_start(&f->w, &c->r), 0);
  assert_non_null(c->r.conn);
}

static void test_response_then_done_and_reuse(void **state) {
  (void)state;
  struct fixture f;
  fixture_init(&f, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 0, 0);
  struct caller c;
  for (int i = 0; i < 3; i++) {
    caller_start(&f, &c);
    uv_run(&f.w.loop, UV_RUN_DEFAULT);
    assert_int_equal(c.heads, 1);
    assert_int_equal(c.status, 200);
    assert_int_equal(c.body, 5);
    assert_int_equal(c.dones, 1);
    assert_int_equal(c.errors, 0);
    assert_true(c.detached_at_end);
  }
  assert_int_equal(f.peer.accepted, 1); /* one keep-alive connection served all three */
  fixture_end(&f);
}

static void test_stale_keepalive_retried(void **state) {
  (void)state;
  struct fixture f;
  /* The peer closes a kept connection when the next request arrives (the
   * keep-alive race): that request is retried on a new connection and the
   * caller sees only its answer. */
  fixture_init(&f, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 1, 0);
  struct caller c;
  caller_start(&f, &c);
  uv_run(&f.w.loop, UV_RUN_DEFAULT);
  assert_int_equal(c.dones, 1);
  caller_start(&f, &c);
  uv_run(&f.w.loop, UV_RUN_DEFAULT);
  assert_int_equal(c.dones, 1);
  assert_int_equal(c.errors, 0);
  assert_int_equal(c.body, 2);
  assert_int_equal(f.peer.accepted, 2);
  assert_int_equal(f.peer.heads, 3); /* the first, the dropped one, the retry */
  assert_int_equal(atomic_load(&f.w.stats.up_retries), 1);
  fixture_end(&f);
}

static void test_malformed_response_is_an_error(void **state) {
  (void)state;
  struct fixture f;
  fixture_init(&f, "HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nhi", 0, 0);
  struct caller c;
  caller_start(&f, &c);
  uv_run(&f.w.loop, UV_RUN_DEFAULT);
  assert_int_equal(c.heads, 0);
  assert_int_equal(c.errors, 1);
  assert_int_equal(c.err_status, 502);
  assert_int_equal(c.dones, 0);
  assert_true(c.detached_at_end);
  fixture_end(&f);
}

static void test_no_member_usable_fails_at_once(void **state) {
  (void)state;
  struct fixture f;
  /* Nothing listens on port 1: the connect fails (at once or in the loop),
   * the member is ejected, and the next start finds none usable. */
  fixture_init(&f, "", 0, 1);
  struct caller c;
  caller_init(&f, &c);
  int r = sl_upstream_start(&f.w, &c.r);
  if (r == 0) {
    uv_run(&f.w.loop, UV_RUN_DEFAULT);
    assert_int_equal(c.errors, 1);
    assert_int_equal(c.err_status, 502);
  } else {
    assert_int_equal(c.errors, 0); /* a synchronous failure calls nothing */
  }
  caller_init(&f, &c);
  assert_int_equal(sl_upstream_start(&f.w, &c.r), UV_EAGAIN);
  assert_int_equal(c.errors + c.dones + c.heads, 0);
  assert_null(c.r.conn);
  fixture_end(&f);
}

static void stop_timer(uv_timer_t *t) { uv_stop(t->loop); }

static void test_cancel_calls_nothing(void **state) {
  (void)state;
  struct fixture f;
  fixture_init(&f, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 0, 0);
  struct caller c;
  caller_start(&f, &c);
  sl_upstream_cancel(&c.r);
  assert_null(c.r.conn);
  uv_timer_t t;
  uv_timer_init(&f.w.loop, &t);
  uv_timer_start(&t, stop_timer, 200, 0);
  uv_run(&f.w.loop, UV_RUN_DEFAULT);
  uv_close((uv_handle_t *)&t, NULL);
  assert_int_equal(c.heads + c.dones + c.errors, 0);
  fixture_end(&f);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_response_then_done_and_reuse), cmocka_unit_test(test_stale_keepalive_retried),
      cmocka_unit_test(test_malformed_response_is_an_error), cmocka_unit_test(test_no_member_usable_fails_at_once),
      cmocka_unit_test(test_cancel_calls_nothing),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
