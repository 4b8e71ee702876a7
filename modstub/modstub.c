/* modstub main: options, listening sockets, worker threads, signals. */
#include "modstub.h"

#include <errno.h>
#include <getopt.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

struct ms_worker *ms_workers;
unsigned ms_nworkers;

static const char usage[] =
  "usage: modstub --listen HOST:PORT [options]\n"
  "A moderation backend stand-in that answers like green-cip (2022-03-02).\n"
  "  --listen HOST:PORT       address to bind (required; port 0 picks one)\n"
  "  --workers N              event-loop threads, one SO_REUSEPORT socket each (default 1)\n"
  "  --latency-ms N           delay every answer by N ms (default 0)\n"
  "  --latency-jitter-ms N    plus a uniform random 0..N ms (default 0)\n"
  "  --error-rate F           fraction 0..1 of answers that are HTTP 500 (default 0)\n"
  "  --seed N                 seed of the random numbers (default: time and pid)\n"
  "  --help                   this text\n"
  "Request headers: x-modstub-status: N, x-modstub-delay-ms: N, x-modstub-chunked: 1,\n"
  "x-modstub-close: 1, x-modstub-size: N, x-modstub-hangup: 1, x-modstub-partial: 1.\n"
  "Paths: /echo (describes the request), GET /stats, POST /stats/reset.\n";

uint64_t ms_rand(struct ms_worker *w) {
  /* xorshift64*: fast, and good enough for jitter, errors and ids. */
  uint64_t x = w->rng;

  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  w->rng = x;
  return x * 0x2545f4914f6cdd1dULL;
}

static uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

/* Parses a decimal number in [0, max]; returns 0 or -1. */
static int parse_u64(const char *s, uint64_t max, uint64_t *out) {
  char *end;
  unsigned long long v;

  if (*s < '0' || *s > '9')
    return -1;
  errno = 0;
  v = strtoull(s, &end, 10);
  if (errno != 0 || *end != '\0' || v > max)
    return -1;
  *out = v;
  return 0;
}

static int parse_opts(int argc, char **argv, struct ms_opts *o) {
  static const struct option longopts[] = {
    {"listen", required_argument, NULL, 'l'},
    {"workers", required_argument, NULL, 'w'},
    {"latency-ms", required_argument, NULL, 'L'},
    {"latency-jitter-ms", required_argument, NULL, 'J'},
    {"error-rate", required_argument, NULL, 'e'},
    {"seed", required_argument, NULL, 's'},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
  };
  uint64_t v;
  char *end;
  int ch, idx = 0;

  memset(o, 0, sizeof(*o));
  o->workers = 1;
  o->seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
  while ((ch = getopt_long(argc, argv, "h", longopts, &idx)) != -1) {
    switch (ch) {
    case 'l':
      o->listen = optarg;
      break;
    case 'w':
      if (parse_u64(optarg, MS_MAX_WORKERS, &v) != 0 || v == 0)
        goto bad;
      o->workers = (unsigned)v;
      break;
    case 'L':
      if (parse_u64(optarg, 3600000, &o->latency_ms) != 0)
        goto bad;
      break;
    case 'J':
      if (parse_u64(optarg, 3600000, &o->jitter_ms) != 0)
        goto bad;
      break;
    case 'e':
      errno = 0;
      o->error_rate = strtod(optarg, &end);
      if (errno != 0 || *end != '\0' || end == optarg || !(o->error_rate >= 0.0) ||
          o->error_rate > 1.0)
        goto bad;
      break;
    case 's':
      if (parse_u64(optarg, UINT64_MAX, &o->seed) != 0)
        goto bad;
      break;
    case 'h':
      fputs(usage, stdout);
      exit(0);
    default:
      fputs(usage, stderr);
      return -1;
    }
  }
  if (optind != argc) {
    fprintf(stderr, "modstub: unexpected argument '%s'\n", argv[optind]);
    return -1;
  }
  if (o->listen == NULL) {
    fprintf(stderr, "modstub: --listen HOST:PORT is required\n");
    return -1;
  }
  return 0;
bad:
  fprintf(stderr, "modstub: bad value '%s' for --%s\n", optarg, longopts[idx].name);
  return -1;
}

