#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <yaml.h>

#include "addr.h"
#include "common.h"
#include "uv_util.h"

/* OPT_CHOICE: one of two words, stored as its value in an int field (a
 * switch's 1 or 0, or an enum), so that nothing tests option strings later. */
enum opt_type { OPT_ADDR, OPT_ADDR_LIST, OPT_STR, OPT_UINT, OPT_U64, OPT_INT, OPT_CHOICE };

struct choice {
  const char *word;
  int value;
};
enum { CHOICES_ON_OFF, CHOICES_OPEN_CLOSED }; /* an OPT_CHOICE's `min` */
static const struct choice choice_sets[][2] = {
    [CHOICES_ON_OFF] = {{"on", 1}, {"off", 0}},
    [CHOICES_OPEN_CLOSED] = {{"open", SL_LIMITER_FULL_OPEN}, {"closed", SL_LIMITER_FULL_CLOSED}},
};

struct opt {
  const char *name; /* long option and YAML key ('_' and '-' are the same) */
  enum opt_type type;
  size_t off;
  size_t size_or_count_off; /* OPT_STR: buffer size; OPT_ADDR_LIST: offset of the count */
  uint64_t min, max; /* OPT_CHOICE: min names the choice set */
  const char *help;
};

#define F(field) offsetof(struct sl_config, field)
#define FSIZE(field) sizeof(((struct sl_config *)0)->field)
static const struct opt opts[] = {
  {"listen", OPT_ADDR, F(listen), 0, 0, 0, "HOST:PORT client listener (127.0.0.1:8080)"},
  {"upstream", OPT_ADDR_LIST, F(upstream), F(n_upstream), 0, 0, "HOST:PORT default pool member (repeatable)"},
  {"upstream-llm", OPT_ADDR_LIST, F(upstream_llm), F(n_upstream_llm), 0, 0,
   "HOST:PORT large-model pool member (repeatable; default: the default pool)"},
  {"redis", OPT_STR, F(redis), FSIZE(redis), 0, 0,
   "HOST:PORT, unix:PATH, sentinel://HOST:PORT[,HOST:PORT...]/MASTER (at most 16 sentinels) or "
   "cluster://HOST:PORT[,HOST:PORT...] (127.0.0.1:6379)"},
  {"redis-prefix", OPT_STR, F(redis_prefix), FSIZE(redis_prefix), 0, 0, "key prefix (sluice:)"},
  {"redis-timeout-ms", OPT_UINT, F(redis_timeout_ms), 0, 100, 600000,
   "Redis connect and reply bound: past it the connection counts as down (2000)"},
  {"redis-wait-replicas", OPT_INT, F(redis_wait_replicas), 0, 1, 16,
   "metering: a batch is acked once WAIT says this many replicas have it; 0 off, -1 auto: 1 when the master "
   "reports a connected replica, else 0 (-1)"},
  {"redis-wait-ms", OPT_UINT, F(redis_wait_ms), 0, 1, 600000,
   "metering: WAIT's timeout; at most half of --redis-timeout-ms is used (1000)"},
  {"workers", OPT_UINT, F(workers), 0, 1, 256, "event-loop threads (number of CPUs)"},
  {"background-nice", OPT_INT, F(background_nice), 0, 0, 19,
   "the background threads' nice value above the process's (flusher, directory, fleet sync; at most 19) (5)"},
  {"background-cpus", OPT_STR, F(background_cpus), FSIZE(background_cpus), 0, 0,
   "CPU list (as taskset -c) for the background threads, e.g. to keep them off the workers' CPUs (the process's)"},
  {"admin", OPT_ADDR, F(admin), 0, 0, 0, "HOST:PORT admin listener (127.0.0.1:9901)"},
  {"region", OPT_STR, F(region), FSIZE(region), 0, 0,
   "region when Host names none (cn-shanghai)"},
  {"flush-ms", OPT_UINT, F(flush_ms), 0, 10, 600000, "metering: counts go to Redis at least this often (1000)"},
  {"flush-quiet-ms", OPT_UINT, F(flush_quiet_ms), 0, 0, 3600000,
   "metering: a key with under 100 counts may wait this long for Redis, a multiple of --flush-ms (0: no wait)"},
  {"spool-ms", OPT_UINT, F(spool_ms), 0, 10, 600000,
   "metering: counts are made durable in the spool this often; kill -9 loses at most this (1000)"},
  {"access-log", OPT_STR, F(access_log), FSIZE(access_log), 0, 0,
   "access log file (off when empty)"},
  {"max-header-bytes", OPT_UINT, F(max_header_bytes), 0, 1024, 1 << 20, "request head bound, else 431 (16384)"},
  {"max-headers", OPT_UINT, F(max_headers), 0, 8, 256, "request header count bound, else 431 (100)"},
  {"max-body-bytes", OPT_U64, F(max_body_bytes), 0, 0, 1ull << 32, "request body bound, else 413 (8388608)"},
  {"header-timeout-ms", OPT_UINT, F(header_timeout_ms), 0, 10, 3600000, "request read bound, else 408 (10000)"},
  {"idle-timeout-ms", OPT_UINT, F(idle_timeout_ms), 0, 10, 3600000, "idle keep-alive close (60000)"},
  {"max-conns", OPT_UINT, F(max_conns), 0, 1, 1000000, "client connections per worker (10000)"},
  {"connect-timeout-ms", OPT_UINT, F(connect_timeout_ms), 0, 10, 600000, "upstream connect bound (1000)"},
  {"response-timeout-ms", OPT_UINT, F(response_timeout_ms), 0, 10, 3600000,
   "upstream silence bound while a response is due, else 504 (30000)"},
  {"upstream-keepalive", OPT_UINT, F(upstream_keepalive), 0, 0, 100000, "idle upstream connections per address (64)"},
  {"max-fails", OPT_UINT, F(max_fails), 0, 1, 1000, "consecutive failures that eject an upstream (1)"},
  {"fail-timeout-ms", OPT_UINT, F(fail_timeout_ms), 0, 10, 3600000, "ejection time before a probe (5000)"},
  {"drain-timeout-ms", OPT_UINT, F(drain_timeout_ms), 0, 10, 3600000, "SIGTERM drain bound (10000)"},
  {"send-timeout-ms", OPT_UINT, F(send_timeout_ms), 0, 10, 3600000,
   "close a client that reads nothing of a pending response for this long (30000)"},
  {"max-body-buffer-bytes", OPT_U64, F(max_body_buffer_bytes), 0, 0, 1ull << 40,
   "request body bytes buffered per worker, else 503 (67108864)"},
  {"regions", OPT_STR, F(regions), FSIZE(regions), 0, 0,
   "known regions, comma-separated; a Host naming another is 400 (the service's regions)"},
  {"metering", OPT_CHOICE, F(metering_on), 0, CHOICES_ON_OFF, 0,
   "on|off: off counts nothing for billing; for measuring metering's cost only (on)"},
  {"spool-dir", OPT_STR, F(spool_dir), FSIZE(spool_dir), 0, 0,
   "metering spool and instance id directory (/var/lib/sluice)"},
  {"instance-id", OPT_STR, F(instance_id), FSIZE(instance_id), 0, 0,
   "metering instance id (default: kept in the spool directory)"},
  {"spool-max-bytes", OPT_U64, F(spool_max_bytes), 0, 4096, 1ull << 40, "metering spool bound (1073741824)"},
  {"meter-keys", OPT_UINT, F(meter_keys), 0, 16, 10000000, "metering keys per worker table (16384)"},
  {"flush-keys", OPT_UINT, F(flush_keys), 0, 1000, 10000000,
   "metering keys one Redis interval gathers; more send its counts early (131072; at least --meter-keys x min(workers, 4))"},
  {"meter-queue-batches", OPT_UINT, F(meter_queue_batches), 0, 1, 10000000,
   "metering batches held for Redis before workers refuse new calls (10000)"},
  {"final-flush-ms", OPT_UINT, F(final_flush_ms), 0, 0, 600000, "SIGTERM: wait for Redis to take the counts (5000)"},
  {"billing-tz-offset-min", OPT_INT, F(billing_tz_offset_min), 0, 720, 840,
   "billing day's time zone, minutes east of UTC (0)"},
  {"time-offset-s", OPT_INT, F(time_offset_s), 0, 1000000000, 1000000000,
   "testing aid: shift sluice's wall clock by N seconds (0)"},
  {"admission", OPT_CHOICE, F(admission_on), 0, CHOICES_ON_OFF, 0,
   "on|off: off forwards every request to the default pool unchecked (on)"},
  {"resync-ms", OPT_UINT, F(resync_ms), 0, 100, 86400000, "directory: changes not notified are found this often (30000; docs/operations.md)"},
  {"lookup-timeout-ms", OPT_UINT, F(lookup_timeout_ms), 0, 10, 60000,
   "wait for a first account lookup, else 503 (1000)"},
  {"negative-ttl-ms", OPT_UINT, F(negative_ttl_ms), 0, 0, 3600000, "cache of unknown AccessKeyIds (5000)"},
  {"max-accounts", OPT_UINT, F(max_accounts), 0, 1, 100000000, "AccessKeyIds held in memory (200000)"},
  {"limiter-keys", OPT_UINT, F(limiter_keys), 0, 16, 100000000, "(UID, feature, region) buckets (1000000)"},
  {"max-parked", OPT_UINT, F(max_parked), 0, 1, 1000000, "requests per worker waiting for a lookup (10000)"},
  {"limiter-full", OPT_CHOICE, F(limiter_full), 0, CHOICES_OPEN_CLOSED, 0,
   "open|closed: admit or 503 when the bucket table is full (open)"},
  {"global-limits", OPT_CHOICE, F(global_limits), 0, CHOICES_ON_OFF, 0,
   "on|off: one limit per key across every instance on this Redis and prefix (on)"},
  {"global-sync-ms", OPT_UINT, F(global_sync_ms), 0, 10, 10000, "global limits: share sync interval (100)"},
  {"global-ttl-ms", OPT_UINT, F(global_ttl_ms), 0, 100, 60000,
   "global limits: a silent instance's share is given back after this (1500)"},
  {"global-keys", OPT_UINT, F(global_keys), 0, 1, 10000000,
   "global limits: keys coordinated at once; past it a key keeps R/N here (4096)"},
  {"trusted-uid-header", OPT_STR, F(trusted_uid_header), FSIZE(trusted_uid_header), 0, 0,
   "header trusted to carry the UID, skipping the AccessKeyId lookup (off)"},
};
#undef F
#undef FSIZE

