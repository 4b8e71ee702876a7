/* Global limits: the fleet thread (see fleet.h and docs/limits.md). */
#include "fleet.h"

#include <errno.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "db.h"
#include "keys.h"
#include "limiter.h"

#include "stat.h"
#include "uv_util.h"

#define JOIN_MS_MIN 500        /* after a reconnect: heartbeats only, until the others are back too */
#define RELEASE_IDLE_MS 5000   /* a key idle here this long is offered back to local shares */
#define KEYS_PER_CALL 512      /* keys in one script call (more go in more calls) */
#define ANNOUNCE_MAX 256       /* announcements read per call */
#define LEAVE_WAIT_MS 300      /* a clean stop waits this long at most for Redis to take the leave */
#define REFRESH_TICKS 4        /* a steady coordinated key is synced every this many ticks */
#define HEARTBEAT_IDLE_MS 500 /* with no key coordinated: heartbeats this often (at most ttl / 3) */
#define DEMAND_FLOOR 100       /* milli-requests/s under which a demand counts as none */

/* The fleet thread's own state of a slot. */
struct sl_fleet_key {
  uint64_t last_attempts;
  uint64_t demand;        /* milli-requests/s, smoothed */
  uint64_t idle_since_ms; /* since when the demand here is none (0: busy) */
  uint64_t sent_demand;   /* the demand the last sync sent */
  uint64_t sent_ms;       /* when (0: never) */
  int unsettled;          /* the last grant was a tenth or more below the target: sync every other tick */
  uint32_t pos;           /* index in f->used */
  uint8_t len;
  char name[SL_FLEET_KEY_MAX]; /* <uid>:<feature>:<region> */
};

struct sl_fleet_recent {
  uint64_t tag[SL_FLEET_RECENT];
  uint64_t ms[SL_FLEET_RECENT];
};

struct wantmsg {
  uint64_t tag;
  uint32_t limit; /* R as the worker applied it: the script weighs demand against it */
  uint32_t len;
  char key[SL_FLEET_KEY_MAX]; /* the bucket key: uid 0x1f feature 0x1f region */
};

/* A script call in flight: which slots it named (the tag tells whether a
 * slot still holds the same key when the reply comes). */
struct call {
  struct sl_fleet *f;
  uint32_t n;
  int keys_allowed;
  struct {
    uint32_t idx;
    uint64_t tag;
  } k[];
};

/* The parts of the sync scripts, shared by the one-server script and the
 * cluster's three (the same Lua either way). */
/* The heartbeat into the instances' zset ik: nlive and the first ids. */
#define LUA_HEARTBEAT                                                                                                  \
  "redis.call('ZADD', ik, now + ttl, me) "                                                                             \
  "redis.call('ZREMRANGEBYSCORE', ik, '-inf', now) "                                                                   \
  "local nlive = redis.call('ZCARD', ik) "                                                                             \
  "local ids = redis.call('ZRANGE', ik, 0, 63) "
/* The announcements after `last` in the stream ak (at first only the
 * newest's id): sets last and ann. */
#define LUA_READ_ANNOUNCE                                                                                              \
  "if last == '' then "                                                                                                \
  "  local top = redis.call('XREVRANGE', ak, '+', '-', 'COUNT', 1) "                                                   \
  "  if #top > 0 then last = top[1][1] else last = '0-0' end "                                                         \
  "else "                                                                                                              \
  "  local got = redis.call('XRANGE', ak, '(' .. last, '+', 'COUNT', 256) "                                            \
  "  for i = 1, #got do ann[#ann + 1] = got[i][2][2]; last = got[i][1] end "                                           \
  "end "
/* sync_key(hk, lim, dem, rel): one key's lease (needs me, now, ttl, nlive
 * and q in scope). Returns its reply entry {lease, fleet demand,
 * registered, state}, and whether the key is to be announced (its '~a' is
 * set here; the caller adds it to the stream). */
#define LUA_SYNC_KEY                                                                                                   \
  "local function want(d, lim) if lim > 0 then return d * 1250000 / lim end return 0 end "                             \
  "local function sync_key(hk, lim, dem, rel) "                                                                        \
  "  local h = redis.call('HGETALL', hk) "                                                                             \
  "  local others, odem, regs, annt = 0, 0, {}, 0 "                                                                    \
  "  for j = 1, #h, 2 do "                                                                                             \
  "    local f, v = h[j], h[j + 1] "                                                                                   \
  "    if f == '~a' then annt = tonumber(v) or 0 "                                                                     \
  "    elseif f ~= me then "                                                                                           \
  "      local l, d, e = string.match(v, '^(%d+):(%d+):(%d+)$') "                                                      \
  "      l, d, e = tonumber(l), tonumber(d), tonumber(e) "                                                             \
  "      if not e or e <= now then redis.call('HDEL', hk, f) "                                                         \
  "      else others = others + l; odem = odem + d; regs[#regs + 1] = d end "                                          \
  "    end "                                                                                                           \
  "  end "                                                                                                             \
  "  local nreg = #regs + 1 "                                                                                          \
  "  local unreg = nlive - nreg "                                                                                      \
  "  if unreg < 0 then unreg = 0 end "                                                                                 \
  "  if rel == '1' and odem == 0 and others + (unreg + 1) * q <= 1000000 then "                                        \
  "    redis.call('HDEL', hk, me) "                                                                                    \
  "    return {0, 0, nreg - 1, 1}, false "                                                                             \
  "  end "                                                                                                             \
  "  local pool = 1000000 - unreg * q "                                                                                \
  "  if pool < 0 then pool = 0 end "                                                                                   \
  "  local fl = math.floor(pool / (50 * nreg)) "                                                                       \
  "  local avail = pool - fl * nreg "                                                                                  \
  "  local mine, wants = want(dem, lim), {} "                                                                          \
  "  for j = 1, #regs do wants[j] = want(regs[j], lim) end "                                                           \
  "  wants[#wants + 1] = mine "                                                                                        \
  "  table.sort(wants) "                                                                                               \
  "  local rem, k, level = avail, #wants, nil "                                                                        \
  "  for j = 1, #wants do "                                                                                            \
  "    local fair = rem / k "                                                                                          \
  "    if wants[j] <= fair then rem = rem - wants[j]; k = k - 1 else level = fair; break end "                         \
  "  end "                                                                                                             \
  "  local target "                                                                                                    \
  "  if lim == 0 then target = fl "                                                                                    \
  "  elseif level then target = fl + math.min(mine, level) else target = fl + mine + rem / #wants end "               \
  "  local g = math.floor(math.min(target, pool - others)) "                                                           \
  "  if g < 0 then g = 0 end "                                                                                         \
  "  redis.call('HSET', hk, me, g .. ':' .. dem .. ':' .. (now + ttl)) "                                               \
  "  redis.call('PEXPIRE', hk, 2 * ttl) "                                                                              \
  "  local an = unreg > 0 and odem + dem > 0 and now - annt >= 1000 "                                                  \
  "  if an then redis.call('HSET', hk, '~a', now) end "                                                                \
  "  local st = 0 "                                                                                                    \
  "  if g < math.floor(target * 0.9) then st = 2 end "                                                                 \
  "  return {g, odem + dem, nreg, st}, an "                                                                            \
  "end "
#define LUA_NOW                                                                                                        \
  "local t = redis.call('TIME') "                                                                                      \
  "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) "