/* Resolves HOST:PORT (HOST may be [v6]) into *ss. Returns 0 or -1. */
static int resolve(const char *spec, struct sockaddr_storage *ss, socklen_t *len) {
  char host[256];
  const char *colon = strrchr(spec, ':');
  struct addrinfo hints, *res;
  size_t hl;
  int rc;

  if (colon == NULL || colon == spec || colon[1] == '\0')
    return -1;
  hl = (size_t)(colon - spec);
  if (spec[0] == '[' && colon[-1] == ']') {
    spec++;
    hl -= 2;
  }
  if (hl == 0 || hl >= sizeof(host))
    return -1;
  memcpy(host, spec, hl);
  host[hl] = '\0';
  memset(&hints, 0, sizeof(hints));
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  rc = getaddrinfo(host, colon + 1, &hints, &res);
  if (rc != 0) {
    fprintf(stderr, "modstub: %s: %s\n", host, gai_strerror(rc));
    return -1;
  }
  memcpy(ss, res->ai_addr, res->ai_addrlen);
  *len = res->ai_addrlen;
  freeaddrinfo(res);
  return 0;
}

static void set_port(struct sockaddr_storage *ss, uint16_t port) {
  if (ss->ss_family == AF_INET6)
    ((struct sockaddr_in6 *)ss)->sin6_port = htons(port);
  else
    ((struct sockaddr_in *)ss)->sin_port = htons(port);
}

static uint16_t get_port(const struct sockaddr_storage *ss) {
  if (ss->ss_family == AF_INET6)
    return ntohs(((const struct sockaddr_in6 *)ss)->sin6_port);
  return ntohs(((const struct sockaddr_in *)ss)->sin_port);
}

/* A socket bound to *ss (reuseport: a worker's, see listen_socket), or -1
 * (message printed; a port another process listens on says so). */
static int bound_socket(const struct sockaddr_storage *ss, socklen_t len, int reuseport, const char *text) {
  int one = 1;
  int fd = socket(ss->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

  if (fd < 0) {
    perror("modstub: socket");
    return -1;
  }
  if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
      (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0)) {
    perror("modstub: setsockopt");
    close(fd);
    return -1;
  }
  if (bind(fd, (const struct sockaddr *)ss, len) != 0) {
    fprintf(stderr, "modstub: listen %s: %s%s\n", text, strerror(errno),
            errno == EADDRINUSE ? " (another process listens there)" : "");
    close(fd);
    return -1;
  }
  return fd;
}

/* Whether another socket listens on *ss's port already: with SO_REUSEPORT a
 * second process of the same user could bind it too, and the kernel would
 * split the connections between the two (two tests run at once given one
 * port). A bind without SO_REUSEPORT is refused while one listens there.
 * Returns 0, or -1 (message printed). */
static int port_taken(const struct sockaddr_storage *ss, socklen_t len, const char *text) {
  int fd = bound_socket(ss, len, 0, text);

  if (fd < 0)
    return -1;
  close(fd);
  return 0;
}

/* A listening socket on *ss with SO_REUSEPORT, so that every worker has its
 * own accept queue on the same port (libuv 1.44 cannot ask for that). When
 * the port is 0, the first socket's port is written back into *ss. Returns
 * the fd or -1 (message printed). */
static int listen_socket(struct sockaddr_storage *ss, socklen_t len, const char *text) {
  int fd = bound_socket(ss, len, 1, text);

  if (fd < 0)
    return -1;
  if (listen(fd, 1024) != 0) {
    perror("modstub: listen");
    goto err;
  }
  if (get_port(ss) == 0) {
    struct sockaddr_storage got;
    socklen_t gl = sizeof(got);

    if (getsockname(fd, (struct sockaddr *)&got, &gl) != 0) {
      perror("modstub: getsockname");
      goto err;
    }
    set_port(ss, get_port(&got));
  }
  return fd;
err:
  close(fd);
  return -1;
}

