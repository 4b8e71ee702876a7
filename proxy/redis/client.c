#include "client.h"

#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "redis_uv.h"

#include "common.h"
#include "stat.h"
#include "uv_util.h"

#define BACKOFF_FIRST_MS 100
#define BACKOFF_MAX_MS 2000
#define PROBE_MAX_MS 1000 /* an idle connection is asked PING at least this often */

struct sl_redis {
  uv_timer_t timer; /* the watchdog: connect and reply deadlines, idle PING, reconnect */
  uv_loop_t *loop;
  struct sl_redis_opts o;
  char host[256];
  int port; /* 0: unix socket at host */
  char subject[160];
  redisAsyncContext *cmd, *sub;
  int cmd_conn, sub_conn; /* TCP (or unix) connect done */
  enum sl_redis_state state;
  int stopped, quiet;
  unsigned tick_ms, probe_ms;
  uint64_t connect_started_ms;
  uint64_t replies, seen_replies, progress_ms; /* reply timeout: replies counted, last progress */
  uint64_t next_probe_ms, up_since_ms;
  uint64_t backoff_ms, next_connect_ms;
  /* "down" logging: the transition once, then one line per SL_REDIS_LOG_MS */
  int ever_up, outage_logged;
  unsigned failures; /* attempts failed in this outage */
  uint64_t down_since_ms, next_down_log_ms;
};

static void stat_inc(_Atomic uint64_t *c) {
  if (c) sl_stat_inc(c, 1);
}
static void stat_set(_Atomic uint64_t *c, uint64_t v) {
  if (c) sl_stat_set(c, v);
}

int sl_redis_parse_addr(const char *addr, char *host, size_t cap, int *port) {
  if (!strncmp(addr, "unix:", 5)) {
    size_t n = strlen(addr + 5);
    if (n == 0 || n >= cap) return UV_EINVAL;
    memcpy(host, addr + 5, n + 1);
    *port = 0;
    return 0;
  }
  const char *colon = strrchr(addr, ':');
  if (!colon) return UV_EINVAL;
  const char *h = addr;
  size_t hl = (size_t)(colon - addr);
  if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') h++, hl -= 2; /* [::1]:6379 */
  long p = 0;
  const char *d = colon + 1;
  for (; *d >= '0' && *d <= '9' && p <= 65535; d++) p = p * 10 + (*d - '0');
  if (hl == 0 || hl >= cap || d == colon + 1 || *d || p < 1 || p > 65535) return UV_EINVAL;
  memcpy(host, h, hl);
  host[hl] = '\0';
  *port = (int)p;
  return 0;
}

/* ---- state changes ---- */

/* Drops a context we no longer want: it is forgotten first and its
 * callbacks then see no owner, so nothing runs twice. Freed, not
 * disconnected: redisAsyncDisconnect waits for the replies outstanding,
 * which a server that stopped answering never sends (and the loop, and the
 * thread, would never end). Called from inside one of its callbacks, hiredis
 * frees it when the callback returns. */
static void drop_ctx(redisAsyncContext **slot) {
  redisAsyncContext *c = *slot;
  if (!c) return;
  *slot = NULL;
  c->data = NULL;
  redisAsyncFree(c);
}

/* Every failure (a connect refused or timed out, a connection lost, no
 * reply in time, not Redis) comes here: both connections go, the owner is
 * told, a reconnect follows the backoff. The log says the outage once with
 * its reason, then at most one line per SL_REDIS_LOG_MS while it lasts
 * (a new outage inside that period is counted, not told). */