/* One call: heartbeat, announcements, and the leases of the keys named.
 * ARGV: prefix, instance, ttl ms, last announcement id read ('' at first),
 * key count, then per key: name, limit and demand (milli-requests/s),
 * release (1: this instance would give the key back to local shares).
 * A key's hash holds, per registered instance, "lease:demand:expiry" (lease
 * in ppm of the limit, expiry in ms of the server's clock), and "~a", when
 * the key was last announced. Invariant kept for every key: the leases plus
 * floor(1e6 / N) for every live instance not registered on it (which
 * admits that much without asking) never exceed 1e6. A key is announced
 * only while it has demand (a key going quiet is not called back in).
 * Shares follow demand
 * by water-filling (each instance wants its demand + 25%; what is left goes
 * equally), above a floor of pool / (50 n) each. Per key it returns the
 * lease, the fleet's demand, the instances registered, and 0 (settled), 1
 * (released: back to R/N) or 2 (unsettled: others still hold more than a
 * tenth of this instance's target; it syncs again two ticks later). Key
 * names: keys.h. */
static const char sync_script[] =
    "local p, me, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]) "
    LUA_NOW
    "local ik = p .. '" SL_KEY_SHARE_INSTANCES "' "
    LUA_HEARTBEAT
    "local ak = p .. '" SL_KEY_SHARE_ANNOUNCE "' "
    "local last, ann = ARGV[4], {} "
    LUA_READ_ANNOUNCE
    "local q = math.floor(1000000 / nlive) "
    LUA_SYNC_KEY
    "local out = {nlive, last, ann, ids} "
    "for i = 0, tonumber(ARGV[5]) - 1 do "
    "  local b = 6 + i * 4 "
    "  local name = ARGV[b] "
    "  local e, an = sync_key(p .. '" SL_KEY_SHARE "' .. name, tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), "
    "                         ARGV[b + 3]) "
    "  if an then redis.call('XADD', ak, 'MAXLEN', '~', 1000, '*', 'key', name) end "
    "  out[#out + 1] = e "
    "end "
    "redis.call('PEXPIRE', ik, 10 * ttl) "
    "redis.call('PEXPIRE', ak, 3600000) "
    "return out";

/* A Redis Cluster (SPEC 10): a script touches the keys of one slot only, so
 * a sync is split (docs/limits.md). The heartbeat, on the instances zset's
 * slot: KEYS[1] the zset; ARGV: instance, ttl ms. Returns {nlive, ids}. */
static const char hb_script[] =
    "local ik, me, ttl = KEYS[1], ARGV[1], tonumber(ARGV[2]) "
    LUA_NOW
    LUA_HEARTBEAT
    "redis.call('PEXPIRE', ik, 10 * ttl) "
    "return {nlive, ids}";

/* The announcements read, on the stream's slot: KEYS[1] the stream; ARGV[1]
 * the last id read ('' at first). Returns {last, announcements}. */
static const char ann_read_script[] =
    "local ak, last, ann = KEYS[1], ARGV[1], {} "
    LUA_READ_ANNOUNCE
    "return {last, ann}";

/* A key announced (the key script said so), on the stream's slot: KEYS[1]
 * the stream, ARGV[1] the key's name. */
static const char ann_add_script[] =
    "redis.call('XADD', KEYS[1], 'MAXLEN', '~', 1000, '*', 'key', ARGV[1]) "
    "redis.call('PEXPIRE', KEYS[1], 3600000) "
    "return 1";

/* The leases of keys of one slot: KEYS the keys' hashes
 * (share:{<uid>}:<feature>:<region>); ARGV: instance, ttl ms, nlive (the
 * heartbeat's reply), then per key limit, demand, release as above. Per
 * key {lease, fleet demand, registered, state, announce (1: add the key to
 * the stream)}. */
static const char key_script[] =
    "local me, ttl, nlive = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]) "
    "if not nlive or nlive < 1 then nlive = 1 end "
    LUA_NOW
    "local q = math.floor(1000000 / nlive) "
    LUA_SYNC_KEY
    "local out = {} "
    "for i = 1, #KEYS do "
    "  local b = 1 + i * 3 "
    "  local e, an = sync_key(KEYS[i], tonumber(ARGV[b]), tonumber(ARGV[b + 1]), ARGV[b + 2]) "
    "  e[5] = an and 1 or 0 "
    "  out[i] = e "
    "end "
    "return out";

const char *sl_fleet_mode_name(enum sl_fleet_mode m) {
  switch (m) {
  case SL_FLEET_SHARED: return "shared";
  case SL_FLEET_FALLBACK: return "fallback";
  case SL_FLEET_JOINING: return "joining";
  default: return "off";
  }
}

static void set_word(struct sl_fleet *f, enum sl_fleet_mode m, unsigned n) {
  if (n == 0) n = 1;
  /* relaxed: workers read the word as one value (fleet.h). */
  atomic_store_explicit(&f->word, (uint64_t)m << 32 | (SL_FLEET_PPM / n), memory_order_relaxed);
  sl_stat_set(&f->stats.mode, (uint64_t)m);
}

static enum sl_fleet_mode mode_now(const struct sl_fleet *f) {
  return sl_fleet_mode_of(atomic_load_explicit(&f->word, memory_order_relaxed));
}

/* ---- workers ---- */

void sl_fleet_want(struct sl_fleet *f, unsigned worker, uint64_t tag, const char *key, size_t len,
                   uint64_t limit, uint64_t now_ms) {
  if (len > SL_FLEET_KEY_MAX || worker >= f->nworkers) return;
  struct sl_fleet_recent *r = &f->recent[worker];
  unsigned i = (unsigned)(tag % SL_FLEET_RECENT);
  if (r->tag[i] == tag && now_ms - r->ms[i] < 1000) return;
  r->tag[i] = tag;
  r->ms[i] = now_ms;
  struct wantmsg m;
  m.tag = tag;
  m.limit = limit > UINT32_MAX ? UINT32_MAX : (uint32_t)limit;
  m.len = (uint32_t)len;
  memcpy(m.key, key, len);
  if (sl_ring_push(&f->wants, &m) != 0) sl_stat_inc(&f->stats.wants_dropped, 1);
}

void sl_fleet_view(struct sl_fleet *f, uint64_t tag, struct sl_fleet_view *v) {
  memset(v, 0, sizeof(*v));
  uint64_t w = atomic_load_explicit(&f->word, memory_order_relaxed);
  v->mode = sl_fleet_mode_of(w);
  v->instances = (unsigned)atomic_load_explicit(&f->stats.instances, memory_order_relaxed);
  v->share = (uint32_t)w;
  struct sl_fleet_slot *s = sl_fleet_find(f, tag);
  if (!s) return;
  v->coordinated = 1;
  if (v->mode == SL_FLEET_SHARED) v->share = atomic_load_explicit(&s->share, memory_order_relaxed);
  v->local_demand = atomic_load_explicit(&s->local_demand, memory_order_relaxed);
  v->fleet_demand = atomic_load_explicit(&s->fleet_demand, memory_order_relaxed);
  v->registered = atomic_load_explicit(&s->registered, memory_order_relaxed);
}

void sl_fleet_instances(struct sl_fleet *f, char *buf, size_t cap) {
  pthread_mutex_lock(&f->text_lock);
  snprintf(buf, cap, "%s", f->instances_text[0] ? f->instances_text : "[]");
  pthread_mutex_unlock(&f->text_lock);
}