static void set_err(char *err, size_t errlen, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

static int name_eq(const char *a, const char *b) {
  for (; *a && *b; a++, b++) {
    char x = *a == '_' ? '-' : *a, y = *b == '_' ? '-' : *b;
    if (x != y) return 0;
  }
  return *a == *b;
}

static const struct opt *opt_find(const char *name) {
  for (size_t i = 0; i < SL_ARRAY_SIZE(opts); i++)
    if (name_eq(opts[i].name, name)) return &opts[i];
  return NULL;
}

int sl_addr_parse(struct sl_addr *addr, const char *text) {
  char host[256];
  const char *port;
  size_t tl = strlen(text);
  if (tl == 0 || tl >= sizeof(addr->text)) return -1;
  if (text[0] == '[') {
    const char *end = strchr(text, ']');
    if (!end || end[1] != ':' || (size_t)(end - text - 1) >= sizeof(host)) return -1;
    memcpy(host, text + 1, (size_t)(end - text - 1));
    host[end - text - 1] = '\0';
    port = end + 2;
  } else {
    const char *colon = strrchr(text, ':');
    if (!colon || (size_t)(colon - text) >= sizeof(host) || colon == text) return -1;
    memcpy(host, text, (size_t)(colon - text));
    host[colon - text] = '\0';
    port = colon + 1;
  }
  char *endp;
  long p = strtol(port, &endp, 10);
  if (*port == '\0' || *endp != '\0' || p < 1 || p > 65535) return -1;
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res;
  if (getaddrinfo(host, port, &hints, &res) != 0) return -1;
  memcpy(&addr->sa, res->ai_addr, res->ai_addrlen);
  addr->salen = res->ai_addrlen;
  freeaddrinfo(res);
  memcpy(addr->text, text, tl + 1);
  return 0;
}

/* Applies one option value. `list_fresh` tells whether a list option should
 * be emptied first (the first value of a list from a given source replaces
 * what an earlier source said). */
static int opt_apply(struct sl_config *c, const struct opt *o, const char *val, int list_fresh, char *err,
                     size_t errlen) {
  char *base = (char *)c;
  switch (o->type) {
    case OPT_ADDR:
      if (sl_addr_parse((struct sl_addr *)(base + o->off), val) != 0) {
        set_err(err, errlen, "%s: '%s' is not a usable HOST:PORT", o->name, val);
        return -1;
      }
      return 0;
    case OPT_ADDR_LIST: {
      unsigned *n = (unsigned *)(base + o->size_or_count_off);
      struct sl_addr *list = (struct sl_addr *)(base + o->off);
      if (list_fresh) *n = 0;
      if (*n >= SL_MAX_UPSTREAMS) {
        set_err(err, errlen, "%s: more than %d addresses", o->name, SL_MAX_UPSTREAMS);
        return -1;
      }
      if (sl_addr_parse(&list[*n], val) != 0) {
        set_err(err, errlen, "%s: '%s' is not a usable HOST:PORT", o->name, val);
        return -1;
      }
      (*n)++;
      return 0;
    }
    case OPT_STR: {
      size_t l = strlen(val);
      if (l >= o->size_or_count_off) {
        set_err(err, errlen, "%s: value longer than %zu bytes", o->name, o->size_or_count_off - 1);
        return -1;
      }
      memcpy(base + o->off, val, l + 1);
      return 0;
    }
    case OPT_CHOICE: {
      const struct choice *ch = choice_sets[o->min];
      for (int i = 0; i < 2; i++)
        if (strcmp(val, ch[i].word) == 0) {
          *(int *)(base + o->off) = ch[i].value;
          return 0;
        }
      set_err(err, errlen, "%s: '%s' is neither '%s' nor '%s'", o->name, val, ch[0].word, ch[1].word);
      return -1;
    }
    case OPT_INT: {
      char *end;
      errno = 0;
      long long v = strtoll(val, &end, 10);
      long long lo = -(long long)o->min, hi = (long long)o->max; /* min holds the magnitude of the lower bound */
      if (*val == '\0' || *end != '\0' || errno || v < lo || v > hi) {
        set_err(err, errlen, "%s: '%s' is not an integer in [%lld, %lld]", o->name, val, lo, hi);
        return -1;
      }
      *(int *)(base + o->off) = (int)v;
      return 0;
    }
    case OPT_UINT:
    case OPT_U64: {
      char *end;
      errno = 0;
      unsigned long long v = strtoull(val, &end, 10);
      if (*val == '\0' || *val == '-' || *end != '\0' || errno || v < o->min || v > o->max) {
        set_err(err, errlen, "%s: '%s' is not an integer in [%llu, %llu]", o->name, val,
                (unsigned long long)o->min, (unsigned long long)o->max);
        return -1;
      }
      if (o->type == OPT_UINT)
        *(unsigned *)(base + o->off) = (unsigned)v;
      else
        *(uint64_t *)(base + o->off) = v;
      return 0;
    }
  }
  return -1;
}

static void config_defaults(struct sl_config *c) {
  memset(c, 0, sizeof(*c));
  sl_addr_parse(&c->listen, "127.0.0.1:8080");
  sl_addr_parse(&c->admin, "127.0.0.1:9901");
  strcpy(c->redis, "127.0.0.1:6379");
  strcpy(c->redis_prefix, "sluice:");
  strcpy(c->region, "cn-shanghai");
  long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
  c->workers = ncpu > 0 ? (unsigned)ncpu : 1;
  c->flush_ms = 1000;
  c->spool_ms = 1000;
  c->max_header_bytes = 16384;
  c->max_headers = 100;
  c->max_body_bytes = 8u << 20;
  c->header_timeout_ms = 10000;
  c->idle_timeout_ms = 60000;
  c->max_conns = 10000;
  c->connect_timeout_ms = 1000;
  c->response_timeout_ms = 30000;
  c->upstream_keepalive = 64;
  c->max_fails = 1;
  c->fail_timeout_ms = 5000;
  c->drain_timeout_ms = 10000;
  c->send_timeout_ms = 30000;
  c->max_body_buffer_bytes = 64ull << 20;
  strcpy(c->regions, SL_DEFAULT_REGIONS);
  c->resync_ms = 30000;
  c->lookup_timeout_ms = 1000;
  c->redis_timeout_ms = 2000;
  c->redis_wait_replicas = -1;
  c->redis_wait_ms = 1000;
  c->negative_ttl_ms = 5000;
  c->max_accounts = 200000;
  c->limiter_keys = 1000000;
  c->max_parked = 10000;
  c->limiter_full = SL_LIMITER_FULL_OPEN;
  c->admission_on = 1;
  c->global_limits = 1;
  c->global_sync_ms = 100;
  c->global_ttl_ms = 1500;
  c->global_keys = 4096;
  strcpy(c->spool_dir, "/var/lib/sluice");
  c->metering_on = 1;
  c->spool_max_bytes = 1ull << 30;
  c->background_nice = SL_BACKGROUND_NICE_DEFAULT;
  c->meter_keys = 16384;
  c->flush_keys = 131072;
  c->meter_queue_batches = 10000;
  c->final_flush_ms = 5000;
}

static const char *scalar(yaml_node_t *n) { return (const char *)n->data.scalar.value; }

static int config_file(struct sl_config *c, const char *path, char *err, size_t errlen) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    set_err(err, errlen, "%s: %s", path, strerror(errno));
    return -1;
  }
  yaml_parser_t parser;
  yaml_document_t doc;
  int rc = -1;
  yaml_parser_initialize(&parser);
  yaml_parser_set_input_file(&parser, f);
  if (!yaml_parser_load(&parser, &doc)) {
    set_err(err, errlen, "%s:%zu: %s", path, parser.problem_mark.line + 1,
            parser.problem ? parser.problem : "YAML error");
    goto out_parser;
  }
  yaml_node_t *root = yaml_document_get_root_node(&doc);
  if (!root) { /* an empty file sets nothing */
    rc = 0;
    goto out_doc;
  }
  if (root->type != YAML_MAPPING_NODE) {
    set_err(err, errlen, "%s:%zu: the top level must be a mapping of option: value", path,
            root->start_mark.line + 1);
    goto out_doc;
  }
  for (yaml_node_pair_t *p = root->data.mapping.pairs.start; p < root->data.mapping.pairs.top; p++) {
    yaml_node_t *k = yaml_document_get_node(&doc, p->key);
    yaml_node_t *v = yaml_document_get_node(&doc, p->value);
    size_t line = k->start_mark.line + 1;
    const struct opt *o = k->type == YAML_SCALAR_NODE ? opt_find(scalar(k)) : NULL;
    if (!o) {
      set_err(err, errlen, "%s:%zu: unknown option '%s'", path, line,
              k->type == YAML_SCALAR_NODE ? scalar(k) : "?");
      goto out_doc;
    }
    char msg[256];
    if (v->type == YAML_SCALAR_NODE) {
      if (opt_apply(c, o, scalar(v), 1, msg, sizeof(msg)) != 0) {
        set_err(err, errlen, "%s:%zu: %s", path, line, msg);
        goto out_doc;
      }
    } else if (v->type == YAML_SEQUENCE_NODE && o->type == OPT_ADDR_LIST) {
      int fresh = 1;
      for (yaml_node_item_t *it = v->data.sequence.items.start; it < v->data.sequence.items.top; it++) {
        yaml_node_t *e = yaml_document_get_node(&doc, *it);
        if (e->type != YAML_SCALAR_NODE || opt_apply(c, o, scalar(e), fresh, msg, sizeof(msg)) != 0) {
          set_err(err, errlen, "%s:%zu: %s", path, e->start_mark.line + 1,
                  e->type == YAML_SCALAR_NODE ? msg : "list items must be HOST:PORT strings");
          goto out_doc;
        }
        fresh = 0;
      }
    } else {
      set_err(err, errlen, "%s:%zu: %s takes %s", path, line, o->name,
              o->type == OPT_ADDR_LIST ? "an address or a list of addresses" : "a single value");
      goto out_doc;
    }
  }
  rc = 0;
