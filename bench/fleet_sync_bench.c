/* The Redis cost of global limits' share sync (issue 11), without HTTP: N
 * fleets (proxy/fleet, each with its own thread, connection and instance
 * id, as N sluice processes would have) in one process, on one Redis, and
 * a driver thread that plays the workers' part of proxy/admit.c for K busy
 * keys: Poisson arrivals at Zipf-shaped rates (key r gets
 * R * top / r requests a second), each on an instance drawn at random,
 * decided by a limiter table of its instance at R x its share, the key asked
 * for when its bucket is more than half used. What Redis sees is what N
 * instances send for K busy keys under that load: the same code, the same
 * scripts.
 *
 * After a warm-up it resets Redis's statistics, runs the window, and prints
 * redis-server's CPU (utime+stime from /proc: meant for a private server on
 * this machine, where nothing else uses it), its INFO commandstats, the
 * fleets' syncs and key updates, and what the fleet admitted against the
 * limits (a sanity check: the sum over keys of min(offered, R)).
 *
 * usage: fleet_sync_bench HOST:PORT [seconds [instances [keys [top [warmup]]]]]
 * bench/README.md (issue 11) has its figures. */
#include <dirent.h>
#include <hiredis/hiredis.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "addr.h"
#include "config.h"
#include "fleet.h"
#include "limiter.h"

#define R 100 /* every key's limit, requests/s (the bench's --limited-qps) */
#define MAXI 8
#define MAXK 512

static struct sl_fleet fleets[MAXI];
static struct lim_table *lims[MAXI];

struct key {
  char name[32];
  size_t len;
  uint64_t hash;
  double rate; /* requests/s offered, all instances together */
  uint64_t offered, admitted;
};
static struct key keys[MAXK];

static uint64_t rng = 88172645463325252ull;
static double uniform(void) {
  rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
  return (double)(rng >> 11) / 9007199254740992.0;
}
static unsigned poisson(double mean) { /* Knuth's: the means here are small */
  double l = exp(-mean), p = 1.0;
  unsigned k = 0;
  do {
    k++;
    p *= uniform();
  } while (p > l);
  return k - 1;
}

/* What proxy/admit.c does with a decision on a key (fleet branch). */
static int decide(unsigned i, struct key *k, uint64_t now_ns) {
  struct sl_fleet_slot *slot;
  uint64_t share = sl_fleet_share(&fleets[i], k->hash, R, &slot);
  struct lim_decision d;
  lim_decide_milli(lims[i], k->name, k->len, k->hash, R * share / 1000, 1, now_ns, &d);
  if (!slot && (d.result == LIM_REJECT || d.remaining * 2 < d.limit))
    sl_fleet_want(&fleets[i], 0, k->hash, k->name, k->len, R, now_ns / 1000000);
  return d.result == LIM_ADMIT;
}

/* Drives the load for `secs` seconds in steps of 1 ms. */
static void drive(unsigned ni, unsigned nk, double secs) {
  uint64_t start = lim_now_ns(), step = 1000000, t = start;
  while (t - start < (uint64_t)(secs * 1e9)) {
    for (unsigned j = 0; j < nk; j++) {
      unsigned n = poisson(keys[j].rate * step / 1e9);
      for (unsigned a = 0; a < n; a++) {
        unsigned i = (unsigned)(uniform() * ni) % ni;
        keys[j].offered++;
        keys[j].admitted += (uint64_t)decide(i, &keys[j], lim_now_ns());
      }
    }
    t += step;
    uint64_t now = lim_now_ns();
    if (now < t) {
      struct timespec ts = {0, (long)(t - now)};
      nanosleep(&ts, NULL);
    }
  }
}

/* redis-server's CPU time so far, seconds: the sum of its threads' time on
 * a CPU (schedstat, in ns: finer than stat's clock ticks). */
static double redis_cpu_s(long pid) {
  char path[96];
  double sum = 0;
  snprintf(path, sizeof path, "/proc/%ld/task", pid);
  DIR *d = opendir(path);
  if (!d) return -1;
  for (struct dirent *e; (e = readdir(d));) {
    if (e->d_name[0] == '.') continue;
    snprintf(path, sizeof path, "/proc/%ld/task/%.20s/schedstat", pid, e->d_name);
    FILE *fp = fopen(path, "r");
    unsigned long long ns = 0;
    if (fp && fscanf(fp, "%llu", &ns) == 1) sum += (double)ns / 1e9;
    if (fp) fclose(fp);
  }
  closedir(d);
  return sum;
}

