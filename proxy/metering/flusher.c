#include "flusher.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "client.h"
#include "db.h"
#include "keys.h"

#include "catalog.h"
#include "common.h"
#include "stat.h"
#include "uv_util.h"

#define ERR_LOG_MS 10000 /* error replies to batches: at most one line per this */

/* A batch is applied exactly once, its Redis work per key as little as the
 * schema allows: the flusher builds every key and field name, one HINCRBY
 * per key into calls and one per billed service into usage, one SADD per
 * day with the batch's UIDs, one stream entry for the whole batch. One
 * server or Sentinel: an optimistic transaction on the batch's marker
 * (send_txn). Redis Cluster: the scripts below. Key names: keys.h. */

/* Redis Cluster (SPEC 10; docs/operations.md): a batch's counts are
 * applied once per slot by a high-water mark, not a marker per batch (issue
 * 14: with many accounts a slot is about one account, so a marker per slot
 * and batch kept ~one key per account and flush for 7 days). The flusher
 * sends one batch at a time, the next only once every part of this one is
 * in Redis, and a restart replays the spool's batches in order before new
 * ones (a new epoch): so for one (instance, epoch) a slot sees the batches
 * in seq order, and "seq <= the slot's mark" means exactly "applied".
 * meter:hwm:{<slot tag>}:<instance>:<epoch> holds the highest seq applied
 * to the slot (the tag first: an instance id with a brace cannot move the
 * key's slot), EX 7 days from its last write (renewed at most once an
 * hour: sl_flusher_mark_ttl_due): at most one key per slot and live epoch.
 * A batch replayed from the spool may have been applied by an earlier
 * version under its marker meter:batch:<id>:{<uid>}: for those only, that
 * marker found means applied too. */

/* A slot of a batch that goes on its own (the one slot of its master in
 * the batch, or one master_script did not run), every key declared, so
 * that a slot being migrated answers ASK or TRYAGAIN for the whole part,
 * never half of it: KEYS[1] the slot's mark, KEYS[2] the old marker of a
 * replayed batch or the mark again, then per key its calls and usage keys
 * (the calls key again when nothing is billed); ARGV: the seq, the key
 * count, then per key the calls field, the count, the number of usage
 * fields and the fields. The mark is set first. */
static const char part_script[] =
    "if tonumber(ARGV[1]) <= (tonumber(redis.call('GET', KEYS[1])) or 0) then return 0 end "
    "if KEYS[2] ~= KEYS[1] and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end "
    "redis.call('SET', KEYS[1], ARGV[1], 'EX', 604800) "
    "local b = 3 "
    "for i = 1, tonumber(ARGV[2]) do "
    "  redis.call('HINCRBY', KEYS[2 * i + 1], ARGV[b], ARGV[b + 1]) "
    "  local u = tonumber(ARGV[b + 2]) "
    "  for j = 1, u do redis.call('HINCRBY', KEYS[2 * i + 2], ARGV[b + 2 + j], ARGV[b + 1]) end "
    "  b = b + 3 + u "
    "end "
    "return 1";

/* Redis Cluster: the slots of a batch's UIDs that one master serves, in
 * one script (issue 14: a script per slot made Redis's per-call cost
 * dominate, about one call per account). Keys of several slots cannot be
 * declared (CROSSSLOT), so none is: Redis 7's allow-cross-slot-keys lets
 * the script touch any slot this node serves, and checks each command.
 * Per slot, an MGET of its probe (a key never written) and its mark under
 * pcall first: an error means the slot is not served here or is being
 * migrated (a missing key of a migrating slot is refused: ASK or TRYAGAIN),
 * and then nothing of it is written here (its keys may be half moved, the
 * mark with them): -1, the flusher sends the slot as its own part_script.
 * Else every key of the slot is here, and the mark decides. Nothing runs
 * between the check and the writes (a script is atomic). A mark that
 * exists keeps its TTL unless the flusher says it is due
 * (sl_flusher_mark_ttl_due): a SET with EX costs Redis about twice one
 * with KEEPTTL, and with many accounts there is about a mark per key
 * (bench/README.md, issue 14). ARGV: the slot count, the seq, then per
 * slot: mark, probe, the old marker of a replayed batch ('' for none), '1'
 * to renew the mark's 7 days ('' to keep its TTL), key count, the number
 * of args that follow for its keys, and per key: calls key, calls field,
 * count, usage key ('' when nothing is billed), the number of usage fields
 * and the fields. Returns an integer per slot: 1 applied, 0 found applied,
 * -1 not run. */
static const char master_script[] =
    "#!lua flags=allow-cross-slot-keys\n"
    "local out, b, s = {}, 3, tonumber(ARGV[2]) "
    "for g = 1, tonumber(ARGV[1]) do "
    "  local n, nb = tonumber(ARGV[b + 4]), b + 6 + tonumber(ARGV[b + 5]) "
    "  local r = redis.pcall('MGET', ARGV[b + 1], ARGV[b]) "
    "  if r.err then out[g] = -1 "
    "  elseif s <= (tonumber(r[2]) or 0) or "
    "         (ARGV[b + 2] ~= '' and redis.call('EXISTS', ARGV[b + 2]) == 1) then out[g] = 0 "
    "  else "
    "    out[g] = 1 "
    "    if r[2] and ARGV[b + 3] == '' then redis.call('SET', ARGV[b], ARGV[2], 'KEEPTTL') "
    "    else redis.call('SET', ARGV[b], ARGV[2], 'EX', 604800) end "
    "    b = b + 6 "
    "    for i = 1, n do "
    "      redis.call('HINCRBY', ARGV[b], ARGV[b + 1], ARGV[b + 2]) "
    "      local u = tonumber(ARGV[b + 4]) "
    "      for j = 1, u do redis.call('HINCRBY', ARGV[b + 3], ARGV[b + 4 + j], ARGV[b + 2]) end "
    "      b = b + 5 + u "
    "    end "
    "  end "
    "  b = nb "
    "end "
    "return out";

/* The batch's usage:stream entry in a cluster, once: KEYS[1] a marker in
 * the stream's slot (meter:batch:<id>:{<tag>}, the tag chosen at start to
 * hash there), KEYS[2] the stream; ARGV: id, key count, deltas. */
static const char stream_script[] =
    "if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', 604800) then return 0 end "
    "redis.call('XADD', KEYS[2], 'MAXLEN', '~', '" SL_USAGE_STREAM_MAXLEN "', '*', "
    "           'batch', ARGV[1], 'keys', ARGV[2], 'deltas', ARGV[3]) "
    "return 1";

/* The flusher's work comes in bursts (a round merges and journals every
 * key the workers saw; a flush makes and sends every batch) and, where the
 * operator pins sluice to the workers' CPUs, on a worker's core: a burst
 * run in one go stalls every request in flight on it (p99). So the loops
 * give the CPU up every SL_FLUSHER_SLICE_KEYS keys (~0.1 ms of work): a
 * runnable worker goes first, an idle CPU makes it a no-op. */
#define SL_FLUSHER_SLICE_KEYS 512
static void breathe(struct sl_flusher *f, unsigned keys) {
  f->slice_keys += keys;
  if (f->slice_keys < SL_FLUSHER_SLICE_KEYS) return;
  f->slice_keys = 0;
  sched_yield();
}

/* ---- the queue ---- */

static uint64_t batch_counts(const struct sl_batch *b) {
  uint64_t n = 0;
  for (uint32_t i = 0; i < b->n; i++) n += b->e[i].count;
  return n;
}