out_doc:
  yaml_document_delete(&doc);
out_parser:
  yaml_parser_delete(&parser);
  fclose(f);
  return rc;
}

/* --regions: lowercase names of letters, digits and '-', comma-separated
 * (spaces around a name allowed), stored normalised; --region among them. */
static int regions_check(struct sl_config *c, char *err, size_t errlen) {
  char norm[sizeof(c->regions)];
  size_t n = 0;
  int found_default = 0;
  const char *p = c->regions;
  for (;;) {
    while (*p == ' ') p++;
    const char *s = p;
    while (*p && *p != ',' && *p != ' ') p++;
    size_t len = (size_t)(p - s);
    while (*p == ' ') p++;
    if (len == 0 || len > SL_REGION_NAME_MAX || (*p && *p != ',')) {
      set_err(err, errlen, "regions: '%s' is not a comma-separated list of region names", c->regions);
      return -1;
    }
    for (size_t i = 0; i < len; i++) {
      char ch = s[i];
      if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '-')) {
        set_err(err, errlen, "regions: '%.*s' holds a character other than a-z, 0-9 and '-'", (int)len, s);
        return -1;
      }
    }
    if (strlen(c->region) == len && memcmp(c->region, s, len) == 0) found_default = 1;
    if (n) norm[n++] = ',';
    memcpy(norm + n, s, len);
    n += len;
    if (!*p) break;
    p++;
  }
  norm[n] = '\0';
  memcpy(c->regions, norm, n + 1);
  if (!found_default) {
    set_err(err, errlen, "region: '%s' is not in --regions (%s)", c->region, c->regions);
    return -1;
  }
  return 0;
}