/* ---- the table (the fleet thread only writes it) ---- */

static uint64_t norm_tag(uint64_t tag) { return tag == 0 || tag == SL_FLEET_TOMB ? 1 : tag; }

/* Makes a slot for the key, holding the default share until Redis grants
 * one (the same R/N the key had uncoordinated, so nothing changes for the
 * workers yet). Returns 0, or -1 when the table is full. */
static int insert(struct sl_fleet *f, uint64_t tag, const char *key, size_t len, uint32_t limit) {
  tag = norm_tag(tag);
  if (sl_fleet_find(f, tag)) return 0;
  if (f->nused >= f->cap) return -1;
  for (uint32_t i = 0; i < SL_FLEET_PROBE; i++) {
    uint32_t idx = (uint32_t)((tag + i) & f->mask);
    struct sl_fleet_slot *s = &f->slots[idx];
    uint64_t t = atomic_load_explicit(&s->tag, memory_order_relaxed);
    if (t != 0 && t != SL_FLEET_TOMB) continue;
    struct sl_fleet_key *k = &f->keys[idx];
    memset(k, 0, sizeof(*k));
    for (size_t j = 0; j < len; j++) k->name[j] = key[j] == '\x1f' ? ':' : key[j];
    k->len = (uint8_t)len;
    k->pos = f->nused;
    k->last_attempts = atomic_load_explicit(&s->attempts, memory_order_relaxed);
    f->used[f->nused++] = idx;
    uint64_t w = atomic_load_explicit(&f->word, memory_order_relaxed);
    atomic_store_explicit(&s->share, (uint32_t)w, memory_order_relaxed);
    atomic_store_explicit(&s->local_demand, 0, memory_order_relaxed);
    atomic_store_explicit(&s->fleet_demand, 0, memory_order_relaxed);
    atomic_store_explicit(&s->registered, 0, memory_order_relaxed);
    atomic_store_explicit(&s->limit, limit, memory_order_relaxed);
    /* release: a worker that sees the tag sees the share above. */
    atomic_store_explicit(&s->tag, tag, memory_order_release);
    sl_stat_set(&f->stats.coordinated, f->nused);
    return 0;
  }
  return -1;
}

static void release_slot(struct sl_fleet *f, uint32_t idx) {
  struct sl_fleet_key *k = &f->keys[idx];
  /* release: nothing to publish; a worker that still finds the old tag
   * applies the old share once more, which was this key's anyway. */
  atomic_store_explicit(&f->slots[idx].tag, SL_FLEET_TOMB, memory_order_release);
  uint32_t last = f->used[--f->nused];
  f->used[k->pos] = last;
  f->keys[last].pos = k->pos;
  sl_stat_set(&f->stats.coordinated, f->nused);
  sl_stat_inc(&f->stats.releases, 1);
}

/* Builds a key's name back from an announcement ("<uid>:<feature>:<region>";
 * the feature and region hold no ':') into a bucket key. Returns its length,
 * or 0 when the name cannot be one. */
static size_t bucket_key_of(const char *name, size_t n, char *out) {
  if (n == 0 || n > SL_FLEET_KEY_MAX) return 0;
  const char *r = memrchr(name, ':', n);
  if (!r || r == name) return 0;
  const char *fe = memrchr(name, ':', (size_t)(r - name));
  if (!fe || fe == name || r - fe < 2 || (size_t)(name + n - r) < 2) return 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)name[i];
    if (c < 0x20 || c == 0x7f) return 0;
  }
  memcpy(out, name, n);
  out[fe - name] = '\x1f';
  out[r - name] = '\x1f';
  return n;
}

static void take_wants(struct sl_fleet *f) {
  struct wantmsg m;
  while (sl_ring_pop(&f->wants, &m) == 0)
    if (insert(f, m.tag, m.key, m.len, m.limit) != 0) sl_stat_inc(&f->stats.keys_full, 1);
}

/* The demand of each key here since the last tick, smoothed over about two
 * ticks: a share follows a change within a few sync intervals (key_due
 * keeps the noise of a few requests a tick from making syncs). */
static void measure(struct sl_fleet *f, uint64_t now, uint64_t dt_ms) {
  if (dt_ms == 0) return;
  for (uint32_t i = 0; i < f->nused; i++) {
    uint32_t idx = f->used[i];
    struct sl_fleet_key *k = &f->keys[idx];
    uint64_t a = atomic_load_explicit(&f->slots[idx].attempts, memory_order_relaxed);
    uint64_t rate = (a - k->last_attempts) * 1000000 / dt_ms; /* milli-requests/s */
    k->last_attempts = a;
    k->demand = (k->demand + rate) / 2;
    if (rate == 0 && k->demand < DEMAND_FLOOR) k->demand = 0;
    if (k->demand == 0) {
      if (!k->idle_since_ms) k->idle_since_ms = now;
    } else {
      k->idle_since_ms = 0;
    }
    atomic_store_explicit(&f->slots[idx].local_demand, k->demand, memory_order_relaxed);
  }
}

/* ---- Redis ---- */

static void on_down_mode(struct sl_fleet *f, const char *why) {
  f->outage = 1;
  f->rejoin = sl_db_cluster(f->db); /* one server: on_redis_ready says when it is back */
  atomic_store_explicit(&f->outage_seen, 1, memory_order_relaxed);
  if (mode_now(f) != SL_FLEET_FALLBACK) {
    set_word(f, SL_FLEET_FALLBACK, f->n_last);
    sl_stat_inc(&f->stats.fallbacks, 1);
  }
  if (f->outage_logged) return;
  f->outage_logged = 1;
  fprintf(stderr,
          "sluice: global limits: redis unreachable (%s); each key is limited to 1/%u of its limit here "
          "(%u instance(s) last seen) until it is back\n",
          why, f->n_last ? f->n_last : 1, f->n_last ? f->n_last : 1);
}

static int reply_int(const redisReply *r, long long *v) {
  if (!r || r->type != REDIS_REPLY_INTEGER) return -1;
  *v = r->integer;
  return 0;
}

static void set_instances_text(struct sl_fleet *f, const redisReply *ids) {
  char buf[SL_FLEET_INSTANCES_TEXT];
  size_t n = 0;
  buf[n++] = '[';
  for (size_t i = 0; i < ids->elements; i++) {
    const redisReply *e = ids->element[i];
    if (e->type != REDIS_REPLY_STRING) continue;
    if (n + e->len * 2 + 8 >= sizeof(buf)) break;
    if (n > 1) buf[n++] = ',';
    buf[n++] = '"';
    for (size_t j = 0; j < e->len; j++) {
      unsigned char c = (unsigned char)e->str[j];
      if (c == '"' || c == '\\' || c < 0x20 || c >= 0x7f) c = '?'; /* ids are ours: host/pid/hex */
      buf[n++] = (char)c;
    }
    buf[n++] = '"';
  }
  buf[n++] = ']';
  buf[n] = '\0';
  pthread_mutex_lock(&f->text_lock);
  memcpy(f->instances_text, buf, n + 1);
  pthread_mutex_unlock(&f->text_lock);
}

/* An instance alone in the fleet has the whole of every limit and needs no
 * key synced (sync_now sends heartbeats only): its keys take the whole
 * share. When others appear, the keys fall to 1/N at once and are synced
 * at the next tick (as new keys), so the fleet never holds more than R
 * for longer than that. */
