/* sluice: startup, signals, configuration reloads and the admin listener on
 * the main thread; the request path lives in the worker threads. */
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "admin.h"
#include "limiter.h"
#include "proxy.h"
#include "uv_util.h"

struct sl_main {
  uv_loop_t *loop;
  struct sl_cli cli;
  struct sl_worker *workers;
  unsigned nworkers;
  struct sl_admin admin;
  struct sl_shared shared;
  uv_signal_t sig_term, sig_int, sig_hup;
  uv_timer_t reclaim;
  struct sl_config *snapshots[64]; /* live snapshots, oldest first; [n-1] is current */
  unsigned nsnap;
};

/* A socket bound to a: with reuseport, each worker's listening socket, so
 * that it accepts on its own queue (libuv 1.44 has no flag for it).
 * Returns the fd or -errno. */
static int bound_socket(const struct sl_addr *a, int reuseport) {
  int fd = socket(a->sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  int one = 1;
  if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
      (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0) ||
      bind(fd, (const struct sockaddr *)&a->sa, a->salen) != 0) {
    int e = -errno;
    close(fd);
    return e;
  }
  return fd;
}

/* Whether another socket listens on a's port already. SO_REUSEPORT lets a
 * second process of the same user bind it too, and the kernel would then
 * split the connections between the two without a word (two instances
 * given one port by mistake). A bind without SO_REUSEPORT is refused
 * (EADDRINUSE) while any socket listens there. Port 0: each socket gets its
 * own port, nothing to check. Returns 0 or -errno. */
static int port_taken(const struct sl_addr *a) {
  const struct sockaddr_in *in = (const struct sockaddr_in *)&a->sa;
  const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)&a->sa;
  if ((a->sa.ss_family == AF_INET && in->sin_port == 0) || (a->sa.ss_family == AF_INET6 && in6->sin6_port == 0))
    return 0;
  int fd = bound_socket(a, 0);
  if (fd < 0) return fd;
  close(fd);
  return 0;
}

static void reclaim_snapshots(struct sl_main *m) {
  uint64_t min_seen = sl_workers_config_seen(m->workers, m->nworkers);
  unsigned keep = 0;
  for (unsigned i = 0; i < m->nsnap; i++) {
    if (i + 1 < m->nsnap && m->snapshots[i]->version < min_seen)
      free(m->snapshots[i]);
    else
      m->snapshots[keep++] = m->snapshots[i];
  }
  m->nsnap = keep;
}

static void on_reclaim(uv_timer_t *t) { reclaim_snapshots(t->data); }

static void reload(struct sl_main *m) {
  char err[512];
  struct sl_config *cur = m->snapshots[m->nsnap - 1];
  struct sl_config *next = sl_malloc(sizeof(*next));
  if (sl_config_load(next, &m->cli, err, sizeof(err)) != 0) {
    fprintf(stderr, "sluice: reload failed, keeping version %llu: %s\n", (unsigned long long)cur->version, err);
    free(next);
    return;
  }
  reclaim_snapshots(m);
  if (m->nsnap == SL_ARRAY_SIZE(m->snapshots)) {
    fprintf(stderr, "sluice: reload refused: workers still hold %u older configurations\n", m->nsnap);
    free(next);
    return;
  }
  /* What the sockets, threads and tables were made from stays as it is
   * until a restart: say which of those the file changed. */
#define KEEP(field, name)                                                 \
  do {                                                                    \
    if (memcmp(&next->field, &cur->field, sizeof(cur->field)) != 0)      \
      fprintf(stderr, "sluice: reload: '%s' changes only on restart\n", name); \
    memcpy(&next->field, &cur->field, sizeof(cur->field));                \
  } while (0)
  KEEP(listen.sa, "listen");
  KEEP(admin.sa, "admin");
  KEEP(workers, "workers");
  KEEP(redis, "redis");
  KEEP(redis_prefix, "redis-prefix");
  KEEP(flush_ms, "flush-ms");
  KEEP(flush_quiet_ms, "flush-quiet-ms");
  KEEP(spool_ms, "spool-ms");
  KEEP(spool_dir, "spool-dir");
  KEEP(instance_id, "instance-id");
  KEEP(spool_max_bytes, "spool-max-bytes");
  KEEP(meter_keys, "meter-keys");
  KEEP(flush_keys, "flush-keys");
  KEEP(meter_queue_batches, "meter-queue-batches");
  KEEP(final_flush_ms, "final-flush-ms");
  KEEP(billing_tz_offset_min, "billing-tz-offset-min");
  KEEP(time_offset_s, "time-offset-s");
  KEEP(resync_ms, "resync-ms");
  KEEP(redis_timeout_ms, "redis-timeout-ms");
  KEEP(redis_wait_replicas, "redis-wait-replicas");
  KEEP(redis_wait_ms, "redis-wait-ms");
  KEEP(lookup_timeout_ms, "lookup-timeout-ms");
  KEEP(negative_ttl_ms, "negative-ttl-ms");
  KEEP(max_accounts, "max-accounts");
  KEEP(limiter_keys, "limiter-keys");
  KEEP(global_limits, "global-limits");
  KEEP(global_sync_ms, "global-sync-ms");
  KEEP(global_ttl_ms, "global-ttl-ms");
  KEEP(global_keys, "global-keys");
#undef KEEP
  next->listen = cur->listen;
  next->admin = cur->admin;
  next->version = cur->version + 1;
  m->snapshots[m->nsnap++] = next;
  for (unsigned i = 0; i < m->nworkers; i++) {
    /* release: the snapshot's contents are complete before a worker can see it. */
    atomic_store_explicit(&m->workers[i].next_cfg, next, memory_order_release);
    sl_inbox_post(&m->workers[i].inbox, SL_MSG_CONFIG);
  }
  fprintf(stderr, "sluice: configuration version %llu loaded\n", (unsigned long long)next->version);
}