static void went_down(struct sl_redis *r, const char *why) {
  uint64_t now = sl_mono_ms();
  int first = r->failures++ == 0;
  if (first) r->down_since_ms = now;
  drop_ctx(&r->cmd);
  drop_ctx(&r->sub);
  r->cmd_conn = r->sub_conn = 0;
  r->state = SL_REDIS_DOWN;
  stat_set(r->o.up, 0);
  if (r->backoff_ms == 0) r->backoff_ms = BACKOFF_FIRST_MS;
  r->next_connect_ms = now + r->backoff_ms;
  unsigned cap = r->o.backoff_max_ms ? r->o.backoff_max_ms : BACKOFF_MAX_MS;
  r->backoff_ms = r->backoff_ms * 2 > cap ? cap : r->backoff_ms * 2;
  if (r->o.on_down) r->o.on_down(r->o.data, why);
  if (r->quiet || now < r->next_down_log_ms) return;
  r->next_down_log_ms = now + SL_REDIS_LOG_MS;
  char w[200], note[160] = "";
  sl_printable(w, sizeof(w), why, strlen(why));
  if (r->o.describe) r->o.describe(r->o.data, note, sizeof(note));
  if (first)
    fprintf(stderr, "sluice: %s down: %s (retrying; said again at most every %d s while it lasts)%s\n", r->subject,
            w, SL_REDIS_LOG_MS / 1000, note);
  else
    fprintf(stderr, "sluice: %s still down after %llu s: %s (%u attempts failed)%s\n", r->subject,
            (unsigned long long)(now - r->down_since_ms) / 1000, w, r->failures, note);
  r->outage_logged = 1;
}

static void went_up(struct sl_redis *r) {
  uint64_t now = sl_mono_ms();
  if (!r->quiet && !r->ever_up)
    fprintf(stderr, "sluice: %s up\n", r->subject);
  else if (!r->quiet && r->outage_logged)
    fprintf(stderr, "sluice: %s up again after %llu.%llu s (%u attempts failed)\n", r->subject,
            (unsigned long long)(now - r->down_since_ms) / 1000,
            (unsigned long long)(now - r->down_since_ms) % 1000 / 100, r->failures);
  /* else: a short outage inside a logging period; counted, not told */
  r->ever_up = 1;
  r->outage_logged = 0;
  r->failures = 0;
  r->state = SL_REDIS_READY;
  r->progress_ms = now;
  r->seen_replies = r->replies;
  r->next_probe_ms = now + r->probe_ms;
  r->up_since_ms = now; /* the backoff resets once it stays up (check) */
  stat_set(r->o.up, 1);
  if (r->o.on_ready) r->o.on_ready(r->o.data);
}

/* ---- hiredis callbacks ---- */

static void on_disconnect(const redisAsyncContext *c, int status) {
  struct sl_redis *r = c->data;
  if (!r) return;
  if (c == r->cmd) r->cmd = NULL; /* hiredis frees it after this */
  if (c == r->sub) r->sub = NULL;
  char why[200];
  const char *refused = sl_redis_refused(c); /* its errstr would only say "Out of memory" */
  if (refused)
    snprintf(why, sizeof(why), "the server sent %s", refused);
  else if (status == REDIS_OK)
    snprintf(why, sizeof(why), "connection closed by the server");
  else
    snprintf(why, sizeof(why), "connection lost: %s", c->errstr);
  went_down(r, why);
}

/* The first reply on a new connection: up only when the server answers
 * PING as Redis does; a server that accepts and says nothing stays down
 * (the connect timeout ends it), one that says something else (LOADING,
 * NOAUTH, not Redis) is dropped. */
static void on_hello(redisAsyncContext *c, void *reply, void *priv) {
  (void)priv;
  struct sl_redis *r = c->data;
  if (!r || !reply) return;
  r->replies++;
  redisReply *rep = reply;
  if (!(rep->type == REDIS_REPLY_STATUS && rep->len == 4 && !strncasecmp(rep->str, "PONG", 4))) {
    char why[200], w[120];
    if (rep->type == REDIS_REPLY_STATUS || rep->type == REDIS_REPLY_ERROR || rep->type == REDIS_REPLY_STRING)
      snprintf(why, sizeof(why), "PING answered '%s'", sl_printable(w, sizeof(w), rep->str, rep->len));
    else
      snprintf(why, sizeof(why), "PING answered with a reply of type %d", rep->type);
    went_down(r, why);
    return;
  }
  went_up(r);
}