static void alone_or_not(struct sl_fleet *f, unsigned n_before) {
  if (f->n_last > 1 && n_before > 1) return;
  uint32_t share = SL_FLEET_PPM / (f->n_last ? f->n_last : 1);
  for (uint32_t i = 0; i < f->nused; i++) {
    uint32_t idx = f->used[i];
    struct sl_fleet_key *k = &f->keys[idx];
    if (f->n_last > 1 && k->sent_ms) continue; /* already shared */
    atomic_store_explicit(&f->slots[idx].share, share, memory_order_relaxed);
    k->sent_ms = 0;
    k->unsettled = 0;
  }
}

static void log_error_reply(struct sl_fleet *f, const redisReply *r) {
  uint32_t held;
  if (r && r->type == REDIS_REPLY_ERROR && sl_ratelog_ok(&f->log_err, sl_mono_ms(), 10000, &held))
    fprintf(stderr, "sluice: global limits: redis answered the sync with an error (%u more held back): %.200s\n",
            held, r->str);
}

/* The heartbeat's part of a reply: N, and the keys alone_or_not resets. */
static void take_instances(struct sl_fleet *f, long long nlive, const redisReply *ids) {
  unsigned n_before = f->n_last;
  f->n_last = (unsigned)(nlive > 100000 ? 100000 : nlive);
  alone_or_not(f, n_before); /* (the leases that follow replace it for the keys they name) */
  set_instances_text(f, ids);
}

/* Announcements: keys busy elsewhere, which this instance registers on
 * (with its demand, maybe none) so that its R/N of them is freed. last:
 * the newest id read (shorter than ann_last, checked by the caller). */
static void take_announcements(struct sl_fleet *f, const redisReply *last, const redisReply *ann) {
  memcpy(f->ann_last, last->str, last->len);
  f->ann_last[last->len] = '\0';
  for (size_t i = 0; i < ann->elements && i < ANNOUNCE_MAX; i++) {
    const redisReply *e = ann->element[i];
    char key[SL_FLEET_KEY_MAX];
    size_t kl;
    if (e->type != REDIS_REPLY_STRING || !(kl = bucket_key_of(e->str, e->len, key))) continue;
    uint64_t tag = norm_tag(lim_hash(key, kl));
    if (!sl_fleet_find(f, tag) && insert(f, tag, key, kl, 0) != 0) sl_stat_inc(&f->stats.keys_full, 1);
  }
}

/* One key's entry of a reply ({lease, fleet demand, registered, state}
 * and, with width 5, announce). Returns 1 when the key is to be announced
 * (a cluster's key script says so), 0 when not or when the entry was not
 * taken (malformed, or the slot holds another key now). */
static int take_key(struct sl_fleet *f, uint32_t idx, uint64_t tag, const redisReply *e, size_t width) {
  long long g, dem, nreg, released, an = 0;
  if (e->type != REDIS_REPLY_ARRAY || e->elements != width || reply_int(e->element[0], &g) ||
      reply_int(e->element[1], &dem) || reply_int(e->element[2], &nreg) || reply_int(e->element[3], &released) ||
      (width > 4 && reply_int(e->element[4], &an)) || g < 0 || g > SL_FLEET_PPM || dem < 0 || nreg < 0)
    return 0;
  struct sl_fleet_slot *s = &f->slots[idx];
  if (atomic_load_explicit(&s->tag, memory_order_relaxed) != tag) return 0; /* released meanwhile */
  if (released == 1) {
    release_slot(f, idx);
    return 0;
  }
  f->keys[idx].unsettled = released == 2;
  atomic_store_explicit(&s->share, (uint32_t)g, memory_order_relaxed);
  atomic_store_explicit(&s->fleet_demand, (uint64_t)dem, memory_order_relaxed);
  atomic_store_explicit(&s->registered, (uint32_t)nreg, memory_order_relaxed);
  return an == 1;
}

/* A sync answered (one server: the script; a cluster: the heartbeat):
 * counted, and the mode follows. n_before: N before the reply. */
static void synced(struct sl_fleet *f, int keys_allowed, unsigned n_before) {
  uint64_t now = sl_mono_ms();
  sl_stat_inc(&f->stats.syncs, 1);
  sl_stat_set(&f->stats.last_sync_ms, now);
  sl_stat_set(&f->stats.instances, f->n_last);
  enum sl_fleet_mode m = mode_now(f);
  if (keys_allowed) {
    if (m != SL_FLEET_SHARED) {
      if (f->outage_logged)
        fprintf(stderr, "sluice: global limits: redis is back; limits shared again (%u instance(s))\n", f->n_last);
      f->outage_logged = 0;
      f->ever_synced = 1;
      f->outage = 0;
    }
    set_word(f, SL_FLEET_SHARED, f->n_last);
  } else {
    /* joining: still the fallback share, now of whichever N is larger */
    set_word(f, SL_FLEET_JOINING, f->n_last > n_before ? f->n_last : n_before);
    f->n_last = f->n_last > n_before ? f->n_last : n_before;
  }
}

/* Takes a sync's reply: the instances, announcements and each key's lease.
 * Returns 0, or -1 (counted, nothing changed) when it is not the shape the
 * script returns. */
static int apply_reply(struct sl_fleet *f, const struct call *cl, const redisReply *r) {
  long long nlive;
  if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 4 + (size_t)cl->n || reply_int(r->element[0], &nlive) ||
      nlive < 1 || r->element[1]->type != REDIS_REPLY_STRING || r->element[1]->len >= sizeof(f->ann_last) ||
      r->element[2]->type != REDIS_REPLY_ARRAY || r->element[3]->type != REDIS_REPLY_ARRAY) {
    sl_stat_inc(&f->stats.sync_errors, 1);
    log_error_reply(f, r);
    return -1;
  }
  unsigned n_before = f->n_last;
  take_instances(f, nlive, r->element[3]);
  take_announcements(f, r->element[1], r->element[2]);
  for (uint32_t i = 0; i < cl->n; i++) take_key(f, cl->k[i].idx, cl->k[i].tag, r->element[4 + i], 4);
  synced(f, cl->keys_allowed, n_before);
  return 0;
}

static void on_synced(void *owner, void *priv, const redisReply *reply) {
  struct call *cl = priv;
  struct sl_fleet *f = owner; /* NULL: the connection was dropped, or stopping */
  if (f) {
    f->inflight--;
    apply_reply(f, cl, reply);
  }
  free(cl);
}

int sl_fleet_apply_reply_test(struct sl_fleet *f, const uint32_t *idx, uint32_t n, const struct redisReply *r) {
  struct call *cl = sl_malloc(sizeof(*cl) + (size_t)n * sizeof(cl->k[0]));
  cl->f = f;
  cl->n = n;
  cl->keys_allowed = 1;
  for (uint32_t i = 0; i < n; i++) {
    cl->k[i].idx = idx[i] & f->mask;
    cl->k[i].tag = atomic_load_explicit(&f->slots[cl->k[i].idx].tag, memory_order_relaxed);
  }
  int rc = apply_reply(f, cl, r);
  free(cl);
  return rc;
}

static struct call *new_call(struct sl_fleet *f, uint32_t n, int keys_allowed) {
  struct call *cl = sl_malloc(sizeof(*cl) + (size_t)n * sizeof(cl->k[0]));
  cl->f = f;
  cl->n = n;
  cl->keys_allowed = keys_allowed;
  return cl;
}

