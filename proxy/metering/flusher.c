#include "flusher.h"

#include <errno.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <fcntl.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>

#include "redis_uv.h"

#include "catalog.h"
#include "common.h"
#include "uv_util.h"

#define SPOOL_MAGIC 0x314d4c53u /* "SLM1" */
#define REC_BATCH SL_SPOOL_REC_BATCH
#define REC_ACK SL_SPOOL_REC_ACK

/* Applies one batch exactly once: the id is recorded with SET NX (kept 7
 * days) in the same atomic script as the counts, so a batch sent again
 * after a lost reply changes nothing. */
static const char apply_script[] =
    "local p, id = ARGV[1], ARGV[2] "
    "if not redis.call('SET', p .. 'meter:batch:' .. id, '1', 'NX', 'EX', 604800) then return 0 end "
    "local n = tonumber(ARGV[3]) "
    "for i = 0, n - 1 do "
    "  local b = 4 + i * 7 "
    "  local day, uid, f, r, tier, o, c = ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], "
    "                                     ARGV[b + 5], ARGV[b + 6] "
    "  redis.call('HINCRBY', p .. 'calls:' .. day .. ':' .. uid, f .. ':' .. r .. ':' .. o, c) "
    "  if o == 'ok' then "
    "    redis.call('HINCRBY', p .. 'usage:' .. day .. ':' .. uid, f .. ':' .. r, c) "
    "    redis.call('SADD', p .. 'usage:' .. day, uid) "
    "  end "
    "  redis.call('XADD', p .. 'usage:stream', 'MAXLEN', '~', '1000000', '*', 'batch', id, 'day', day, "
    "             'uid', uid, 'feature', f, 'region', r, 'tier', tier, 'outcome', o, 'count', c) "
    "end "
    "return 1";




static inline void stat_add(_Atomic uint64_t *c, uint64_t v) { atomic_fetch_add_explicit(c, v, memory_order_relaxed); }
static inline void stat_set(_Atomic uint64_t *c, uint64_t v) { atomic_store_explicit(c, v, memory_order_relaxed); }

