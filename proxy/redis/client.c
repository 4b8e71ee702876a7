#include "client.h"

#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "redis_uv.h"
#include "sentinel.h"

#include "common.h"
#include "stat.h"
#include "uv_util.h"

#define BACKOFF_FIRST_MS 100
#define BACKOFF_MAX_MS 2000
#define PROBE_MAX_MS 1000 /* an idle connection is asked ROLE at least this often */
#define WATCH_RETRY_MS 500 /* a lost sentinel subscription is opened again (on the next sentinel) after this */

struct sl_redis {
  uv_timer_t timer; /* the watchdog: connect and reply deadlines, idle PING, reconnect */
  uv_loop_t *loop;
  struct sl_redis_opts o;
  struct sl_redis_url url; /* what --redis names */
  char host[SL_REDIS_HOST_MAX]; /* the server, or the master the sentinels named */
  int port; /* 0: unix socket at host */
  int replicas; /* connected replicas the server's last ROLE listed; -1: not known */
  /* Sentinel (url.kind == SL_REDIS_SENTINEL): an attempt first asks the
   * sentinels in turn, from the one that answered last, for the master;
   * apart from that one sentinel connection stays SUBSCRIBEd to
   * +switch-master, whatever the master's state. */
  redisAsyncContext *ask, *watch;
  unsigned ask_first, asked; /* the sentinel to ask first; sentinels asked in this attempt */
  uint64_t ask_started_ms;
  char ask_why[200];  /* the last sentinel's failure, for the "down" line */
  int direct;         /* the next attempt goes to host:port as +switch-master named it, without asking */
  unsigned watch_i;
  int watch_subscribed;
  uint64_t watch_started_ms, watch_next_ms;
  char master_said[SL_REDIS_HOST_MAX + 8]; /* the master's address last logged */
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

/* The attempt or the connections to the server go (not the sentinel
 * subscription): down, without a word or a callback. */
static void drop_server(struct sl_redis *r) {
  drop_ctx(&r->ask);
  drop_ctx(&r->cmd);
  drop_ctx(&r->sub);
  r->cmd_conn = r->sub_conn = 0;
  r->state = SL_REDIS_DOWN;
  stat_set(r->o.up, 0);
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
  drop_server(r);
  if (r->backoff_ms == 0) r->backoff_ms = BACKOFF_FIRST_MS;
  r->next_connect_ms = now + r->backoff_ms;
  unsigned cap = r->o.backoff_max_ms ? r->o.backoff_max_ms : BACKOFF_MAX_MS;
  r->backoff_ms = r->backoff_ms * 2 > cap ? cap : r->backoff_ms * 2;
  if (r->o.on_down) r->o.on_down(r->o.data, why);
  if (r->quiet || now < r->next_down_log_ms) return;
  r->next_down_log_ms = now + SL_REDIS_LOG_MS;
  char w[400], note[160] = "";
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

/* ROLE's reply, after the first PONG and as the idle probe: the replicas
 * the server lists (WAIT's auto count); with Sentinel, a server that is no
 * (longer a) master is down. */
static void on_role(redisAsyncContext *c, void *reply, void *priv) {
  (void)priv;
  struct sl_redis *r = c->data;
  if (!r || !reply || c != r->cmd) return;
  r->replies++; /* progress, as every reply */
  char why[600], w[160];
  int n = 0, role = sl_redis_role_reply(reply, &n, w, sizeof(w));
  if (role >= 0) r->replicas = role == 1 ? n : 0;
  if (r->url.kind != SL_REDIS_SENTINEL) return; /* a single server: what it says about itself is all */
  if (role == 1) {
    if (r->state == SL_REDIS_CONNECTING) went_up(r);
    return;
  }
  if (role < 0 && r->state == SL_REDIS_READY) return; /* an unreadable probe reply: the watchdog judges progress */
  snprintf(why, sizeof(why), "%s:%d, named master '%s', is not a master: %s", r->host, r->port, r->url.master, w);
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
  /* Its ROLE says how many replicas a metering batch can wait for (WAIT);
   * with Sentinel, the server must also still be the master: one named by a
   * sentinel that has not yet seen a failover, or an old master back as a
   * replica, is not up. A single server is up at PONG, as before (the reply
   * comes before any of the owner's). */
  redisAsyncCommand(r->cmd, on_role, NULL, "ROLE");
  if (r->url.kind == SL_REDIS_SERVER) went_up(r);
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


/* A context to host:port (port 0: a unix socket) with r's callbacks or the
 * given ones. Returns it, or NULL with why (why_len bytes) filled in. */
static redisAsyncContext *open_to(struct sl_redis *r, const char *host, int port, char *why, size_t why_len,
                                  redisConnectCallback *on_conn, redisDisconnectCallback *on_disc) {
  redisAsyncContext *c = port ? redisAsyncConnect(host, port) : redisAsyncConnectUnix(host);
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
  if (port && redisEnableKeepAlive(&c->c) != REDIS_OK) {
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
  redisAsyncSetConnectCallback(c, on_conn);
  redisAsyncSetDisconnectCallback(c, on_disc);
  return c;
}

/* The server's connections: the connect timeout runs from now. */
static void open_server(struct sl_redis *r) {
  r->cmd_conn = r->sub_conn = 0;
  r->connect_started_ms = sl_mono_ms();
  char why[200] = "cannot connect";
  r->cmd = open_to(r, r->host, r->port, why, sizeof(why), on_connect, on_disconnect);
  if (r->cmd && r->o.subscriber) r->sub = open_to(r, r->host, r->port, why, sizeof(why), on_connect, on_disconnect);
  if (!r->cmd || (r->o.subscriber && !r->sub)) went_down(r, why);
}

/* ---- Sentinel: which server is the master ---- */

static void ask_next(struct sl_redis *r);

/* The sentinel asked now failed (why): the next one is asked. */
static void ask_failed(struct sl_redis *r, const char *why) {
  const struct sl_redis_hostport *s = &r->url.hosts[(r->ask_first + r->asked - 1) % r->url.n_hosts];
  char w[120];
  /* (a long host is cut short: the line only reports it) */
  if (snprintf(r->ask_why, sizeof(r->ask_why), "sentinel %s:%d: %s", s->host, s->port,
               sl_printable(w, sizeof(w), why, strlen(why))) >= (int)sizeof(r->ask_why))
    r->ask_why[sizeof(r->ask_why) - 1] = '\0';
  drop_ctx(&r->ask);
  ask_next(r);
}

static void on_ask_reply(redisAsyncContext *c, void *reply, void *priv) {
  (void)priv;
  struct sl_redis *r = c->data;
  if (!r || !reply || c != r->ask) return; /* lost: on_ask_disconnect goes on */
  struct sl_redis_hostport m;
  char why[200];
  if (sl_sentinel_master_reply(reply, &m, why, sizeof(why)) != 0) {
    ask_failed(r, why);
    return;
  }
  r->ask_first = (r->ask_first + r->asked - 1) % r->url.n_hosts; /* it answered: asked first next time */
  drop_ctx(&r->ask);
  memcpy(r->host, m.host, sizeof(r->host));
  r->port = m.port;
  char now_at[sizeof(r->master_said)];
  snprintf(now_at, sizeof(now_at), "%s:%d", r->host, r->port);
  if (!r->quiet && strcmp(now_at, r->master_said)) {
    const struct sl_redis_hostport *s = &r->url.hosts[r->ask_first];
    fprintf(stderr, "sluice: %s: sentinel %s:%d names master '%s' at %s\n", r->subject, s->host, s->port,
            r->url.master, now_at);
    memcpy(r->master_said, now_at, sizeof(now_at));
  }
  open_server(r);
}

static void on_ask_connect(const redisAsyncContext *c, int status) {
  struct sl_redis *r = c->data;
  if (!r || c != r->ask) return;
  if (status != REDIS_OK) {
    r->ask = NULL; /* hiredis frees it after this */
    ask_failed(r, c->errstr);
    return;
  }
  redisAsyncCommand(r->ask, on_ask_reply, NULL, "SENTINEL get-master-addr-by-name %s", r->url.master);
}

static void on_ask_disconnect(const redisAsyncContext *c, int status) {
  (void)status;
  struct sl_redis *r = c->data;
  if (!r || c != r->ask) return;
  r->ask = NULL; /* hiredis frees it after this */
  ask_failed(r, c->errstr[0] ? c->errstr : "connection closed");
}

/* Asks the next sentinel not yet asked in this attempt, each within the
 * connect timeout; when every one has failed the attempt has. */
static void ask_next(struct sl_redis *r) {
  unsigned n = r->url.n_hosts;
  if (r->asked == n) {
    char why[400];
    snprintf(why, sizeof(why), "no sentinel named master '%s' (%u asked; last: %s)", r->url.master, n, r->ask_why);
    went_down(r, why);
    return;
  }
  const struct sl_redis_hostport *s = &r->url.hosts[(r->ask_first + r->asked++) % n];
  char why[200];
  r->ask_started_ms = sl_mono_ms();
  r->ask = open_to(r, s->host, s->port, why, sizeof(why), on_ask_connect, on_ask_disconnect);
  if (!r->ask) ask_failed(r, why);
}

static void connect_attempt(struct sl_redis *r) {
  if (r->stopped || r->cmd || r->sub || r->ask) return; /* an attempt is under way */
  stat_inc(r->o.attempts);
  r->state = SL_REDIS_CONNECTING;
  r->replicas = -1;
  r->connect_started_ms = sl_mono_ms();
  if (r->url.kind == SL_REDIS_SENTINEL && !r->direct) {
    r->asked = 0; /* every attempt asks again: a failover may have happened meanwhile */
    ask_next(r);
    return;
  }
  r->direct = 0;
  open_server(r);
}

/* ---- Sentinel: +switch-master ---- */

/* A sentinel announced a new address for our master: the connections go
 * (the owner is told, as for any outage) and the new one is tried at once,
 * without asking and without the backoff. */
static void switch_master(struct sl_redis *r, const struct sl_redis_hostport *m) {
  const struct sl_redis_hostport *s = &r->url.hosts[r->watch_i];
  snprintf(r->master_said, sizeof(r->master_said), "%s:%d", m->host, m->port);
  if (!r->quiet)
    fprintf(stderr, "sluice: %s: sentinel %s:%d announced master '%s' at %s (+switch-master); reconnecting\n",
            r->subject, s->host, s->port, r->url.master, r->master_said);
  int was_ready = r->state == SL_REDIS_READY;
  drop_server(r);
  memcpy(r->host, m->host, sizeof(r->host));
  r->port = m->port;
  r->direct = 1;
  if (was_ready && r->o.on_down) r->o.on_down(r->o.data, "the master changed (+switch-master)");
  connect_attempt(r);
}

static void watch_lost(struct sl_redis *r) {
  r->watch_subscribed = 0;
  r->watch_i = (r->watch_i + 1) % r->url.n_hosts;
  r->watch_next_ms = sl_mono_ms() + WATCH_RETRY_MS;
}

static void on_watch_msg(redisAsyncContext *c, void *reply, void *priv) {
  (void)priv;
  struct sl_redis *r = c->data;
  if (!r || !reply || c != r->watch) return;
  redisReply *rep = reply;
  struct sl_redis_hostport m;
  if (sl_sentinel_switch_msg(rep, r->url.master, &m)) {
    switch_master(r, &m);
    return;
  }
  if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 3 && rep->element[0]->type == REDIS_REPLY_STRING &&
      !strcmp(rep->element[0]->str, "subscribe"))
    r->watch_subscribed = 1;
}

static void on_watch_connect(const redisAsyncContext *c, int status) {
  struct sl_redis *r = c->data;
  if (!r || c != r->watch) return;
  if (status != REDIS_OK) {
    r->watch = NULL; /* hiredis frees it after this */
    watch_lost(r);
    return;
  }
  redisAsyncCommand(r->watch, on_watch_msg, NULL, "SUBSCRIBE %s", SL_SENTINEL_SWITCH_CHANNEL);
}

static void on_watch_disconnect(const redisAsyncContext *c, int status) {
  (void)status;
  struct sl_redis *r = c->data;
  if (!r || c != r->watch) return;
  r->watch = NULL; /* hiredis frees it after this */
  watch_lost(r);
}

/* Keeps one sentinel connection subscribed (a connection not subscribed
 * within the connect timeout is dropped), from the timer. */
static void watch_check(struct sl_redis *r, uint64_t now) {
  if (r->url.kind != SL_REDIS_SENTINEL || r->stopped) return;
  if (r->watch) {
    if (!r->watch_subscribed && now - r->watch_started_ms >= r->o.timeout_ms) {
      drop_ctx(&r->watch);
      watch_lost(r);
    }
    return;
  }
  if (now < r->watch_next_ms) return;
  const struct sl_redis_hostport *s = &r->url.hosts[r->watch_i];
  char why[200];
  r->watch_started_ms = now;
  r->watch = open_to(r, s->host, s->port, why, sizeof(why), on_watch_connect, on_watch_disconnect);
  if (!r->watch) watch_lost(r);
}

/* ---- the watchdog ---- */

/* A connection that is not up within timeout_ms of its start, or a command
 * connection with replies outstanding and none come for timeout_ms, counts
 * as down. */
static void on_timer(uv_timer_t *t) {
  struct sl_redis *r = sl_container_of(t, struct sl_redis, timer);
  uint64_t now = sl_mono_ms();
  char why[200];
  watch_check(r, now);
  if (r->state == SL_REDIS_DOWN) {
    if (now >= r->next_connect_ms) connect_attempt(r);
    return;
  }
  if (r->state == SL_REDIS_CONNECTING && r->ask) {
    if (now - r->ask_started_ms < r->o.timeout_ms) return;
    snprintf(why, sizeof(why), "no answer within %u ms (--redis-timeout-ms)", r->o.timeout_ms);
    ask_failed(r, why);
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
      redisAsyncCommand(c, on_role, NULL, "ROLE");
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
  char msg[300];
  int err = sl_redis_url_parse(&r->url, o->addr, msg, sizeof(msg)) ? UV_EINVAL : 0;
  if (err) goto fail;
  if (r->url.kind == SL_REDIS_CLUSTER) { /* one client per node: cluster_client.h, through db.h */
    err = UV_EINVAL;
    goto fail;
  }
  if (r->url.kind == SL_REDIS_SERVER) {
    memcpy(r->host, r->url.server.host, sizeof(r->host));
    r->port = r->url.server.port;
  }
  r->replicas = -1;
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
  watch_check(r, sl_mono_ms());
  connect_attempt(r);
  uv_timer_start(&r->timer, on_timer, r->tick_ms, r->tick_ms);
}

static void on_timer_closed(uv_handle_t *h) { free(sl_container_of((uv_timer_t *)h, struct sl_redis, timer)); }

void sl_redis_stop(struct sl_redis *r) {
  if (!r) return;
  r->stopped = r->quiet = 1;
  drop_ctx(&r->watch);
  drop_server(r);
  uv_timer_stop(&r->timer);
  sl__close((uv_handle_t *)&r->timer, on_timer_closed);
}

redisAsyncContext *sl_redis_cmd(struct sl_redis *r) { return r && r->state == SL_REDIS_READY ? r->cmd : NULL; }

redisAsyncContext *sl_redis_sub(struct sl_redis *r) { return r && r->state == SL_REDIS_READY ? r->sub : NULL; }

enum sl_redis_state sl_redis_state(const struct sl_redis *r) { return r ? r->state : SL_REDIS_DOWN; }

int sl_redis_replicas(const struct sl_redis *r) { return r->replicas; }

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
