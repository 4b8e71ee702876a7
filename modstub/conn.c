/* Connections: accept, read, parse with llhttp, queue answers in request
 * order, write them with uv_try_write (uv_write for the rest), close. */
#include "conn.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>

#define container_of(ptr, type, member) \
  ((type *)((char *)(ptr) - offsetof(type, member)))

#define MS_LINGER_MS 2000 /* bound on discarding input after the last answer */

static atomic_uint_fast64_t next_conn_id;

static void conn_process(struct ms_conn *c);
static void conn_close(struct ms_conn *c);

/* ---- llhttp callbacks: copy the request into c->req ---- */

static struct ms_conn *conn_of(llhttp_t *p) {
  return p->data;
}

static int on_message_begin(llhttp_t *p) {
  struct ms_conn *c = conn_of(p);
  int i;

  c->req.len = 0;
  c->url_len = 0;
  c->nhdr = 0;
  c->hdr_open = 0;
  for (i = 0; i < MS_H_COUNT; i++)
    c->known[i] = -1;
  c->body_len = 0;
  c->body_hash = 0xcbf29ce484222325ULL;
  c->body_off = 0;
  c->req_error = 0;
  c->nreq++;
  return 0;
}

/* Fails the request with `status`; llhttp then stops with an error. */
static int refuse(struct ms_conn *c, int status) {
  c->req_error = status;
  return HPE_USER;
}

static int on_url(llhttp_t *p, const char *at, size_t n) {
  struct ms_conn *c = conn_of(p);

  if (c->url_len + n > MS_MAX_URL)
    return refuse(c, 414);
  ms_buf_put(&c->req, at, n);
  c->url_len += (uint32_t)n;
  return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t n) {
  struct ms_conn *c = conn_of(p);
  struct ms_hdr *h;

  if (c->req.len + n > MS_MAX_HEAD)
    return refuse(c, 431);
  if (!c->hdr_open) {
    if (c->nhdr == MS_MAX_HEADERS)
      return refuse(c, 431);
    h = &c->hdr[c->nhdr];
    h->name_off = (uint32_t)c->req.len;
    h->name_len = 0;
    h->val_off = h->val_len = 0;
    c->hdr_open = 1;
  }
  ms_buf_put(&c->req, at, n);
  c->hdr[c->nhdr].name_len += (uint32_t)n;
  return 0;
}

static int on_header_field_complete(llhttp_t *p) {
  struct ms_conn *c = conn_of(p);

  c->hdr[c->nhdr].val_off = (uint32_t)c->req.len;
  return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n) {
  struct ms_conn *c = conn_of(p);

  if (c->req.len + n > MS_MAX_HEAD)
    return refuse(c, 431);
  ms_buf_put(&c->req, at, n);
  c->hdr[c->nhdr].val_len += (uint32_t)n;
  return 0;
}

static const struct {
  const char *name;
  size_t len;
} known_names[MS_H_COUNT] = {
#define K(s) {s, sizeof(s) - 1}
  [MS_H_ACTION] = K("x-acs-action"),
  [MS_H_REQID] = K("x-request-id"),
  [MS_H_CTYPE] = K("content-type"),
  [MS_H_STATUS] = K("x-modstub-status"),
  [MS_H_DELAY] = K("x-modstub-delay-ms"),
  [MS_H_CHUNKED] = K("x-modstub-chunked"),
  [MS_H_CLOSE] = K("x-modstub-close"),
  [MS_H_SIZE] = K("x-modstub-size"),
  [MS_H_HANGUP] = K("x-modstub-hangup"),
  [MS_H_PARTIAL] = K("x-modstub-partial"),
  [MS_H_EXPECT] = K("expect"),
#undef K
};

static int on_header_value_complete(llhttp_t *p) {
  struct ms_conn *c = conn_of(p);
  struct ms_hdr *h = &c->hdr[c->nhdr];
  const char *name = c->req.p + h->name_off;
  int i;

  for (i = 0; i < MS_H_COUNT; i++)
    if (h->name_len == known_names[i].len &&
        strncasecmp(name, known_names[i].name, h->name_len) == 0) {
      c->known[i] = (int)c->nhdr; /* the last one wins */
      break;
    }
  c->nhdr++;
  c->hdr_open = 0;
  return 0;
}

/* Answers "Expect: 100-continue" so that clients such as curl send a large
 * body without waiting. Only when nothing is queued before it: an interim
 * answer must not overtake earlier ones (the client then sends the body
 * after its own timeout). Returns 0, or -1 to drop a broken connection. */