/* A key named in a sync: its demand as sent, and its slot and tag in cl. */
static void name_key(struct sl_fleet *f, struct call *cl, uint32_t i, uint32_t idx, uint64_t now) {
  struct sl_fleet_key *k = &f->keys[idx];
  k->sent_demand = k->demand;
  k->sent_ms = now;
  cl->k[i].idx = idx;
  cl->k[i].tag = atomic_load_explicit(&f->slots[idx].tag, memory_order_relaxed);
}

/* The per-key arguments every script takes: limit and demand in
 * milli-requests/s, release flag. np: room for two numbers. Returns the
 * room used. */
static size_t key_args(struct sl_fleet *f, uint32_t idx, uint64_t now, const char **argv, size_t *lens, char *np) {
  const struct sl_fleet_key *k = &f->keys[idx];
  size_t l1 = sl_u64toa((uint64_t)atomic_load_explicit(&f->slots[idx].limit, memory_order_relaxed) * 1000, np);
  size_t l2 = sl_u64toa(k->demand, np + l1 + 1);
  argv[0] = np, lens[0] = l1;
  argv[1] = np + l1 + 1, lens[1] = l2;
  int release = k->idle_since_ms && now - k->idle_since_ms >= RELEASE_IDLE_MS;
  argv[2] = release ? "1" : "0", lens[2] = 1;
  return l1 + l2 + 2;
}

/* One server: the one script, for the keys pick[0..n). */
static void send_call(struct sl_fleet *f, const uint32_t *pick, uint32_t n, int keys_allowed, uint64_t now) {
  struct call *cl = new_call(f, n, keys_allowed);
  size_t argc = 8 + 4 * (size_t)n;
  const char **argv = sl_malloc(argc * sizeof(char *));
  size_t *lens = sl_malloc(argc * sizeof(size_t));
  char *nums = sl_malloc(((size_t)n * 2 + 2) * 24);
  char *np = nums;
  size_t a = 0, l;
#define ARG(s, len) (argv[a] = (s), lens[a++] = (len))
#define NUM(v) (l = sl_u64toa((v), np), ARG(np, l), np += l + 1)
  ARG("EVAL", 4);
  ARG(sync_script, sizeof(sync_script) - 1);
  ARG("0", 1);
  ARG(f->prefix, strlen(f->prefix));
  ARG(f->id, strlen(f->id));
  NUM(f->ttl_ms);
  ARG(f->ann_last, strlen(f->ann_last));
  NUM(n);
  for (uint32_t i = 0; i < n; i++) {
    name_key(f, cl, i, pick[i], now);
    ARG(f->keys[pick[i]].name, f->keys[pick[i]].len);
    np += key_args(f, pick[i], now, argv + a, lens + a, np);
    a += 3;
  }
#undef ARG
#undef NUM
  if (sl_db_command(f->db, 0, on_synced, cl, (int)a, argv, lens) == 0) {
    f->inflight++;
    sl_stat_inc(&f->stats.key_updates, n);
  } else {
    free(cl);
  }
  free(argv);
  free(lens);
  free(nums);
}

/* ---- a Redis Cluster: a sync in parts, each on one slot ---- */

/* An EVAL of script on the slot of keys[0..nkeys), with args after them;
 * cb gets priv. Returns sl_db_command's result. */
static int eval_on(struct sl_fleet *f, unsigned slot, const char *script, size_t slen, int nkeys, int argc,
                   const char **args, const size_t *lens, sl_db_reply_fn *cb, void *priv) {
  const char **argv = sl_malloc((size_t)(argc + 3) * sizeof(char *));
  size_t *al = sl_malloc((size_t)(argc + 3) * sizeof(size_t));
  char nk[24];
  argv[0] = "EVAL", al[0] = 4;
  argv[1] = script, al[1] = slen;
  argv[2] = nk, al[2] = sl_u64toa((uint64_t)nkeys, nk);
  memcpy(argv + 3, args, (size_t)argc * sizeof(char *));
  memcpy(al + 3, lens, (size_t)argc * sizeof(size_t));
  int rc = sl_db_command(f->db, slot, cb, priv, argc + 3, argv, al);
  free(argv);
  free(al);
  return rc;
}

/* The key's hash in a cluster, share:{<uid>}:<feature>:<region> (the name
 * is <uid>:<feature>:<region>; feature and region hold no ':'). Returns
 * its length, or a negative errno (a UID that cannot be a hash tag: the
 * key then stays on its default share, which needs no sync). */
static int cluster_hash_key(const struct sl_fleet *f, const struct sl_fleet_key *k, char *out, size_t cap,
                            unsigned *slot) {
  const char *r = memrchr(k->name, ':', k->len);
  const char *fe = r ? memrchr(k->name, ':', (size_t)(r - k->name)) : NULL;
  if (!fe) return UV_EINVAL;
  size_t ul = (size_t)(fe - k->name);
  char head[80];
  int hl = snprintf(head, sizeof head, "%s" SL_KEY_SHARE, f->prefix);
  if (hl < 0 || (size_t)hl >= sizeof head) return UV_ENOSPC;
  *slot = sl_db_uid_slot(k->name, ul);
  return sl_db_uid_key(f->db, out, cap, head, (size_t)hl, k->name, ul, fe, (size_t)(k->name + k->len - fe));
}

static void on_ignored(void *owner, void *priv, const redisReply *reply) {
  (void)owner, (void)priv, (void)reply;
}

/* The reply to one slot's key script: each key's lease, and the keys to
 * announce (one XADD each, on the stream's slot). A lost or refused
 * reply: its keys sync again at the next tick. */
static void on_keys(void *owner, void *priv, const redisReply *r) {
  struct call *cl = priv;
  struct sl_fleet *f = owner;
  if (!f) goto out;
  f->inflight--;
  if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != cl->n) {
    sl_stat_inc(&f->stats.sync_errors, 1);
    log_error_reply(f, r);
    for (uint32_t i = 0; i < cl->n; i++)
      if (atomic_load_explicit(&f->slots[cl->k[i].idx].tag, memory_order_relaxed) == cl->k[i].tag)
        f->keys[cl->k[i].idx].sent_ms = 0;
    goto out;
  }
  char ak[sizeof(f->prefix) + sizeof(SL_KEY_SHARE_ANNOUNCE)];
  int akl = snprintf(ak, sizeof ak, "%s" SL_KEY_SHARE_ANNOUNCE, f->prefix);
  for (uint32_t i = 0; i < cl->n; i++) {
    if (!take_key(f, cl->k[i].idx, cl->k[i].tag, r->element[i], 5)) continue;
    const struct sl_fleet_key *k = &f->keys[cl->k[i].idx];
    const char *args[] = {ak, k->name};
    size_t lens[] = {(size_t)akl, k->len};
    eval_on(f, sl_db_key_slot(ak, (size_t)akl), ann_add_script, sizeof(ann_add_script) - 1, 1, 2, args, lens,
            on_ignored, NULL);
  }
out:
  free(cl);
}