uint32_t sl_crc32(const void *p, size_t n) {
  static uint32_t table[256];
  static int ready;
  if (!ready) { /* built once, on the flusher thread, before any concurrent use */
    for (uint32_t i = 0; i < 256; i++) {
      uint32_t c = i;
      for (int k = 0; k < 8; k++) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
      table[i] = c;
    }
    ready = 1;
  }
  const unsigned char *s = p;
  uint32_t c = 0xffffffffu;
  for (size_t i = 0; i < n; i++) c = table[(c ^ s[i]) & 0xff] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

/* ---- spool records: [magic u32][type u8][pad 3][len u32][crc u32][payload] ---- */

#define HDR 16
size_t sl_spool_batch_size(const struct sl_batch *b) {
  size_t n = HDR + 1 + b->id_len + 4;
  for (uint32_t i = 0; i < b->n; i++) n += 4 + 5 + b->e[i].k.uid_len + b->e[i].k.region_len + 8;
  return n;
}

static void put_hdr(unsigned char *o, uint8_t type, uint32_t len, const unsigned char *payload) {
  uint32_t magic = SPOOL_MAGIC, crc = sl_crc32(payload, len);
  memcpy(o, &magic, 4);
  o[4] = type;
  o[5] = o[6] = o[7] = 0;
  memcpy(o + 8, &len, 4);
  memcpy(o + 12, &crc, 4);
}

size_t sl_spool_encode_batch(const struct sl_batch *b, unsigned char *out) {
  unsigned char *p = out + HDR;
  *p++ = b->id_len;
  memcpy(p, b->id, b->id_len);
  p += b->id_len;
  memcpy(p, &b->n, 4);
  p += 4;
  for (uint32_t i = 0; i < b->n; i++) {
    const struct sl_meter_key *k = &b->e[i].k;
    memcpy(p, &k->day, 4);
    p += 4;
    *p++ = k->feature;
    *p++ = k->tier;
    *p++ = k->outcome;
    *p++ = k->uid_len;
    *p++ = k->region_len;
    memcpy(p, k->uid, k->uid_len);
    p += k->uid_len;
    memcpy(p, k->region, k->region_len);
    p += k->region_len;
    memcpy(p, &b->e[i].count, 8);
    p += 8;
  }
  put_hdr(out, REC_BATCH, (uint32_t)(p - out - HDR), out + HDR);
  return (size_t)(p - out);
}

static struct sl_batch *batch_new(uint32_t n) {
  struct sl_batch *b = sl_calloc(1, sizeof(*b) + n * sizeof(struct sl_batch_entry));
  return b;
}

/* Decodes a batch payload; NULL when malformed. */
struct sl_batch *sl_spool_decode_batch(const unsigned char *p, size_t len) {
  const unsigned char *end = p + len;
  if (len < 5 || p[0] == 0 || p[0] >= sizeof(((struct sl_batch *)0)->id) || (size_t)(1 + p[0] + 4) > len)
    return NULL;
  uint8_t idl = p[0];
  uint32_t n;
  memcpy(&n, p + 1 + idl, 4);
  if (n > SL_BATCH_MAX) return NULL;
  struct sl_batch *b = batch_new(n);
  b->id_len = idl;
  memcpy(b->id, p + 1, idl);
  const unsigned char *q = p + 1 + idl + 4;
  for (uint32_t i = 0; i < n; i++) {
    struct sl_meter_key *k = &b->e[i].k;
    if (end - q < 9) goto bad;
    memcpy(&k->day, q, 4);
    k->feature = q[4];
    k->tier = q[5];
    k->outcome = q[6];
    k->uid_len = q[7];
    k->region_len = q[8];
    q += 9;
    /* send_next names the feature, tier and outcome from these bytes */
    if (k->uid_len > SL_UID_MAX || k->region_len > SL_REGION_MAX || k->outcome >= SL_NOUTCOMES ||
        (k->feature >= sl_nfeatures && k->feature != SL_METER_NO_FEATURE) || k->tier > SL_TIER_LLM ||
        end - q < k->uid_len + k->region_len + 8)
      goto bad;
    memcpy(k->uid, q, k->uid_len);
    q += k->uid_len;
    memcpy(k->region, q, k->region_len);
    q += k->region_len;
    memcpy(&b->e[i].count, q, 8);
    q += 8;
  }
  if (q != end) goto bad; /* what encode writes, and nothing else */
  b->n = n;
  return b;
bad:
  free(b);
  return NULL;
}

int sl_spool_decode_ack(const unsigned char *p, size_t len, const unsigned char **id, uint8_t *id_len) {
  if (len < 2 || p[0] == 0 || p[0] >= sizeof(((struct sl_batch *)0)->id) || (size_t)p[0] + 1 != len) return -1;
  *id = p + 1;
  *id_len = p[0];
  return 0;
}

size_t sl_spool_scan(const unsigned char *data, size_t len,
                     int (*on_record)(void *arg, int type, const unsigned char *payload, uint32_t plen), void *arg) {
  size_t off = 0;
  while (len - off >= HDR) {
    uint32_t magic, plen, crc;
    memcpy(&magic, data + off, 4);
    memcpy(&plen, data + off + 8, 4);
    memcpy(&crc, data + off + 12, 4);
    uint8_t type = data[off + 4];
    if (magic != SPOOL_MAGIC || (type != REC_BATCH && type != REC_ACK) || plen > len - off - HDR ||
        sl_crc32(data + off + HDR, plen) != crc)
      break;
    if (on_record(arg, type, data + off + HDR, plen) != 0) break;
    off += HDR + plen;
  }
  return off;
}

static void spool_write(struct sl_flusher *f, const void *p, size_t n) {
  if (f->spool_fd < 0) return;
  const char *s = p;
  while (n) {
    ssize_t w = write(f->spool_fd, s, n);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) {
      fprintf(stderr, "sluice: spool %s: write: %s\n", f->spool_path, strerror(errno));
      stat_add(&f->stats.spool_errors, 1);
      return;
    }
    s += w;
    n -= (size_t)w;
    f->spool_bytes += (uint64_t)w;
  }
  f->spool_dirty = 1;
  stat_set(&f->stats.spool_bytes, f->spool_bytes);
}

static void spool_sync(struct sl_flusher *f) {
  if (f->spool_fd >= 0 && f->spool_dirty) {
    if (fdatasync(f->spool_fd) != 0) stat_add(&f->stats.spool_errors, 1);
    f->spool_dirty = 0;
  }
}

static void spool_batch(struct sl_flusher *f, struct sl_batch *b) {
  size_t need = sl_spool_batch_size(b);
  if (f->spool_bytes + need > f->spool_max) {
    stat_set(&f->stats.spool_full, 1);
    uint64_t now = sl_mono_ms();
    if (now - f->spool_full_said_ms > 60000 || f->spool_full_said_ms == 0) {
      fprintf(stderr,
              "sluice: METERING SPOOL FULL (%llu of %llu bytes in %s): batches are kept in memory only and are "
              "lost if the process dies before Redis takes them\n",
              (unsigned long long)f->spool_bytes, (unsigned long long)f->spool_max, f->spool_path);
      f->spool_full_said_ms = now;
    }
    return;
  }
  unsigned char *buf = sl_malloc(need);
  size_t n = sl_spool_encode_batch(b, buf);
  spool_write(f, buf, n);
  free(buf);
  b->spooled = 1;
}

static void spool_ack(struct sl_flusher *f, const struct sl_batch *b) {
  if (!b->spooled) return;
  unsigned char rec[HDR + 1 + sizeof(b->id)];
  rec[HDR] = b->id_len;
  memcpy(rec + HDR + 1, b->id, b->id_len);
  put_hdr(rec, REC_ACK, (uint32_t)(1 + b->id_len), rec + HDR);
  spool_write(f, rec, HDR + 1 + b->id_len);
}

