/* Drives the Redis Cluster router (proxy/redis/cluster_client.h) against a
 * real 3-master cluster that test_cluster.py made: cluster_router PORT1
 * PORT2 PORT3. Exits 0 when every check holds, 1 with a line saying which
 * did not. The cluster is changed with hiredis' blocking API on the side
 * (slot migrations), as an operator's redis-cli would.
 *
 *  1. seeded with one node only, commands before the map follow MOVED;
 *  2. with the map, every command goes straight to its master;
 *  3. a slot moved away (a finished reshard): MOVED followed, map reloaded;
 *  4. a slot being migrated: ASK followed with ASKING; a multi-key command
 *     over keys on both sides gets TRYAGAIN, retried until the tries are
 *     spent, then answered with it; once migrated, it works;
 *  5. the command's own error is passed on, not retried;
 *  6. stop with a command in flight: answered NULL once, no handle left. */
#include <hiredis/hiredis.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "cluster_client.h"

static uv_loop_t loop;
static struct sl_cluster *cl;
static int ports[3];
static char ids[3][64];

#define CHECK(c, ...)                                                     \
  do {                                                                    \
    if (!(c)) {                                                           \
      fprintf(stderr, "cluster_router: line %d: %s: ", __LINE__, #c);     \
      fprintf(stderr, __VA_ARGS__);                                       \
      fputc('\n', stderr);                                                \
      exit(1);                                                            \
    }                                                                     \
  } while (0)

struct res {
  int calls, isnull, type;
  long long integer;
  char str[256];
};

static void on_res(void *priv, const redisReply *r) {
  struct res *x = priv;
  x->calls++;
  x->isnull = r == NULL;
  if (!r) return;
  x->type = r->type;
  x->integer = r->integer;
  if (r->type == REDIS_REPLY_ARRAY) { /* MGET: the elements joined by ',' */
    size_t o = 0;
    for (size_t i = 0; i < r->elements && o < sizeof x->str - 1; i++)
      o += (size_t)snprintf(x->str + o, sizeof x->str - o, "%s%s", i ? "," : "",
                            r->element[i]->str ? r->element[i]->str : "(nil)");
  } else {
    snprintf(x->str, sizeof x->str, "%.*s", r->str ? (int)r->len : 0, r->str ? r->str : "");
  }
}

static void on_tick(uv_timer_t *t) { (void)t; }

/* Runs the loop until *flag is set or ms pass. */
static int run_until(const int *flag, unsigned ms) {
  uint64_t end = uv_now(&loop) + ms;
  uv_timer_t tick; /* keeps the loop from blocking forever */
  uv_timer_init(&loop, &tick);
  uv_timer_start(&tick, on_tick, 10, 10);
  while (!*flag && uv_now(&loop) < end) uv_run(&loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&tick, NULL);
  uv_run(&loop, UV_RUN_NOWAIT);
  return *flag;
}

/* A command through the router, waited for (up to 8 s). */
static struct res cmd(const char *fmt_args, ...) {
  const char *argv[8];
  size_t lens[8];
  int argc = 0;
  va_list ap;
  va_start(ap, fmt_args);
  for (const char *a = fmt_args; a && argc < 8; a = va_arg(ap, const char *)) {
    argv[argc] = a;
    lens[argc++] = strlen(a);
  }
  va_end(ap);
  unsigned slot = argc > 1 ? sl_cluster_key_slot(argv[1], lens[1]) : 0;
  struct res x = {0};
  CHECK(sl_cluster_command(cl, slot, on_res, &x, argc, argv, lens) == 0, "%s", argv[0]);
  CHECK(x.calls == 0, "answered inside sl_cluster_command");
  run_until(&x.calls, 8000);
  CHECK(x.calls == 1, "%s %s: %d answers", argv[0], argc > 1 ? argv[1] : "", x.calls);
  return x;
}

/* A blocking command to one node (administration on the side). */
static redisReply *admin(int port, const char *fmt, ...) {
  redisContext *c = redisConnect("127.0.0.1", port);
  CHECK(c && !c->err, "connect to %d", port);
  va_list ap;
  va_start(ap, fmt);
  redisReply *r = redisvCommand(c, fmt, ap);
  va_end(ap);
  CHECK(r != NULL, "%s on %d: %s", fmt, port, c->errstr);
  redisFree(c);
  return r;
}

static void admin_ok(int port, const char *fmt, const char *a, const char *b) {
  redisReply *r = admin(port, fmt, a, b);
  CHECK(r->type == REDIS_REPLY_STATUS, "%s %s %s on %d: %s", fmt, a, b, port, r->str ? r->str : "?");
  freeReplyObject(r);
}

static int owner_of(unsigned slot) {
  const struct sl_cluster_node *n = sl_cluster_map_node(sl_cluster_map(cl), slot);
  CHECK(n != NULL, "slot %u has no master", slot);
  for (int i = 0; i < 3; i++)
    if (ports[i] == n->port) return i;
  CHECK(0, "slot %u on unknown port %d", slot, n->port);
  return -1;
}

static void setslot(int src, int dst, unsigned slot, int finish) {
  char s[16];
  snprintf(s, sizeof s, "%u", slot);
  if (!finish) {
    admin_ok(ports[dst], "CLUSTER SETSLOT %s IMPORTING %s", s, ids[src]);
    admin_ok(ports[src], "CLUSTER SETSLOT %s MIGRATING %s", s, ids[dst]);
  } else {
    int order[3] = {dst, src, 3 - src - dst}; /* the new owner first, then the old, then the third */
    for (int i = 0; i < 3; i++) admin_ok(ports[order[i]], "CLUSTER SETSLOT %s NODE %s", s, ids[dst]);
  }
}

static void migrate_key(int src, int dst, const char *key) {
  redisReply *r = admin(ports[src], "MIGRATE 127.0.0.1 %d %s 0 5000", ports[dst], key);
  CHECK(r->type == REDIS_REPLY_STATUS, "MIGRATE %s: %s", key, r->str ? r->str : "?");
  freeReplyObject(r);
}

static void on_map(void *data) { *(int *)data = 1; }

int main(int argc, char **argv) {
  CHECK(argc == 4, "usage: cluster_router PORT1 PORT2 PORT3");
  for (int i = 0; i < 3; i++) {
    ports[i] = atoi(argv[i + 1]);
    redisReply *r = admin(ports[i], "CLUSTER MYID");
    CHECK(r->type == REDIS_REPLY_STRING && r->len < sizeof ids[i], "MYID");
    memcpy(ids[i], r->str, r->len + 1);
    freeReplyObject(r);
  }
  CHECK(uv_loop_init(&loop) == 0, "loop");
  struct sl_cluster_node seed = {.host = "127.0.0.1", .port = ports[0]};
  int mapped = 0;
  struct sl_cluster_opts o = {
      .seeds = &seed, .nseeds = 1, .timeout_ms = 2000, .log_subject = "test: redis cluster", .on_map = on_map,
      .data = &mapped};
  CHECK(sl_cluster_init(&cl, &loop, &o) == 0, "init");
  sl_cluster_start(cl);
  const struct sl_cluster_stats *st = sl_cluster_stats(cl);

  /* 1. before the map: the seed's MOVED says where */
  char k[32], v[32];
  struct res xs[30];
  for (int i = 0; i < 30; i++) {
    snprintf(k, sizeof k, "k%d", i);
    snprintf(v, sizeof v, "v%d", i);
    const char *a[] = {"SET", k, v};
    size_t l[] = {3, strlen(k), strlen(v)};
    memset(&xs[i], 0, sizeof xs[i]);
    CHECK(sl_cluster_command(cl, sl_cluster_key_slot(k, l[1]), on_res, &xs[i], 3, a, l) == 0, "SET");
  }
  for (int i = 0; i < 30; i++) {
    run_until(&xs[i].calls, 8000);
    CHECK(xs[i].calls == 1 && xs[i].type == REDIS_REPLY_STATUS && !strcmp(xs[i].str, "OK"), "SET k%d: %s", i,
          xs[i].str);
  }
  CHECK(st->moved > 0, "no MOVED followed before the map");
  CHECK(run_until(&mapped, 5000), "no map");
  const struct sl_cluster_map *m = sl_cluster_map(cl);
  CHECK(m->nnodes == 3, "%u masters", m->nnodes);
  for (unsigned s = 0; s < SL_CLUSTER_SLOTS; s++) CHECK(m->slot[s] != SL_CLUSTER_NO_NODE, "slot %u unserved", s);
  printf("ok: 30 SETs from one seed, %llu MOVED followed; map of 3 masters\n", (unsigned long long)st->moved);

  /* 2. with the map: straight to the master */
  uint64_t moved0 = st->moved;
  for (int i = 0; i < 30; i++) {
    snprintf(k, sizeof k, "k%d", i);
    snprintf(v, sizeof v, "v%d", i);
    struct res x = cmd("GET", k, NULL);
    CHECK(x.type == REDIS_REPLY_STRING && !strcmp(x.str, v), "GET %s: %s", k, x.str);
  }
  CHECK(st->moved == moved0, "MOVED with a fresh map");
  printf("ok: 30 GETs straight to their masters\n");

  /* 3. a finished reshard: MOVED, then the map reloaded */
  unsigned s0 = sl_cluster_key_slot("k0", 2);
  int a = owner_of(s0), b = (a + 1) % 3;
  uint64_t maps0 = st->maps;
  setslot(a, b, s0, 0);
  migrate_key(a, b, "k0");
  setslot(a, b, s0, 1);
  struct res x = cmd("GET", "k0", NULL);
  CHECK(x.type == REDIS_REPLY_STRING && !strcmp(x.str, "v0"), "GET k0 after the reshard: %s", x.str);
  CHECK(st->moved == moved0 + 1, "moved %llu", (unsigned long long)st->moved);
  int reloaded = 0;
  for (int t = 0; t < 100 && !reloaded; t++) {
    int never = 0;
    run_until(&never, 20);
    reloaded = st->maps > maps0 && owner_of(s0) == b;
  }
  CHECK(reloaded, "map not reloaded after MOVED");
  printf("ok: slot %u moved %d -> %d: MOVED followed, map reloaded\n", s0, ports[a], ports[b]);

  /* 4. a slot being migrated: ASK, TRYAGAIN, then done */
  cmd("SET", "{t}a", "va", NULL);
  cmd("SET", "{t}b", "vb", NULL);
  unsigned st_ = sl_cluster_key_slot("{t}a", 4);
  a = owner_of(st_);
  b = (a + 2) % 3;
  setslot(a, b, st_, 0);
  migrate_key(a, b, "{t}a");
  uint64_t ask0 = st->ask, moved1 = st->moved;
  x = cmd("GET", "{t}a", NULL);
  CHECK(x.type == REDIS_REPLY_STRING && !strcmp(x.str, "va"), "GET {t}a while migrating: %s", x.str);
  CHECK(st->ask == ask0 + 1 && st->moved == moved1, "ask %llu", (unsigned long long)st->ask);
  x = cmd("GET", "{t}b", NULL);
  CHECK(x.type == REDIS_REPLY_STRING && !strcmp(x.str, "vb"), "GET {t}b while migrating: %s", x.str);
  uint64_t gave0 = st->gave_up, retried0 = st->retried;
  uint64_t t0 = uv_now(&loop);
  x = cmd("MGET", "{t}a", "{t}b", NULL);
  CHECK(x.type == REDIS_REPLY_ERROR && !strncmp(x.str, "TRYAGAIN", 8), "MGET while migrating: %s", x.str);
  CHECK(st->gave_up == gave0 + 1 && st->retried == retried0 + SL_CLUSTER_MAX_TRIES - 1, "gave up %llu retried %llu",
        (unsigned long long)st->gave_up, (unsigned long long)st->retried);
  printf("ok: ASK followed; TRYAGAIN retried %d times over %llu ms, then answered\n", SL_CLUSTER_MAX_TRIES - 1,
         (unsigned long long)(uv_now(&loop) - t0));
  migrate_key(a, b, "{t}b");
  setslot(a, b, st_, 1);
  x = cmd("MGET", "{t}a", "{t}b", NULL);
  CHECK(x.type == REDIS_REPLY_ARRAY && !strcmp(x.str, "va,vb"), "MGET after the migration: %s", x.str);
  printf("ok: after the migration MGET answered from %d\n", ports[b]);

  /* 5. the command's own error */
  x = cmd("INCR", "k1", NULL);
  CHECK(x.type == REDIS_REPLY_ERROR && strstr(x.str, "not an integer"), "INCR k1: %s", x.str);

  /* 6. stop with a command in flight */
  struct res last = {0};
  const char *ga[] = {"GET", "k1"};
  size_t gl[] = {3, 2};
  CHECK(sl_cluster_command(cl, sl_cluster_key_slot("k1", 2), on_res, &last, 2, ga, gl) == 0, "GET");
  sl_cluster_stop(cl);
  CHECK(last.calls == 1 && last.isnull, "in flight at stop: %d answers, null %d", last.calls, last.isnull);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK(uv_loop_close(&loop) == 0, "handles left");
  printf("ok: stopped with a command in flight, answered NULL; no handle left\n");
  return 0;
}