int sl_config_load(struct sl_config *out, const struct sl_cli *cli, char *err, size_t errlen) {
  config_defaults(out);
  if (cli->file && config_file(out, cli->file, err, errlen) != 0) return -1;
  unsigned char seen[SL_ARRAY_SIZE(opts)] = {0};
  for (int i = 0; i + 1 < cli->argc; i += 2) {
    const struct opt *o = opt_find(cli->argv[i] + 2);
    /* The first command-line value of a list replaces the file's list. */
    int fresh = !seen[o - opts];
    seen[o - opts] = 1;
    if (opt_apply(out, o, cli->argv[i + 1], fresh, err, errlen) != 0) return -1;
  }
  struct sl_redis_url *url = sl_malloc(sizeof(*url)); /* 4 KiB: not on a worker-sized stack */
  int bad = sl_redis_url_parse(url, out->redis, err, errlen);
  free(url);
  if (bad) return -1;
  if (out->global_ttl_ms < 3 * out->global_sync_ms) {
    set_err(err, errlen, "global-ttl-ms (%u) must be at least 3 x global-sync-ms (%u): a share lives through two lost syncs",
            out->global_ttl_ms, out->global_sync_ms);
    return -1;
  }
  long ncpu = sysconf(_SC_NPROCESSORS_CONF);
  out->background_pinned = out->background_cpus[0] != '\0';
  if (out->background_pinned &&
      sl_cpu_list_parse(out->background_cpus, &out->background_cpuset, ncpu > 0 ? (unsigned)ncpu : 1) != 0) {
    set_err(err, errlen, "background-cpus: '%s' is not a CPU list (as taskset -c: 2, 0-3, 1,4-5) of CPUs below %ld",
            out->background_cpus, ncpu);
    return -1;
  }
  if (out->n_upstream == 0) {
    set_err(err, errlen, "no upstream: give --upstream HOST:PORT (or 'upstream:' in the file)");
    return -1;
  }
  return regions_check(out, err, errlen);
}