static int expect_continue(struct ms_conn *c) {
  static const char line[] = "HTTP/1.1 100 Continue\r\n\r\n";
  const struct ms_hdr *h = &c->hdr[c->known[MS_H_EXPECT]];
  uv_buf_t b = uv_buf_init((char *)line, sizeof(line) - 1);
  int rc;

  if (h->val_len != 12 || strncasecmp(c->req.p + h->val_off, "100-continue", 12) != 0 ||
      c->qlen > 0 || c->writing || c->parser.http_minor == 0)
    return 0;
  rc = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
  if (rc == (int)b.len || rc == UV_EAGAIN)
    return 0;
  c->req_error = 400; /* a torn interim line cannot be repaired */
  return -1;
}

static int on_headers_complete(llhttp_t *p) {
  struct ms_conn *c = conn_of(p);

  if ((p->flags & F_CONTENT_LENGTH) && p->content_length > MS_MAX_BODY) {
    c->req_error = 413;
    return -1;
  }
  c->body_off = c->req.len;
  if (c->known[MS_H_EXPECT] >= 0)
    return expect_continue(c);
  return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n) {
  struct ms_conn *c = conn_of(p);
  uint64_t h = c->body_hash;
  size_t i, keep;

  if (c->body_len + n > MS_MAX_BODY)
    return refuse(c, 413);
  if (c->body_len < MS_ECHO_BODY) {
    keep = MS_ECHO_BODY - (size_t)c->body_len;
    ms_buf_put(&c->req, at, n < keep ? n : keep);
  }
  for (i = 0; i < n; i++) {
    h ^= (unsigned char)at[i];
    h *= 0x100000001b3ULL;
  }
  c->body_hash = h;
  c->body_len += n;
  return 0;
}

static int on_message_complete(llhttp_t *p) {
  struct ms_conn *c = conn_of(p);

  ms_reply_request(c);
  /* Pause when no further request may be parsed now: its answer could not
   * be queued, or the connection is to close after this one. */
  if (c->state != MS_CONN_OPEN || c->qlen == MS_QMAX || c->out.len > MS_OUT_HIGH)
    return HPE_PAUSED;
  return 0;
}

static const llhttp_settings_t settings = {
  .on_message_begin = on_message_begin,
  .on_url = on_url,
  .on_header_field = on_header_field,
  .on_header_field_complete = on_header_field_complete,
  .on_header_value = on_header_value,
  .on_header_value_complete = on_header_value_complete,
  .on_headers_complete = on_headers_complete,
  .on_body = on_body,
  .on_message_complete = on_message_complete,
};

/* ---- the answer queue ---- */

struct ms_reply *ms_conn_push(struct ms_conn *c) {
  struct ms_reply *r = &c->q[(c->qhead + c->qlen) % MS_QMAX];

  c->qlen++;
  memset(r, 0, sizeof(*r));
  r->off = c->out.len;
  return r;
}

/* Moves the queued bytes to the front of out once the sent prefix is large,
 * so a connection that always has answers pending does not grow out. */
static void out_compact(struct ms_conn *c) {
  size_t head, i;

  if (c->qlen == 0) {
    c->out.len = 0;
    if (c->out.cap > MS_OUT_HIGH)
      ms_buf_free(&c->out); /* do not keep a huge x-modstub-size buffer */
    return;
  }
  head = c->q[c->qhead].off;
  if (head < (64u << 10) || head < c->out.len / 2)
    return;
  memmove(c->out.p, c->out.p + head, c->out.len - head);
  c->out.len -= head;
  for (i = 0; i < c->qlen; i++)
    c->q[(c->qhead + i) % MS_QMAX].off -= head;
}

static void on_linger_timer(uv_timer_t *t) {
  conn_close(container_of(t, struct ms_conn, timer));
}

static void on_shutdown(uv_shutdown_t *req, int status) {
  struct ms_conn *c = container_of(req, struct ms_conn, sreq);

  if (status < 0 && c->state != MS_CONN_CLOSED)
    conn_close(c);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf);
static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

/* The last answer is out: shut the write side and discard what the client
 * still sends (bounded), so closing does not reset the answer away. */