static void on_connect(const redisAsyncContext *c, int status) {
  struct sl_redis *r = c->data;
  if (!r) return;
  if (status != REDIS_OK) {
    char why[200];
    snprintf(why, sizeof(why), "cannot connect: %s", c->errstr);
    if (c == r->cmd) r->cmd = NULL; /* hiredis frees it after this */
    if (c == r->sub) r->sub = NULL;
    went_down(r, why);
    return;
  }
  if (c == r->cmd) r->cmd_conn = 1;
  if (c == r->sub) r->sub_conn = 1;
  if (!r->cmd_conn || (r->o.subscriber && !r->sub_conn)) return;
  /* Connected is not up: a server that accepts and never answers would
   * otherwise count as up. The connect timeout keeps running until PONG. */
  redisAsyncCommand(r->cmd, on_hello, NULL, "PING");
}

static void on_probe(redisAsyncContext *c, void *reply, void *priv) {
  (void)priv;
  sl_redis_owner(c, reply); /* progress is all it is for */
}

/* Returns the context, or NULL with why (why_len bytes) filled in. */
static redisAsyncContext *open_ctx(struct sl_redis *r, char *why, size_t why_len) {
  redisAsyncContext *c = r->port ? redisAsyncConnect(r->host, r->port) : redisAsyncConnectUnix(r->host);
  if (!c) {
    snprintf(why, why_len, "cannot connect: out of memory");
    return NULL;
  }
  if (c->err) {
    snprintf(why, why_len, "cannot connect: %s", c->errstr);
    redisAsyncFree(c);
    return NULL;
  }
  /* A peer that vanishes without a word (a cable, a frozen host) is found
   * by the reply timeout when a reply is due, by keepalive otherwise (a
   * subscriber connection mostly waits). */
  if (r->port && redisEnableKeepAlive(&c->c) != REDIS_OK) {
    snprintf(why, why_len, "cannot enable TCP keepalive: %s", c->c.errstr);
    redisAsyncFree(c);
    return NULL;
  }
  if (sl_redis_attach(c, r->loop) != REDIS_OK) {
    snprintf(why, why_len, "cannot watch the socket");
    redisAsyncFree(c);
    return NULL;
  }
  c->data = r;
  redisAsyncSetConnectCallback(c, on_connect);
  redisAsyncSetDisconnectCallback(c, on_disconnect);
  return c;
}

static void connect_attempt(struct sl_redis *r) {
  if (r->stopped || r->cmd || r->sub) return; /* an attempt is under way */
  stat_inc(r->o.attempts);
  r->state = SL_REDIS_CONNECTING;
  r->cmd_conn = r->sub_conn = 0;
  r->connect_started_ms = sl_mono_ms();
  char why[200] = "cannot connect";
  r->cmd = open_ctx(r, why, sizeof(why));
  if (r->cmd && r->o.subscriber) r->sub = open_ctx(r, why, sizeof(why));
  if (!r->cmd || (r->o.subscriber && !r->sub)) went_down(r, why);
}

/* ---- the watchdog ---- */

/* A connection that is not up within timeout_ms of its start, or a command
 * connection with replies outstanding and none come for timeout_ms, counts
 * as down. */
