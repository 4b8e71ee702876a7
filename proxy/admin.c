#include "admin.h"

#include <stdarg.h>
#include <string.h>
#include <time.h>

#include "http_util.h"
#include "limiter.h"

struct admin_conn {
  uv_tcp_t tcp;
  uv_write_t wreq;
  struct sl_admin *admin;
  llhttp_t parser;
  char url[256];
  size_t url_len;
  char in[4096];
  struct sl_buf out;
  int done;
  /* /explain for a UID the directory does not hold yet: asked for, and
   * answered when it comes (or after EXPLAIN_WAIT_MS) */
  uv_timer_t wait;
  unsigned waited_ms;
  int waiting;
};

#define EXPLAIN_WAIT_MS 1000
#define EXPLAIN_POLL_MS 10

static llhttp_settings_t admin_settings;

static void admin_conn_free(uv_handle_t *h) {
  struct admin_conn *ac = sl_container_of(h, struct admin_conn, tcp);
  sl_buf_free(&ac->out);
  free(ac);
}

static void appendf(struct sl_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void appendf(struct sl_buf *b, const char *fmt, ...) {
  char tmp[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
  va_end(ap);
  if (n > 0) sl_buf_append(b, tmp, (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

#define LOAD(x) atomic_load_explicit(&(x), memory_order_relaxed)

static uint64_t sum(struct sl_admin *a, size_t off) {
  uint64_t s = 0;
  for (unsigned i = 0; i < a->nworkers; i++)
    s += atomic_load_explicit((_Atomic uint64_t *)((char *)&a->workers[i].stats + off), memory_order_relaxed);
  return s;
}
#define SUM(field) sum(a, offsetof(struct sl_stats, field))

void sl_admin_metrics(struct sl_admin *a, struct sl_buf *o) {
  static const char *classes[] = {"", "1xx", "2xx", "3xx", "4xx", "5xx"};
  appendf(o, "# HELP sluice_requests_total Requests answered to clients, by status class.\n"
             "# TYPE sluice_requests_total counter\n");
  for (int k = 1; k <= 5; k++)
    appendf(o, "sluice_requests_total{class=\"%s\"} %llu\n", classes[k],
            (unsigned long long)sum(a, offsetof(struct sl_stats, status_class) + (size_t)k * sizeof(uint64_t)));
  struct {
    const char *name, *type, *help;
    size_t off;
  } plain[] = {
      {"sluice_connections_open", "gauge", "Client connections open.", offsetof(struct sl_stats, conns_open)},
      {"sluice_connections_accepted_total", "counter", "Client connections accepted.",
       offsetof(struct sl_stats, conns_accepted)},
      {"sluice_connections_refused_total", "counter", "Client connections refused at max-conns.",
       offsetof(struct sl_stats, conns_refused)},
      {"sluice_upstream_connects_total", "counter", "Upstream connections opened.",
       offsetof(struct sl_stats, up_connects)},
      {"sluice_upstream_reused_total", "counter", "Requests sent on a kept-alive upstream connection.",
       offsetof(struct sl_stats, up_reused)},
      {"sluice_upstream_connect_errors_total", "counter", "Upstream connects that failed.",
       offsetof(struct sl_stats, up_connect_errors)},
      {"sluice_upstream_errors_total", "counter", "Upstream exchanges that broke (reset, bad response).",
       offsetof(struct sl_stats, up_errors)},
      {"sluice_upstream_timeouts_total", "counter", "Upstream connect or response timeouts.",
       offsetof(struct sl_stats, up_timeouts)},
      {"sluice_upstream_retries_total", "counter", "Requests retried on another upstream connection.",
       offsetof(struct sl_stats, up_retries)},
      {"sluice_upstream_ejections_total", "counter", "Upstream addresses ejected by passive health checks.",
       offsetof(struct sl_stats, up_ejections)},
      {"sluice_requests_malformed_total", "counter", "Requests refused as malformed or over a bound (400/413/431/408).",
       offsetof(struct sl_stats, refused_malformed)},
      {"sluice_requests_answered_at_head_total", "counter", "Requests answered before their body was read.",
       offsetof(struct sl_stats, early_answers)},
      {"sluice_body_budget_full_total", "counter", "Requests refused (503) because the worker buffered max-body-buffer-bytes.",
       offsetof(struct sl_stats, body_budget_full)},
      {"sluice_send_timeouts_total", "counter", "Clients closed after reading nothing for send-timeout-ms.",
       offsetof(struct sl_stats, send_timeouts)},
  };
  for (size_t i = 0; i < SL_ARRAY_SIZE(plain); i++)
    appendf(o, "# HELP %s %s\n# TYPE %s %s\n%s %llu\n", plain[i].name, plain[i].help, plain[i].name, plain[i].type,
            plain[i].name, (unsigned long long)sum(a, plain[i].off));
  appendf(o, "# HELP sluice_upstream_latency_seconds Time from sending a request to its response head.\n"
             "# TYPE sluice_upstream_latency_seconds histogram\n");
  uint64_t cum = 0;
  for (int i = 0; i <= SL_LAT_BUCKETS; i++) {
    cum += sum(a, offsetof(struct sl_stats, lat_bucket) + (size_t)i * sizeof(uint64_t));
    if (i < SL_LAT_BUCKETS)
      appendf(o, "sluice_upstream_latency_seconds_bucket{le=\"%g\"} %llu\n", (double)sl_lat_bounds_us[i] / 1e6,
              (unsigned long long)cum);
    else
      appendf(o, "sluice_upstream_latency_seconds_bucket{le=\"+Inf\"} %llu\n", (unsigned long long)cum);
  }
  appendf(o, "sluice_upstream_latency_seconds_sum %.6f\nsluice_upstream_latency_seconds_count %llu\n",
          (double)SUM(lat_sum_us) / 1e6, (unsigned long long)SUM(lat_count));
  appendf(o, "# HELP sluice_requests_outcome_total Requests by outcome (SPEC section 6), feature and tier.\n"
             "# TYPE sluice_requests_outcome_total counter\n");
  for (int oc = 0; oc < SL_NOUTCOMES; oc++)
    for (unsigned f = 0; f <= sl_nfeatures; f++)
      for (unsigned t = 0; t < 2; t++) {
        uint64_t v = sum(a, offsetof(struct sl_stats, outcome) +
                                (((size_t)oc * (SL_MAX_FEATURES + 1) + f) * 2 + t) * sizeof(uint64_t));
        if (!v) continue;
        const char *fname = f ? sl_features[f - 1].name : "unknown";
        const char *tier = f ? sl_tier_name((enum sl_tier)t) : "none";
        appendf(o, "sluice_requests_outcome_total{outcome=\"%s\",feature=\"%s\",tier=\"%s\"} %llu\n",
                sl_outcome_names[oc], fname, tier, (unsigned long long)v);
      }
  appendf(o, "# HELP sluice_parked_total Requests that waited for a first account lookup.\n"
             "# TYPE sluice_parked_total counter\nsluice_parked_total %llu\n"
             "# HELP sluice_parked Requests waiting for an account lookup now.\n"
             "# TYPE sluice_parked gauge\nsluice_parked %llu\n",
          (unsigned long long)SUM(parked), (unsigned long long)SUM(parked_now));
  appendf(o, "# HELP sluice_requests_orphaned_total Requests whose client left while the backend's answer was due "
             "(the answer is still awaited and counted: a 200 is billable).\n"
             "# TYPE sluice_requests_orphaned_total counter\nsluice_requests_orphaned_total %llu\n",
          (unsigned long long)SUM(orphans));
  if (a->dir) {
    struct sl_dirsync_stats *ds = &a->dir->stats;
    struct {
      const char *name, *type, *help;
      _Atomic uint64_t *v;
    } d[] = {
        {"sluice_redis_up", "gauge", "1 while the directory's Redis connections are up.", &ds->redis_up},
        {"sluice_redis_keyspace_notifications", "gauge", "1 when keyspace notifications are enabled.",
         &ds->keyspace_enabled},
        {"sluice_directory_lookups_total", "counter", "Account lookups asked by workers.", &ds->lookups},
        {"sluice_directory_lookup_failures_total", "counter", "Lookups answered 'unavailable' (Redis down or slow).",
         &ds->lookup_failures},
        {"sluice_directory_notifications_total", "counter", "Keyspace events and change messages handled.",
         &ds->notifications},
        {"sluice_directory_resyncs_total", "counter", "Full resyncs completed.", &ds->resyncs},
        {"sluice_directory_resync_checks_total", "counter",
         "Resync intervals that found every change notified (nothing reread).", &ds->resync_checks},
        {"sluice_redis_connect_attempts_total", "counter", "Redis connection attempts.", &ds->reconnects},
        {"sluice_directory_invalid_packages_total", "counter", "QPS package hashes that could not be used.",
         &ds->invalid_packages},
        {"sluice_directory_accounts", "gauge", "AccessKeyIds held in the directory.", &ds->accounts},
        {"sluice_directory_version", "gauge", "Version of the directory snapshot.", &ds->version},
        {"sluice_directory_evictions_total", "counter", "Accounts dropped at the max-accounts bound.",
         &ds->evictions},
        {"sluice_redis_bad_keys", "gauge", "Keys seen unusable lately (wrong type or value); named in the log.",
         &ds->bad_keys},
        {"sluice_redis_bad_keys_total", "counter", "Reads that found a key unusable and set it aside.",
         &ds->bad_key_reads},
        {"sluice_redis_timeouts_total", "counter",
         "Directory connections dropped: no connection or no reply within redis-timeout-ms.", &ds->redis_timeouts},
    };
    for (size_t i = 0; i < SL_ARRAY_SIZE(d); i++)
      appendf(o, "# HELP %s %s\n# TYPE %s %s\n%s %llu\n", d[i].name, d[i].help, d[i].name, d[i].type, d[i].name,
              (unsigned long long)atomic_load_explicit(d[i].v, memory_order_relaxed));
  }
  if (a->flusher) {
    struct sl_flusher_stats *fs = &a->flusher->stats;
    uint64_t oldest = atomic_load_explicit(&fs->oldest_ms, memory_order_relaxed);
    uint64_t age = oldest ? uv_hrtime() / 1000000 - oldest : 0;
    /* Read before the queue (the flusher counts a batch made after it shows
     * in the queue, and takes it out after counting it applied): a reader
     * that sees its requests counted and then an empty queue knows them in
     * Redis. An initializer list's order of evaluation is unspecified. */
    uint64_t made = atomic_load_explicit(&fs->batches, memory_order_acquire);
    uint64_t counted = atomic_load_explicit(&fs->counted, memory_order_acquire);
    uint64_t applied_now = LOAD(fs->applied), deduplicated_now = LOAD(fs->deduplicated);
    struct {
      const char *name, *type, *help;
      uint64_t v;
    } m[] = {
        {"sluice_meter_batches_total", "counter", "Metering batches made.", made},
        {"sluice_meter_batches_applied_total", "counter", "Batches applied by Redis.", applied_now},
        {"sluice_meter_batches_deduplicated_total", "counter", "Batches Redis had already applied (a lost reply).",
         deduplicated_now},
        {"sluice_meter_batches_retried_total", "counter", "Batches sent again after a lost reply or an error.",
         LOAD(fs->retried)},
        {"sluice_meter_batches_replayed_total", "counter", "Batches read back from the spool at start.",
         LOAD(fs->replayed)},
        {"sluice_meter_queue_batches", "gauge", "Batches not yet applied.", LOAD(fs->queued)},
        {"sluice_meter_unflushed_requests", "gauge", "Requests counted in batches not yet applied.",
         LOAD(fs->queued_counts)},
        {"sluice_meter_accumulated_requests", "gauge",
         "Requests gathered and journaled in the spool for the next flush to Redis (not in a batch yet).",
         LOAD(fs->accumulated)},
        {"sluice_meter_oldest_unflushed_seconds", "gauge", "Age of the oldest batch not yet applied.", age / 1000},
        {"sluice_meter_spool_bytes", "gauge", "Size of the spool file.", LOAD(fs->spool_bytes)},
        {"sluice_meter_spool_full", "gauge", "1 while the spool is at its bound.", LOAD(fs->spool_full)},
        {"sluice_meter_spool_errors_total", "counter", "Spool writes or syncs that failed.", LOAD(fs->spool_errors)},
        {"sluice_meter_redis_up", "gauge", "1 while the flusher's Redis connection is up.", LOAD(fs->redis_up)},
        {"sluice_meter_counted_total", "counter", "Requests handed to batches.", counted},
        {"sluice_meter_lost_total", "counter", "Counted requests lost (spool full at exit without Redis).",
         LOAD(fs->lost)},
        {"sluice_meter_flush_latency_max_ms", "gauge", "Longest time from a batch made to applied.",
         LOAD(fs->flush_latency_us_max) / 1000},
    };
    for (size_t i = 0; i < SL_ARRAY_SIZE(m); i++)
      appendf(o, "# HELP %s %s\n# TYPE %s %s\n%s %llu\n", m[i].name, m[i].help, m[i].name, m[i].type, m[i].name,
              (unsigned long long)m[i].v);
    uint64_t applied = LOAD(fs->applied) + LOAD(fs->deduplicated);
    appendf(o, "# HELP sluice_meter_flush_latency_seconds_avg Mean time from a batch made to applied.\n"
               "# TYPE sluice_meter_flush_latency_seconds_avg gauge\nsluice_meter_flush_latency_seconds_avg %.6f\n",
            applied ? (double)LOAD(fs->flush_latency_us_sum) / 1e6 / (double)applied : 0.0);
  }
  if (a->fleet) {
    struct sl_fleet_stats *gs = &a->fleet->stats;
    uint64_t last = LOAD(gs->last_sync_ms);
    double lag = last ? (double)(uv_hrtime() / 1000000 - last) / 1000.0 : -1.0;
    struct {
      const char *name, *type, *help;
      uint64_t v;
    } g[] = {
        {"sluice_global_limits_mode", "gauge",
         "Global limits: 1 shared, 2 fallback (Redis unreachable: R/N per key here), 3 joining (0: off).",
         LOAD(gs->mode)},
        {"sluice_global_instances", "gauge", "Live instances on this Redis and prefix, as last seen.",
         LOAD(gs->instances)},
        {"sluice_global_coordinated_keys", "gauge", "Keys whose share of the limit comes from Redis.",
         LOAD(gs->coordinated)},
        {"sluice_global_syncs_total", "counter", "Share syncs answered by Redis.", LOAD(gs->syncs)},
        {"sluice_global_sync_errors_total", "counter", "Share syncs answered with an error or garbage.",
         LOAD(gs->sync_errors)},
        {"sluice_global_key_updates_total", "counter", "Keys sent in share syncs (Redis's per-key work).",
         LOAD(gs->key_updates)},
        {"sluice_global_bell_up", "gauge",
         "1 while subscribed to the fleet's bell (one server or Sentinel; a cluster polls instead).",
         LOAD(gs->bell_up)},
        {"sluice_global_bells_total", "counter", "Another instance rang the bell (the stream or the instances changed).",
         LOAD(gs->bells)},
        {"sluice_global_keys_full_total", "counter",
         "Keys not coordinated: the table (--global-keys) was full; they keep R/N here.", LOAD(gs->keys_full)},
        {"sluice_global_wants_dropped_total", "counter", "Asks to coordinate a key lost to a full ring.",
         LOAD(gs->wants_dropped)},
        {"sluice_global_fallbacks_total", "counter", "Switches to fallback shares (Redis unreachable).",
         LOAD(gs->fallbacks)},
        {"sluice_global_releases_total", "counter", "Keys given back to local shares when idle.",
         LOAD(gs->releases)},
        {"sluice_global_redis_up", "gauge", "1 while the global limits' Redis connection is up.",
         LOAD(gs->redis_up)},
    };
    for (size_t i = 0; i < SL_ARRAY_SIZE(g); i++)
      appendf(o, "# HELP %s %s\n# TYPE %s %s\n%s %llu\n", g[i].name, g[i].help, g[i].name, g[i].type, g[i].name,
              (unsigned long long)g[i].v);
    appendf(o, "# HELP sluice_global_sync_lag_seconds Time since the last share sync answered (-1: never).\n"
               "# TYPE sluice_global_sync_lag_seconds gauge\nsluice_global_sync_lag_seconds %.3f\n",
            lag);
  } else {
    appendf(o, "# HELP sluice_global_limits_mode Global limits: 0 off (limits per instance).\n"
               "# TYPE sluice_global_limits_mode gauge\nsluice_global_limits_mode 0\n");
  }
  if (a->lim) {
    struct lim_stats ls;
    lim_table_stats(a->lim, &ls);
    appendf(o, "# HELP sluice_limiter_keys Bucket keys in the limiter table.\n# TYPE sluice_limiter_keys gauge\n"
               "sluice_limiter_keys %llu\nsluice_limiter_capacity %llu\n"
               "# HELP sluice_limiter_reclaims_total Idle buckets given to another key.\n"
               "# TYPE sluice_limiter_reclaims_total counter\nsluice_limiter_reclaims_total %llu\n"
               "# HELP sluice_limiter_full_total Decisions the full bucket table could not hold.\n"
               "# TYPE sluice_limiter_full_total counter\nsluice_limiter_full_total %llu\n",
            (unsigned long long)ls.keys, (unsigned long long)ls.capacity, (unsigned long long)ls.reclaims,
            (unsigned long long)ls.full);
  }
  appendf(o, "# HELP sluice_workers Event-loop threads.\n# TYPE sluice_workers gauge\nsluice_workers %u\n",
          a->nworkers);
  /* a reload counts once every worker has taken it (on its next wake): a
   * reader that sees the new version knows the next request runs under it */
  appendf(o, "# HELP sluice_config_version Version of the configuration in force (taken by every worker).\n"
             "# TYPE sluice_config_version gauge\nsluice_config_version %llu\n",
          (unsigned long long)sl_workers_config_seen(a->workers, a->nworkers));
}

static void json_str(struct sl_buf *o, const char *s, size_t n) {
  sl_buf_lit(o, "\"");
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)s[i];
    if (ch == '"' || ch == '\\') {
      char e[2] = {'\\', (char)ch};
      sl_buf_append(o, e, 2);
    } else if (ch < 0x20) {
      appendf(o, "\\u%04x", ch);
    } else {
      sl_buf_append(o, s + i, 1);
    }
  }
  sl_buf_lit(o, "\"");
}

/* Any AccessKeyId of this UID carries its packages, and so does the UID's
 * own entry (0x01 and the UID) once asked for (admin path: a scan is fine). */
static const struct sl_acct *cached_uid(const struct sl_dir_snap *s, const char *uid, size_t ul) {
  for (unsigned k = 0; k < SL_DIR_SHARDS; k++) {
    const struct sl_acct_shard *sh = s->shards[k];
    for (uint32_t i = 0; sh && i <= sh->mask; i++)
      if (sh->slot[i] && sh->slot[i]->kind == SL_ACCT_FOUND && sh->slot[i]->uid_len == ul &&
          !memcmp(sh->slot[i]->uid, uid, ul))
        return sh->slot[i];
  }
  return NULL;
}

/* 1 when /explain?query names a UID whose packages the directory does not
 * hold: it is then asked for (as a trusted UID header's is), and the answer
 * should wait for it. */
static int explain_needs_lookup(struct sl_admin *a, const char *query) {
  char key[SL_UID_MAX + 2];
  const char *q = *query == '?' ? query + 1 : query;
  int ul = sl_http_query_get(q, strlen(q), "uid", 3, key + 1, SL_UID_MAX);
  if (!a->dir || ul <= 0) return 0;
  const struct sl_dir_snap *s = sl_dirsync_enter(a->dir);
  int have = cached_uid(s, key + 1, (size_t)ul) != NULL;
  sl_dirsync_exit(a->dir);
  if (have) return 0;
  for (int i = 1; i <= ul; i++)
    if ((unsigned char)key[i] < 0x20 || key[i] == 0x7f) return 0; /* no such UID in Redis keys */
  key[0] = '\x01';
  /* (worker 0 is told when it is in: it finds nothing parked for it) */
  return sl_dirsync_lookup(a->dir, 0, key, (size_t)ul + 1, sl_dir_hash(key, (size_t)ul + 1)) == 0;
}

int sl_admin_explain(struct sl_admin *a, const char *query, struct sl_buf *o) {
  char uid[SL_UID_MAX + 1], feat[64], region[SL_REGION_MAX + 1];
  const char *q = *query == '?' ? query + 1 : query;
  size_t ql = strlen(q);
  int ul = sl_http_query_get(q, ql, "uid", 3, uid, sizeof(uid) - 1);
  int fl = sl_http_query_get(q, ql, "feature", 7, feat, sizeof(feat) - 1);
  int rl = sl_http_query_get(q, ql, "region", 6, region, sizeof(region) - 1);
  if (ul <= 0 || fl <= 0 || rl <= 0) {
    sl_buf_lit(o, "{\"Code\":\"InvalidParameter\",\"Message\":\"Give uid, feature and region.\"}");
    return 400;
  }
  int f = sl_feature_id(feat, (size_t)fl);
  if (f < 0) {
    sl_buf_lit(o, "{\"Code\":\"InvalidParameter\",\"Message\":\"Unknown feature.\"}");
    return 404;
  }
  const struct sl_dir_snap *s = sl_dirsync_enter(a->dir);
  const struct sl_acct *acct = cached_uid(s, uid, (size_t)ul);
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME_COARSE, &ts); /* the clock admission uses */
  ts.tv_sec += a->time_offset_s;
  sl_buf_lit(o, "{\"uid\":");
  json_str(o, uid, (size_t)ul);
  appendf(o, ",\"feature\":\"%s\",\"region\":", sl_features[f].name);
  json_str(o, region, (size_t)rl);
  appendf(o, ",\"tier\":\"%s\",\"default_qps\":%u,\"default_overridden\":%s,\"suspended\":%s,"
             "\"account_cached\":%s,\"packages\":[",
          sl_tier_name((enum sl_tier)s->feature_tier[f]), s->feature_qps[f],
          s->feature_overridden[f] ? "true" : "false", sl_dir_is_suspended(s, uid, (size_t)ul) ? "true" : "false",
          acct ? "true" : "false");
  int first = 1;
  for (uint32_t i = 0; acct && i < acct->npkgs; i++) {
    const struct sl_pkg *p = &acct->pkgs[i];
    if (p->feature != f || p->region_len != (size_t)rl || memcmp(p->region, region, (size_t)rl)) continue;
    int active = sl_pkg_active(p, ts.tv_sec);
    if (!first) sl_buf_lit(o, ",");
    sl_buf_lit(o, "{\"id\":");
    first = 0;
    json_str(o, p->id, p->id_len);
    appendf(o, ",\"qps\":%u,\"starts_at\":%lld,\"expires_at\":%lld,\"active\":%s}", p->qps,
            (long long)p->starts_at, (long long)p->expires_at, active ? "true" : "false");
  }
  uint64_t limit = acct ? sl_dir_limit(s, acct, f, region, (size_t)rl, ts.tv_sec) : s->feature_qps[f];
  char key[SL_BUCKET_KEY_MAX];
  size_t kl = sl_bucket_key(key, uid, (size_t)ul, f, region, (size_t)rl);
  uint64_t hash = lim_hash(key, kl);
  struct sl_fleet_view gv = {.mode = SL_FLEET_OFF, .share = SL_FLEET_PPM};
  if (a->fleet) sl_fleet_view(a->fleet, hash, &gv);
  uint64_t rate_milli = limit * gv.share / 1000; /* what the workers apply here (admit.c) */
  struct lim_decision d;
  int pr = lim_peek_milli(a->lim, key, kl, hash, rate_milli, lim_now_ns(), &d);
  appendf(o, "],\"effective_qps\":%llu,\"global\":{\"mode\":\"%s\",\"instance\":", (unsigned long long)limit,
          sl_fleet_mode_name(gv.mode));
  json_str(o, a->fleet ? a->fleet->id : "", a->fleet ? strlen(a->fleet->id) : 0);
  char inst[SL_FLEET_INSTANCES_TEXT];
  if (a->fleet)
    sl_fleet_instances(a->fleet, inst, sizeof(inst));
  else
    strcpy(inst, "[]");
  appendf(o, ",\"instances\":%u,\"instances_known\":%s,\"coordinated\":%s,\"registered\":%u,"
             "\"share_ppm\":%u,\"share_qps\":%.3f,\"local_demand_qps\":%.3f,\"fleet_demand_qps\":%.3f}",
          gv.instances, inst, gv.coordinated ? "true" : "false", gv.registered, gv.share,
          (double)rate_milli / 1000.0, (double)gv.local_demand / 1000.0, (double)gv.fleet_demand / 1000.0);
  appendf(o, ",\"bucket\":{\"exists\":%s,\"limit\":%llu,\"remaining\":%llu,"
             "\"retry_after_ms\":%llu,\"reset_ms\":%llu},\"directory_version\":%llu,\"config_version\":%llu}",
          pr == 0 ? "true" : "false", (unsigned long long)d.limit,
          (unsigned long long)d.remaining,
          (unsigned long long)(d.result == LIM_ADMIT ? 0 : (d.retry_after_ns + 999999) / 1000000),
          (unsigned long long)(d.reset_ns / 1000000), (unsigned long long)s->version,
          (unsigned long long)sl_workers_config_seen(a->workers, a->nworkers));
  sl_dirsync_exit(a->dir);
  return 200;
}

static void admin_written(uv_write_t *req, int status) {
  (void)status;
  struct admin_conn *ac = sl_container_of(req, struct admin_conn, wreq);
  sl__close((uv_handle_t *)&ac->tcp, admin_conn_free);
}

static void admin_respond(struct admin_conn *ac, int status, const char *ctype, struct sl_buf *body) {
  char head[256];
  int n = snprintf(head, sizeof(head),
                   "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n", status,
                   sl_http_reason(status), ctype, body->len);
  sl_buf_append(&ac->out, head, (size_t)n);
  sl_buf_append(&ac->out, body->data, body->len);
  uv_buf_t b = uv_buf_init(ac->out.data, (unsigned)ac->out.len);
  ac->done = 1;
  uv_read_stop((uv_stream_t *)&ac->tcp);
  if (uv_write(&ac->wreq, (uv_stream_t *)&ac->tcp, &b, 1, admin_written) != 0)
    sl__close((uv_handle_t *)&ac->tcp, admin_conn_free);
}

static int admin_on_url(llhttp_t *p, const char *at, size_t n) {
  struct admin_conn *ac = p->data;
  if (ac->url_len + n >= sizeof(ac->url)) return -1;
  memcpy(ac->url + ac->url_len, at, n);
  ac->url_len += n;
  ac->url[ac->url_len] = '\0';
  return 0;
}

static void explain_respond(struct admin_conn *ac) {
  struct sl_buf body = {.max = 1u << 20};
  int st = sl_admin_explain(ac->admin, ac->url + 8, &body);
  admin_respond(ac, st, "application/json", &body);
  sl_buf_free(&body);
}

static void explain_wait_end(struct admin_conn *ac) {
  ac->waiting = 0;
  uv_timer_stop(&ac->wait);
  uv_close((uv_handle_t *)&ac->wait, NULL); /* closed before the connection (admin_conn_free) */
}

static void explain_poll(uv_timer_t *t) {
  struct admin_conn *ac = sl_container_of(t, struct admin_conn, wait);
  ac->waited_ms += EXPLAIN_POLL_MS;
  char uid[SL_UID_MAX + 1];
  const char *q = ac->url + 9;
  int ul = sl_http_query_get(q, strlen(q), "uid", 3, uid, SL_UID_MAX);
  const struct sl_dir_snap *s = sl_dirsync_enter(ac->admin->dir);
  int have = ul > 0 && cached_uid(s, uid, (size_t)ul) != NULL;
  sl_dirsync_exit(ac->admin->dir);
  if (!have && ac->waited_ms < EXPLAIN_WAIT_MS) return;
  explain_wait_end(ac);
  explain_respond(ac);
}

static int admin_on_complete(llhttp_t *p) {
  struct admin_conn *ac = p->data;
  struct sl_buf body = {.max = 1u << 20};
  size_t path_len = strcspn(ac->url, "?");
  if (path_len == 8 && !memcmp(ac->url, "/healthz", 8)) {
    sl_buf_lit(&body, "ok\n");
    admin_respond(ac, 200, "text/plain", &body);
  } else if (path_len == 8 && !memcmp(ac->url, "/explain", 8)) {
    if (ac->url[8] == '?' && explain_needs_lookup(ac->admin, ac->url + 8)) {
      uv_timer_init(ac->tcp.loop, &ac->wait);
      uv_timer_start(&ac->wait, explain_poll, EXPLAIN_POLL_MS, EXPLAIN_POLL_MS);
      ac->waiting = 1;
    } else {
      explain_respond(ac);
    }
  } else if (path_len == 8 && !memcmp(ac->url, "/metrics", 8)) {
    sl_admin_metrics(ac->admin, &body);
    admin_respond(ac, 200, "text/plain; version=0.0.4", &body);
  } else {
    sl_buf_lit(&body, "{\"Code\":\"NotFound\",\"Message\":\"Try /healthz, /metrics or /explain.\"}");
    admin_respond(ac, 404, "application/json", &body);
  }
  sl_buf_free(&body);
  return HPE_PAUSED;
}

static void admin_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b) {
  (void)hint;
  struct admin_conn *ac = sl_container_of(h, struct admin_conn, tcp);
  *b = uv_buf_init(ac->in, sizeof(ac->in));
}

static void admin_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b) {
  struct admin_conn *ac = sl_container_of(s, struct admin_conn, tcp);
  if (ac->done) return;
  if (nread < 0) {
    if (ac->waiting && nread == UV_EOF) { /* a client that shut down its side still gets the answer */
      uv_read_stop(s);
      return;
    }
    if (ac->waiting) explain_wait_end(ac);
    sl__close((uv_handle_t *)&ac->tcp, admin_conn_free);
    return;
  }
  llhttp_errno_t e = llhttp_execute(&ac->parser, b->base, (size_t)nread);
  if (e != HPE_OK && e != HPE_PAUSED) {
    struct sl_buf body = {.max = 4096};
    sl_buf_lit(&body, "{\"Code\":\"BadRequest\",\"Message\":\"Malformed request.\"}");
    admin_respond(ac, 400, "application/json", &body);
    sl_buf_free(&body);
  }
}

