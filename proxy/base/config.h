/* Configuration: one table of options serves the YAML file and the command
 * line (every option overrides the file). A loaded configuration is a flat,
 * immutable snapshot: workers read it without locks and the main thread
 * replaces it on SIGHUP. */
#ifndef SL_CONFIG_H
#define SL_CONFIG_H

#include <netinet/in.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/socket.h>

#define SL_MAX_UPSTREAMS 32
#define SL_REGION_NAME_MAX 63

enum sl_limiter_full { SL_LIMITER_FULL_OPEN, SL_LIMITER_FULL_CLOSED };
/* The regions Content Moderation 2.0 (green-cip) is served in. */
#define SL_DEFAULT_REGIONS                                                                                \
  "cn-shanghai,cn-beijing,cn-hangzhou,cn-shenzhen,cn-chengdu,cn-qingdao,ap-southeast-1,ap-southeast-3," \
  "ap-southeast-5,ap-northeast-1,us-east-1,us-west-1,eu-central-1,eu-west-1"

struct sl_addr {
  struct sockaddr_storage sa;
  socklen_t salen;
  char text[96]; /* as the operator wrote it, for logs and metrics */
};

struct sl_config {
  uint64_t version; /* bumped by every successful (re)load */
  struct sl_addr listen;
  struct sl_addr admin;
  struct sl_addr upstream[SL_MAX_UPSTREAMS];
  unsigned n_upstream;
  struct sl_addr upstream_llm[SL_MAX_UPSTREAMS];
  unsigned n_upstream_llm;
  char redis[1024]; /* as given: checked by sl_redis_url_parse (16 sentinels fit) */
  char redis_prefix[64];
  char region[64];
  char access_log[256];
  unsigned workers;
  int background_nice;          /* the background threads' nice value above the process's (flusher, directory, fleet sync) */
  char background_cpus[256];    /* their CPU list (taskset -c syntax); empty: the process's CPUs */
  int background_pinned;        /* background_cpus given: background_cpuset is it, parsed at load */
  cpu_set_t background_cpuset;
  unsigned flush_ms;  /* metering: counts go to Redis at least this often */
  unsigned flush_quiet_ms; /* metering: a quiet key may wait this long for Redis (0: --flush-ms) */
  unsigned spool_ms;  /* metering: counts are gathered and made durable in the spool this often */
  unsigned max_header_bytes;  /* request line + headers, else 431 */
  unsigned max_headers;       /* header count, else 431 */
  uint64_t max_body_bytes;    /* request body, else 413 */
  unsigned header_timeout_ms; /* a started request must arrive in this, else 408 */
  unsigned idle_timeout_ms;   /* idle keep-alive client connections closed after */
  unsigned max_conns;         /* client connections per worker */
  unsigned connect_timeout_ms;
  unsigned response_timeout_ms; /* upstream silence while a response is due, else 504 */
  unsigned upstream_keepalive;  /* idle upstream connections kept per address */
  unsigned max_fails;           /* consecutive failures that eject an address */
  unsigned fail_timeout_ms;     /* how long an ejected address rests before a probe */
  unsigned drain_timeout_ms;    /* SIGTERM: bound on finishing requests in flight */
  unsigned send_timeout_ms;     /* a client that reads none of a pending response for this long is closed */
  uint64_t max_body_buffer_bytes; /* request bodies buffered per worker, else 503 */
  char regions[512];            /* known regions, comma-separated; a Host naming another is 400 */
  /* metering */
  int metering_on;              /* 0 ("off") only for measuring metering's cost: nothing is billed */
  char spool_dir[256];
  char instance_id[48];
  uint64_t spool_max_bytes;
  unsigned meter_keys;          /* keys per worker metering table */
  unsigned flush_keys;          /* keys the flusher gathers between Redis flushes, at most */
  unsigned meter_queue_batches; /* batches waiting for Redis, at most */
  unsigned final_flush_ms;
  int billing_tz_offset_min;    /* minutes east of UTC for the billing day */
  int time_offset_s;            /* testing aid: added to the wall clock */
  /* admission */
  int admission_on;            /* 0 ("off") to proxy without classifying (benchmarks of the core) */
  unsigned resync_ms;          /* full reload of what the directory holds */
  unsigned lookup_timeout_ms;  /* a first lookup of an account waits at most this */
  unsigned redis_timeout_ms;   /* every Redis connection (directory, flusher): connect, and a reply outstanding, at most this */
  int redis_wait_replicas;     /* metering: replicas a batch must be on (WAIT) before it is acked; 0 off, -1 auto */
  unsigned redis_wait_ms;      /* metering: WAIT's timeout (at most half of redis_timeout_ms is used) */
  unsigned negative_ttl_ms;    /* an unknown AccessKeyId is remembered this long */
  unsigned max_accounts;       /* AccessKeyIds the directory holds */
  unsigned limiter_keys;       /* (UID, feature, region) buckets */
  unsigned max_parked;         /* requests per worker waiting for a lookup */
  int limiter_full;            /* enum sl_limiter_full: admit or refuse when the bucket table is full */
  char trusted_uid_header[64]; /* a header trusted to carry the UID (empty: none) */
  /* global limits (SPEC 9) */
  int global_limits;           /* 1: one limit per key for every instance on this Redis and prefix */
  unsigned global_sync_ms;     /* how often shares are synced */
  unsigned global_ttl_ms;      /* an instance's heartbeat and leases live this long unrefreshed */
  unsigned global_keys;        /* keys coordinated at once, at most */
};

/* What the command line said; kept so that a SIGHUP reload re-applies it. */
struct sl_cli {
  const char *file;
  int check_only;
  int argc;
  char **argv; /* option/value pairs that override the file */
};

enum sl_cli_result { SL_CLI_RUN, SL_CLI_EXIT_OK, SL_CLI_EXIT_ERR };

/* Parses argv into cli. Prints --help/--version output or the error itself. */
enum sl_cli_result sl_cli_parse(struct sl_cli *cli, int argc, char **argv);

/* Builds a configuration: defaults, then the file (if any), then the command
 * line. Returns 0, or -1 with a message in err. `out` is fully written. */
int sl_config_load(struct sl_config *out, const struct sl_cli *cli, char *err, size_t errlen);

/* Parses "HOST:PORT" or "[V6]:PORT" into addr (numeric or resolvable host).
 * Returns 0 or -1. */
int sl_addr_parse(struct sl_addr *addr, const char *text);

void sl_config_usage(FILE *f);

#endif