static void queue_stats(struct sl_flusher *f) {
  sl_stat_set(&f->stats.queued, f->nqueued);
  sl_stat_set(&f->stats.queued_counts, f->queued_counts);
  sl_stat_set(&f->stats.oldest_ms, f->head ? f->head->created_ms : 0);
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

/* Whether counts wait between flushes journaled in the spool (the Redis
 * interval is longer than the spool interval); with equal intervals every
 * round flushes, as before the two were separate. */
static int journaling(const struct sl_flusher *f) { return f->flush_ms > f->spool_ms; }

static void send_next(struct sl_flusher *f);
static void on_pace(uv_timer_t *t) { send_next(t->data); }

/* Batches the accumulator's keys would make. */
static unsigned acc_batches(const struct sl_flusher *f) { return (f->acc->n + SL_BATCH_MAX - 1) / SL_BATCH_MAX; }

/* 1 when the accumulator may become batches: the queue takes them within
 * its bound (an empty queue always takes them, so that a bound smaller than
 * one accumulator's worth cannot stop metering), or the process is exiting
 * (the final flush writes everything to Redis or the spool). */
static int queue_has_room(const struct sl_flusher *f) {
  return f->final_started || f->nqueued == 0 || f->nqueued + acc_batches(f) <= f->queue_max;
}

/* Writes t's keys from the from-th on to the spool as delta records: counts
 * gathered but not yet in a batch (the Redis interval is longer than the
 * spool interval), so that a crash loses at most one spool interval. */
static void journal(struct sl_flusher *f, const struct sl_meter_table *t, uint32_t from) {
  struct sl_batch *d = NULL;
  for (uint32_t j = from; j < t->n; j++) {
    const struct sl_meter_entry *e = &t->e[j];
    if (!d) {
      uint32_t left = t->n - j;
      d = sl_batch_new(left < SL_BATCH_MAX ? left : SL_BATCH_MAX);
    }
    d->e[d->n].k = e->k;
    d->e[d->n].count = e->count;
    breathe(f, 1);
    if (++d->n == SL_BATCH_MAX || j + 1 == t->n) {
      sl_spool_delta(&f->spool, d);
      free(d);
      d = NULL;
    }
  }
}

/* A quiet key (fewer counts than this) may wait for later flushes, up to
 * --flush-quiet-ms: Redis's work is per key, so a key of 100 counts costs
 * it a hundredth of a key's work per request, and waiting buys little more. */
#define SL_FLUSH_HOT_COUNT 100

/* 1 when an accumulated key waits for a later flush (--flush-quiet-ms). */
static int quiet_key(const struct sl_meter_entry *e, void *arg) {
  const struct sl_flusher *f = arg;
  return e->count < SL_FLUSH_HOT_COUNT && f->flushes - e->born + 1 < f->quiet_rounds;
}

/* Turns what the accumulator holds into batches of at most SL_BATCH_MAX
 * keys, each allocated for the keys it holds, spools and queues them; with
 * retain, quiet keys stay (quiet_key). When nothing older waits and the
 * spool has grown, the new batches replace the whole file (with the kept
 * keys' counts after them, they cover every delta in it; every batch in it
 * is acked). */
/* The order in which finalize cuts t's keys into batches: by the UID's
 * hash slot (counting sort), so that an account's keys share a batch. In a
 * Redis Cluster the exactly-once work is per slot and batch (a mark read
 * and written): in arrival order a batch of 1000 keys touches ~1000 slots,
 * and each account's slot is marked once per batch it shows up in (6.7
 * times a flush in the bench's API mix); sorted, about once a flush. With
 * one server the batch's SADD holds fewer UIDs and an account's hashes
 * are written together (bench/metering_cost.sh, 10,000 accounts: Redis
 * CPU per request 1.11 -> 0.80 us; cluster 2.62 -> 1.76). The caller
 * frees the array. */
static uint32_t *slot_order(const struct sl_meter_table *t) {
  uint32_t *start = sl_calloc(SL_CLUSTER_SLOTS + 1, sizeof *start), *order = sl_malloc(t->n * sizeof *order);
  uint16_t *slot = sl_malloc(t->n * sizeof *slot);
  for (uint32_t j = 0; j < t->n; j++) {
    slot[j] = (uint16_t)sl_db_uid_slot(t->e[j].k.uid, t->e[j].k.uid_len);
    start[slot[j] + 1]++;
  }
  for (unsigned s = 1; s <= SL_CLUSTER_SLOTS; s++) start[s] += start[s - 1];
  for (uint32_t j = 0; j < t->n; j++) order[start[slot[j]]++] = j;
  free(slot);
  free(start);
  return order;
}

static void finalize(struct sl_flusher *f, int retain) {
  struct sl_meter_table *t = f->acc;
  if (t->n == 0) return;
  retain = retain && f->quiet_rounds > 1;
  struct sl_batch *b = NULL, *first = NULL, **link = &first;
  unsigned nb = 0;
  uint32_t kept = 0;
  size_t bytes = 0;
  uint64_t counted = 0;
  uint32_t *order = slot_order(t);
  for (uint32_t j = 0; j < t->n; j++) {
    const struct sl_meter_entry *e = &t->e[order[j]];
    if (retain && quiet_key(e, f)) {
      kept++;
      continue;
    }
    if (!b) {
      uint32_t left = t->n - j;
      b = sl_batch_new(left < SL_BATCH_MAX ? left : SL_BATCH_MAX);
      b->created_ms = sl_mono_ms();
      int l = snprintf(b->id, sizeof(b->id), "%s:%016llx:%llu", f->instance, (unsigned long long)f->epoch,
                       (unsigned long long)++f->seq);
      b->id_len = (uint8_t)l;
    }
    b->e[b->n].k = e->k;
    b->e[b->n].count = e->count;
    counted += e->count;
    breathe(f, 1);
    if (++b->n == SL_BATCH_MAX) {
      bytes += sl_spool_batch_size(b);
      *link = b;
      link = &b->next;
      nb++;
      b = NULL;
    }
  }
  free(order);
  if (b) {
    bytes += sl_spool_batch_size(b);
    *link = b;
    nb++;
  }
  if (nb == 0) return; /* all quiet: they stay, journaled as they came */
  if (kept)
    sl_meter_table_retain(t, quiet_key, f);
  else
    sl_meter_table_clear(t);
  int rewritten = 0;
  if (f->nqueued == 0 && sl_spool_should_compact(&f->spool) && bytes <= f->spool.max) {
    unsigned char *buf = sl_malloc(bytes), *p = buf;
    for (struct sl_batch *x = first; x; x = x->next) {
      p += sl_spool_encode_batch(x, p);
      breathe(f, x->n);
    }
    if (sl_spool_rewrite(&f->spool, buf, (size_t)(p - buf)) == 0) {
      rewritten = 1;
      for (struct sl_batch *x = first; x; x = x->next) x->spooled = 1;
    }
    free(buf);
  }
  /* Paced: one interval's batches go over the first half of the next
   * interval, not in one burst of Redis work; a backlog goes at once. */
  f->pace_ms = nb > 1 && f->nqueued == 0 ? f->flush_ms / (2 * nb) : 0;
  while (first) {
    struct sl_batch *x = first;
    first = x->next;
    x->next = NULL;
    if (!rewritten) {
      sl_spool_batch(&f->spool, x);
      breathe(f, x->n);
    }
    enqueue(f, x);
  }
  /* The keys kept, whole, after the batches: a batch covers every delta
   * before it in the spool, theirs too. */
  if (kept) journal(f, t, 0);
  queue_stats(f);
  /* Made and counted only now that the batches show in the queue, and
   * released: /metrics reads these first, so a reader that sees requests
   * counted and then an empty queue knows them applied. */
  sl_stat_inc_release(&f->stats.batches, nb);
  sl_stat_inc_release(&f->stats.counted, counted);
}

/* Merges a worker's table into the accumulator; when the accumulator fills
 * up, what it holds becomes batches early and the merge goes on (the rest
 * journaled when this round makes no batches). Returns 0, or -ENOBUFS
 * (nothing merged) when the accumulator might not hold the table's keys and
 * the queue has no room for what it holds: the table then stays with its
 * worker. */
static int merge_table(struct sl_flusher *f, const struct sl_meter_table *t) {
  if (f->acc->n + t->n > f->acc->limit && !queue_has_room(f)) return -ENOBUFS;
  uint32_t from = 0; /* t's keys before it are in batches */
  for (uint32_t j = 0; j < t->n; j++) {
    const struct sl_meter_entry *e = &t->e[j];
    breathe(f, 1);
    if (sl_meter_add(f->acc, &e->k, e->hash, e->count) == 0) continue;
    /* Full (a table fits an empty accumulator: it holds at least one). */
    finalize(f, 0);
    from = j;
    sl_meter_add(f->acc, &e->k, e->hash, e->count);
  }
  if (f->journal) journal(f, t, from);
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
/* ---- Redis (client.h: connect, timeouts, backoff, "down" lines) ---- */

int sl_flusher_reply_kind(const struct redisReply *r) {
  if (!r) return SL_REPLY_LOST;
  if (r->type == REDIS_REPLY_INTEGER && r->integer == 1) return SL_REPLY_APPLIED;
  if (r->type == REDIS_REPLY_INTEGER && r->integer == 0) return SL_REPLY_DUPLICATE;
  return SL_REPLY_ERROR;
}

/* Replicas a batch must be on before it is acked: --redis-wait-replicas, or
 * with auto (-1) 1 when the master's ROLE listed a connected replica (at
 * connect, and at the client's idle probes), else 0 (no WAIT). */
static int wait_replicas(const struct sl_flusher *f, unsigned slot) {
  if (f->wait_replicas >= 0) return f->wait_replicas;
  return sl_db_replicas(f->redis, slot) > 0;
}

static void acked(struct sl_flusher *f, struct sl_batch *b, int kind);

/* One command of the batch in flight (its EVAL, or a cluster's SADD of a
 * day's set) and then its WAIT. */
struct part {
  uint64_t gen;   /* the send it belongs to (f->gen): a reply to an older one is dropped */
  size_t txn_cmds; /* one server: the commands its EXEC answers */
  int txn_again;   /* one server: EXECs answered nil so far */
  int marker_kind; /* one server: what the marker's GET said (sl_flusher_marker_kind) */
  int watched;     /* one server: WATCH answered OK */
  unsigned slot;  /* where it goes (and its WAIT after it) */
  int plain;      /* a plain command (SADD, idempotent): any integer reply is success */
  int kind;       /* SL_REPLY_APPLIED or _DUPLICATE once the command is answered */
  int need;       /* > 0: WAIT was sent for this many replicas */
};

enum { PART_OK, PART_LOST, PART_SHORT, PART_ERROR }; /* how a part ended, worst last */

/* Every part of the batch in flight has ended: acked when each is in Redis
 * (and, where WAIT is on, on enough replicas); else the whole batch goes
 * again (parts applied before are no-ops through their markers). */
static void parts_done(struct sl_flusher *f) {
  struct sl_batch *b = f->inflight;
  f->inflight = NULL;
  if (f->part_worst == PART_OK) {
    acked(f, b, f->part_applied ? SL_REPLY_APPLIED : SL_REPLY_DUPLICATE);
    return;
  }
  sl_stat_inc(&f->stats.retried, 1);
  uint64_t now = sl_mono_ms();
  f->retry_at_ms = now + (f->part_worst == PART_ERROR ? 500 : 200);
  /* one server: a lost connection is retried on its next PING (on_redis_ready) */
  if (sl_db_cluster(f->redis)) uv_timer_start(&f->pace, on_pace, f->retry_at_ms - now, 0);
}

static void part_end(struct sl_flusher *f, struct part *p, int how) {
  if (how > f->part_worst) f->part_worst = how;
  if (how == PART_OK && p->kind == SL_REPLY_APPLIED) f->part_applied = 1;
  free(p);
  if (--f->parts_left == 0) parts_done(f);
}

static void on_part(void *owner, void *priv, const redisReply *r);
static void part_in_redis(struct sl_flusher *f, struct part *p, int kind);

/* WAIT's reply: fewer replicas than needed keeps the batch (sent again: on
 * this master its markers make that a no-op, then WAIT again; a new master
 * that never got it applies it once). */
static void part_waited(struct sl_flusher *f, struct part *p, const redisReply *r) {
  if (!r) {
    part_end(f, p, PART_LOST);
    return;
  }
  if (r->type == REDIS_REPLY_INTEGER && r->integer >= p->need) {
    part_end(f, p, PART_OK);
    return;
  }
  uint32_t held;
  if (sl_ratelog_ok(&f->log_wait, sl_mono_ms(), ERR_LOG_MS, &held)) {
    char w[160], e[100];
    if (r->type == REDIS_REPLY_INTEGER)
      snprintf(w, sizeof(w), "%lld of %d replica(s) have it after %u ms", r->integer, p->need, f->wait_ms);
    else
      snprintf(w, sizeof(w), "WAIT answered '%s'",
               r->type == REDIS_REPLY_ERROR ? sl_printable(e, sizeof(e), r->str, r->len) : "an unexpected reply");
    fprintf(stderr, "sluice: metering batch %.*s: in Redis, but %s: kept and sent again (said at most every %d s)\n",
            f->inflight->id_len, f->inflight->id, w, ERR_LOG_MS / 1000);
  }
  part_end(f, p, PART_SHORT);
}

/* An error reply to the batch in flight (r: NULL when what says it all),
 * said at most every ERR_LOG_MS. */
static void batch_error(struct sl_flusher *f, const char *what, const redisReply *r) {
  uint32_t held;
  f->errors++;
  if (!sl_ratelog_ok(&f->log_err, sl_mono_ms(), ERR_LOG_MS, &held)) return;
  char w[220];
  fprintf(stderr, "sluice: metering batch %.*s: %s%s (%llu error(s) so far, said at most every %d s)\n",
          f->inflight->id_len, f->inflight->id, what,
          !r ? "" : r->type == REDIS_REPLY_ERROR ? sl_printable(w, sizeof(w), r->str, r->len) : "an unexpected reply",
          (unsigned long long)f->errors, ERR_LOG_MS / 1000);
}

/* A reply's part (db.h: owner NULL when its connection was dropped, and
 * on_redis_down counted the retry, or the flusher is stopping), or NULL
 * (and freed) when it belongs to no send in flight. */
static struct part *current_part(const struct sl_flusher *f, struct part *p) {
  if (f && p->gen == f->gen && f->inflight) return p;
  free(p);
  return NULL;
}

/* A part's reply. */
static void on_part(void *owner, void *priv, const redisReply *r) {
  struct sl_flusher *f = owner;
  struct part *p = current_part(f, priv);
  if (!p) return;
  if (p->need) {
    part_waited(f, p, r);
    return;
  }
  int kind = p->plain ? (!r ? SL_REPLY_LOST : r->type == REDIS_REPLY_INTEGER ? SL_REPLY_APPLIED : SL_REPLY_ERROR)
                      : sl_flusher_reply_kind(r);
  if (kind == SL_REPLY_LOST) { /* the reply may be lost with its connection: resent with the same id */
    part_end(f, p, PART_LOST);
    return;
  }
  if (kind == SL_REPLY_ERROR) {
    batch_error(f, "retrying: ", r);
    part_end(f, p, PART_ERROR);
    return;
  }
  part_in_redis(f, p, kind);
}

/* p's command is in Redis (kind: applied now or found applied): then WAIT
 * on its master where that is on, else p has ended. */
static void part_in_redis(struct sl_flusher *f, struct part *p, int kind) {
  p->kind = kind;
  int need = wait_replicas(f, p->slot);
  if (need > 0) { /* acked once on that many replicas: a failover cannot lose it (SPEC 10) */
    char nb[16], ms[16];
    const char *argv[] = {"WAIT", nb, ms};
    size_t lens[] = {4, (size_t)snprintf(nb, sizeof nb, "%d", need), (size_t)snprintf(ms, sizeof ms, "%u", f->wait_ms)};
    p->need = need;
    if (sl_db_command(f->redis, p->slot, on_part, p, 3, argv, lens) != 0) part_end(f, p, PART_LOST);
    return;
  }
  part_end(f, p, PART_OK);
}

/* Sends one part of the batch in flight (f->gen's send). */
static void send_part(struct sl_flusher *f, unsigned slot, int plain, int argc, const char **argv,
                      const size_t *lens) {
  struct part *p = sl_calloc(1, sizeof *p);
  *p = (struct part){.gen = f->gen, .slot = slot, .plain = plain};
  if (sl_db_command(f->redis, slot, on_part, p, argc, argv, lens) != 0) {
    free(p);
    if (PART_LOST > f->part_worst) f->part_worst = PART_LOST;
    return;
  }
  f->parts_left++;
}

/* b, the head, is in Redis (kind: applied now or found applied) and, where
 * WAIT is on, on enough replicas: it leaves the queue and the spool. */
static void acked(struct sl_flusher *f, struct sl_batch *b, int kind) {
  sl_stat_inc(kind == SL_REPLY_APPLIED ? &f->stats.applied : &f->stats.deduplicated, 1);
  uint64_t lat = (sl_mono_ms() - b->created_ms) * 1000;
  sl_stat_inc(&f->stats.flush_latency_us_sum, lat);
  if (lat > atomic_load_explicit(&f->stats.flush_latency_us_max, memory_order_relaxed))
    sl_stat_set(&f->stats.flush_latency_us_max, lat);
  /* b is the head: applied in order. */
  f->head = b->next;
  if (!f->head) f->tail = NULL;
  f->nqueued--;
  f->queued_counts -= batch_counts(b);
  sl_spool_ack(&f->spool, b);
  free(b);
  /* Everything acked and nothing journaled waits: start afresh so that the
   * spool does not grow. */
  if (!f->head && (f->acc->n == 0 || !journaling(f))) sl_spool_compact(&f->spool);
  f->next_send_ms = sl_mono_ms() + f->pace_ms;
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

/* Appends s[0..n) to the argument buffer and names it as the next arg. */
struct args {
  const char **argv;
  size_t *lens;
  size_t a;
  char *buf, *p;
};

static void arg(struct args *x, const char *s, size_t n) {
  x->argv[x->a] = s;
  x->lens[x->a++] = n;
}

/* Copies the pieces into the buffer and names them as one arg. */
static void arg_cat(struct args *x, const char *a, size_t an, const char *b, size_t bn, const char *c, size_t cn) {
  char *start = x->p;
  memcpy(x->p, a, an), x->p += an;
  memcpy(x->p, b, bn), x->p += bn;
  memcpy(x->p, c, cn), x->p += cn;
  arg(x, start, (size_t)(x->p - start));
}

static void arg_num(struct args *x, uint64_t v) {
  size_t l = sl_u64toa(v, x->p);
  arg(x, x->p, l);
  x->p += l + 1;
}

/* The names a key is written under: "<feature>:<region>" (into out, the
 * usage field; the calls field appends ":<outcome>"). Returns its length. */
static size_t field_fr(const struct sl_meter_key *k, char *out) {
  const char *fname, *tier, *o;
  sl_flusher_key_names(k, &fname, &tier, &o);
  size_t fl = strlen(fname);
  memcpy(out, fname, fl);
  out[fl] = ':';
  memcpy(out + fl + 1, k->region, k->region_len);
  return fl + 1 + k->region_len;
}

/* The key's calls field "<feature>:<region>:<outcome>" as an arg. */
static void arg_calls_field(struct args *x, const struct sl_meter_key *k) {
  char fr[64 + SL_REGION_MAX];
  const char *fname, *tier, *o;
  sl_flusher_key_names(k, &fname, &tier, &o);
  arg_cat(x, fr, field_fr(k, fr), ":", 1, o, strlen(o));
}

/* Whether a key's count goes to usage: an ok of a billable Action. */
static int billed(const struct sl_meter_key *k) { return k->outcome == SL_OUT_OK && k->billable; }

static int ows(char c) { return c == ' ' || c == '\t'; }

/* The services a billed key names, each once, in order: the Service split
 * at commas, each item without the spaces around it ("a, b" is a and b: a
 * backend that trims bills b, and " b" would name a service with no price
 * in the rating), empty items skipped; "-" when it names none (SPEC 6).
 * Returns their number (at least 1). */
static size_t services(const struct sl_meter_key *k, const char **svc, size_t *svl) {
  size_t ns = 0;
  for (size_t i = 0; i < k->service_len;) {
    size_t j = i;
    while (j < k->service_len && k->service[j] != ',') j++;
    size_t a = i, b = j;
    while (a < b && ows(k->service[a])) a++;
    while (b > a && ows(k->service[b - 1])) b--;
    if (b > a) {
      int dup = 0;
      for (size_t q = 0; q < ns && !dup; q++) dup = svl[q] == b - a && !memcmp(svc[q], k->service + a, b - a);
      if (!dup) {
        svc[ns] = k->service + a;
        svl[ns++] = b - a;
      }
    }
    i = j + 1;
  }
  if (ns == 0) {
    svc[0] = "-";
    svl[0] = 1;
    ns = 1;
  }
  return ns;
}

/* The batch's usage:stream deltas from p on: "<day>:<uid>:<feature>:<region>:<tier>:<outcome> <count>"
 * and the services billed, a line per key. Returns the end. */
static char *deltas_text(const struct sl_batch *b, char *p) {
  for (uint32_t i = 0; i < b->n; i++) {
    const struct sl_meter_key *k = &b->e[i].k;
    const char *fname, *tier, *o;
    sl_flusher_key_names(k, &fname, &tier, &o);
    p += sl_u64toa(k->day, p);
    *p++ = ':';
    memcpy(p, k->uid, k->uid_len), p += k->uid_len;
    *p++ = ':';
    p += field_fr(k, p);
    p += sprintf(p, ":%s:%s ", tier, o);
    p += sl_u64toa(b->e[i].count, p);
    if (billed(k)) { /* the services billed, once each ("-": none named) */
      *p++ = ' ';
      const char *svc[SL_METER_SERVICE_MAX / 2 + 1];
      size_t svl[SL_METER_SERVICE_MAX / 2 + 1];
      size_t ns = services(k, svc, svl);
      for (size_t j = 0; j < ns; j++) {
        if (j) *p++ = ',';
        memcpy(p, svc[j], svl[j]), p += svl[j];
      }
    }
    *p++ = '\n';
  }
  return p;
}

/* A billed key's usage fields "<feature>:<service>:<region>", one per
 * service, as args after a count arg set here. */
static void usage_fields(struct args *x, const struct sl_meter_key *k) {
  const char *fname, *tier, *o;
  sl_flusher_key_names(k, &fname, &tier, &o);
  size_t count_at = x->a, nf = 0;
  arg(x, "", 0);
  const char *svc[SL_METER_SERVICE_MAX / 2 + 1];
  size_t svl[SL_METER_SERVICE_MAX / 2 + 1];
  size_t ns = services(k, svc, svl), fnl = strlen(fname);
  for (size_t j = 0; j < ns; j++) {
    char *start = x->p;
    memcpy(x->p, fname, fnl), x->p += fnl;
    *x->p++ = ':';
    memcpy(x->p, svc[j], svl[j]), x->p += svl[j];
    *x->p++ = ':';
    memcpy(x->p, k->region, k->region_len), x->p += k->region_len;
    arg(x, start, (size_t)(x->p - start));
    nf++;
  }
  size_t l = sl_u64toa(nf, x->p);
  x->argv[count_at] = x->p;
  x->lens[count_at] = l;
  x->p += l + 1;
}

static void send_single(struct sl_flusher *f);
static struct args args_new(const struct sl_flusher *f, const struct sl_batch *b);
static void args_free(struct args *x);
static void send_cluster(struct sl_flusher *f, struct sl_batch *b, struct args *xp);

static void send_next(struct sl_flusher *f) {
  if (!sl_db_ready(f->redis) || f->inflight || !f->head) return;
  uint64_t now = sl_mono_ms();
  if (now < f->retry_at_ms) return;
  if (now < f->next_send_ms && !f->final_started) { /* paced: Redis's work spread over the interval */
    uv_timer_start(&f->pace, on_pace, f->next_send_ms - now, 0);
    return;
  }
  struct sl_batch *b = f->head;
  f->inflight = b;
  f->gen++;
  f->parts_left = 0;
  f->part_worst = PART_OK;
  f->part_applied = 0;
  if (sl_db_cluster(f->redis)) {
    struct args x = args_new(f, b);
    send_cluster(f, b, &x);
    args_free(&x);
  } else {
    send_single(f);
  }
  if (f->parts_left == 0) parts_done(f); /* none could go */
}

/* Argument arrays and a buffer big enough for any command made of b's keys
 * (its one EVAL, or in a cluster any of its parts); args_free frees them. */
static struct args args_new(const struct sl_flusher *f, const struct sl_batch *b) {
  size_t plen = strlen(f->prefix), n = b->n;
  /* per key 5 args and a usage field per service (at most 64: a Service
   * is at most 127 bytes), + at most 1 SADD member, + 2 per SADD group, or
   * in a master's script 5 per slot (mark, probe, old marker, 2 counts) */
  size_t argc = 8 + (5 + SL_METER_SERVICE_MAX / 2 + 1) * n + 6 * n + 2;
  struct args x = {.argv = sl_malloc(argc * sizeof(char *)), .lens = sl_malloc(argc * sizeof(size_t))};
  /* names: calls key and usage key (prefix + "usage:" + day + ":" + uid),
   * fields, counts; the deltas text: a line per key */
  /* The buffer every name is built in, sized per key: calls and usage key
   * names, fields, numbers, the SADD set names, the stream line. */
  size_t cap = 64;
  for (uint32_t i = 0; i < n; i++) {
    const struct sl_meter_key *k = &b->e[i].k;
    size_t key_name = plen + 16 + k->uid_len, field = 40 + k->region_len;
    size_t per = 3 * key_name + 2 * field + 3 * 24 + (field + k->uid_len + 64) + k->service_len + 8;
    if (billed(k)) {
      const char *svc[SL_METER_SERVICE_MAX / 2 + 1];
      size_t svl[SL_METER_SERVICE_MAX / 2 + 1];
      size_t ns = services(k, svc, svl);
      per += ns * (field + 2) + k->service_len + 2;
    }
    /* a cluster: a slot's mark, probe and old marker, the seq */
    cap += per + 3 * plen + 2 * sizeof(b->id) + k->uid_len + 96;
  }
  cap += 2 * plen + 2 * sizeof(b->id) + 256; /* a cluster: the stream's marker and name */
  x.buf = x.p = sl_malloc(cap);
  return x;
}

static void args_free(struct args *x) {
  free(x->argv);
  free(x->lens);
  free(x->buf);
}

/* One server or Sentinel: a batch is an optimistic transaction, not a
 * script (issue 12: Redis spends about a quarter less per key on queued
 * commands than on the same commands called from Lua, measured in
 * bench/README.md). WATCH the batch's marker P meter:batch:<id>, GET it,
 * MULTI (one round trip): set means applied before (a duplicate: DISCARD).
 * Else the marker's SET, the HINCRBYs, the days' SADDs, the stream entry,
 * EXEC: all or nothing, and
 * nothing if the marker changed after the WATCH (EXEC answers nil, and the
 * marker is read again). So a batch applies once even when the EXEC's reply
 * is lost, or when a dropped connection's EXEC reaches Redis after the
 * resend's GET: one of the two EXECs finds the marker changed. */
#define SL_TXN_AGAIN_MAX 3 /* EXECs answered nil in a row before the batch waits for the retry delay */

static void on_txn_step(void *owner, void *priv, const redisReply *r) {
  (void)owner, (void)priv, (void)r; /* QUEUED (EXEC's reply tells), DISCARD, UNWATCH */
}

static int send_watch(struct sl_flusher *f, struct part *p);
static void on_txn_exec(void *owner, void *priv, const redisReply *r);

/* The marker's name for b into buf (cap bytes): its length. */
static size_t marker_name(const struct sl_flusher *f, const struct sl_batch *b, char *buf, size_t cap) {
  return (size_t)snprintf(buf, cap, "%s" SL_KEY_METER_BATCH "%.*s", f->prefix, (int)b->id_len, b->id);
}

/* The transaction's commands for the batch in flight; p->txn_cmds counts
 * what EXEC will answer. Returns 0, or -1 when the connection is gone. */
static int send_txn(struct sl_flusher *f, struct part *p) {
  struct sl_batch *b = f->inflight;
  struct args x = args_new(f, b);
  size_t plen = strlen(f->prefix), n = b->n;
  char mk[sizeof(f->prefix) + sizeof(SL_KEY_METER_BATCH) + sizeof(b->id)];
  size_t mkl = marker_name(f, b, mk, sizeof(mk));
  int rc = 0;
  p->txn_cmds = 0;
#define SEND()                                                                                    \
  do {                                                                                            \
    if (!rc) rc = sl_db_command(f->redis, 0, on_txn_step, NULL, (int)x.a, x.argv, x.lens);         \
    p->txn_cmds++;                                                                                \
    x.a = 0;                                                                                      \
    x.p = x.buf;                                                                                  \
  } while (0)
  arg(&x, "SET", 3), arg(&x, mk, mkl), arg(&x, "1", 1), arg(&x, "EX", 2), arg(&x, "604800", 6);
  SEND();
  char daybuf[16];
  for (uint32_t i = 0; i < n; i++) {
    const struct sl_meter_key *k = &b->e[i].k;
    breathe(f, 1);
    size_t dl = sl_u64toa(k->day, daybuf);
    daybuf[dl++] = ':';
    arg(&x, "HINCRBY", 7);
    arg_cat(&x, f->prefix, plen, SL_KEY_CALLS, SL_KEYLEN(SL_KEY_CALLS), daybuf, dl);
    memcpy(x.p, k->uid, k->uid_len), x.p += k->uid_len;
    x.lens[x.a - 1] += k->uid_len;
    arg_calls_field(&x, k);
    arg_num(&x, b->e[i].count);
    SEND();
    if (!billed(k)) continue;
    /* one HINCRBY per service billed: the usage key, then the fields */
    arg_cat(&x, f->prefix, plen, SL_KEY_USAGE, SL_KEYLEN(SL_KEY_USAGE), daybuf, dl);
    memcpy(x.p, k->uid, k->uid_len), x.p += k->uid_len;
    x.lens[x.a - 1] += k->uid_len;
    usage_fields(&x, k);
    const char *ukey = x.argv[0];
    size_t ukl = x.lens[0], nfields = x.a - 2; /* after the key, usage_fields' count and its fields */
    char cnt[24];
    size_t cl = sl_u64toa(b->e[i].count, cnt);
    const char *fields[SL_METER_SERVICE_MAX / 2 + 1];
    size_t fl[SL_METER_SERVICE_MAX / 2 + 1];
    for (size_t j = 0; j < nfields; j++) fields[j] = x.argv[2 + j], fl[j] = x.lens[2 + j];
    for (size_t j = 0; j < nfields; j++) {
      const char *hv[] = {"HINCRBY", ukey, fields[j], cnt};
      size_t hl[] = {7, ukl, fl[j], cl};
      if (!rc) rc = sl_db_command(f->redis, 0, on_txn_step, NULL, 4, hv, hl);
      p->txn_cmds++;
    }
    x.a = 0;
    x.p = x.buf;
  }
  /* One SADD per day with the batch's UIDs that had billable calls (each
   * once: keys of one UID are many, its member is one). Repeats of a (day,
   * UID) are marked first, through a set of the keys' indices (open
   * addressing on the UID's hash): linear in the batch. */
  uint32_t scap = 16;
  while (scap < 2 * n) scap <<= 1;
  uint32_t *set = sl_calloc(scap, sizeof(*set)); /* index + 1; 0 empty */
  for (uint32_t i = 0; i < n; i++) {
    struct sl_batch_entry *e = &b->e[i];
    if (!billed(&e->k)) continue;
    uint32_t h = (uint32_t)(sl_dir_hash(e->k.uid, e->k.uid_len) ^ e->k.day * 0x9e3779b1u);
    for (uint32_t s = h & (scap - 1);; s = (s + 1) & (scap - 1)) {
      if (!set[s]) {
        set[s] = i + 1;
        break;
      }
      const struct sl_meter_key *q = &b->e[set[s] - 1].k;
      if (q->day == e->k.day && q->uid_len == e->k.uid_len && !memcmp(q->uid, e->k.uid, e->k.uid_len)) {
        e->sadd_done = 1; /* an earlier key of this UID and day names it */
        break;
      }
    }
  }
  free(set);
  for (uint32_t i = 0; i < n; i++) {
    const struct sl_meter_key *k = &b->e[i].k;
    if (!billed(k) || b->e[i].sadd_done) continue;
    size_t dl = sl_u64toa(k->day, daybuf);
    arg(&x, "SADD", 4);
    arg_cat(&x, f->prefix, plen, SL_KEY_USAGE, SL_KEYLEN(SL_KEY_USAGE), daybuf, dl);
    for (uint32_t j = i; j < n; j++) {
      struct sl_batch_entry *e = &b->e[j];
      if (!billed(&e->k) || e->k.day != k->day || e->sadd_done) continue;
      e->sadd_done = 1;
      arg(&x, e->k.uid, e->k.uid_len);
    }
    SEND();
  }
  for (uint32_t i = 0; i < n; i++) b->e[i].sadd_done = 0; /* sent again whole after a lost reply */
  char keys[24];
  arg(&x, "XADD", 4);
  arg_cat(&x, f->prefix, plen, SL_KEY_USAGE_STREAM, SL_KEYLEN(SL_KEY_USAGE_STREAM), "", 0);
  arg(&x, "MAXLEN", 6), arg(&x, "~", 1), arg(&x, SL_USAGE_STREAM_MAXLEN, SL_KEYLEN(SL_USAGE_STREAM_MAXLEN));
  arg(&x, "*", 1), arg(&x, "batch", 5), arg(&x, b->id, b->id_len), arg(&x, "keys", 4);
  arg(&x, keys, sl_u64toa(n, keys)), arg(&x, "deltas", 6);
  char *d0 = x.p;
  x.p = deltas_text(b, x.p);
  arg(&x, d0, (size_t)(x.p - d0));
  SEND();
#undef SEND
  args_free(&x);
  const char *exec = "EXEC";
  size_t el = 4;
  if (!rc) rc = sl_db_command(f->redis, 0, on_txn_exec, p, 1, &exec, &el);
  return rc ? -1 : 0;
}

int sl_flusher_marker_kind(const struct redisReply *r) {
  if (!r) return SL_REPLY_LOST;
  if (r->type == REDIS_REPLY_NIL) return SL_REPLY_NOT_YET;
  if (r->type == REDIS_REPLY_STRING) return SL_REPLY_DUPLICATE;
  return SL_REPLY_ERROR;
}

int sl_flusher_exec_kind(const struct redisReply *r, size_t cmds) {
  if (!r) return SL_REPLY_LOST;
  if (r->type == REDIS_REPLY_NIL) return SL_REPLY_AGAIN;
  if (r->type == REDIS_REPLY_ARRAY && r->elements == cmds) return SL_REPLY_APPLIED;
  return SL_REPLY_ERROR;
}

static void on_txn_exec(void *owner, void *priv, const redisReply *r) {
  struct sl_flusher *f = owner;
  struct part *p = current_part(f, priv);
  if (!p) return;
  switch (sl_flusher_exec_kind(r, p->txn_cmds)) {
  case SL_REPLY_LOST:
    part_end(f, p, PART_LOST);
    return;
  case SL_REPLY_AGAIN: /* the marker changed since the WATCH: read it again */
    if (++p->txn_again < SL_TXN_AGAIN_MAX) {
      if (send_watch(f, p) != 0) part_end(f, p, PART_LOST);
      return;
    }
    batch_error(f, "retrying: its marker kept changing", NULL);
    part_end(f, p, PART_ERROR);
    return;
  case SL_REPLY_APPLIED:
    /* A command refused inside (a key of the wrong type, written by
     * someone else): the rest is applied, those counts are not. */
    for (size_t i = 0; i < r->elements; i++)
      if (r->element[i]->type == REDIS_REPLY_ERROR) {
        batch_error(f, "applied, but a command was refused, its counts are not in Redis: ", r->element[i]);
        break;
      }
    part_in_redis(f, p, SL_REPLY_APPLIED);
    return;
  default: /* EXECABORT (a command refused while queued), or no transaction */
    batch_error(f, "retrying: ", r);
    part_end(f, p, PART_ERROR);
  }
}

/* WATCH's and the marker's GET's replies: kept for MULTI's reply, which
 * follows on the same connection and decides (p stays owned by that
 * callback). */
static void on_watch(void *owner, void *priv, const redisReply *r) {
  struct sl_flusher *f = owner;
  struct part *p = priv;
  if (!f || p->gen != f->gen || !f->inflight) return;
  p->watched = r && r->type == REDIS_REPLY_STATUS;
  if (!p->watched && r) batch_error(f, "retrying: WATCH refused: ", r);
}

static void on_marker(void *owner, void *priv, const redisReply *r) {
  struct sl_flusher *f = owner;
  struct part *p = priv;
  if (!f || p->gen != f->gen || !f->inflight) return;
  p->marker_kind = sl_flusher_marker_kind(r);
  if (p->marker_kind == SL_REPLY_ERROR) batch_error(f, "retrying: reading its marker: ", r);
}

/* MULTI's reply, after WATCH's and the marker's: watched, not applied yet
 * and MULTI taken: the body and EXEC; found applied: DISCARD (which also
 * unwatches). WATCH or MULTI refused (an ACL, a renamed command): no body,
 * since it would run unguarded or command by command. */
static void on_multi(void *owner, void *priv, const redisReply *r) {
  struct sl_flusher *f = owner;
  struct part *p = current_part(f, priv);
  if (!p) return;
  if (!r || p->marker_kind == SL_REPLY_LOST) {
    part_end(f, p, PART_LOST);
    return;
  }
  int in_multi = r->type == REDIS_REPLY_STATUS && r->len == 2 && !memcmp(r->str, "OK", 2);
  if (!in_multi) batch_error(f, "retrying: MULTI refused: ", r);
  if (in_multi && p->watched && p->marker_kind == SL_REPLY_NOT_YET) {
    if (send_txn(f, p) != 0) part_end(f, p, PART_LOST);
    return;
  }
  const char *cmd = in_multi ? "DISCARD" : "UNWATCH";
  size_t cl = strlen(cmd);
  sl_db_command(f->redis, 0, on_txn_step, NULL, 1, &cmd, &cl);
  if (in_multi && p->marker_kind == SL_REPLY_DUPLICATE)
    part_in_redis(f, p, SL_REPLY_DUPLICATE);
  else
    part_end(f, p, PART_ERROR);
}

/* WATCH and GET of the batch in flight's marker, and MULTI, in one round
 * trip; p is its part. Returns 0, or -1 when the connection is gone. */
static int send_watch(struct sl_flusher *f, struct part *p) {
  char mk[sizeof(f->prefix) + sizeof(SL_KEY_METER_BATCH) + sizeof(f->inflight->id)];
  size_t mkl = marker_name(f, f->inflight, mk, sizeof(mk));
  const char *w[] = {"WATCH", mk}, *g[] = {"GET", mk}, *m = "MULTI";
  size_t wl[] = {5, mkl}, gl[] = {3, mkl}, ml = 5;
  p->marker_kind = SL_REPLY_LOST;
  p->watched = 0;
  if (sl_db_command(f->redis, 0, on_watch, p, 2, w, wl) != 0 ||
      sl_db_command(f->redis, 0, on_marker, p, 2, g, gl) != 0)
    return -1;
  return sl_db_command(f->redis, 0, on_multi, p, 1, &m, &ml) != 0 ? -1 : 0;
}

static void send_single(struct sl_flusher *f) {
  struct part *p = sl_calloc(1, sizeof *p);
  *p = (struct part){.gen = f->gen};
  if (send_watch(f, p) != 0) { /* the connection is gone: nothing answers p */
    free(p);
    f->part_worst = PART_LOST;
    return;
  }
  f->parts_left++;
}

/* The name <prefix><head><day>:{<uid>} into the args (cluster form). */
static void arg_uid_key(struct sl_flusher *f, struct args *x, const char *head, size_t hl, const struct sl_meter_key *k) {
  char h[128];
  int l = snprintf(h, sizeof h, "%s%.*s%llu:", f->prefix, (int)hl, head, (unsigned long long)k->day);
  int n = sl_db_uid_key(f->redis, x->p, 128 + k->uid_len + 8, h, (size_t)l, k->uid, k->uid_len, "", 0);
  if (n < 0) n = snprintf(x->p, 128 + k->uid_len + 8, "%s%.*s", h, (int)k->uid_len, k->uid); /* a UID with a brace */
  arg(x, x->p, (size_t)n);
  x->p += n + 1;
}

/* A UID with a brace cannot be a tag: its keys keep the plain names. */
static int uid_plain(const struct sl_meter_key *k) {
  return memchr(k->uid, '{', k->uid_len) || memchr(k->uid, '}', k->uid_len);
}

/* The batch's keys as cluster.h's group keys, sorted: by master in m (NULL:
 * none, by slot alone), slot, index. A slot's keys are one run whatever m
 * says, so its marker is the same on either path. A slot with a key of a
 * UID with a brace never joins a master's script (plain names: the slot
 * is that of the UID read as a key, and the part declares them all). The
 * caller frees the array. */
static uint64_t *group_keys(const struct sl_batch *b, const struct sl_cluster_map *m) {
  uint64_t *keys = sl_malloc((b->n ? b->n : 1) * sizeof *keys);
  uint8_t alone[SL_CLUSTER_SLOTS / 8] = {0}; /* slots with such a key */
  for (uint32_t i = 0; i < b->n; i++) {
    const struct sl_meter_key *k = &b->e[i].k;
    int plain = uid_plain(k);
    unsigned slot = plain ? sl_cluster_key_slot(k->uid, k->uid_len) : sl_db_uid_slot(k->uid, k->uid_len);
    if (plain) alone[slot / 8] |= (uint8_t)(1u << slot % 8);
    keys[i] = slot;
  }
  for (uint32_t i = 0; i < b->n; i++) {
    unsigned slot = (unsigned)keys[i];
    keys[i] = sl_cluster_group_key(alone[slot / 8] & 1u << slot % 8 ? NULL : m, slot, i);
  }
  sl_cluster_group_sort(keys, b->n);
  return keys;
}

/* The marker an earlier version set for a slot of batch b, meter:batch:<id>:{<uid>}
 * (the UID of the slot's lowest-index key in the batch), into the args:
 * for a replayed batch. Returns its arg, or NULL with '' added when there
 * is none to look for: a batch made by this process, or an id with a
 * brace (such a marker was never in that slot). */
static const char *arg_old_marker(struct sl_flusher *f, struct args *x, const struct sl_batch *b,
                                  const struct sl_meter_key *k0) {
  if (!b->replayed || memchr(b->id, '{', b->id_len) || memchr(b->id, '}', b->id_len)) {
    arg(x, "", 0);
    return NULL;
  }
  char head[160];
  int hl = snprintf(head, sizeof head, "%s" SL_KEY_METER_BATCH "%.*s:", f->prefix, b->id_len, b->id);
  int ml = sl_db_uid_key(f->redis, x->p, (size_t)hl + k0->uid_len + 4, head, (size_t)hl, k0->uid, k0->uid_len, "", 0);
  if (ml < 0) ml = snprintf(x->p, (size_t)hl + k0->uid_len + 4, "%s%.*s", head, (int)k0->uid_len, k0->uid);
  arg(x, x->p, (size_t)ml);
  x->p += ml + 1;
  return x->argv[x->a - 1];
}

/* A batch id <instance>:<epoch>:<seq> (finalize): *stem_len the bytes of
 * "<instance>:<epoch>", and the seq. An id of another form (none is made)
 * is a stem of its own with seq 1: applied once all the same. */
static uint64_t batch_seq(const struct sl_batch *b, size_t *stem_len) {
  size_t at = b->id_len;
  while (at > 0 && b->id[at - 1] != ':') at--;
  uint64_t seq = 0;
  int ok = at > 0 && at < b->id_len && b->id_len - at <= 19;
  for (size_t i = at; ok && i < b->id_len; i++) {
    ok = b->id[i] >= '0' && b->id[i] <= '9';
    seq = seq * 10 + (uint64_t)(b->id[i] - '0');
  }
  if (!ok || seq == 0) {
    *stem_len = b->id_len;
    return 1;
  }
  *stem_len = at - 1;
  return seq;
}

/* The slot's mark meter:hwm:{<tag>}:<instance>:<epoch> (the batch's) into
 * the args, and with probe its probe meter:probe:{<tag>} after it. */
static void arg_mark(struct sl_flusher *f, struct args *x, const struct sl_batch *b, unsigned slot, int probe) {
  const char *tag = f->slot_tags + (size_t)(slot & (SL_CLUSTER_SLOTS - 1)) * SL_CLUSTER_TAG_SIZE;
  size_t stem;
  batch_seq(b, &stem);
  int n = sprintf(x->p, "%s" SL_KEY_METER_HWM "{%s}:%.*s", f->prefix, tag, (int)stem, b->id);
  arg(x, x->p, (size_t)n);
  x->p += n + 1;
  if (!probe) return;
  n = sprintf(x->p, "%s" SL_KEY_METER_PROBE "{%s}", f->prefix, tag);
  arg(x, x->p, (size_t)n);
  x->p += n + 1;
}

/* One slot's part (part_script): run[0..n), the sorted group keys of that
 * slot; base: the batch's buffers (args_new), written from their start. */
static void send_slot_part(struct sl_flusher *f, struct sl_batch *b, const struct args *base, const uint64_t *run,
                           uint32_t n) {
  struct args x = *base;
  x.a = 0;
  size_t stem;
  uint64_t seq = batch_seq(b, &stem);
  arg(&x, "EVAL", 4);
  arg(&x, part_script, sizeof(part_script) - 1);
  arg_num(&x, 2 + 2 * n);
  arg_mark(f, &x, b, sl_cluster_group_slot(run[0]), 0);
  size_t old_at = x.a;
  if (!arg_old_marker(f, &x, b, &b->e[sl_cluster_group_index(run[0])].k)) { /* none: the mark again */
    x.argv[old_at] = x.argv[old_at - 1];
    x.lens[old_at] = x.lens[old_at - 1];
  }
  for (uint32_t j = 0; j < n; j++) {
    const struct sl_meter_key *k = &b->e[sl_cluster_group_index(run[j])].k;
    arg_uid_key(f, &x, SL_KEY_CALLS, SL_KEYLEN(SL_KEY_CALLS), k);
    arg_uid_key(f, &x, billed(k) ? SL_KEY_USAGE : SL_KEY_CALLS, billed(k) ? SL_KEYLEN(SL_KEY_USAGE) : SL_KEYLEN(SL_KEY_CALLS),
                k);
  }
  arg_num(&x, seq);
  arg_num(&x, n);
  for (uint32_t j = 0; j < n; j++) {
    const struct sl_batch_entry *be = &b->e[sl_cluster_group_index(run[j])];
    arg_calls_field(&x, &be->k);
    arg_num(&x, be->count);
    if (billed(&be->k))
      usage_fields(&x, &be->k);
    else
      arg(&x, "0", 1);
  }
  send_part(f, sl_cluster_group_slot(run[0]), 0, (int)x.a, x.argv, x.lens);
}

/* A master's script in flight: its part (first: part_end frees it) and
 * the slots of its groups, in the script's order. */
struct master_part {
  struct part p;
  uint32_t sent_s; /* mark_now_s() at the send: renewed marks are fresh from then */
  unsigned n;
  unsigned slots[];
};

static uint32_t mark_now_s(void) { return (uint32_t)(sl_mono_ms() / 1000) + 1; }

int sl_flusher_mark_ttl_due(uint32_t fresh_s, uint32_t now_s) {
  return !fresh_s || now_s - fresh_s >= SL_MARK_FRESH_S;
}

static void on_master_part(void *owner, void *priv, const redisReply *r);

/* One master's slots in one master_script EVAL: run[0..n), the sorted group
 * keys of one master, of several slots; base as for send_slot_part. */
static void send_master_part(struct sl_flusher *f, struct sl_batch *b, const struct args *base, const uint64_t *run,
                             uint32_t n) {
  unsigned ngroups = 0;
  for (uint32_t g = 0; g < n; g = (uint32_t)sl_cluster_group_end(run, n, g, 1)) ngroups++;
  struct master_part *mp = sl_calloc(1, sizeof *mp + ngroups * sizeof mp->slots[0]);
  mp->p = (struct part){.gen = f->gen, .slot = sl_cluster_group_slot(run[0])};
  mp->sent_s = mark_now_s();
  struct args x = *base;
  x.a = 0;
  arg(&x, "EVAL", 4);
  arg(&x, master_script, sizeof(master_script) - 1);
  arg(&x, "0", 1); /* keys of several slots cannot be declared (CROSSSLOT) */
  arg_num(&x, ngroups);
  size_t stem;
  arg_num(&x, batch_seq(b, &stem));
  for (uint32_t g = 0, e; g < n; g = e) {
    e = (uint32_t)sl_cluster_group_end(run, n, g, 1);
    unsigned slot = sl_cluster_group_slot(run[g]);
    mp->slots[mp->n++] = slot;
    arg_mark(f, &x, b, slot, 1);
    arg_old_marker(f, &x, b, &b->e[sl_cluster_group_index(run[g])].k);
    arg(&x, "1", sl_flusher_mark_ttl_due(f->mark_fresh_s[slot], mp->sent_s) ? 1 : 0);
    arg_num(&x, e - g);
    size_t span_at = x.a;
    arg(&x, "", 0); /* the group's args after this one, set below */
    for (uint32_t j = g; j < e; j++) {
      const struct sl_batch_entry *be = &b->e[sl_cluster_group_index(run[j])];
      breathe(f, 1);
      arg_uid_key(f, &x, SL_KEY_CALLS, SL_KEYLEN(SL_KEY_CALLS), &be->k);
      arg_calls_field(&x, &be->k);
      arg_num(&x, be->count);
      if (billed(&be->k)) {
        arg_uid_key(f, &x, SL_KEY_USAGE, SL_KEYLEN(SL_KEY_USAGE), &be->k);
        usage_fields(&x, &be->k);
      } else {
        arg(&x, "", 0);
        arg(&x, "0", 1);
      }
    }
    size_t l = sl_u64toa(x.a - span_at - 1, x.p);
    x.argv[span_at] = x.p;
    x.lens[span_at] = l;
    x.p += l + 1;
  }
  if (sl_db_command(f->redis, mp->p.slot, on_master_part, mp, (int)x.a, x.argv, x.lens) != 0) {
    free(mp);
    if (PART_LOST > f->part_worst) f->part_worst = PART_LOST;
    return;
  }
  f->parts_left++;
}

/* The slots of a master's script that did not run there (refused: the
 * whole script; -1: a slot it does not serve, or one being migrated) go
 * again as parts of their own now, which follow MOVED, ASK and TRYAGAIN;
 * their markers are the same, so one applied meanwhile is a no-op. */
static void send_slots_again(struct sl_flusher *f, const struct master_part *mp, const redisReply *r) {
  uint8_t redo[SL_CLUSTER_SLOTS / 8] = {0};
  unsigned nredo = 0;
  for (unsigned i = 0; i < mp->n; i++)
    if (!r || r->element[i]->integer < 0) {
      redo[mp->slots[i] / 8] |= (uint8_t)(1u << mp->slots[i] % 8);
      nredo++;
    }
  if (!nredo) return;
  sl_db_refresh(f->redis); /* the map said these slots were there */
  struct sl_batch *b = f->inflight;
  struct args x = args_new(f, b);
  uint64_t *keys = group_keys(b, NULL); /* by slot alone */
  for (uint32_t g = 0, e; g < b->n; g = e) {
    e = (uint32_t)sl_cluster_group_end(keys, b->n, g, 1);
    unsigned slot = sl_cluster_group_slot(keys[g]);
    if (redo[slot / 8] & 1u << slot % 8) send_slot_part(f, b, &x, keys + g, e - g);
  }
  free(keys);
  args_free(&x);
}

/* A master's script answered: an integer per group (1 applied, 0 found
 * applied, -1 not run there), or an error (none ran: Redis before 7.0
 * does not know the shebang, a replica refuses writes, ...). */
static void on_master_part(void *owner, void *priv, const redisReply *r) {
  struct sl_flusher *f = owner;
  struct master_part *mp = priv;
  if (!f || mp->p.gen != f->gen || !f->inflight) {
    free(mp);
    return;
  }
  if (mp->p.need) { /* its WAIT's reply */
    part_waited(f, &mp->p, r);
    return;
  }
  if (!r) { /* lost with its connection: the whole batch again */
    part_end(f, &mp->p, PART_LOST);
    return;
  }
  int ok = r->type == REDIS_REPLY_ARRAY && r->elements == mp->n, kind = SL_REPLY_DUPLICATE, ran = -1;
  for (unsigned i = 0; ok && i < mp->n; i++) {
    const redisReply *e = r->element[i];
    ok = e->type == REDIS_REPLY_INTEGER && e->integer >= -1 && e->integer <= 1;
    if (ok && e->integer >= 0 && ran < 0) ran = (int)i;
    if (ok && e->integer == 1) kind = SL_REPLY_APPLIED;
  }
  /* Applied with a TTL renewed where one was due (send_master_part): fresh
   * from the send on. (A reply lost leaves them due: renewed again.) */
  for (unsigned i = 0; ok && i < mp->n; i++)
    if (r->element[i]->integer == 1 && sl_flusher_mark_ttl_due(f->mark_fresh_s[mp->slots[i]], mp->sent_s))
      f->mark_fresh_s[mp->slots[i]] = mp->sent_s;
  if (!ok) {
    uint32_t held;
    if (sl_ratelog_ok(&f->log_err, sl_mono_ms(), ERR_LOG_MS, &held)) {
      char w[220];
      fprintf(stderr,
              "sluice: metering batch %.*s: a master's script answered %s: its %u slot(s) go one by one (said at "
              "most every %d s)\n",
              f->inflight->id_len, f->inflight->id,
              r->type == REDIS_REPLY_ERROR ? sl_printable(w, sizeof(w), r->str, r->len) : "an unexpected reply", mp->n,
              ERR_LOG_MS / 1000);
    }
  }
  send_slots_again(f, mp, ok ? r : NULL);
  if (!ok || ran < 0) { /* nothing of it is on this master: no WAIT here */
    part_end(f, &mp->p, PART_OK);
    return;
  }
  mp->p.slot = mp->slots[ran]; /* a slot it ran on: WAIT goes to that master */
  part_in_redis(f, &mp->p, kind);
}

/* Redis Cluster: per master of the map, one master_script EVAL for the
 * slots of the batch's UIDs it serves (one part_script EVAL where it has
 * just one, or the map has none for it), one SADD per day's set of UIDs
 * (its own slot; idempotent), and the stream entry with its own marker:
 * each slot applied once through its marker, whichever way it goes; the
 * batch acked when every part is (parts_done). */
static void send_cluster(struct sl_flusher *f, struct sl_batch *b, struct args *xp) {
  struct args x = *xp;
  char *buf = x.p;
  uint32_t n = b->n;
  uint64_t *keys = group_keys(b, sl_db_map(f->redis));
  for (uint32_t g = 0, e; g < n; g = e) {
    e = (uint32_t)sl_cluster_group_end(keys, n, g, 0);
    int one_slot = sl_cluster_group_end(keys, n, g, 1) == e;
    if (sl_cluster_group_node(keys[g]) != SL_CLUSTER_NO_NODE && !one_slot) {
      send_master_part(f, b, &x, keys + g, e - g);
      continue;
    }
    for (uint32_t s = g, se; s < e; s = se) { /* a slot's own part: one slot, or a master unknown */
      se = (uint32_t)sl_cluster_group_end(keys, e, s, 1);
      send_slot_part(f, b, &x, keys + s, se - s);
    }
  }
  free(keys);
  /* The day's sets: SADD each day's billed UIDs (repeats are harmless). */
  for (uint32_t i = 0; i < n; i++) {
    const struct sl_meter_key *k = &b->e[i].k;
    if (!billed(k) || b->e[i].sadd_done) continue;
    x.a = 0;
    x.p = buf;
    arg(&x, "SADD", 4);
    char set[128];
    int sl = snprintf(set, sizeof set, "%s" SL_KEY_USAGE "%llu", f->prefix, (unsigned long long)k->day);
    arg(&x, set, (size_t)sl);
    for (uint32_t j = i; j < n; j++) {
      struct sl_batch_entry *e = &b->e[j];
      if (!billed(&e->k) || e->k.day != k->day || e->sadd_done) continue;
      e->sadd_done = 1;
      arg(&x, e->k.uid, e->k.uid_len);
    }
    send_part(f, sl_db_key_slot(set, (size_t)sl), 1, (int)x.a, x.argv, x.lens);
  }
  for (uint32_t i = 0; i < n; i++) b->e[i].sadd_done = 0; /* sent again whole after a lost reply */
  /* The stream entry, once through its own marker in the stream's slot. */
  x.a = 0;
  x.p = buf;
  arg(&x, "EVAL", 4);
  arg(&x, stream_script, sizeof(stream_script) - 1);
  arg(&x, "2", 1);
  char marker[200], stream[128];
  int ml = snprintf(marker, sizeof marker, "%s" SL_KEY_METER_BATCH "%.*s:{%s}", f->prefix, b->id_len, b->id,
                    f->stream_tag);
  int sl = snprintf(stream, sizeof stream, "%s" SL_KEY_USAGE_STREAM, f->prefix);
  arg(&x, marker, (size_t)ml);
  arg(&x, stream, (size_t)sl);
  arg(&x, b->id, b->id_len);
  arg_num(&x, n);
  char *d0 = x.p;
  x.p = deltas_text(b, x.p);
  arg(&x, d0, (size_t)(x.p - d0));
  send_part(f, sl_db_key_slot(stream, (size_t)sl), 0, (int)x.a, x.argv, x.lens);
}

/* PING answered (client.h): what waits goes. */
static void on_redis_ready(void *data) { send_next(data); }

/* The connection is gone: the batch in flight is sent again on the next one
 * with the same id (its reply, if one comes, finds no owner). */
static void on_redis_down(void *data, const char *why) {
  (void)why; /* the client logs it */
  struct sl_flusher *f = data;
  f->final_fail = 1;
  if (f->inflight) {
    f->inflight = NULL;
    f->gen++; /* its parts' replies are dropped */
    sl_stat_inc(&f->stats.retried, 1);
  }
}

static void describe_wait(void *data, char *buf, size_t cap) {
  const struct sl_flusher *f = data;
  snprintf(buf, cap, "; %u batch(es) wait in the queue and the spool", f->nqueued);
}

/* ---- rounds ---- */

static int round_complete(struct sl_flusher *f) {
  for (unsigned i = 0; i < f->nworkers; i++)
    /* acquire: the worker's handoff pushes happen before its round_done store. */
    if (atomic_load_explicit(&f->workers[i]->round_done, memory_order_acquire) < f->round) return 0;
  return 1;
}

/* Every spool interval: the workers' tables into the accumulator, made
 * durable (journaled, or as batches); every flush interval: batches for
 * Redis. */
static void end_round(struct sl_flusher *f) {
  uint64_t now = sl_mono_ms();
  /* Within half a round of the flush time counts as due: with equal
   * intervals every round flushes (nothing journaled), whatever the
   * timers' jitter. */
  int due = now + f->spool_ms / 2 >= f->next_flush_ms;
  /* Counts that do not become batches now are journaled: a crash loses at
   * most one spool interval. */
  f->journal = journaling(f) && !(due && queue_has_room(f));
  collect(f);
  f->journal = 0;
  /* At the queue's bound the counts stay in the accumulator, merged by key,
   * until Redis takes batches. */
  if (due && queue_has_room(f)) {
    finalize(f, 1);
    f->acc->epoch = ++f->flushes; /* keys from now on are born in the next flush */
    f->next_flush_ms = now + f->flush_ms;
  }
  sl_stat_set(&f->stats.accumulated, f->acc->total);
  sl_spool_sync(&f->spool);
  send_next(f);
}

static void stop_loop(struct sl_flusher *f) {
  uv_timer_stop(&f->tick);
  sl__close((uv_handle_t *)&f->tick, NULL);
  sl__close((uv_handle_t *)&f->pace, NULL);
  sl__close((uv_handle_t *)&f->wake, NULL);
  if (f->redis) {
    sl_db_stop(f->redis); /* freed by the loop's close callbacks (sl_flusher_stop runs them) */
    f->redis = NULL;
    f->inflight = NULL; /* its callbacks see no owner */
  }
}

static void final_step(struct sl_flusher *f) {
  if (!f->final_started) {
    f->final_started = 1;
    f->final_deadline = sl_mono_ms() + f->final_ms;
    /* Redis may be back since the last try: ask now, not after the backoff.
     * A failure from here on ends the wait (the counts go to the spool). */
    f->final_fail = 0;
    if (sl_db_single(f->redis)) {
      sl_redis_quiet(sl_db_single(f->redis)); /* the exit says what is left */
      sl_redis_connect_now(sl_db_single(f->redis));
    }
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
    finalize(f, 0);
    sl_spool_sync(&f->spool);
    send_next(f);
  }
  /* A connect tried during the final flush failed: the counts are in the
   * spool, waiting helps nothing. */
  int hopeless = sl_db_state(f->redis) == SL_REDIS_DOWN && f->final_fail;
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
      sl_stat_inc(&f->stats.lost, left);
    }
    sl_spool_sync(&f->spool);
    stop_loop(f);
  }
}

static void on_tick(uv_timer_t *t) {
  struct sl_flusher *f = t->data;
  if (atomic_load_explicit(&f->final, memory_order_acquire)) {
    final_step(f);
    return;
  }
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
    sl_inbox_post(f->worker_inboxes[i], SL_MSG_METER_ROUND);
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

/* ---- start-up ---- */

static void free_pending(struct sl_flusher *f) {
  while (f->pending) {
    struct sl_batch *d = f->pending;
    f->pending = d->next;
    free(d);
  }
}

static void free_queue(struct sl_flusher *f) {
  while (f->head) {
    struct sl_batch *b = f->head;
    f->head = b->next;
    free(b);
  }
  f->tail = NULL;
  f->nqueued = 0;
}

/* The instance id: configured, kept in dir/instance-id, or made and kept
 * there. Returns 0, or a negative errno with a message in err. */
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
    int r = errno ? -errno : UV_EIO;
    snprintf(err, errlen, "%s: %s", path, strerror(errno));
    if (fd >= 0) close(fd);
    return r;
  }
  close(fd);
  return 0;
}