static uint64_t sum_stat(unsigned ni, size_t off) {
  uint64_t s = 0;
  for (unsigned i = 0; i < ni; i++) s += atomic_load((_Atomic uint64_t *)((char *)&fleets[i].stats + off));
  return s;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s HOST:PORT [seconds [instances [keys [top [warmup]]]]]\n", argv[0]);
    return 2;
  }
  double secs = argc > 2 ? atof(argv[2]) : 10;
  unsigned ni = argc > 3 ? (unsigned)atoi(argv[3]) : 3;
  unsigned nk = argc > 4 ? (unsigned)atoi(argv[4]) : 46;
  double top = argc > 5 ? atof(argv[5]) : 20;
  double warm = argc > 6 ? atof(argv[6]) : 4;
  if (ni < 1 || ni > MAXI || nk < 1 || nk > MAXK) return 2;
  char host[256];
  int port;
  if (sl_redis_parse_addr(argv[1], host, sizeof host, &port) != 0) return 2;
  redisContext *rc = redisConnect(host, port);
  if (!rc || rc->err) {
    fprintf(stderr, "redis %s: cannot connect\n", argv[1]);
    return 1;
  }
  redisReply *r = redisCommand(rc, "INFO server");
  const char *p = r && r->type == REDIS_REPLY_STRING ? strstr(r->str, "process_id:") : NULL;
  long pid = p ? atol(p + 11) : 0;
  freeReplyObject(r);

  /* Redis alone (its timers), for as long as the window: what is not the fleet's */
  double i0 = redis_cpu_s(pid);
  usleep((useconds_t)(secs * 1e6));
  double idle = (redis_cpu_s(pid) - i0) * 1000 / secs;

  struct sl_config cfg;
  memset(&cfg, 0, sizeof cfg);
  snprintf(cfg.redis, sizeof cfg.redis, "%s", argv[1]);
  snprintf(cfg.redis_prefix, sizeof cfg.redis_prefix, "fsb%d:", (int)getpid());
  cfg.redis_timeout_ms = 1000;
  cfg.global_limits = 1;
  /* --global-sync-ms and --global-ttl-ms (defaults 100, 1500) from the environment */
  const char *e = getenv("BENCH_SYNC_MS");
  cfg.global_sync_ms = e && atoi(e) > 0 ? (unsigned)atoi(e) : 100;
  e = getenv("BENCH_TTL_MS");
  cfg.global_ttl_ms = e && atoi(e) > 0 ? (unsigned)atoi(e) : 1500;
  cfg.global_keys = 4096;
  for (unsigned i = 0; i < ni; i++) {
    char err[256];
    lims[i] = lim_table_new(4096, 1);
    if (!lims[i] || sl_fleet_start(&fleets[i], &cfg, 1, err, sizeof err) != 0) {
      fprintf(stderr, "instance %u: %s\n", i, err);
      return 1;
    }
  }
  for (unsigned i = 0; i < ni; i++) sl_fleet_wait_first(&fleets[i], 1000);
  for (unsigned j = 0; j < nk; j++) {
    struct key *k = &keys[j];
    k->len = (size_t)snprintf(k->name, sizeof k->name, "b%u\x1ftext\x1f" "cn-shanghai", j + 1);
    k->hash = lim_hash(k->name, k->len);
    k->rate = R * top / (j + 1);
  }
  drive(ni, nk, warm);

  freeReplyObject(redisCommand(rc, "CONFIG RESETSTAT"));
  for (unsigned j = 0; j < nk; j++) keys[j].offered = keys[j].admitted = 0;
  uint64_t s0 = sum_stat(ni, offsetof(struct sl_fleet_stats, syncs));
  uint64_t u0 = sum_stat(ni, offsetof(struct sl_fleet_stats, key_updates));
  double c0 = redis_cpu_s(pid);
  drive(ni, nk, secs);
  double c1 = redis_cpu_s(pid);
  uint64_t s1 = sum_stat(ni, offsetof(struct sl_fleet_stats, syncs));
  uint64_t u1 = sum_stat(ni, offsetof(struct sl_fleet_stats, key_updates));

  uint64_t offered = 0, admitted = 0;
  double want = 0;
  for (unsigned j = 0; j < nk; j++) {
    offered += keys[j].offered;
    admitted += keys[j].admitted;
    want += keys[j].rate < R ? keys[j].offered : R * secs;
  }
  printf("instances %u, busy keys %u, R %d, top %.0f R, window %.1f s\n", ni, nk, R, top, secs);
  printf("offered %.0f/s, admitted %.0f/s = %.3f of sum(min(offered, R))\n", offered / secs, admitted / secs,
         admitted / want);
  printf("syncs answered %.1f/s, key updates %.1f/s (all instances)\n", (s1 - s0) / secs, (u1 - u0) / secs);
  printf("coordinated keys per instance:");
  for (unsigned i = 0; i < ni; i++) printf(" %llu", (unsigned long long)atomic_load(&fleets[i].stats.coordinated));
  printf("\nredis-server CPU %.2f ms/s (pid %ld); %.2f ms/s with no fleet: the fleet's %.2f ms/s\n",
         (c1 - c0) * 1000 / secs, pid, idle, (c1 - c0) * 1000 / secs - idle);
  r = redisCommand(rc, "INFO commandstats");
  if (r && r->type == REDIS_REPLY_STRING) {
    double tot = 0;
    for (char *l = strtok(r->str, "\r\n"); l; l = strtok(NULL, "\r\n")) {
      if (strncmp(l, "cmdstat_", 8) != 0 || strstr(l, "cmdstat_config") || strstr(l, "cmdstat_info")) continue;
      printf("  %s\n", l + 8);
      const char *u = strstr(l, "usec=");
      if (strstr(l, "cmdstat_eval")) tot += u ? atof(u + 5) : 0;
    }
    printf("script calls: %.2f ms/s of Redis time\n", tot / 1000 / secs);
  }
  freeReplyObject(r);
  for (unsigned i = 0; i < ni; i++) sl_fleet_stop(&fleets[i]);
  for (unsigned i = 0; i < ni; i++) lim_table_free(lims[i]);
  redisFree(rc);
  return 0;
}