static void on_timer(uv_timer_t *t) {
  struct sl_redis *r = sl_container_of(t, struct sl_redis, timer);
  uint64_t now = sl_mono_ms();
  char why[200];
  if (r->state == SL_REDIS_DOWN) {
    if (now >= r->next_connect_ms) connect_attempt(r);
    return;
  }
  if (r->state == SL_REDIS_CONNECTING) {
    if (now - r->connect_started_ms < r->o.timeout_ms) return;
    if (r->cmd_conn && (!r->o.subscriber || r->sub_conn))
      snprintf(why, sizeof(why), "no answer to PING within %u ms (connected; not a Redis server?)", r->o.timeout_ms);
    else
      snprintf(why, sizeof(why), "no connection within %u ms (--redis-timeout-ms)", r->o.timeout_ms);
    stat_inc(r->o.timeouts);
    went_down(r, why);
    return;
  }
  /* A server that answers PING and then fails goes up and down: the backoff
   * grows across such short stays, and resets after a long one. */
  if (r->backoff_ms && now - r->up_since_ms >= SL_REDIS_LOG_MS) r->backoff_ms = 0;
  redisAsyncContext *c = r->cmd;
  if (!c->replies.head || r->replies != r->seen_replies) { /* idle, or replies came */
    r->seen_replies = r->replies;
    r->progress_ms = now;
    /* Idle for a while: a PING, so that a server gone silent is found even
     * when the owner asks nothing. */
    if (!c->replies.head && now >= r->next_probe_ms) {
      r->next_probe_ms = now + r->probe_ms;
      redisAsyncCommand(c, on_probe, NULL, "PING");
    }
    return;
  }
  if (now - r->progress_ms < r->o.timeout_ms) return;
  snprintf(why, sizeof(why), "no reply within %u ms (--redis-timeout-ms)", r->o.timeout_ms);
  stat_inc(r->o.timeouts);
  went_down(r, why);
}

/* ---- API ---- */

int sl_redis_init(struct sl_redis **out, uv_loop_t *loop, const struct sl_redis_opts *o) {
  struct sl_redis *r = sl_calloc(1, sizeof(*r));
  int err = sl_redis_parse_addr(o->addr, r->host, sizeof(r->host), &r->port);
  if (err) goto fail;
  if ((err = uv_timer_init(loop, &r->timer)) != 0) goto fail;
  r->loop = loop;
  r->o = *o;
  if (!r->o.timeout_ms) r->o.timeout_ms = 2000;
  snprintf(r->subject, sizeof(r->subject), "%s", o->log_subject ? o->log_subject : "redis");
  r->o.log_subject = r->subject;
  /* Fine enough to find a timeout within a quarter of it past the bound. */
  r->tick_ms = r->o.timeout_ms / 4 < 10 ? 10 : r->o.timeout_ms / 4 > 100 ? 100 : r->o.timeout_ms / 4;
  r->probe_ms = r->o.timeout_ms < PROBE_MAX_MS ? r->o.timeout_ms : PROBE_MAX_MS;
  *out = r;
  return 0;
fail:
  free(r);
  return err;
}

void sl_redis_start(struct sl_redis *r) {
  connect_attempt(r);
  uv_timer_start(&r->timer, on_timer, r->tick_ms, r->tick_ms);
}

static void on_timer_closed(uv_handle_t *h) { free(sl_container_of((uv_timer_t *)h, struct sl_redis, timer)); }

void sl_redis_stop(struct sl_redis *r) {
  r->stopped = r->quiet = 1;
  drop_ctx(&r->cmd);
  drop_ctx(&r->sub);
  r->cmd_conn = r->sub_conn = 0;
  r->state = SL_REDIS_DOWN;
  uv_timer_stop(&r->timer);
  sl__close((uv_handle_t *)&r->timer, on_timer_closed);
}

redisAsyncContext *sl_redis_cmd(struct sl_redis *r) { return r->state == SL_REDIS_READY ? r->cmd : NULL; }

redisAsyncContext *sl_redis_sub(struct sl_redis *r) { return r->state == SL_REDIS_READY ? r->sub : NULL; }

enum sl_redis_state sl_redis_state(const struct sl_redis *r) { return r->state; }

void *sl_redis_owner(const redisAsyncContext *c, const void *reply) {
  struct sl_redis *r = c->data;
  if (!r) return NULL;
  if (reply && c == r->cmd) r->replies++;
  return r->o.data;
}

void sl_redis_connect_now(struct sl_redis *r) {
  if (r->state == SL_REDIS_DOWN) connect_attempt(r);
}

void sl_redis_quiet(struct sl_redis *r) { r->quiet = 1; }