/* One record read back from the spool: a batch goes on the queue, an ack
 * takes its batch off. Returns 0, or -1 (stop: the record is not one of
 * ours). */
static int replay_record(void *arg, int type, const unsigned char *p, uint32_t len) {
  struct sl_flusher *f = arg;
  if (type == SL_SPOOL_REC_DELTA) { /* counts not in a batch yet, unless a batch record follows */
    struct sl_batch *d = sl_spool_decode_delta(p, len);
    if (!d) return -1;
    d->next = f->pending;
    f->pending = d;
    return 0;
  }
  if (type == SL_SPOOL_REC_BATCH || type == SL_SPOOL_REC_BATCH_V1) {
    struct sl_batch *b = type == SL_SPOOL_REC_BATCH ? sl_spool_decode_batch(p, len) : sl_spool_decode_batch_v1(p, len);
    if (!b) return -1;
    free_pending(f); /* a batch covers every delta before it */
    b->spooled = 1;
    b->replayed = 1;
    b->created_ms = sl_mono_ms();
    enqueue(f, b);
    sl_stat_inc(&f->stats.replayed, 1);
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
      sl_stat_set(&f->stats.replayed, atomic_load(&f->stats.replayed) - 1);
      free(b);
      break;
    }
  return 0;
}

int sl_flusher_start(struct sl_flusher *f, const struct sl_config *cfg, struct sl_meter_worker **workers,
                     struct sl_inbox **worker_inboxes, unsigned nworkers, char *err, size_t errlen) {
  int r;
  f->workers = workers;
  f->worker_inboxes = worker_inboxes;
  f->nworkers = nworkers;
  f->flush_ms = cfg->flush_ms;
  f->quiet_rounds = cfg->flush_quiet_ms > cfg->flush_ms ? cfg->flush_quiet_ms / cfg->flush_ms : 1;
  /* Rounds gather the workers' counts into the spool every spool interval;
   * batches for Redis are made every flush interval (never less often than
   * a round). */
  f->spool_ms = cfg->spool_ms < cfg->flush_ms ? cfg->spool_ms : cfg->flush_ms;
  f->next_flush_ms = sl_mono_ms() + f->flush_ms;
  f->queue_max = cfg->meter_queue_batches;
  f->final_ms = cfg->final_flush_ms;
  f->wait_replicas = cfg->redis_wait_replicas;
  /* WAIT blocks the connection: within half the reply timeout, lest the
   * client's watchdog take the wait for a dead server. */
  f->wait_ms = cfg->redis_wait_ms < cfg->redis_timeout_ms / 2 ? cfg->redis_wait_ms : cfg->redis_timeout_ms / 2;
  f->spool.fd = -1;
  f->spool.max = cfg->spool_max_bytes;
  f->spool.st_bytes = &f->stats.spool_bytes;
  f->spool.st_full = &f->stats.spool_full;
  f->spool.st_errors = &f->stats.spool_errors;
  snprintf(f->prefix, sizeof(f->prefix), "%s", cfg->redis_prefix);
  /* The first decimal number that hashes to usage:stream's slot: the tag
   * of a cluster's stream markers (a few thousand CRC16s, once). */
  char stream_key[96];
  int skl = snprintf(stream_key, sizeof stream_key, "%s" SL_KEY_USAGE_STREAM, f->prefix);
  unsigned stream_slot = sl_db_key_slot(stream_key, (size_t)skl);
  for (unsigned t = 0;; t++) {
    int tl = snprintf(f->stream_tag, sizeof f->stream_tag, "%u", t);
    if (sl_db_key_slot(f->stream_tag, (size_t)tl) == stream_slot) break;
  }
  if (mkdir(cfg->spool_dir, 0700) != 0 && errno != EEXIST) {
    r = -errno;
    snprintf(err, errlen, "spool directory %s: %s", cfg->spool_dir, strerror(errno));
    return r;
  }
  if ((r = load_instance(f, cfg->spool_dir, cfg->instance_id, err, errlen)) != 0) return r;
  if (getrandom(&f->epoch, sizeof(f->epoch), 0) != sizeof(f->epoch)) f->epoch = uv_hrtime();
  /* Batches without an ack go back on the queue, in order. */
  if ((r = sl_spool_open(&f->spool, cfg->spool_dir, replay_record, f, err, errlen)) != 0) goto err_queue;
  /* The accumulator holds one Redis interval's keys (--flush-keys), and at
   * least a few workers' tables so that a merge needs one finalize at most. */
  uint32_t acc_keys = cfg->meter_keys * (nworkers < 4 ? nworkers : 4);
  if (acc_keys < cfg->flush_keys) acc_keys = cfg->flush_keys;
  f->acc = sl_meter_table_new(acc_keys < SL_BATCH_MAX ? SL_BATCH_MAX : acc_keys);
  /* Journaled counts no batch covers: back into the accumulator (they stay
   * in the spool until a batch covers them). */
  uint64_t replayed_counts = 0;
  for (struct sl_batch *d = f->pending; d; d = d->next)
    for (uint32_t i = 0; i < d->n; i++) {
      const struct sl_meter_key *k = &d->e[i].k;
      if (f->acc->n >= f->acc->limit) finalize(f, 0);
      sl_meter_add(f->acc, k, sl_meter_key_hash(k), d->e[i].count);
      replayed_counts += d->e[i].count;
    }
  free_pending(f);
  if (f->nqueued || replayed_counts)
    fprintf(stderr, "sluice: metering: %u batch(es) and %llu journaled count(s) from the spool will be sent first\n",
            f->nqueued, (unsigned long long)replayed_counts);
  queue_stats(f);
  sl_stat_set(&f->stats.accumulated, f->acc->total);
  if ((r = uv_loop_init(&f->loop)) != 0) {
    snprintf(err, errlen, "flusher loop: %s", uv_strerror(r));
    goto err_acc;
  }
  if ((r = uv_async_init(&f->loop, &f->wake, on_wake)) != 0) {
    snprintf(err, errlen, "flusher wake: %s", uv_strerror(r));
    goto err_loop;
  }
  f->wake.data = f;
  uv_timer_init(&f->loop, &f->tick);
  f->tick.data = f;
  uv_timer_init(&f->loop, &f->pace);
  f->pace.data = f;
  struct sl_redis_opts o = {
      .addr = cfg->redis,
      .timeout_ms = cfg->redis_timeout_ms,
      .log_subject = "metering: redis",
      .up = &f->stats.redis_up,
      .on_ready = on_redis_ready,
      .on_down = on_redis_down,
      .describe = describe_wait,
      .data = f,
  };
  if ((r = sl_db_init(&f->redis, &f->loop, &o)) != 0) {
    snprintf(err, errlen, "redis: '%s': %s", cfg->redis, uv_strerror(r));
    goto err_handles;
  }
  if (sl_db_cluster(f->redis)) { /* the slots' marks are named by their tags (~1 ms, once) */
    f->slot_tags = sl_malloc((size_t)SL_CLUSTER_SLOTS * SL_CLUSTER_TAG_SIZE);
    f->mark_fresh_s = sl_calloc(SL_CLUSTER_SLOTS, sizeof *f->mark_fresh_s);
    sl_cluster_slot_tags((char(*)[SL_CLUSTER_TAG_SIZE])f->slot_tags);
  }
  sl_db_start(f->redis);
  uv_timer_start(&f->tick, on_tick, f->spool_ms, f->spool_ms);
  if ((r = sl_loop_thread_start(&f->thread, &f->loop, "sluice-flusher")) != 0) {
    snprintf(err, errlen, "flusher thread: %s", uv_strerror(r));
    goto err_redis;
  }
  return 0;
err_redis:
  free(f->slot_tags);
  f->slot_tags = NULL;
  free(f->mark_fresh_s);
  f->mark_fresh_s = NULL;
  sl_db_stop(f->redis);
  f->redis = NULL;
err_handles:
  uv_close((uv_handle_t *)&f->tick, NULL);
  uv_close((uv_handle_t *)&f->pace, NULL);
  uv_close((uv_handle_t *)&f->wake, NULL);
  uv_run(&f->loop, UV_RUN_DEFAULT); /* the close callbacks */
err_loop:
  uv_loop_close(&f->loop);
err_acc:
  sl_meter_table_free(f->acc);
  f->acc = NULL;
  sl_spool_close(&f->spool);
err_queue:
  free_queue(f);
  free_pending(f);
  return r;
}

void sl_flusher_stop(struct sl_flusher *f) {
  atomic_store_explicit(&f->final, 1, memory_order_release);
  uv_async_send(&f->wake);
  uv_thread_join(&f->thread);
  uv_run(&f->loop, UV_RUN_DEFAULT); /* close callbacks of what hiredis and the client left */
  uv_loop_close(&f->loop);
  free_queue(f);
  sl_meter_table_free(f->acc);
  sl_spool_close(&f->spool);
  free(f->slot_tags);
  free(f->mark_fresh_s);
}