static void on_stop(uv_async_t *a) {
  struct ms_worker *w = a->data;

  ms_conn_close_all(w);
}

static void worker_main(void *arg) {
  struct ms_worker *w = arg;

  uv_run(&w->loop, UV_RUN_DEFAULT);
}

static void on_signal(uv_signal_t *sig, int signum) {
  unsigned i;

  (void)signum;
  for (i = 0; i < ms_nworkers; i++)
    uv_async_send(&ms_workers[i].stop);
  uv_close((uv_handle_t *)sig, NULL);
  uv_close((uv_handle_t *)sig->data, NULL);
}

/* Prints the ready line with the address actually bound. */
static void print_ready(const struct sockaddr_storage *ss, socklen_t len) {
  char host[INET6_ADDRSTRLEN];
  int v6 = ss->ss_family == AF_INET6;

  if (getnameinfo((const struct sockaddr *)ss, len, host, sizeof(host), NULL, 0,
                  NI_NUMERICHOST) != 0)
    strcpy(host, "?");
  fprintf(stderr, "modstub listening on %s%s%s:%u\n", v6 ? "[" : "", host, v6 ? "]" : "",
          (unsigned)get_port(ss));
  fflush(stderr);
}

int main(int argc, char **argv) {
  struct ms_opts opts;
  struct sockaddr_storage ss;
  socklen_t sslen;
  uv_loop_t loop;
  uv_signal_t sigterm, sigint;
  unsigned i;

  if (parse_opts(argc, argv, &opts) != 0)
    return 2;
  if (resolve(opts.listen, &ss, &sslen) != 0) {
    fprintf(stderr, "modstub: cannot use --listen '%s'\n", opts.listen);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  ms_stats_init();
  ms_nworkers = opts.workers;
  ms_workers = calloc(ms_nworkers, sizeof(*ms_workers));
  if (ms_workers == NULL || uv_loop_init(&loop) != 0) {
    fprintf(stderr, "modstub: out of memory\n");
    return 1;
  }

  /* Everything that can fail happens here, before any thread starts; a
   * failure ends the process, which releases what was set up. */
  if (get_port(&ss) != 0 && port_taken(&ss, sslen, opts.listen) != 0)
    return 1;
  for (i = 0; i < ms_nworkers; i++) {
    struct ms_worker *w = &ms_workers[i];
    int err;

    w->index = i;
    w->opts = &opts;
    w->rng = splitmix64(opts.seed + i) | 1;
    w->fd = listen_socket(&ss, sslen, opts.listen);
    if (w->fd < 0)
      return 1;
    if ((err = uv_loop_init(&w->loop)) != 0 ||
        (err = uv_async_init(&w->loop, &w->stop, on_stop)) != 0 ||
        (err = ms_conn_listen(w)) != 0) {
      fprintf(stderr, "modstub: worker %u: %s\n", i, uv_strerror(err));
      return 1;
    }
    w->stop.data = w;
  }

  uv_signal_init(&loop, &sigterm);
  uv_signal_init(&loop, &sigint);
  sigterm.data = &sigint;
  sigint.data = &sigterm;
  uv_signal_start(&sigterm, on_signal, SIGTERM);
  uv_signal_start(&sigint, on_signal, SIGINT);

  for (i = 0; i < ms_nworkers; i++) {
    if (uv_thread_create(&ms_workers[i].thread, worker_main, &ms_workers[i]) != 0) {
      fprintf(stderr, "modstub: cannot start worker %u\n", i);
      return 1;
    }
  }
  print_ready(&ss, sslen);

  uv_run(&loop, UV_RUN_DEFAULT); /* until SIGTERM or SIGINT */
  for (i = 0; i < ms_nworkers; i++) {
    struct ms_worker *w = &ms_workers[i];

    uv_thread_join(&w->thread);
    uv_loop_close(&w->loop);
    ms_buf_free(&w->scratch);
  }
  uv_loop_close(&loop);
  free(ms_workers);
  ms_stats_fini();
  return 0;
}