void sl_config_usage(FILE *f) {
  fprintf(f,
          "usage: sluice [-c FILE] [-t] [options]\n"
          "  -c, --config FILE   YAML file of option: value (keys as below, '_' or '-')\n"
          "  -t                  check the configuration and exit\n"
          "  --version, --help\n");
  for (size_t i = 0; i < SL_ARRAY_SIZE(opts); i++) fprintf(f, "  --%-22s %s\n", opts[i].name, opts[i].help);
}

enum sl_cli_result sl_cli_parse(struct sl_cli *cli, int argc, char **argv) {
  memset(cli, 0, sizeof(*cli));
  cli->argv = sl_calloc((size_t)argc + 1, sizeof(char *));
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      sl_config_usage(stdout);
      return SL_CLI_EXIT_OK;
    }
    if (!strcmp(a, "--version")) {
      printf("sluice %s\n", SLUICE_VERSION);
      return SL_CLI_EXIT_OK;
    }
    if (!strcmp(a, "-t")) {
      cli->check_only = 1;
      continue;
    }
    if (!strcmp(a, "-c") || !strcmp(a, "--config")) {
      if (i + 1 >= argc) goto missing;
      cli->file = argv[++i];
      continue;
    }
    if (strncmp(a, "--", 2) != 0 || !opt_find(a + 2)) {
      fprintf(stderr, "sluice: unknown option '%s' (see --help)\n", a);
      return SL_CLI_EXIT_ERR;
    }
    if (i + 1 >= argc) goto missing;
    cli->argv[cli->argc++] = argv[i];
    cli->argv[cli->argc++] = argv[++i];
  }
  return SL_CLI_RUN;
missing:
  fprintf(stderr, "sluice: option '%s' needs a value\n", argv[argc - 1]);
  return SL_CLI_EXIT_ERR;
}