/* Everything acked: start the spool afresh so that it does not grow. */
static void spool_compact(struct sl_flusher *f) {
  uint64_t threshold = f->spool_max / 2 < (1u << 20) ? f->spool_max / 2 : (1u << 20);
  if (f->spool_fd < 0 || f->head || f->spool_bytes < threshold) return;
  if (ftruncate(f->spool_fd, 0) == 0) {
    f->spool_bytes = 0;
    f->spool_dirty = 1;
    stat_set(&f->stats.spool_bytes, 0);
    stat_set(&f->stats.spool_full, 0);
  }
}

/* ---- the queue ---- */

static uint64_t batch_counts(const struct sl_batch *b) {
  uint64_t n = 0;
  for (uint32_t i = 0; i < b->n; i++) n += b->e[i].count;
  return n;
}

static void queue_stats(struct sl_flusher *f) {
  stat_set(&f->stats.queued, f->nqueued);
  stat_set(&f->stats.queued_counts, f->queued_counts);
  stat_set(&f->stats.oldest_ms, f->head ? f->head->created_ms : 0);
}

static void enqueue(struct sl_flusher *f, struct sl_batch *b) {
  f->queued_counts += batch_counts(b);
  if (f->tail)
    f->tail->next = b;
  else
    f->head = b;
  f->tail = b;
  f->nqueued++;
}

static void send_next(struct sl_flusher *f);

/* Batches the accumulator's keys would make. */
static unsigned acc_batches(const struct sl_flusher *f) { return (f->acc->n + SL_BATCH_MAX - 1) / SL_BATCH_MAX; }

/* 1 when the accumulator may become batches: the queue takes them within
 * its bound (an empty queue always takes them, so that a bound smaller than
 * one accumulator's worth cannot stop metering), or the process is exiting
 * (the final flush writes everything to Redis or the spool). */
static int queue_has_room(const struct sl_flusher *f) {
  return f->final_started || f->nqueued == 0 || f->nqueued + acc_batches(f) <= f->queue_max;
}

/* Turns what the accumulator holds into batches of at most SL_BATCH_MAX
 * keys, each allocated for the keys it holds. */
static void finalize(struct sl_flusher *f) {
  struct sl_meter_table *t = f->acc;
  if (t->n == 0) return;
  struct sl_batch *b = NULL;
  for (uint32_t j = 0; j < t->n; j++) {
    const struct sl_meter_entry *e = &t->e[t->used[j]];
    if (!b) {
      uint32_t left = t->n - j;
      b = batch_new(left < SL_BATCH_MAX ? left : SL_BATCH_MAX);
      b->created_ms = sl_mono_ms();
      int l = snprintf(b->id, sizeof(b->id), "%s:%016llx:%llu", f->instance, (unsigned long long)f->epoch,
                       (unsigned long long)++f->seq);
      b->id_len = (uint8_t)l;
    }
    b->e[b->n].k = e->k;
    b->e[b->n].count = e->count;
    stat_add(&f->stats.counted, e->count);
    if (++b->n == SL_BATCH_MAX || j + 1 == t->n) {
      spool_batch(f, b);
      enqueue(f, b);
      stat_add(&f->stats.batches, 1);
      b = NULL;
    }
  }
  sl_meter_table_clear(t);
  queue_stats(f);
}

/* Merges a worker's table into the accumulator. Returns 0, or -ENOBUFS
 * (nothing merged) when the accumulator might not hold its keys and the
 * queue has no room for what the accumulator holds: the table then stays
 * with its worker. */
static int merge_table(struct sl_flusher *f, const struct sl_meter_table *t) {
  if (f->acc->n + t->n > f->acc->limit) {
    if (!queue_has_room(f)) return -ENOBUFS;
    finalize(f); /* what the accumulator holds becomes batches */
  }
  for (uint32_t j = 0; j < t->n; j++) {
    const struct sl_meter_entry *e = &t->e[t->used[j]];
    /* Fits: the accumulator is at least one worker table's size (start). */
    int r = sl_meter_add(f->acc, &e->k, e->hash, e->count);
    (void)r;
  }
  return 0;
}

/* Takes the tables the workers handed over, while the accumulator can hold
 * them, and gives them back cleared. A table that cannot be taken stays
 * first in its worker's ring (order is kept): that ring fills, the worker
 * keeps full tables aside and admission refuses new calls. */
static void collect(struct sl_flusher *f) {
  for (unsigned i = 0; i < f->nworkers; i++) {
    struct sl_meter_worker *m = f->workers[i];
    struct sl_meter_table *t;
    while (sl_ring_peek(&m->handoff, &t) == 0) {
      if (merge_table(f, t) != 0) break;
      sl_ring_pop(&m->handoff, &t);
      sl_meter_table_clear(t);
      if (sl_ring_push(&m->spare, &t) != 0) sl_meter_table_free(t);
    }
  }
}

/* ---- Redis ---- */

/* hiredis 0.14's async client has no timeouts of its own: one uv timer (the
 * watchdog) holds the deadline of whatever is awaited, the connection or
 * the oldest reply. A server that accepts and never answers is taken as
 * down after the bound, the connection dropped and made again with backoff,
 * and the batch in flight sent again with the same id (idempotent). */