static int by_slot(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

/* After the heartbeat: the keys of the round, one key script per slot (at
 * most KEYS_PER_CALL keys each), with the heartbeat's N. */
static void send_keys(struct sl_fleet *f, const struct call *rd, long long nlive, uint64_t now) {
  uint64_t *order = sl_malloc((size_t)rd->n * sizeof(*order));
  char (*hk)[256] = sl_malloc((size_t)rd->n * sizeof(*hk));
  size_t *hl = sl_malloc((size_t)rd->n * sizeof(*hl));
  uint32_t m = 0;
  for (uint32_t i = 0; i < rd->n; i++) {
    if (atomic_load_explicit(&f->slots[rd->k[i].idx].tag, memory_order_relaxed) != rd->k[i].tag) continue;
    unsigned slot;
    int l = cluster_hash_key(f, &f->keys[rd->k[i].idx], hk[i], sizeof hk[i], &slot);
    if (l < 0) continue;
    hl[i] = (size_t)l;
    order[m++] = (uint64_t)slot << 32 | i;
  }
  qsort(order, m, sizeof(*order), by_slot);
  size_t cap = 3 + 4 * (size_t)KEYS_PER_CALL;
  const char **argv = sl_malloc(cap * sizeof(char *));
  size_t *lens = sl_malloc(cap * sizeof(size_t));
  char *nums = sl_malloc(((size_t)KEYS_PER_CALL * 2 + 2) * 24);
  char ttl[24], nl[24];
  size_t ttll = sl_u64toa(f->ttl_ms, ttl), nll = sl_u64toa((uint64_t)nlive, nl);
  for (uint32_t from = 0; from < m;) {
    unsigned slot = (unsigned)(order[from] >> 32);
    uint32_t to = from;
    while (to < m && to - from < KEYS_PER_CALL && (unsigned)(order[to] >> 32) == slot) to++;
    uint32_t n = to - from;
    struct call *cl = new_call(f, n, 1);
    size_t a = 0;
    for (uint32_t j = 0; j < n; j++) {
      uint32_t i = (uint32_t)order[from + j];
      argv[a] = hk[i], lens[a++] = hl[i];
    }
    argv[a] = f->id, lens[a++] = strlen(f->id);
    argv[a] = ttl, lens[a++] = ttll;
    argv[a] = nl, lens[a++] = nll;
    char *np = nums;
    for (uint32_t j = 0; j < n; j++) {
      uint32_t i = (uint32_t)order[from + j];
      cl->k[j] = rd->k[i];
      np += key_args(f, rd->k[i].idx, now, argv + a, lens + a, np);
      a += 3;
    }
    if (eval_on(f, slot, key_script, sizeof(key_script) - 1, (int)n, (int)a, argv, lens, on_keys, cl) == 0) {
      f->inflight++;
      sl_stat_inc(&f->stats.key_updates, n);
    } else {
      free(cl);
    }
    from = to;
  }
  free(argv);
  free(lens);
  free(nums);
  free(order);
  free(hk);
  free(hl);
}

/* The heartbeat's reply ({nlive, ids}): N, then the round's keys on their
 * slots. The round (priv) is freed here. */
static void on_heartbeat(void *owner, void *priv, const redisReply *r) {
  struct call *rd = priv;
  struct sl_fleet *f = owner;
  long long nlive;
  if (!f) goto out;
  f->inflight--;
  if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2 || reply_int(r->element[0], &nlive) || nlive < 1 ||
      r->element[1]->type != REDIS_REPLY_ARRAY) {
    sl_stat_inc(&f->stats.sync_errors, 1);
    log_error_reply(f, r);
    goto out;
  }
  uint64_t now = sl_mono_ms();
  unsigned n_before = f->n_last;
  take_instances(f, nlive, r->element[1]);
  if (f->rejoin) {
    /* back after an outage (sync_now sent no key): as on_redis_ready does
     * with one server, heartbeats only for a while */
    f->rejoin = 0;
    f->joined_at_ms = now + (f->ttl_ms / 2 > JOIN_MS_MIN ? JOIN_MS_MIN : f->ttl_ms / 2);
    set_word(f, SL_FLEET_JOINING, f->n_last);
  }
  if (rd->keys_allowed && rd->n) send_keys(f, rd, nlive, now);
  synced(f, rd->keys_allowed, n_before);
out:
  free(rd);
}

/* The announcements' reply ({last, ids}). */
static void on_announcements(void *owner, void *priv, const redisReply *r) {
  struct sl_fleet *f = owner;
  (void)priv;
  if (!f) return;
  f->inflight--;
  if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2 || r->element[0]->type != REDIS_REPLY_STRING ||
      r->element[0]->len >= sizeof(f->ann_last) || r->element[1]->type != REDIS_REPLY_ARRAY) {
    sl_stat_inc(&f->stats.sync_errors, 1);
    log_error_reply(f, r);
    return;
  }
  take_announcements(f, r->element[0], r->element[1]);
}

/* A cluster's sync of the keys pick[0..n): the heartbeat on the instances
 * zset's slot and the announcements read on the stream's (at once), then,
 * with the heartbeat's N, one key script per slot of the keys. */
static void cluster_sync(struct sl_fleet *f, const uint32_t *pick, uint32_t n, int keys_allowed, uint64_t now) {
  struct call *rd = new_call(f, n, keys_allowed);
  for (uint32_t i = 0; i < n; i++) name_key(f, rd, i, pick[i], now);
  char ik[sizeof(f->prefix) + sizeof(SL_KEY_SHARE_INSTANCES)], ak[sizeof(f->prefix) + sizeof(SL_KEY_SHARE_ANNOUNCE)];
  char ttl[24];
  int ikl = snprintf(ik, sizeof ik, "%s" SL_KEY_SHARE_INSTANCES, f->prefix);
  int akl = snprintf(ak, sizeof ak, "%s" SL_KEY_SHARE_ANNOUNCE, f->prefix);
  const char *hb[] = {ik, f->id, ttl};
  size_t hbl[] = {(size_t)ikl, strlen(f->id), sl_u64toa(f->ttl_ms, ttl)};
  if (eval_on(f, sl_db_key_slot(ik, (size_t)ikl), hb_script, sizeof(hb_script) - 1, 1, 3, hb, hbl, on_heartbeat,
              rd) != 0) {
    free(rd);
    return;
  }
  f->inflight++;
  const char *an[] = {ak, f->ann_last};
  size_t anl[] = {(size_t)akl, strlen(f->ann_last)};
  if (eval_on(f, sl_db_key_slot(ak, (size_t)akl), ann_read_script, sizeof(ann_read_script) - 1, 1, 2, an, anl,
              on_announcements, NULL) == 0)
    f->inflight++;
}

/* The keys pick[0..n) synced (none: a heartbeat and the announcements). */
static void sync_keys(struct sl_fleet *f, uint32_t n, int keys_allowed, uint64_t now) {
  f->last_sent_ms = now;
  if (sl_db_cluster(f->db)) {
    cluster_sync(f, f->pick, n, keys_allowed, now);
    return;
  }
  if (n == 0) {
    send_call(f, NULL, 0, keys_allowed, now);
    return;
  }
  for (uint32_t from = 0; from < n; from += KEYS_PER_CALL)
    send_call(f, f->pick + from, n - from < KEYS_PER_CALL ? n - from : KEYS_PER_CALL, 1, now);
}

/* Whether a coordinated key goes in this tick's sync: new, unsettled, its
 * demand moved by a tenth, offered back, or due for a refresh (a few times
 * per ttl). A steady key costs Redis a refresh every REFRESH_TICKS ticks,
 * not every tick. */