static void conn_linger(struct ms_conn *c) {
  c->state = MS_CONN_LINGER;
  if (uv_shutdown(&c->sreq, (uv_stream_t *)&c->tcp, on_shutdown) != 0) {
    conn_close(c);
    return;
  }
  uv_timer_start(&c->timer, on_linger_timer, MS_LINGER_MS, 0);
  if (!c->reading && !c->eof) {
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0)
      c->reading = 1;
  }
  if (c->eof)
    conn_close(c);
}

/* Drops the n answers at the head of the queue, which have been sent. */
static void conn_pop(struct ms_conn *c, unsigned n) {
  int close = c->q[(c->qhead + n - 1) % MS_QMAX].close;

  c->qhead = (c->qhead + n) % MS_QMAX;
  c->qlen -= n;
  out_compact(c);
  if (close)
    conn_linger(c);
}

static void on_write(uv_write_t *req, int status) {
  struct ms_conn *c = container_of(req, struct ms_conn, wreq);

  c->writing = 0;
  if (c->state == MS_CONN_CLOSED)
    return;
  if (status < 0) {
    conn_close(c);
    return;
  }
  conn_pop(c, c->wbatch);
  conn_process(c);
}

static void on_delay_timer(uv_timer_t *t) {
  conn_process(container_of(t, struct ms_conn, timer));
}

/* Sends every answer at the head of the queue that is due, several in one
 * write when they are. Stops at an answer still held back (and arms the
 * timer for it), at a write that would block, or at the connection's end. */
static void conn_flush(struct ms_conn *c) {
  uv_stream_t *s = (uv_stream_t *)&c->tcp;
  uint64_t now = uv_now(&c->w->loop);

  while (!c->writing && c->qlen > 0 &&
         (c->state == MS_CONN_OPEN || c->state == MS_CONN_DRAIN)) {
    struct ms_reply *r = &c->q[c->qhead], *x;
    unsigned n = 0;
    size_t end;
    uv_buf_t b;
    int rc;

    if (r->due > now) {
      uv_timer_start(&c->timer, on_delay_timer, r->due - now, 0);
      return;
    }
    if (r->hangup) {
      conn_close(c);
      return;
    }
    for (;;) {
      x = &c->q[(c->qhead + n) % MS_QMAX];
      end = x->off + x->send;
      n++;
      if (x->close || n == c->qlen)
        break;
      x = &c->q[(c->qhead + n) % MS_QMAX];
      if (x->due > now || x->hangup)
        break;
    }
    b = uv_buf_init(c->out.p + r->off, (unsigned)(end - r->off));
    rc = b.len ? uv_try_write(s, &b, 1) : 0;
    if (rc == UV_EAGAIN || rc == UV_ENOSYS)
      rc = 0;
    if (rc < 0) {
      conn_close(c);
      return;
    }
    if ((size_t)rc < b.len) {
      b.base += rc;
      b.len -= (size_t)rc;
      c->wbatch = n;
      if (uv_write(&c->wreq, s, &b, 1, on_write) != 0) {
        conn_close(c);
        return;
      }
      c->writing = 1;
      return;
    }
    conn_pop(c, n);
  }
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  struct ms_conn *c = container_of(h, struct ms_conn, tcp);

  (void)hint;
  if (c->state == MS_CONN_LINGER || c->in_off == c->in_len) {
    c->in_off = c->in_len = 0; /* nothing kept: reuse the whole buffer */
  } else if (c->in_off > 0) {
    memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
    c->in_len -= c->in_off;
    c->in_off = 0;
  }
  *buf = uv_buf_init(c->in + c->in_len, (unsigned)(MS_INBUF - c->in_len));
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  struct ms_conn *c = container_of(s, struct ms_conn, tcp);

  (void)buf;
  if (c->state == MS_CONN_CLOSED)
    return;
  if (c->state == MS_CONN_LINGER) {
    if (nread < 0)
      conn_close(c);
    return;
  }
  if (nread == UV_ENOBUFS) {
    /* Buffer full of paused input; conn_process restarts reading. */
    uv_read_stop(s);
    c->reading = 0;
    return;
  }
  if (nread < 0) {
    if (nread != UV_EOF) {
      conn_close(c);
      return;
    }
    c->eof = 1;
    uv_read_stop(s);
    c->reading = 0;
  } else {
    c->in_len += (size_t)nread;
  }
  conn_process(c);
}

/* Parses what input may be parsed now, sends what is due, and starts or
 * stops reading to match. Runs after every event of the connection. */