#define DOWN_LOG_MS 10000 /* while Redis stays down, at most one log line per this */
#define PROBE_MS 1000     /* an idle connection is asked PING after this, so silence is found without traffic */

static void connect_redis(struct sl_flusher *f);

static void arm_watchdog(struct sl_flusher *f);

/* The connection is unusable (why): the metric at once; the log says the
 * change once, then at most one line per DOWN_LOG_MS while it lasts. */
static void redis_down(struct sl_flusher *f, const char *why) {
  uint64_t now = sl_mono_ms();
  f->ready = 0;
  f->final_fail = 1;
  stat_set(&f->stats.redis_up, 0);
  if (atomic_load_explicit(&f->final, memory_order_acquire)) return; /* the exit says what is left */
  if (!f->down) {
    f->down = 1;
    f->down_since_ms = f->down_said_ms = now;
    fprintf(stderr,
            "sluice: metering: redis down: %s; batches wait in the queue and the spool (said again at most every "
            "%d s while it lasts)\n",
            why, DOWN_LOG_MS / 1000);
  } else if (now - f->down_said_ms >= DOWN_LOG_MS) {
    f->down_said_ms = now;
    fprintf(stderr, "sluice: metering: redis still down after %llu s: %s; %u batch(es) wait\n",
            (unsigned long long)(now - f->down_since_ms) / 1000, why, f->nqueued);
  }
}

static void retry_later(struct sl_flusher *f) {
  if (!f->backoff_ms) f->backoff_ms = 100;
  f->next_connect_ms = sl_mono_ms() + f->backoff_ms;
  f->backoff_ms = f->backoff_ms * 2 > 2000 ? 2000 : f->backoff_ms * 2;
}

static void redis_up(struct sl_flusher *f) {
  uint64_t now = sl_mono_ms();
  if (f->down && !atomic_load_explicit(&f->final, memory_order_acquire))
    fprintf(stderr, "sluice: metering: redis up again after %.1f s\n", (double)(now - f->down_since_ms) / 1000.0);
  f->down = 0;
  f->ready = 1;
  f->backoff_ms = 0;
  stat_set(&f->stats.redis_up, 1);
}

/* A command was sent: its reply is due within the bound. */
static void await_begin(struct sl_flusher *f) {
  if (f->awaiting++ == 0) f->io_deadline_ms = sl_mono_ms() + f->timeout_ms;
  arm_watchdog(f);
}

/* A reply came: the next one awaited (replies come in order) gets a new bound. */
static void await_end(struct sl_flusher *f) {
  uint64_t now = sl_mono_ms();
  if (f->awaiting) f->awaiting--;
  f->io_deadline_ms = f->awaiting ? now + f->timeout_ms : 0;
  f->last_io_ms = now;
  arm_watchdog(f);
}

/* Forgets the connection (from a timer or a reply callback, never from the
 * disconnect callback): its pending callbacks run with no reply and find no
 * owner; the batch in flight is sent again on the next connection. */
static void redis_drop(struct sl_flusher *f, const char *why) {
  redisAsyncContext *c = f->ctx;
  f->ctx = NULL;
  f->connecting = 0;
  f->awaiting = 0;
  f->pinging = 0;
  f->io_deadline_ms = 0;
  arm_watchdog(f);
  if (f->inflight) {
    f->inflight = NULL;
    stat_add(&f->stats.retried, 1);
  }
  if (c) {
    c->data = NULL;
    redisAsyncFree(c); /* inside a hiredis callback, hiredis frees it when the callback returns */
  }
  redis_down(f, why);
  retry_later(f);
}

static void on_watchdog(uv_timer_t *t) {
  struct sl_flusher *f = t->data;
  if (!f->ctx || !f->io_deadline_ms) return;
  uint64_t now = sl_mono_ms();
  if (now < f->io_deadline_ms) {
    arm_watchdog(f);
    return;
  }
  char why[96];
  snprintf(why, sizeof(why), "%s within %u ms (--redis-timeout-ms)", f->connecting ? "no connection" : "no reply",
           f->timeout_ms);
  redis_drop(f, why);
}

static void arm_watchdog(struct sl_flusher *f) {
  if (uv_is_closing((uv_handle_t *)&f->watchdog)) return;
  if (!f->io_deadline_ms) {
    uv_timer_stop(&f->watchdog);
    return;
  }
  uint64_t now = sl_mono_ms();
  uv_timer_start(&f->watchdog, on_watchdog, f->io_deadline_ms > now ? f->io_deadline_ms - now : 0, 0);
}

int sl_flusher_reply_kind(const struct redisReply *r) {
  if (!r) return SL_REPLY_LOST;
  if (r->type == REDIS_REPLY_INTEGER && r->integer == 1) return SL_REPLY_APPLIED;
  if (r->type == REDIS_REPLY_INTEGER && r->integer == 0) return SL_REPLY_DUPLICATE;
  return SL_REPLY_ERROR;
}