static int key_due(const struct sl_fleet *f, const struct sl_fleet_key *k, uint64_t now) {
  if (!k->sent_ms) return 1;
  /* Short of its target: again once the others have had a tick to give
   * back (every tick would resend what they cannot have answered yet). */
  if (k->unsettled && now - k->sent_ms >= 2 * (uint64_t)f->sync_ms - f->sync_ms / 2) return 1;
  /* Demand beyond the whole limit weighs the same in the water-filling (it
   * wants more than the pool either way): capped there, a throttled key's
   * noisy demand does not resync it every tick. A move of a quarter, and
   * of a tenth of the limit, resyncs at once; smaller ones wait for the
   * refresh. */
  uint64_t cap = (uint64_t)atomic_load_explicit(&f->slots[k - f->keys].limit, memory_order_relaxed) * 1000;
  uint64_t d = k->demand, s = k->sent_demand;
  if (cap) {
    d = d < cap ? d : cap;
    s = s < cap ? s : cap;
  }
  uint64_t moved = d > s ? d - s : s - d;
  if (moved * 4 > (s > d ? s : d) && moved * 10 >= cap) return 1;
  if (k->idle_since_ms && now - k->idle_since_ms >= RELEASE_IDLE_MS) return 1;
  uint64_t refresh = (uint64_t)f->sync_ms * REFRESH_TICKS;
  if (refresh > f->ttl_ms / 3) refresh = f->ttl_ms / 3;
  return now - k->sent_ms >= refresh;
}

static void sync_now(struct sl_fleet *f, uint64_t now) {
  if (!sl_db_ready(f->db) || f->inflight) return;
  int keys_allowed = !f->outage || !f->ever_synced || now >= f->joined_at_ms;
  if (f->rejoin && f->ever_synced) keys_allowed = 0; /* a cluster back after an outage: on_heartbeat */
  uint32_t n = 0;
  /* Alone: heartbeats only (alone_or_not), every tick while keys are busy
   * here so that another instance's arrival is seen within a tick. */
  int alone = f->ever_synced && f->n_last <= 1;
  if (keys_allowed && alone && f->nused) {
    sync_keys(f, 0, keys_allowed, now);
    return;
  }
  if (keys_allowed)
    for (uint32_t i = 0; i < f->nused; i++)
      if (key_due(f, &f->keys[f->used[i]], now)) f->pick[n++] = f->used[i];
  if (n == 0) {
    /* Nothing to sync: a heartbeat (and the announcements) is enough a few
     * times per ttl, not every sync interval. */
    uint64_t idle_every = f->ttl_ms / 3 < HEARTBEAT_IDLE_MS ? f->ttl_ms / 3 : HEARTBEAT_IDLE_MS;
    if (f->ever_synced && keys_allowed && now - f->last_sent_ms < idle_every) return;
  }
  sync_keys(f, n, keys_allowed, now);
}

static void on_redis_ready(void *data) {
  struct sl_fleet *f = data;
  if (sl_db_cluster(f->db)) { /* the first slot map: commands sent meanwhile are still answered */
    sync_now(f, sl_mono_ms());
    return;
  }
  f->inflight = 0;
  if (f->outage && f->ever_synced) {
    /* Back after an outage: the others may come back a little later (and a
     * restarted Redis holds no registrations): heartbeat first, so that the
     * leases granted count every instance. */
    f->joined_at_ms = sl_mono_ms() + (f->ttl_ms / 2 > JOIN_MS_MIN ? JOIN_MS_MIN : f->ttl_ms / 2);
    set_word(f, SL_FLEET_JOINING, f->n_last);
  }
  sync_now(f, sl_mono_ms());
}

/* One server only (a cluster answers each lost command instead). */
static void on_redis_down(void *data, const char *why) {
  struct sl_fleet *f = data;
  f->inflight = 0;
  on_down_mode(f, why);
}

static void on_tick(uv_timer_t *t) {
  struct sl_fleet *f = t->data;
  uint64_t now = sl_mono_ms();
  take_wants(f);
  measure(f, now, now - f->last_tick_ms);
  f->last_tick_ms = now;
  /* Replies that stop coming (a script error each time, a stuck server the
   * client has not dropped yet): past the lease's life, shares mean nothing. */
  uint64_t last = atomic_load_explicit(&f->stats.last_sync_ms, memory_order_relaxed);
  if (mode_now(f) == SL_FLEET_SHARED && now - last > f->ttl_ms) on_down_mode(f, "no sync within the ttl");
  sync_now(f, now);
}

/* Leaving (a clean stop): the heartbeat and every lease of this instance
 * go at once, so the others' next syncs take its share (a kill -9 leaves
 * that to the ttl). */
static const char leave_script[] =
    "local p, me = ARGV[1], ARGV[2] "
    "redis.call('ZREM', p .. '" SL_KEY_SHARE_INSTANCES "', me) "
    "for i = 3, #ARGV do redis.call('HDEL', p .. '" SL_KEY_SHARE "' .. ARGV[i], me) end "
    "return 1";

static void close_all(struct sl_fleet *f) {
  uv_timer_stop(&f->tick);
  sl__close((uv_handle_t *)&f->tick, NULL);
  sl__close((uv_handle_t *)&f->stop, NULL);
  if (f->db) {
    sl_db_stop(f->db);
    f->db = NULL;
  }
}

/* A part of the leave answered: the last closes (owner NULL: dropped or
 * stopping, left to the timeout). */
static void on_left(void *owner, void *priv, const redisReply *reply) {
  (void)priv, (void)reply;
  struct sl_fleet *f = owner;
  if (f && --f->leaving == 0) close_all(f);
}

static void on_leave_timeout(uv_timer_t *t) { close_all(t->data); }

/* A cluster's leave: ZREM on the zset's slot, an HDEL per key on its own. */
static void send_leave_cluster(struct sl_fleet *f) {
  char key[256];
  int l = snprintf(key, sizeof key, "%s" SL_KEY_SHARE_INSTANCES, f->prefix);
  const char *argv[] = {"ZREM", key, f->id};
  size_t lens[] = {4, (size_t)l, strlen(f->id)};
  if (sl_db_command(f->db, sl_db_key_slot(key, (size_t)l), on_left, NULL, 3, argv, lens) == 0) f->leaving++;
  argv[0] = "HDEL", lens[0] = 4;
  for (uint32_t i = 0; i < f->nused; i++) {
    unsigned slot;
    if ((l = cluster_hash_key(f, &f->keys[f->used[i]], key, sizeof key, &slot)) < 0) continue;
    lens[1] = (size_t)l;
    if (sl_db_command(f->db, slot, on_left, NULL, 3, argv, lens) == 0) f->leaving++;
  }
}

/* Sends the leave; returns 0, or -1 when nothing could be sent. */
static int send_leave(struct sl_fleet *f) {
  if (!sl_db_ready(f->db)) return -1;
  f->leaving = 0;
  if (sl_db_cluster(f->db)) {
    send_leave_cluster(f);
    return f->leaving ? 0 : -1;
  }
  size_t argc = 5 + (size_t)f->nused;
  const char **argv = sl_malloc(argc * sizeof(char *));
  size_t *lens = sl_malloc(argc * sizeof(size_t)), a = 0;
  argv[a] = "EVAL", lens[a++] = 4;
  argv[a] = leave_script, lens[a++] = sizeof(leave_script) - 1;
  argv[a] = "0", lens[a++] = 1;
  argv[a] = f->prefix, lens[a++] = strlen(f->prefix);
  argv[a] = f->id, lens[a++] = strlen(f->id);
  for (uint32_t i = 0; i < f->nused; i++) {
    const struct sl_fleet_key *k = &f->keys[f->used[i]];
    argv[a] = k->name, lens[a++] = k->len;
  }
  int rc = sl_db_command(f->db, 0, on_left, NULL, (int)a, argv, lens) == 0 ? 0 : -1;
  if (rc == 0) f->leaving = 1;
  free(argv);
  free(lens);
  return rc;
}