static void conn_process(struct ms_conn *c) {
  int want;

again:
  while (c->state == MS_CONN_OPEN && !c->writing && c->qlen < MS_QMAX &&
         c->out.len <= MS_OUT_HIGH && c->in_off < c->in_len) {
    const char *at = c->in + c->in_off;
    llhttp_errno_t err = llhttp_execute(&c->parser, at, c->in_len - c->in_off);

    if (err == HPE_OK) {
      c->in_off = c->in_len;
    } else if (err == HPE_PAUSED || err == HPE_PAUSED_UPGRADE) {
      /* We never switch protocols: an Upgrade request was answered as a
       * plain one, and parsing goes on with HTTP. */
      c->in_off = (size_t)(llhttp_get_error_pos(&c->parser) - c->in);
      if (err == HPE_PAUSED)
        llhttp_resume(&c->parser);
      else
        llhttp_resume_after_upgrade(&c->parser);
    } else {
      ms_reply_error(c, c->req_error ? c->req_error : 400);
      c->in_off = c->in_len;
    }
  }
  if (c->in_off == c->in_len)
    c->in_off = c->in_len = 0;
  conn_flush(c);
  if (c->state != MS_CONN_OPEN && c->state != MS_CONN_DRAIN)
    return;
  /* Sending made room in the queue: parse what was held back. */
  if (c->state == MS_CONN_OPEN && !c->writing && c->qlen < MS_QMAX &&
      c->out.len <= MS_OUT_HIGH && c->in_off < c->in_len)
    goto again;
  if (c->eof && c->qlen == 0 && !c->writing &&
      (c->state == MS_CONN_DRAIN || c->in_off == c->in_len)) {
    conn_close(c); /* client is done and so are we */
    return;
  }
  want = c->state == MS_CONN_OPEN && !c->eof && !c->writing && c->qlen < MS_QMAX &&
         c->out.len <= MS_OUT_HIGH && (c->in_off > 0 || c->in_len < MS_INBUF);
  if (want && !c->reading) {
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) != 0) {
      conn_close(c);
      return;
    }
    c->reading = 1;
  } else if (!want && c->reading) {
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = 0;
  }
}

/* ---- lifetime ---- */

static void on_conn_closed(uv_handle_t *h) {
  struct ms_conn *c = h->data;

  if (--c->open_handles > 0)
    return;
  ms_buf_free(&c->req);
  ms_buf_free(&c->out);
  free(c);
}

static void conn_close(struct ms_conn *c) {
  if (c->state == MS_CONN_CLOSED)
    return;
  c->state = MS_CONN_CLOSED;
  uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
  uv_close((uv_handle_t *)&c->timer, on_conn_closed);
}

static void on_connection(uv_stream_t *server, int status) {
  struct ms_worker *w = container_of(server, struct ms_worker, listener);
  struct ms_conn *c;

  if (status < 0)
    return;
  c = calloc(1, sizeof(*c));
  if (c == NULL) {
    fprintf(stderr, "modstub: out of memory\n");
    abort();
  }
  c->w = w;
  uv_tcp_init(&w->loop, &c->tcp);
  uv_timer_init(&w->loop, &c->timer);
  c->tcp.data = c->timer.data = c;
  c->open_handles = 2;
  if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
    conn_close(c);
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  /* Relaxed: only uniqueness matters. */
  c->id = atomic_fetch_add_explicit(&next_conn_id, 1, memory_order_relaxed) + 1;
  ms_count(&w->stats.connections);
  llhttp_init(&c->parser, HTTP_REQUEST, &settings);
  c->parser.data = c;
  conn_process(c);
}

int ms_conn_listen(struct ms_worker *w) {
  int rc = uv_tcp_init(&w->loop, &w->listener);

  if (rc != 0)
    return rc;
  rc = uv_tcp_open(&w->listener, w->fd);
  if (rc == 0)
    rc = uv_listen((uv_stream_t *)&w->listener, 1024, on_connection);
  return rc;
}

static void close_one(uv_handle_t *h, void *arg) {
  struct ms_worker *w = arg;

  if (uv_is_closing(h))
    return;
  if (h->type == UV_TCP && h != (uv_handle_t *)&w->listener)
    conn_close(h->data);
  else if (h->type != UV_TIMER) /* a conn's timer closes with its conn */
    uv_close(h, NULL);
}

void ms_conn_close_all(struct ms_worker *w) {
  uv_walk(&w->loop, close_one, w);
}