static void on_applied(redisAsyncContext *c, void *reply, void *priv) {
  (void)priv;
  struct sl_flusher *f = c->data;
  if (!f) return;
  redisReply *r = reply;
  struct sl_batch *b = f->inflight;
  f->inflight = NULL;
  int kind = sl_flusher_reply_kind(r);
  if (kind == SL_REPLY_LOST) { /* connection lost: the reply may be lost with it; resent with the same id */
    if (b) stat_add(&f->stats.retried, 1);
    return;
  }
  await_end(f);
  if (!b) return;
  if (kind == SL_REPLY_ERROR) {
    uint64_t now = sl_mono_ms();
    f->errors++;
    if (f->err_said_ms == 0 || now - f->err_said_ms >= DOWN_LOG_MS) {
      fprintf(stderr, "sluice: metering batch %.*s: %.*s (retrying; %llu error(s) so far, said at most every %d s)\n",
              b->id_len, b->id, r->type == REDIS_REPLY_ERROR ? (int)(r->len > 200 ? 200 : r->len) : 16,
              r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply", (unsigned long long)f->errors,
              DOWN_LOG_MS / 1000);
      f->err_said_ms = now;
    }
    stat_add(&f->stats.retried, 1);
    f->retry_at_ms = now + 500;
    return;
  }
  stat_add(kind == SL_REPLY_APPLIED ? &f->stats.applied : &f->stats.deduplicated, 1);
  uint64_t lat = (sl_mono_ms() - b->created_ms) * 1000;
  stat_add(&f->stats.flush_latency_us_sum, lat);
  if (lat > atomic_load_explicit(&f->stats.flush_latency_us_max, memory_order_relaxed))
    stat_set(&f->stats.flush_latency_us_max, lat);
  /* b is the head: applied in order. */
  f->head = b->next;
  if (!f->head) f->tail = NULL;
  f->nqueued--;
  f->queued_counts -= batch_counts(b);
  spool_ack(f, b);
  free(b);
  spool_compact(f);
  queue_stats(f);
  send_next(f);
}

void sl_flusher_key_names(const struct sl_meter_key *k, const char **feature, const char **tier,
                          const char **outcome) {
  int known = k->feature < sl_nfeatures;
  *feature = known ? sl_features[k->feature].name : "-";
  *tier = known ? sl_tier_name((enum sl_tier)k->tier) : "-";
  *outcome = k->outcome < SL_NOUTCOMES ? sl_outcome_names[k->outcome] : "-";
}

static void send_next(struct sl_flusher *f) {
  if (!f->ready || f->inflight || !f->head || sl_mono_ms() < f->retry_at_ms) return;
  struct sl_batch *b = f->head;
  size_t argc = 6 + 7 * (size_t)b->n;
  const char **argv = sl_malloc(argc * sizeof(char *));
  size_t *lens = sl_malloc(argc * sizeof(size_t));
  char *nums = sl_malloc(((size_t)b->n * 2 + 1) * 24);
  size_t a = 0;
  char *np = nums;
#define ARG(s, l) (argv[a] = (s), lens[a++] = (l))
  ARG("EVAL", 4);
  ARG(apply_script, sizeof(apply_script) - 1);
  ARG("0", 1);
  ARG(f->prefix, strlen(f->prefix));
  ARG(b->id, b->id_len);
  size_t l = sl_u64toa(b->n, np);
  ARG(np, l);
  np += l + 1;
  for (uint32_t i = 0; i < b->n; i++) {
    const struct sl_meter_key *k = &b->e[i].k;
    l = sl_u64toa(k->day, np);
    ARG(np, l);
    np += l + 1;
    const char *fname, *tier, *o;
    sl_flusher_key_names(k, &fname, &tier, &o);
    ARG(k->uid, k->uid_len);
    ARG(fname, strlen(fname));
    ARG(k->region, k->region_len);
    ARG(tier, strlen(tier));
    ARG(o, strlen(o));
    l = sl_u64toa(b->e[i].count, np);
    ARG(np, l);
    np += l + 1;
  }
#undef ARG
  if (redisAsyncCommandArgv(f->ctx, on_applied, NULL, (int)a, argv, lens) == REDIS_OK) {
    f->inflight = b;
    await_begin(f);
  }
  free(argv);
  free(lens);
  free(nums);
}

/* The connection counts as up only once the server answered a PING: a
 * server that accepts and never answers (or is no Redis) is never up. */
static void on_pong(redisAsyncContext *c, void *reply, void *priv) {
  (void)priv;
  struct sl_flusher *f = c->data;
  if (!f) return;
  redisReply *r = reply;
  f->pinging = 0;
  if (!r) return; /* the connection is going: on_disconnect says so */
  await_end(f);
  if (r->type == REDIS_REPLY_ERROR) { /* LOADING, NOAUTH...: not usable yet */
    char why[160];
    snprintf(why, sizeof(why), "PING answered %.*s", (int)(r->len > 120 ? 120 : r->len), r->str);
    redis_drop(f, why);
    return;
  }
  if (!f->ready) redis_up(f);
  send_next(f);
}