static void admin_on_connection(uv_stream_t *s, int status) {
  struct sl_admin *a = sl_container_of(s, struct sl_admin, tcp);
  if (status < 0) return;
  struct admin_conn *ac = sl_calloc(1, sizeof(*ac));
  ac->admin = a;
  ac->out.max = 1u << 20;
  uv_tcp_init(s->loop, &ac->tcp);
  if (uv_accept(s, (uv_stream_t *)&ac->tcp) != 0) {
    uv_close((uv_handle_t *)&ac->tcp, admin_conn_free);
    return;
  }
  llhttp_init(&ac->parser, HTTP_REQUEST, &admin_settings);
  ac->parser.data = ac;
  uv_read_start((uv_stream_t *)&ac->tcp, admin_alloc, admin_read);
}

int sl_admin_start(struct sl_admin *a, uv_loop_t *loop, const struct sl_addr *addr) {
  llhttp_settings_init(&admin_settings);
  admin_settings.on_url = admin_on_url;
  admin_settings.on_message_complete = admin_on_complete;
  int r;
  uv_tcp_init(loop, &a->tcp);
  if ((r = uv_tcp_bind(&a->tcp, (const struct sockaddr *)&addr->sa, 0)) != 0) return r;
  return uv_listen((uv_stream_t *)&a->tcp, 128, admin_on_connection);
}

void sl_admin_stop(struct sl_admin *a) { sl__close((uv_handle_t *)&a->tcp, NULL); }