static void on_signal(uv_signal_t *s, int signum) {
  struct sl_main *m = s->data;
  if (signum == SIGHUP) {
    reload(m);
    return;
  }
  fprintf(stderr, "sluice: %s: draining\n", signum == SIGTERM ? "SIGTERM" : "SIGINT");
  for (unsigned i = 0; i < m->nworkers; i++) {
    atomic_store_explicit(&m->workers[i].drain, 1, memory_order_release);
    sl_inbox_post(&m->workers[i].inbox, SL_MSG_DRAIN);
  }
  sl_admin_stop(&m->admin);
  uv_close((uv_handle_t *)&m->sig_term, NULL);
  uv_close((uv_handle_t *)&m->sig_int, NULL);
  uv_close((uv_handle_t *)&m->sig_hup, NULL);
  uv_close((uv_handle_t *)&m->reclaim, NULL);
}

int main(int argc, char **argv) {
  static struct sl_main m;
  char err[512];
  switch (sl_cli_parse(&m.cli, argc, argv)) {
    case SL_CLI_EXIT_OK: return 0;
    case SL_CLI_EXIT_ERR: return 2;
    case SL_CLI_RUN: break;
  }
  struct sl_config *cfg = sl_malloc(sizeof(*cfg));
  if (sl_config_load(cfg, &m.cli, err, sizeof(err)) != 0) {
    fprintf(stderr, "sluice: configuration error: %s\n", err);
    return 1;
  }
  cfg->version = 1;
  if (m.cli.check_only) {
    printf("sluice: configuration ok (%u workers, %u upstreams, %u large-model upstreams)\n", cfg->workers,
           cfg->n_upstream, cfg->n_upstream_llm);
    free(cfg);
    free(m.cli.argv);
    return 0;
  }
  if (!cfg->metering_on)
    fprintf(stderr, "sluice: WARNING: --metering off: no call is counted for billing (measurement only)\n");
  signal(SIGPIPE, SIG_IGN);
  sl_background_configure(cfg->background_nice, cfg->background_pinned ? &cfg->background_cpuset : NULL);
  m.snapshots[m.nsnap++] = cfg;
  m.nworkers = cfg->workers;
  m.workers = sl_calloc(m.nworkers, sizeof(*m.workers));
  m.loop = uv_default_loop();
  /* Caught from here on (and acted on once the loop runs): the client
   * socket listens next, so a SIGTERM from now must drain, not kill. */
  uv_signal_init(m.loop, &m.sig_term);
  uv_signal_init(m.loop, &m.sig_int);
  uv_signal_init(m.loop, &m.sig_hup);
  m.sig_term.data = m.sig_int.data = m.sig_hup.data = &m;
  uv_signal_start(&m.sig_term, on_signal, SIGTERM);
  uv_signal_start(&m.sig_int, on_signal, SIGINT);
  uv_signal_start(&m.sig_hup, on_signal, SIGHUP);
  int taken = port_taken(&cfg->listen);
  if (taken < 0) {
    fprintf(stderr, "sluice: listen %s: %s%s\n", cfg->listen.text, strerror(-taken),
            taken == -EADDRINUSE ? " (another process listens there)" : "");
    return 1;
  }
  for (unsigned i = 0; i < m.nworkers; i++) {
    int fd = bound_socket(&cfg->listen, 1);
    if (fd < 0) {
      fprintf(stderr, "sluice: listen %s: %s\n", cfg->listen.text, strerror(-fd));
      return 1;
    }
    m.workers[i].listen_fd = fd;
  }
  m.admin.workers = m.workers;
  m.admin.nworkers = m.nworkers;
  m.admin.time_offset_s = cfg->time_offset_s;
  int r = sl_admin_start(&m.admin, m.loop, &cfg->admin);
  if (r != 0) {
    fprintf(stderr, "sluice: admin listen %s: %s\n", cfg->admin.text, uv_strerror(r));
    return 1;
  }
  m.shared.lim = lim_table_new(cfg->limiter_keys, 64);
  if (!m.shared.lim) {
    fprintf(stderr, "sluice: cannot allocate the limiter table for %u keys\n", cfg->limiter_keys);
    return 1;
  }
  struct sl_inbox **inboxes = sl_calloc(m.nworkers, sizeof(*inboxes));
  for (unsigned i = 0; i < m.nworkers; i++) {
    if ((r = sl_worker_init(&m.workers[i], i, cfg, m.workers[i].listen_fd, &m.shared)) != 0) {
      fprintf(stderr, "sluice: worker %u: %s\n", i, uv_strerror(r));
      return 1;
    }
    inboxes[i] = &m.workers[i].inbox;
  }
  /* The threads started below inherit a mask that blocks the signals sluice
   * handles, so the kernel delivers those to the main thread, whose loop
   * acts on them: a signal taken by a thread asleep in its own loop (under
   * ThreadSanitizer, one whose delivery is deferred until that thread
   * wakes) could otherwise wait for that thread's next timer. */
  sigset_t handled, before;
  sigemptyset(&handled);
  sigaddset(&handled, SIGTERM);
  sigaddset(&handled, SIGINT);
  sigaddset(&handled, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &handled, &before);
  if ((r = sl_dirsync_start(&m.shared.dir, cfg, m.nworkers, inboxes)) != 0) {
    fprintf(stderr, "sluice: directory thread: %s\n", strerror(-r));
    return 1;
  }
  struct sl_meter_worker **meters = sl_calloc(m.nworkers, sizeof(*meters));
  for (unsigned i = 0; i < m.nworkers; i++) meters[i] = &m.workers[i].meter;
  if (sl_flusher_start(&m.shared.flusher, cfg, meters, inboxes, m.nworkers, err, sizeof(err)) != 0) {
    fprintf(stderr, "sluice: metering: %s\n", err);
    return 1;
  }
  if (cfg->global_limits && cfg->admission_on) {
    if (sl_fleet_start(&m.shared.fleet_store, cfg, m.nworkers, err, sizeof(err)) != 0) {
      fprintf(stderr, "sluice: %s\n", err);
      return 1;
    }
    m.shared.fleet = &m.shared.fleet_store;
    sl_fleet_wait_first(m.shared.fleet, cfg->redis_timeout_ms < 1000 ? cfg->redis_timeout_ms : 1000);
  }
  m.admin.fleet = m.shared.fleet;
  m.admin.flusher = &m.shared.flusher;
  m.admin.dir = &m.shared.dir;
  m.admin.lim = m.shared.lim;
  for (unsigned i = 0; i < m.nworkers; i++) {
    if ((r = sl_worker_run(&m.workers[i])) != 0) {
      fprintf(stderr, "sluice: worker %u: %s\n", i, uv_strerror(r));
      return 1;
    }
  }
  pthread_sigmask(SIG_SETMASK, &before, NULL);
  uv_timer_init(m.loop, &m.reclaim);
  m.reclaim.data = &m;
  uv_timer_start(&m.reclaim, on_reclaim, 1000, 1000);
  fprintf(stderr, "sluice %s: listening on %s, admin %s, %u workers, upstreams %u+%u\n", SLUICE_VERSION,
          cfg->listen.text, cfg->admin.text, m.nworkers, cfg->n_upstream, cfg->n_upstream_llm);
  uv_run(m.loop, UV_RUN_DEFAULT);
  for (unsigned i = 0; i < m.nworkers; i++) uv_thread_join(&m.workers[i].thread);
  sl_flusher_stop(&m.shared.flusher); /* every count to Redis, or to the spool */
  sl_dirsync_stop(&m.shared.dir);
  if (m.shared.fleet) sl_fleet_stop(m.shared.fleet);
  for (unsigned i = 0; i < m.nworkers; i++) sl_worker_destroy(&m.workers[i]);
  lim_table_free(m.shared.lim);
  free(inboxes);
  free(meters);
  fprintf(stderr, "sluice: stopped\n");
  for (unsigned i = 0; i < m.nsnap; i++) free(m.snapshots[i]);
  free(m.workers);
  free(m.cli.argv);
  uv_loop_close(m.loop);
  return 0;
}