static void send_ping(struct sl_flusher *f) {
  if (!f->ctx || f->pinging) return;
  if (redisAsyncCommand(f->ctx, on_pong, NULL, "PING") == REDIS_OK) {
    f->pinging = 1;
    await_begin(f);
  }
}

static void on_disconnect(const redisAsyncContext *c, int status) {
  struct sl_flusher *f = c->data;
  if (!f) return;
  f->ctx = NULL;
  f->connecting = 0;
  f->awaiting = 0;
  f->pinging = 0;
  f->inflight = NULL; /* on_applied ran with no reply and counted the retry */
  f->io_deadline_ms = 0;
  arm_watchdog(f);
  const char *refused = sl_redis_refused(c); /* its errstr would only say "Out of memory" */
  redis_down(f, refused ? refused : status == REDIS_OK ? "connection closed" : c->errstr);
  retry_later(f);
}

static void on_connect(const redisAsyncContext *c, int status) {
  struct sl_flusher *f = c->data;
  if (!f) return;
  f->connecting = 0;
  if (status != REDIS_OK) {
    f->ctx = NULL; /* hiredis frees it after this callback */
    f->io_deadline_ms = 0;
    arm_watchdog(f);
    redis_down(f, c->errstr);
    retry_later(f);
    return;
  }
  f->io_deadline_ms = 0;
  send_ping(f);
}

static void connect_redis(struct sl_flusher *f) {
  if (f->ctx) return;
  redisAsyncContext *c = f->port ? redisAsyncConnect(f->host, f->port) : redisAsyncConnectUnix(f->host);
  if (!c) {
    redis_down(f, "out of memory");
    retry_later(f);
    return;
  }
  if (c->err) {
    redis_down(f, c->errstr);
    redisAsyncFree(c);
    retry_later(f);
    return;
  }
  c->data = f;
  if (sl_redis_attach(c, &f->loop) != REDIS_OK) {
    redisAsyncFree(c);
    redis_down(f, "cannot watch the socket");
    retry_later(f);
    return;
  }
  redisAsyncSetConnectCallback(c, on_connect);
  redisAsyncSetDisconnectCallback(c, on_disconnect);
  f->ctx = c;
  f->connecting = 1;
  f->io_deadline_ms = sl_mono_ms() + f->timeout_ms;
  arm_watchdog(f);
}

/* ---- rounds ---- */

static int round_complete(struct sl_flusher *f) {
  for (unsigned i = 0; i < f->nworkers; i++)
    /* acquire: the worker's handoff pushes happen before its round_done store. */
    if (atomic_load_explicit(&f->workers[i]->round_done, memory_order_acquire) < f->round) return 0;
  return 1;
}

static void end_round(struct sl_flusher *f) {
  collect(f);
  /* At the queue's bound the counts stay in the accumulator, merged by key,
   * until Redis takes batches. */
  if (queue_has_room(f)) finalize(f);
  spool_sync(f);
  send_next(f);
}

static void stop_loop(struct sl_flusher *f) {
  uv_timer_stop(&f->tick);
  sl__close((uv_handle_t *)&f->tick, NULL);
  uv_timer_stop(&f->watchdog);
  sl__close((uv_handle_t *)&f->watchdog, NULL);
  sl__close((uv_handle_t *)&f->wake, NULL);
  if (f->ctx) {
    redisAsyncContext *c = f->ctx;
    f->ctx = NULL;
    f->ready = 0;
    f->inflight = NULL; /* its callback sees no owner */
    c->data = NULL;
    redisAsyncDisconnect(c);
  }
}

static void final_step(struct sl_flusher *f) {
  if (!f->final_started) {
    f->final_started = 1;
    f->final_deadline = sl_mono_ms() + f->final_ms;
    /* Redis may be back since the last try: ask now, not after the backoff.
     * A failure from here on ends the wait (the counts go to the spool). */
    f->final_fail = 0;
    if (!f->ctx) connect_redis(f);
    /* The workers have stopped: their tables are ours now. */
    for (unsigned i = 0; i < f->nworkers; i++) {
      struct sl_meter_worker *m = f->workers[i];
      collect(f);
      for (unsigned k = 0; k < m->noverflow; k++) merge_table(f, m->overflow[k]);
      merge_table(f, m->active);
      sl_meter_table_clear(m->active);
      for (unsigned k = 0; k < m->noverflow; k++) sl_meter_table_free(m->overflow[k]);
      m->noverflow = 0;
    }
    finalize(f);
    spool_sync(f);
    send_next(f);
  }
  /* A connect tried during the final flush failed: the counts are in the
   * spool, waiting helps nothing. */
  int hopeless = !f->ready && !f->ctx && f->final_fail;
  if (!f->head || hopeless || sl_mono_ms() >= f->final_deadline) {
    uint64_t left = 0;
    for (struct sl_batch *b = f->head; b; b = b->next)
      if (!b->spooled)
        for (uint32_t i = 0; i < b->n; i++) left += b->e[i].count;
    if (f->head)
      fprintf(stderr, "sluice: metering: %u batch(es) not yet in Redis at exit%s\n", f->nqueued,
              left ? "" : "; they are in the spool and will be sent at the next start");
    if (left) {
      fprintf(stderr, "sluice: METERING LOST %llu counted requests (spool full, Redis unreachable)\n",
              (unsigned long long)left);
      stat_add(&f->stats.lost, left);
    }
    spool_sync(f);
    stop_loop(f);
  }
}