static void on_stop(uv_async_t *a) {
  struct sl_fleet *f = a->data;
  if (send_leave(f) == 0) {
    uv_timer_start(&f->tick, on_leave_timeout, LEAVE_WAIT_MS, 0); /* the reply closes, or this */
    return;
  }
  close_all(f);
}

static void make_id(struct sl_fleet *f) {
  char host[64] = "host";
  uint32_t rnd;
  gethostname(host, sizeof(host) - 1);
  host[sizeof(host) - 1] = '\0';
  for (char *p = host; *p; p++)
    if (*p == ':' || *p == '"' || *p == '\\' || (unsigned char)*p < 0x21 || (unsigned char)*p > 0x7e) *p = '_';
  if (getrandom(&rnd, sizeof(rnd), 0) != sizeof(rnd)) rnd = (uint32_t)uv_hrtime();
  snprintf(f->id, sizeof(f->id), "%s/%d/%08x", host, (int)getpid(), rnd);
}

/* The table and what the workers use, without the thread. */
static int table_init(struct sl_fleet *f, unsigned cap, unsigned nworkers) {
  f->cap = cap;
  uint32_t slots = 16;
  while (slots < 2 * f->cap) slots <<= 1;
  f->mask = slots - 1;
  f->nworkers = nworkers;
  f->n_last = 1;
  pthread_mutex_init(&f->text_lock, NULL);
  if (posix_memalign((void **)&f->slots, 64, (size_t)slots * sizeof(*f->slots)) != 0) return -ENOMEM;
  memset(f->slots, 0, (size_t)slots * sizeof(*f->slots));
  f->keys = sl_calloc(slots, sizeof(*f->keys));
  f->used = sl_calloc(f->cap, sizeof(*f->used));
  f->pick = sl_calloc(f->cap, sizeof(*f->pick));
  f->recent = sl_calloc(nworkers, sizeof(*f->recent));
  int r = sl_ring_init(&f->wants, SL_FLEET_WANTS, sizeof(struct wantmsg));
  if (r != 0) {
    free(f->slots);
    free(f->keys);
    free(f->used);
    free(f->pick);
    free(f->recent);
    f->slots = NULL;
    return r;
  }
  /* Until Redis answers: alone (the whole limit), as with --global-limits off. */
  set_word(f, SL_FLEET_FALLBACK, 1);
  return 0;
}

static void table_free(struct sl_fleet *f) {
  sl_ring_free(&f->wants);
  free(f->slots);
  free(f->keys);
  free(f->used);
  free(f->pick);
  free(f->recent);
  pthread_mutex_destroy(&f->text_lock);
  f->slots = NULL;
}

int sl_fleet_table_init_test(struct sl_fleet *f, unsigned cap, unsigned nworkers) {
  memset(f, 0, sizeof(*f));
  snprintf(f->id, sizeof(f->id), "test/1/00000000");
  f->ttl_ms = 1500;
  return table_init(f, cap, nworkers);
}

void sl_fleet_table_free_test(struct sl_fleet *f) { table_free(f); }

void sl_fleet_table_reset_test(struct sl_fleet *f) {
  struct wantmsg m;
  while (sl_ring_pop(&f->wants, &m) == 0) {
  }
  memset(f->slots, 0, ((size_t)f->mask + 1) * sizeof(*f->slots));
  memset(f->keys, 0, ((size_t)f->mask + 1) * sizeof(*f->keys));
  memset(f->recent, 0, f->nworkers * sizeof(*f->recent));
  f->nused = 0;
  f->n_last = 1;
  f->ann_last[0] = '\0';
  f->outage = f->ever_synced = f->outage_logged = 0;
  memset(&f->stats, 0, sizeof(f->stats));
  set_word(f, SL_FLEET_FALLBACK, 1);
}

void sl_fleet_take_wants_test(struct sl_fleet *f) { take_wants(f); }

int sl_fleet_start(struct sl_fleet *f, const struct sl_config *cfg, unsigned nworkers, char *err, size_t errlen) {
  int r;
  f->sync_ms = cfg->global_sync_ms;
  f->ttl_ms = cfg->global_ttl_ms;
  snprintf(f->prefix, sizeof(f->prefix), "%s", cfg->redis_prefix);
  make_id(f);
  if ((r = table_init(f, cfg->global_keys, nworkers)) != 0) {
    snprintf(err, errlen, "global limits: no memory for %u keys", cfg->global_keys);
    return r;
  }
  if ((r = uv_loop_init(&f->loop)) != 0) {
    snprintf(err, errlen, "global limits loop: %s", uv_strerror(r));
    goto err_table;
  }
  uv_async_init(&f->loop, &f->stop, on_stop);
  f->stop.data = f;
  uv_timer_init(&f->loop, &f->tick);
  f->tick.data = f;
  struct sl_redis_opts o = {
      .addr = cfg->redis,
      .timeout_ms = cfg->redis_timeout_ms,
      .backoff_max_ms = 250, /* the fleet is on fallback shares meanwhile: come back soon */
      .log_subject = "global limits: redis",
      .up = &f->stats.redis_up,
      .on_ready = on_redis_ready,
      .on_down = on_redis_down,
      .data = f,
  };
  if ((r = sl_db_init(&f->db, &f->loop, &o)) != 0) {
    snprintf(err, errlen, "redis: '%s': %s", cfg->redis, uv_strerror(r));
    goto err_handles;
  }
  f->last_tick_ms = sl_mono_ms();
  sl_db_start(f->db);
  uv_timer_start(&f->tick, on_tick, f->sync_ms, f->sync_ms);
  if ((r = sl_loop_thread_start(&f->thread, &f->loop, "sluice-fleet")) != 0) {
    snprintf(err, errlen, "global limits thread: %s", uv_strerror(r));
    sl_db_stop(f->db);
    f->db = NULL;
    goto err_handles;
  }
  return 0;
err_handles:
  uv_close((uv_handle_t *)&f->tick, NULL);
  uv_close((uv_handle_t *)&f->stop, NULL);
  uv_run(&f->loop, UV_RUN_DEFAULT);
  uv_loop_close(&f->loop);
err_table:
  table_free(f);
  return r;
}

void sl_fleet_wait_first(struct sl_fleet *f, unsigned timeout_ms) {
  uint64_t end = sl_mono_ms() + timeout_ms;
  /* relaxed: a counter polled; the word it precedes is read relaxed too. */
  while (atomic_load_explicit(&f->stats.syncs, memory_order_relaxed) == 0 &&
         atomic_load_explicit(&f->stats.fallbacks, memory_order_relaxed) == 0 && !f->outage_seen &&
         sl_mono_ms() < end)
    uv_sleep(2);
}

void sl_fleet_stop(struct sl_fleet *f) {
  if (!f->slots) return;
  uv_async_send(&f->stop);
  uv_thread_join(&f->thread);
  uv_run(&f->loop, UV_RUN_DEFAULT); /* close callbacks of what hiredis and the client left */
  uv_loop_close(&f->loop);
  table_free(f);
}