static void on_tick(uv_timer_t *t) {
  struct sl_flusher *f = t->data;
  if (atomic_load_explicit(&f->final, memory_order_acquire)) {
    if (!f->ctx && sl_mono_ms() >= f->next_connect_ms) connect_redis(f);
    final_step(f);
    return;
  }
  if (!f->ctx && sl_mono_ms() >= f->next_connect_ms) connect_redis(f);
  /* An idle connection is still asked: a Redis that stopped answering is
   * found by the reply bound even when there is nothing to send. */
  if (f->ready && !f->awaiting && sl_mono_ms() - f->last_io_ms >= PROBE_MS) send_ping(f);
  end_round(f); /* whatever came since: a slow worker's table joins the next batch */
  if (f->nqueued >= f->queue_max) {
    /* Backlog at its bound: leave the tables with the workers (who refuse new
     * work once theirs are full) rather than grow without limit. */
    send_next(f);
    return;
  }
  f->round++;
  for (unsigned i = 0; i < f->nworkers; i++) {
    /* release: nothing to publish but the number; the worker answers with
     * an async wake. */
    atomic_store_explicit(&f->workers[i]->round_req, f->round, memory_order_release);
    uv_async_send(f->worker_wakes[i]);
  }
}

static void on_wake(uv_async_t *a) {
  struct sl_flusher *f = a->data;
  if (atomic_load_explicit(&f->final, memory_order_acquire)) {
    if (!uv_is_closing((uv_handle_t *)&f->tick)) {
      uv_timer_start(&f->tick, on_tick, 20, 20); /* the final flush polls faster */
      final_step(f);
    }
    return;
  }
  if (round_complete(f)) end_round(f);
}

static void flusher_main(void *arg) {
  /* Background work: under CFS a small nice value keeps it from taking the
   * workers' core in bursts (p99), without starving it. */
  (void)setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 5);
  struct sl_flusher *f = arg;
  uv_run(&f->loop, UV_RUN_DEFAULT);
}

/* ---- start-up ---- */

static int load_instance(struct sl_flusher *f, const char *dir, const char *configured, char *err, size_t errlen) {
  if (configured[0]) {
    snprintf(f->instance, sizeof(f->instance), "%s", configured);
    return 0;
  }
  char path[512];
  snprintf(path, sizeof(path), "%s/instance-id", dir);
  FILE *fp = fopen(path, "r");
  if (fp) {
    char buf[64] = "";
    if (fgets(buf, sizeof(buf), fp)) buf[strcspn(buf, "\r\n")] = '\0';
    fclose(fp);
    if (buf[0]) {
      snprintf(f->instance, sizeof(f->instance), "%s", buf);
      return 0;
    }
  }
  uint64_t r[2];
  if (getrandom(r, sizeof(r), 0) != sizeof(r)) r[0] = uv_hrtime(), r[1] = (uint64_t)getpid();
  snprintf(f->instance, sizeof(f->instance), "%016llx%016llx", (unsigned long long)r[0], (unsigned long long)r[1]);
  int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0 || dprintf(fd, "%s\n", f->instance) < 0 || fsync(fd) != 0) {
    snprintf(err, errlen, "%s: %s", path, strerror(errno));
    if (fd >= 0) close(fd);
    return -1;
  }
  close(fd);
  return 0;
}

/* One record read back from the spool: a batch goes on the queue, an ack
 * takes its batch off. Returns 0, or -1 (stop: the record is not one of
 * ours). */
static int replay_record(void *arg, int type, const unsigned char *p, uint32_t len) {
  struct sl_flusher *f = arg;
  if (type == REC_BATCH) {
    struct sl_batch *b = sl_spool_decode_batch(p, len);
    if (!b) return -1;
    b->spooled = 1;
    b->created_ms = sl_mono_ms();
    enqueue(f, b);
    stat_add(&f->stats.replayed, 1);
    return 0;
  }
  const unsigned char *id;
  uint8_t idl;
  if (sl_spool_decode_ack(p, len, &id, &idl) != 0) return -1;
  /* Acks come in queue order: the acked batch is the oldest with that id. */
  struct sl_batch **pp = &f->head, *prev = NULL;
  for (; *pp; prev = *pp, pp = &(*pp)->next)
    if ((*pp)->id_len == idl && !memcmp((*pp)->id, id, idl)) {
      struct sl_batch *b = *pp;
      *pp = b->next;
      if (f->tail == b) f->tail = prev;
      f->nqueued--;
      f->queued_counts -= batch_counts(b);
      stat_set(&f->stats.replayed, atomic_load(&f->stats.replayed) - 1);
      free(b);
      break;
    }
  return 0;
}

/* Reads the spool: batches without an ack go back on the queue, in order; a
 * torn record at the end (a crash mid-write) is cut off. */
static int replay_spool(struct sl_flusher *f, char *err, size_t errlen) {
  struct stat st;
  if (fstat(f->spool_fd, &st) != 0) {
    snprintf(err, errlen, "%s: %s", f->spool_path, strerror(errno));
    return -1;
  }
  size_t size = (size_t)st.st_size;
  unsigned char *data = sl_malloc(size ? size : 1);
  size_t got = 0;
  while (got < size) {
    ssize_t r = pread(f->spool_fd, data + got, size - got, (off_t)got);
    if (r <= 0) break;
    got += (size_t)r;
  }
  size_t off = sl_spool_scan(data, got, replay_record, f);
  free(data);
  if (off < size) {
    fprintf(stderr, "sluice: spool %s: %zu trailing bytes are not a whole record (a write cut short): dropped\n",
            f->spool_path, size - off);
    if (ftruncate(f->spool_fd, (off_t)off) != 0) {
      snprintf(err, errlen, "%s: truncate: %s", f->spool_path, strerror(errno));
      return -1;
    }
  }
  f->spool_bytes = off;
  stat_set(&f->stats.spool_bytes, off);
  if (f->nqueued)
    fprintf(stderr, "sluice: metering: %u batch(es) from the spool will be sent first\n", f->nqueued);
  queue_stats(f);
  return 0;
}

int sl_flusher_start(struct sl_flusher *f, const struct sl_config *cfg, struct sl_meter_worker **workers,
                     uv_async_t **worker_wakes, unsigned nworkers, char *err, size_t errlen) {
  f->workers = workers;
  f->worker_wakes = worker_wakes;
  f->nworkers = nworkers;
  f->flush_ms = cfg->flush_ms;
  f->queue_max = cfg->meter_queue_batches;
  f->final_ms = cfg->final_flush_ms;
  f->spool_max = cfg->spool_max_bytes;
  f->spool_fd = -1;
  snprintf(f->prefix, sizeof(f->prefix), "%s", cfg->redis_prefix);
  if (!strncmp(cfg->redis, "unix:", 5)) {
    snprintf(f->host, sizeof(f->host), "%s", cfg->redis + 5);
  } else {
    const char *colon = strrchr(cfg->redis, ':');
    snprintf(f->host, sizeof(f->host), "%.*s", (int)(colon - cfg->redis), cfg->redis);
    f->port = atoi(colon + 1);
  }
  if (mkdir(cfg->spool_dir, 0700) != 0 && errno != EEXIST) {
    snprintf(err, errlen, "spool directory %s: %s", cfg->spool_dir, strerror(errno));
    return -1;
  }
  if (load_instance(f, cfg->spool_dir, cfg->instance_id, err, errlen) != 0) return -1;
  if (getrandom(&f->epoch, sizeof(f->epoch), 0) != sizeof(f->epoch)) f->epoch = uv_hrtime();
  snprintf(f->spool_path, sizeof(f->spool_path), "%s/meter.spool", cfg->spool_dir);
  f->spool_fd = open(f->spool_path, O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  if (f->spool_fd < 0) {
    snprintf(err, errlen, "%s: %s", f->spool_path, strerror(errno));
    return -1;
  }
  if (replay_spool(f, err, errlen) != 0) return -1;
  uint32_t acc_keys = cfg->meter_keys * (nworkers < 4 ? nworkers : 4);
  f->acc = sl_meter_table_new(acc_keys < SL_BATCH_MAX ? SL_BATCH_MAX : acc_keys);
  int r;
  if ((r = uv_loop_init(&f->loop)) != 0) {
    snprintf(err, errlen, "flusher loop: %s", uv_strerror(r));
    return -1;
  }
  uv_async_init(&f->loop, &f->wake, on_wake);
  f->wake.data = f;
  uv_timer_init(&f->loop, &f->tick);
  f->tick.data = f;
  uv_timer_start(&f->tick, on_tick, f->flush_ms, f->flush_ms);
  uv_timer_init(&f->loop, &f->watchdog);
  f->watchdog.data = f;
  f->timeout_ms = cfg->redis_timeout_ms;
  connect_redis(f);
  if ((r = uv_thread_create(&f->thread, flusher_main, f)) != 0) {
    snprintf(err, errlen, "flusher thread: %s", uv_strerror(r));
    return -1;
  }
  return 0;
}

void sl_flusher_stop(struct sl_flusher *f) {
  atomic_store_explicit(&f->final, 1, memory_order_release);
  uv_async_send(&f->wake);
  uv_thread_join(&f->thread);
  uv_run(&f->loop, UV_RUN_DEFAULT);
  uv_loop_close(&f->loop);
  while (f->head) {
    struct sl_batch *b = f->head;
    f->head = b->next;
    free(b);
  }
  sl_meter_table_free(f->acc);
  if (f->spool_fd >= 0) close(f->spool_fd);
}
