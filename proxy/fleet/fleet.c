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
#define REFRESH_TICKS 50       /* a steady key is synced every this many ticks (nudges carry changes sooner) */
#define POLL_TICKS 2           /* with keys coordinated and no bell (a cluster): the nudges read this often */
#define HEARTBEAT_IDLE_MS 500  /* with no key coordinated: heartbeats this often (at most ttl / 3) */
#define DEMAND_FLOOR 100       /* milli-requests/s under which a demand counts as none */
#define MOVE_MIN_PPM 100000u   /* a move of a tenth of the limit at least (noise on small shares is not one) */
#define DEMAND_MAX 900000000u  /* milli-requests/s sent at most: demand * 1e7 + lease stays exact in Lua */

/* Why a key is in a sync: the script's per-key flag. */
#define FL_REFRESH '0' /* a refresh, or another instance nudged it */
#define FL_MOVED '1'   /* new here, or its demand moved: the others are nudged if that frees share */
#define FL_RELEASE '2' /* idle here: offered back to local shares */
#define FL_RETRY '3'   /* unsettled: again once the others have had a tick to give back (no nudge) */

/* The scripts, sent by EVALSHA (EVAL when Redis says NOSCRIPT). */
enum { SC_SYNC, SC_HB, SC_ANN_READ, SC_ANN_ADD, SC_KEY, SC_N };

/* The fleet thread's own state of a slot. */
struct sl_fleet_key {
  uint64_t last_attempts;
  uint64_t demand;        /* milli-requests/s, smoothed */
  uint64_t idle_since_ms; /* since when the demand here is none (0: busy) */
  uint64_t quiet;         /* requests expected since the last tick with one (1e6 each; measure) */
  uint8_t quiet_ticks;    /* ticks since then */
  uint64_t sent_ms;       /* when (0: never) */
  int unsettled;          /* the last grant was a fifth or more below the target: a retry two ticks later */
  uint8_t contended;      /* the last sync cut some instance's want (the water level) */
  uint8_t capped;         /* ... this one's: more demand here changes nothing */
  char flag;              /* FL_*: why it is in the sync being built */
  char sent_flag;         /* ... and in the last one sent */
  uint8_t nudged;         /* another instance's sync changed what this one should have: sync now */
  uint8_t redo;           /* the last sync was lost: again at the next tick, with sent_flag */
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
  size_t old_len; /* a heartbeat: the bytes of old_members it carried */
  struct {
    uint32_t idx;
    uint64_t tag;
  } k[];
};

/* The parts of the sync scripts, shared by the one-server script and the
 * cluster's three (the same Lua either way). */
/* The heartbeat into the instances' zset ik (and this process's earlier
 * sessions out of it, `old`: space-separated): ids, every live session,
 * and nlive; moved (a number) when a session joined or expired. */
#define LUA_HEARTBEAT                                                                                                  \
  "for m in string.gmatch(old, '%S+') do redis.call('ZREM', ik, m) end "                                               \
  "local moved = redis.call('ZADD', ik, now + ttl, me) "                                                               \
  "moved = moved + redis.call('ZREMRANGEBYSCORE', ik, '-inf', now) "                                                   \
  "local ids = redis.call('ZRANGE', ik, 0, -1) "                                                                       \
  "local nlive = #ids "
/* The announcements after `last` in the stream ak (at first only the
 * newest's id), but this session's own: sets last, and ann to pairs of key
 * name and kind ('a' announced: join it; 'n' nudged: sync it now; 'an'). */
#define LUA_READ_ANNOUNCE                                                                                              \
  "if last == '' then "                                                                                                \
  "  local top = redis.call('XREVRANGE', ak, '+', '-', 'COUNT', 1) "                                                   \
  "  if #top > 0 then last = top[1][1] else last = '0-0' end "                                                         \
  "else "                                                                                                              \
  "  local got = redis.call('XRANGE', ak, '(' .. last, '+', 'COUNT', 256) "                                            \
  "  for i = 1, #got do "                                                                                              \
  "    local e = got[i][2] "                                                                                           \
  "    if e[2] and e[4] ~= me then ann[#ann + 1] = e[2]; ann[#ann + 1] = e[6] or 'a' end "                             \
  "    last = got[i][1] "                                                                                              \
  "  end "                                                                                                             \
  "end "
/* What sync_key needs besides me, now and ttl: q (R/N in ppm) and the set
 * of live sessions (ids: the heartbeat's). */
#define LUA_LIVE                                                                                                       \
  "local q = math.floor(1000000 / nlive) "                                                                             \
  "local live, life = {}, 10 * ttl "                                                                                   \
  "for i = 1, #ids do live[ids[i]] = true end "
/* sync_key(hk, lim, dem, fl): one key's lease. A field of the hash is a
 * session (a value of demand * 1e7 + lease: one tonumber, no string
 * parsing) and counts while that session heartbeats; other fields are
 * dropped. Returns the reply entry {lease, fleet demand, registered,
 * state}, and what to add to the stream: 0, 1 (announce: a live instance is
 * not registered; '~a' is set here), 2 (nudge: the registered others
 * should sync now: those with demand when this one registered, its demand
 * fell or it gave back 5% of the limit or more; any, idle ones too, when
 * it is short of its target, since they hold it) or 3 (both). */
#define LUA_SYNC_KEY                                                                                                   \
  "local function sync_key(hk, lim, dem, fl) "                                                                         \
  "  local h = redis.call('HGETALL', hk) "                                                                             \
  "  local others, odem, n, annt, exp, old, w = 0, 0, 0, 0, nil, nil, {} "                                             \
  "  for j = 1, #h, 2 do "                                                                                             \
  "    local f = h[j] "                                                                                                \
  "    if f == me then old = tonumber(h[j + 1]) "                                                                      \
  "    elseif live[f] then "                                                                                           \
  "      local v = tonumber(h[j + 1]) or 0 "                                                                           \
  "      local l = v % 10000000 "                                                                                      \
  "      local d = (v - l) / 10000000 "                                                                                \
  "      others = others + l; odem = odem + d; n = n + 1; w[n] = d "                                                   \
  "    elseif f == '~a' then annt = tonumber(h[j + 1]) or 0 "                                                          \
  "    elseif f == '~e' then exp = tonumber(h[j + 1]) "                                                                \
  "    else redis.call('HDEL', hk, f) end "                                                                            \
  "  end "                                                                                                             \
  "  local nreg = n + 1 "                                                                                              \
  "  local unreg = nlive - nreg "                                                                                      \
  "  if unreg < 0 then unreg = 0 end "                                                                                 \
  "  if fl == '2' and odem == 0 and others + (unreg + 1) * q <= 1000000 then "                                         \
  "    redis.call('HDEL', hk, me) "                                                                                    \
  "    return {0, 0, n, 1}, 0 "                                                                                        \
  "  end "                                                                                                             \
  "  local pool = 1000000 - unreg * q "                                                                                \
  "  if pool < 0 then pool = 0 end "                                                                                   \
  "  local fl0 = math.floor(pool / (50 * nreg)) "                                                                      \
  "  local target, level, c = fl0, nil, 0 "                                                                            \
  "  if lim > 0 then "                                                                                                 \
  "    local rem, k = pool - fl0 * nreg, nreg "                                                                        \
  "    c = 1250000 / lim "                                                                                             \
  "    w[nreg] = dem "                                                                                                 \
  "    if nreg > 1 then table.sort(w) end "                                                                            \
  "    for j = 1, nreg do "                                                                                            \
  "      local x, fair = w[j] * c, rem / k "                                                                           \
  "      if x <= fair then rem = rem - x; k = k - 1 else level = fair; break end "                                     \
  "    end "                                                                                                           \
  "    if level then target = fl0 + math.min(dem * c, level) else target = fl0 + dem * c + rem / nreg end "            \
  "  end "                                                                                                             \
  "  local g = math.floor(math.min(target, pool - others)) "                                                           \
  "  if g < 0 then g = 0 end "                                                                                         \
  "  local od = old and (old - old % 10000000) / 10000000 "                                                            \
  "  local write = not old or old % 10000000 ~= g or math.abs(dem - od) * 8 > math.max(dem, od) "                      \
  "  if not exp or now - exp >= life / 3 then "                                                                        \
  "    if write then redis.call('HSET', hk, me, string.format('%d%07d', dem, g), '~e', now) "                          \
  "    else redis.call('HSET', hk, '~e', now) end "                                                                    \
  "    redis.call('PEXPIRE', hk, life) "                                                                               \
  "  elseif write then redis.call('HSET', hk, me, string.format('%d%07d', dem, g)) end "                               \
  "  local st, an = 0, 0 "                                                                                             \
  "  if g < math.floor(target * 0.8) then st = 2 end "                                                                 \
  "  if level then st = st + 4; if dem * c > level then st = st + 8 end end "                                          \
  "  if unreg > 0 and odem + dem > 0 and now - annt >= 1000 then redis.call('HSET', hk, '~a', now); an = 1 end "       \
  "  if n > 0 and ((odem > 0 and ((fl == '1' and (not old or dem < od)) or (old and old % 10000000 - g >= 50000))) "  \
  "               or (st % 4 == 2 and fl ~= '3')) then an = an + 2 end "                                               \
  "  return {g, odem + dem, nreg, st}, an "                                                                            \
  "end "
#define LUA_NOW                                                                                                        \
  "local t = redis.call('TIME') "                                                                                      \
  "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) "

/* One call: heartbeat, announcements, and the leases of the keys named.
 * ARGV: prefix, this session, ttl ms, earlier sessions to drop ('' mostly),
 * last announcement id read ('' at first), key count, then per key: name,
 * limit and demand (milli-requests/s), flag (FL_*). A key's hash holds, per
 * registered session, demand * 1e7 + lease (lease in ppm of the limit;
 * not rewritten when only the demand moved by less than an eighth), "~a",
 * when the key was last announced, and "~e", when its expiry (10 ttl) was
 * last set (every 10 ttl / 3: not a PEXPIRE per sync). A lease counts
 * while its session is in the instances zset (heartbeats, ttl): a key is
 * synced when it changes, not to keep its lease alive. Invariant kept for
 * every key:
 * the leases plus floor(1e6 / N) for every live instance not registered on
 * it (which admits that much without asking) never exceed 1e6. A key is
 * announced only while it has demand (a key going quiet is not called back
 * in). Shares follow demand by water-filling (each instance wants its
 * demand + 25%; what is left goes equally), above a floor of pool / (50 n)
 * each. Per key it returns the lease, the fleet's demand, the instances
 * registered, and a state: 0 (settled), 1 (released: back to R/N) or 2
 * (unsettled: others still hold more than a fifth of this instance's
 * target; they are nudged, and it syncs again two ticks later), plus 4
 * when the water level cut some instance's want (contended) and 8 when it
 * cut this one's. Key names: keys.h. */
static const char sync_script[] =
    "local p, me, ttl, old = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] "
    LUA_NOW
    "local ik = p .. '" SL_KEY_SHARE_INSTANCES "' "
    LUA_HEARTBEAT
    "local ak = p .. '" SL_KEY_SHARE_ANNOUNCE "' "
    "local last, ann = ARGV[5], {} "
    LUA_READ_ANNOUNCE
    LUA_LIVE
    LUA_SYNC_KEY
    "local out, kinds, added = {nlive, last, ann, ids}, {'a', 'n', 'an'}, false "
    "for i = 0, tonumber(ARGV[6]) - 1 do "
    "  local b = 7 + i * 4 "
    "  local e, an = sync_key(p .. '" SL_KEY_SHARE "' .. ARGV[b], tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), "
    "                         ARGV[b + 3]) "
    "  if an > 0 then "
    "    redis.call('XADD', ak, 'MAXLEN', '~', 1000, '*', 'key', ARGV[b], 'by', me, 'k', kinds[an]) "
    "    added = true "
    "  end "
    "  out[#out + 1] = e "
    "end "
    "redis.call('PEXPIRE', ik, 10 * ttl) "
    "if added then redis.call('PEXPIRE', ak, 3600000) end "
    "if added or moved > 0 then redis.call('PUBLISH', p .. '" SL_CHANNEL_SHARE_BELL "', me) end "
    "return out";

/* A Redis Cluster (SPEC 10): a script touches the keys of one slot only, so
 * a sync is split (docs/limits.md). The heartbeat, on the instances zset's
 * slot: KEYS[1] the zset; ARGV: session, ttl ms, earlier sessions to drop.
 * Returns {nlive, ids}. */
static const char hb_script[] =
    "local ik, me, ttl, old = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3] "
    LUA_NOW
    LUA_HEARTBEAT
    "redis.call('PEXPIRE', ik, 10 * ttl) "
    "return {nlive, ids}";

/* The announcements read, on the stream's slot: KEYS[1] the stream; ARGV:
 * the last id read ('' at first), this session. Returns {last,
 * announcements}. */
static const char ann_read_script[] =
    "local ak, last, me, ann = KEYS[1], ARGV[1], ARGV[2], {} "
    LUA_READ_ANNOUNCE
    "return {last, ann}";

/* A key announced or nudged (the key script said so), on the stream's
 * slot: KEYS[1] the stream, ARGV: the key's name, this session, the kind. */
static const char ann_add_script[] =
    "redis.call('XADD', KEYS[1], 'MAXLEN', '~', 1000, '*', 'key', ARGV[1], 'by', ARGV[2], 'k', ARGV[3]) "
    "redis.call('PEXPIRE', KEYS[1], 3600000) "
    "return 1";

/* The leases of keys of one slot: KEYS the keys' hashes
 * (share:{<uid>}:<feature>:<region>); ARGV: session, ttl ms, the number of
 * live sessions and their ids (the heartbeat's reply), then per key limit,
 * demand, flag as above. Per key {lease, fleet demand, registered, state,
 * stream (sync_key's: 1 announce, 2 nudge, 3 both)}. */
static const char key_script[] =
    "local me, ttl, nlive = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]) or 0 "
    "local ids = {} "
    "for i = 1, nlive do ids[i] = ARGV[3 + i] end "
    "if nlive < 1 then nlive = 1 end "
    LUA_NOW
    LUA_LIVE
    LUA_SYNC_KEY
    "local out, b = {}, 4 + #ids "
    "for i = 1, #KEYS do "
    "  local e, an = sync_key(KEYS[i], tonumber(ARGV[b]), tonumber(ARGV[b + 1]), ARGV[b + 2]) "
    "  e[5] = an "
    "  out[i] = e "
    "  b = b + 3 "
    "end "
    "return out";

static const char *const scripts[SC_N] = {sync_script, hb_script, ann_read_script, ann_add_script, key_script};
static const size_t script_len[SC_N] = {sizeof(sync_script) - 1, sizeof(hb_script) - 1, sizeof(ann_read_script) - 1,
                                        sizeof(ann_add_script) - 1, sizeof(key_script) - 1};

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
    /* Requests the demand made expected since the last one seen: past 5
     * (and two ticks), the load has stopped here (odds of such a gap by
     * chance: e^-5) and the demand is none at once, not halved tick by
     * tick, so that its share goes to whoever has the load within the
     * second. (milli-requests/s x ms: 1e6 a request.) */
    k->quiet = rate ? 0 : k->quiet + (k->demand * dt_ms < 5000000 ? k->demand * dt_ms : 5000000);
    k->quiet_ticks = rate ? 0 : k->quiet_ticks + (k->quiet_ticks < 255);
    k->demand = (k->demand + rate) / 2;
    if (rate == 0 && (k->demand < DEMAND_FLOOR || (k->quiet >= 5000000 && k->quiet_ticks >= 2))) k->demand = 0;
    if (k->demand == 0) {
      if (!k->idle_since_ms) k->idle_since_ms = now;
    } else {
      k->idle_since_ms = 0;
    }
    atomic_store_explicit(&f->slots[idx].local_demand, k->demand, memory_order_relaxed);
  }
}

/* ---- Redis ---- */

/* A new session (fleet.h): the current one goes to the list that the
 * next heartbeat drops from the zset, so that its leases stop counting at
 * once (with four waiting the oldest is left to expire within the ttl). */
static void new_session(struct sl_fleet *f) {
  size_t ml = strlen(f->member), ol = strlen(f->old_members);
  while (ml && ol && ol + ml + 2 > sizeof(f->old_members)) {
    char *sp = strchr(f->old_members, ' ');
    size_t drop = sp ? (size_t)(sp - f->old_members) + 1 : ol;
    memmove(f->old_members, f->old_members + drop, ol - drop + 1);
    ol -= drop;
  }
  if (ml) snprintf(f->old_members + ol, sizeof(f->old_members) - ol, "%s%s", ol ? " " : "", f->member);
  snprintf(f->member, sizeof(f->member), "%s#%u", f->id, ++f->session);
}

/* A heartbeat that carried the first old_len bytes of old_members was
 * answered: those sessions are gone from the zset. */
static void old_members_dropped(struct sl_fleet *f, size_t old_len) {
  size_t ol = strlen(f->old_members);
  if (old_len == 0 || old_len > ol) return;
  if (f->old_members[old_len] == ' ') old_len++;
  memmove(f->old_members, f->old_members + old_len, ol - old_len + 1);
}

static void on_down_mode(struct sl_fleet *f, const char *why) {
  f->outage = 1;
  f->rejoin = sl_db_cluster(f->db); /* one server: on_redis_ready says when it is back */
  atomic_store_explicit(&f->outage_seen, 1, memory_order_relaxed);
  if (mode_now(f) != SL_FLEET_FALLBACK) {
    set_word(f, SL_FLEET_FALLBACK, f->n_last);
    sl_stat_inc(&f->stats.fallbacks, 1);
    /* The leases here are no longer kept: they must not count when the
     * others see this instance again (it comes back as unregistered on
     * every key, holding R/N_last, until its keys sync). */
    new_session(f);
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
    const char *hash = memchr(e->str, '#', e->len); /* <id>#<session>: the id */
    size_t len = hash ? (size_t)(hash - e->str) : e->len;
    for (size_t j = 0; j < len; j++) {
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
  if (f->n_last > 1 && n_before > 1) {
    /* N changed: every key's R/N and pool did; each syncs at the next tick
     * (a nudge: its leases counted while its session lived, a dead
     * instance's did not once it left the zset) */
    if (f->n_last != n_before)
      for (uint32_t i = 0; i < f->nused; i++) f->keys[f->used[i]].nudged = 1;
    return;
  }
  /* Alone: its keys are not synced, so its leases stop being kept; a new
   * session makes them stop counting for whoever comes next. */
  if (f->n_last <= 1 && n_before > 1) new_session(f);
  uint32_t share = SL_FLEET_PPM / (f->n_last ? f->n_last : 1);
  for (uint32_t i = 0; i < f->nused; i++) {
    uint32_t idx = f->used[i];
    struct sl_fleet_key *k = &f->keys[idx];
    if (f->n_last > 1 && k->sent_ms) continue; /* already shared */
    atomic_store_explicit(&f->slots[idx].share, share, memory_order_relaxed);
    if (f->n_last <= 1) { /* for /explain: this instance alone holds the key */
      atomic_store_explicit(&f->slots[idx].registered, 1, memory_order_relaxed);
      atomic_store_explicit(&f->slots[idx].fleet_demand, k->demand, memory_order_relaxed);
    }
    k->sent_ms = 0;
    k->unsettled = 0;
    k->contended = k->capped = 0;
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

/* The stream's entries, pairs of a key's name and a kind: announced ('a':
 * busy elsewhere; this instance registers on it, with its demand, maybe
 * none, so that its R/N of it is freed) and nudged ('n': another
 * instance's sync changed what this one should hold; synced at the next
 * tick if coordinated here). last: the newest id read (shorter than
 * ann_last, checked by the caller). */
static void take_announcements(struct sl_fleet *f, const redisReply *last, const redisReply *ann) {
  memcpy(f->ann_last, last->str, last->len);
  f->ann_last[last->len] = '\0';
  for (size_t i = 0; i + 1 < ann->elements && i < 2 * ANNOUNCE_MAX; i += 2) {
    const redisReply *e = ann->element[i], *kind = ann->element[i + 1];
    char key[SL_FLEET_KEY_MAX];
    size_t kl;
    if (e->type != REDIS_REPLY_STRING || kind->type != REDIS_REPLY_STRING ||
        !(kl = bucket_key_of(e->str, e->len, key)))
      continue;
    uint64_t tag = norm_tag(lim_hash(key, kl));
    struct sl_fleet_slot *s = sl_fleet_find(f, tag);
    if (s) {
      if (memchr(kind->str, 'n', kind->len)) f->keys[s - f->slots].nudged = 1;
    } else if (memchr(kind->str, 'a', kind->len) && insert(f, tag, key, kl, 0) != 0) {
      sl_stat_inc(&f->stats.keys_full, 1);
    }
  }
}

/* One key's entry of a reply ({lease, fleet demand, registered, state}
 * and, with width 5, what to add to the stream). Returns that (a cluster's
 * key script: 1 announce, 2 nudge, 3 both), 0 when nothing or when the
 * entry was not taken (malformed, or the slot holds another key now). */
static int take_key(struct sl_fleet *f, uint32_t idx, uint64_t tag, const redisReply *e, size_t width) {
  long long g, dem, nreg, released, an = 0;
  if (e->type != REDIS_REPLY_ARRAY || e->elements != width || reply_int(e->element[0], &g) ||
      reply_int(e->element[1], &dem) || reply_int(e->element[2], &nreg) || reply_int(e->element[3], &released) ||
      (width > 4 && reply_int(e->element[4], &an)) || g < 0 || g > SL_FLEET_PPM || dem < 0 || nreg < 0)
    return 0;
  struct sl_fleet_slot *s = &f->slots[idx];
  if (atomic_load_explicit(&s->tag, memory_order_relaxed) != tag) return 0; /* released meanwhile */
  if ((released & 3) == 1) {
    release_slot(f, idx);
    return 0;
  }
  f->keys[idx].unsettled = (released & 3) == 2;
  f->keys[idx].contended = (released & 4) != 0;
  f->keys[idx].capped = (released & 8) != 0;
  atomic_store_explicit(&s->share, (uint32_t)g, memory_order_relaxed);
  atomic_store_explicit(&s->fleet_demand, (uint64_t)dem, memory_order_relaxed);
  atomic_store_explicit(&s->registered, (uint32_t)nreg, memory_order_relaxed);
  return an >= 0 && an <= 3 ? (int)an : 0;
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
  old_members_dropped(f, cl->old_len);
  take_instances(f, nlive, r->element[3]);
  take_announcements(f, r->element[1], r->element[2]);
  for (uint32_t i = 0; i < cl->n; i++) take_key(f, cl->k[i].idx, cl->k[i].tag, r->element[4 + i], 4);
  synced(f, cl->keys_allowed, n_before);
  return 0;
}

/* The keys a call named, when it was lost or refused: again at the next
 * tick, as they were sent (a refresh-only sync would not be repeated
 * before the next refresh otherwise). */
static void redo_keys(struct sl_fleet *f, const struct call *cl) {
  for (uint32_t i = 0; i < cl->n; i++)
    if (atomic_load_explicit(&f->slots[cl->k[i].idx].tag, memory_order_relaxed) == cl->k[i].tag)
      f->keys[cl->k[i].idx].redo = 1;
}

static void on_synced(void *owner, void *priv, const redisReply *reply) {
  struct call *cl = priv;
  struct sl_fleet *f = owner; /* NULL: the connection was dropped, or stopping */
  if (f) {
    f->inflight--;
    if (apply_reply(f, cl, reply) != 0) redo_keys(f, cl);
  }
  free(cl);
}

int sl_fleet_apply_reply_test(struct sl_fleet *f, const uint32_t *idx, uint32_t n, const struct redisReply *r) {
  struct call *cl = sl_calloc(1, sizeof(*cl) + (size_t)n * sizeof(cl->k[0]));
  cl->f = f;
  cl->n = n;
  cl->keys_allowed = 1;
  for (uint32_t i = 0; i < n; i++) {
    cl->k[i].idx = idx[i] & f->mask;
    cl->k[i].tag = atomic_load_explicit(&f->slots[cl->k[i].idx].tag, memory_order_relaxed);
  }
  int rc = apply_reply(f, cl, r);
  if (rc != 0) redo_keys(f, cl);
  free(cl);
  return rc;
}

static struct call *new_call(struct sl_fleet *f, uint32_t n, int keys_allowed) {
  struct call *cl = sl_calloc(1, sizeof(*cl) + (size_t)n * sizeof(cl->k[0]));
  cl->f = f;
  cl->n = n;
  cl->keys_allowed = keys_allowed;
  return cl;
}

/* A key named in a sync: its flag as sent, and its slot and tag
 * in cl. */
static void name_key(struct sl_fleet *f, struct call *cl, uint32_t i, uint32_t idx, uint64_t now) {
  struct sl_fleet_key *k = &f->keys[idx];
  k->sent_ms = now;
  k->sent_flag = k->flag;
  k->nudged = 0;
  k->redo = 0;
  cl->k[i].idx = idx;
  cl->k[i].tag = atomic_load_explicit(&f->slots[idx].tag, memory_order_relaxed);
}

/* The per-key arguments every script takes: limit and demand in
 * milli-requests/s, flag. np: room for two numbers. Returns the room
 * used. */
static size_t key_args(struct sl_fleet *f, uint32_t idx, const char **argv, size_t *lens, char *np) {
  static const char flags[] = {FL_REFRESH, FL_MOVED, FL_RELEASE, FL_RETRY};
  const struct sl_fleet_key *k = &f->keys[idx];
  size_t l1 = sl_u64toa((uint64_t)atomic_load_explicit(&f->slots[idx].limit, memory_order_relaxed) * 1000, np);
  size_t l2 = sl_u64toa(k->demand < DEMAND_MAX ? k->demand : DEMAND_MAX, np + l1 + 1);
  argv[0] = np, lens[0] = l1;
  argv[1] = np + l1 + 1, lens[1] = l2;
  unsigned fl = (unsigned)(k->flag - FL_REFRESH);
  argv[2] = &flags[fl < 4 ? fl : 0], lens[2] = 1;
  return l1 + l2 + 2;
}

/* One server: the one script, for the keys pick[0..n). */
static void send_call(struct sl_fleet *f, const uint32_t *pick, uint32_t n, int keys_allowed, uint64_t now) {
  struct call *cl = new_call(f, n, keys_allowed);
  size_t argc = 7 + 4 * (size_t)n;
  const char **argv = sl_malloc(argc * sizeof(char *));
  size_t *lens = sl_malloc(argc * sizeof(size_t));
  char *nums = sl_malloc(((size_t)n * 2 + 2) * 24);
  char *np = nums;
  size_t a = 0, l;
#define ARG(s, len) (argv[a] = (s), lens[a++] = (len))
#define NUM(v) (l = sl_u64toa((v), np), ARG(np, l), np += l + 1)
  ARG("0", 1);
  ARG(f->prefix, strlen(f->prefix));
  ARG(f->member, strlen(f->member));
  NUM(f->ttl_ms);
  cl->old_len = strlen(f->old_members);
  ARG(f->old_members, cl->old_len);
  ARG(f->ann_last, strlen(f->ann_last));
  NUM(n);
  for (uint32_t i = 0; i < n; i++) {
    name_key(f, cl, i, pick[i], now);
    ARG(f->keys[pick[i]].name, f->keys[pick[i]].len);
    np += key_args(f, pick[i], argv + a, lens + a, np);
    a += 3;
  }
#undef ARG
#undef NUM
  if (sl_db_eval(f->db, 0, &f->scripts[SC_SYNC], on_synced, cl, (int)a, argv, lens) == 0) {
    f->inflight++;
    sl_stat_inc(&f->stats.key_updates, n);
  } else {
    redo_keys(f, cl);
    free(cl);
  }
  free(argv);
  free(lens);
  free(nums);
}

/* ---- a Redis Cluster: a sync in parts, each on one slot ---- */

/* A script (SC_*) on the slot of keys[0..nkeys), with args after them; cb
 * gets priv. Returns sl_db_eval's result. */
static int eval_on(struct sl_fleet *f, unsigned slot, int script, int nkeys, int argc, const char **args,
                   const size_t *lens, sl_db_reply_fn *cb, void *priv) {
  const char **argv = sl_malloc((size_t)(argc + 1) * sizeof(char *));
  size_t *al = sl_malloc((size_t)(argc + 1) * sizeof(size_t));
  char nk[24];
  argv[0] = nk, al[0] = sl_u64toa((uint64_t)nkeys, nk);
  memcpy(argv + 1, args, (size_t)argc * sizeof(char *));
  memcpy(al + 1, lens, (size_t)argc * sizeof(size_t));
  int rc = sl_db_eval(f->db, slot, &f->scripts[script], cb, priv, argc + 1, argv, al);
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

/* An announcement's XADD: nothing to take from its reply. */
static void on_added(void *owner, void *priv, const redisReply *reply) {
  (void)owner, (void)priv, (void)reply;
}

/* The reply to one slot's key script: each key's lease, and the keys to
 * announce or nudge (one XADD each, on the stream's slot). A lost or
 * refused reply: its keys sync again at the next tick. */
static void on_keys(void *owner, void *priv, const redisReply *r) {
  static const char *const kinds[4] = {"", "a", "n", "an"};
  struct call *cl = priv;
  struct sl_fleet *f = owner;
  if (!f) goto out;
  f->inflight--;
  if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != cl->n) {
    sl_stat_inc(&f->stats.sync_errors, 1);
    log_error_reply(f, r);
    redo_keys(f, cl);
    goto out;
  }
  char ak[sizeof(f->prefix) + sizeof(SL_KEY_SHARE_ANNOUNCE)];
  int akl = snprintf(ak, sizeof ak, "%s" SL_KEY_SHARE_ANNOUNCE, f->prefix);
  for (uint32_t i = 0; i < cl->n; i++) {
    int an = take_key(f, cl->k[i].idx, cl->k[i].tag, r->element[i], 5);
    if (!an) continue;
    const struct sl_fleet_key *k = &f->keys[cl->k[i].idx];
    const char *args[] = {ak, k->name, f->member, kinds[an]};
    size_t lens[] = {(size_t)akl, k->len, strlen(f->member), strlen(kinds[an])};
    eval_on(f, sl_db_key_slot(ak, (size_t)akl), SC_ANN_ADD, 1, 4, args, lens, on_added, NULL);
  }
out:
  free(cl);
}

static int by_slot(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

/* After the heartbeat: the keys of the round, one key script per slot (at
 * most KEYS_PER_CALL keys each), with the heartbeat's live sessions ids. */
static void send_keys(struct sl_fleet *f, const struct call *rd, const redisReply *ids) {
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
  size_t cap = 3 + ids->elements + 4 * (size_t)KEYS_PER_CALL;
  const char **argv = sl_malloc(cap * sizeof(char *));
  size_t *lens = sl_malloc(cap * sizeof(size_t));
  char *nums = sl_malloc(((size_t)KEYS_PER_CALL * 2 + 2) * 24);
  char ttl[24], ni[24];
  size_t ttll = sl_u64toa(f->ttl_ms, ttl), nid = 0;
  for (size_t j = 0; j < ids->elements; j++) nid += ids->element[j]->type == REDIS_REPLY_STRING;
  size_t nl = sl_u64toa(nid, ni);
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
    argv[a] = f->member, lens[a++] = strlen(f->member);
    argv[a] = ttl, lens[a++] = ttll;
    argv[a] = ni, lens[a++] = nl;
    for (size_t j = 0; j < ids->elements; j++)
      if (ids->element[j]->type == REDIS_REPLY_STRING) argv[a] = ids->element[j]->str, lens[a++] = ids->element[j]->len;
    char *np = nums;
    for (uint32_t j = 0; j < n; j++) {
      uint32_t i = (uint32_t)order[from + j];
      cl->k[j] = rd->k[i];
      np += key_args(f, rd->k[i].idx, argv + a, lens + a, np);
      a += 3;
    }
    if (eval_on(f, slot, SC_KEY, (int)n, (int)a, argv, lens, on_keys, cl) == 0) {
      f->inflight++;
      sl_stat_inc(&f->stats.key_updates, n);
    } else {
      redo_keys(f, cl);
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
    redo_keys(f, rd);
    goto out;
  }
  uint64_t now = sl_mono_ms();
  unsigned n_before = f->n_last;
  old_members_dropped(f, rd->old_len);
  take_instances(f, nlive, r->element[1]);
  if (f->rejoin) {
    /* back after an outage (sync_now sent no key): as on_redis_ready does
     * with one server, heartbeats only for a while */
    f->rejoin = 0;
    f->joined_at_ms = now + (f->ttl_ms / 2 > JOIN_MS_MIN ? JOIN_MS_MIN : f->ttl_ms / 2);
    set_word(f, SL_FLEET_JOINING, f->n_last);
  }
  if (rd->keys_allowed && rd->n) send_keys(f, rd, r->element[1]);
  synced(f, rd->keys_allowed, n_before);
out:
  free(rd);
}

/* The announcements' reply ({last, pairs}). */
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
 * with the heartbeat's live sessions, one key script per slot of the keys. */
static void cluster_sync(struct sl_fleet *f, const uint32_t *pick, uint32_t n, int keys_allowed, uint64_t now) {
  struct call *rd = new_call(f, n, keys_allowed);
  for (uint32_t i = 0; i < n; i++) name_key(f, rd, i, pick[i], now);
  char ik[sizeof(f->prefix) + sizeof(SL_KEY_SHARE_INSTANCES)], ak[sizeof(f->prefix) + sizeof(SL_KEY_SHARE_ANNOUNCE)];
  char ttl[24];
  int ikl = snprintf(ik, sizeof ik, "%s" SL_KEY_SHARE_INSTANCES, f->prefix);
  int akl = snprintf(ak, sizeof ak, "%s" SL_KEY_SHARE_ANNOUNCE, f->prefix);
  rd->old_len = strlen(f->old_members);
  const char *hb[] = {ik, f->member, ttl, f->old_members};
  size_t hbl[] = {(size_t)ikl, strlen(f->member), sl_u64toa(f->ttl_ms, ttl), rd->old_len};
  if (eval_on(f, sl_db_key_slot(ik, (size_t)ikl), SC_HB, 1, 4, hb, hbl, on_heartbeat, rd) != 0) {
    redo_keys(f, rd);
    free(rd);
    return;
  }
  f->inflight++;
  const char *an[] = {ak, f->ann_last, f->member};
  size_t anl[] = {(size_t)akl, strlen(f->ann_last), strlen(f->member)};
  if (eval_on(f, sl_db_key_slot(ak, (size_t)akl), SC_ANN_READ, 1, 3, an, anl, on_announcements, NULL) == 0)
    f->inflight++;
}

/* The keys pick[0..n) synced (none: a heartbeat and the announcements). */
static void sync_keys(struct sl_fleet *f, uint32_t n, int keys_allowed, uint64_t now) {
  f->last_sent_ms = now;
  f->bell = 0; /* every call reads the stream and the instances */
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

/* Whether a coordinated key's demand moved so that its share should: its
 * want (demand + 25%, in ppm of the limit, as the script weighs it) is an
 * eighth above the lease while the last sync did not cut it (more is to
 * be had), or a quarter below it while another instance's want was cut
 * (it holds what that one needs); in either case by a tenth of the limit
 * (a fortieth when the load has stopped here), and by three standard deviations of the demand's noise (Poisson
 * arrivals, measured as measure() does). Otherwise the share would not
 * change: a cut instance gets the water level whatever its demand, and
 * one that is not cut holds its want and more. Noise on the demand of a
 * key near its limit costs no sync; a real move of a few requests a
 * second waits for the refresh. */
static int demand_moved(const struct sl_fleet *f, const struct sl_fleet_key *k) {
  const struct sl_fleet_slot *s = &f->slots[k - f->keys];
  uint64_t lim = (uint64_t)atomic_load_explicit(&s->limit, memory_order_relaxed) * 1000;
  if (!lim) return 0;
  uint64_t g = atomic_load_explicit(&s->share, memory_order_relaxed);
  uint64_t d = k->demand < DEMAND_MAX ? k->demand : DEMAND_MAX;
  uint64_t w = d * 1250000 / lim;
  uint64_t moved = w > g ? w - g : g - w;
  if (moved < (d ? MOVE_MIN_PPM : MOVE_MIN_PPM / 4)) return 0; /* load gone: any sizeable share goes back */
  if (!(k->capped ? 0 : w * 8 > g * 9) && !(k->contended && w * 4 < g * 3)) return 0;
  /* The variance of measure()'s estimate, (milli-requests/s)^2: counts
   * over a tick of sync_ms, averaged with weights 1/2, 1/4...: d/(3 tick). */
  double ppm = 1250000.0 / (double)lim;
  double var = 1e6 * (double)d / (3.0 * (f->sync_ms ? f->sync_ms : 1)) * ppm * ppm;
  return (double)moved * (double)moved > 9.0 * var;
}

/* Whether a coordinated key goes in this tick's sync, and why (FL_*; 0:
 * not due). A lease counts as long as this instance heartbeats, so a key
 * is synced when something changed: new here, its demand moved, another
 * instance nudged it (its sync changed what this one should hold), short
 * of its target (unsettled), idle long enough to offer it back; and at
 * each refresh epoch (every REFRESH_TICKS ticks, all keys at once: one
 * call) unless synced in the last half of that, in case a nudge was lost.
 * A steady key costs Redis a sync every 2.5-5 s, not every few ticks. */
static char key_due(const struct sl_fleet *f, const struct sl_fleet_key *k, uint64_t now, int epoch) {
  int idle = k->idle_since_ms && now - k->idle_since_ms >= RELEASE_IDLE_MS;
  char why;
  if (!k->sent_ms) why = FL_MOVED;
  else if (k->redo) why = k->sent_flag;
  else if (demand_moved(f, k)) why = FL_MOVED;
  else if (k->nudged) why = FL_REFRESH;
  /* Short of its target (the others were nudged): again once they have
   * had a tick to give back, once; if still short, at the next refresh or
   * nudge (they hold their own targets then, or cannot sync). */
  else if (k->unsettled && k->sent_flag != FL_RETRY && now - k->sent_ms >= 2 * (uint64_t)f->sync_ms - f->sync_ms / 2)
    why = FL_RETRY;
  else if (epoch && now - k->sent_ms >= (uint64_t)f->sync_ms * REFRESH_TICKS / 2) why = FL_REFRESH;
  /* idle: offered back once, then with each refresh (refused while the
   * others have demand: this instance's registration frees its R/N) */
  else if (idle && k->sent_flag != FL_RELEASE) why = FL_RELEASE;
  else return 0;
  return idle ? FL_RELEASE : why;
}

/* Whether this tick is a refresh epoch (see key_due); advances it. */
static int refresh_epoch(struct sl_fleet *f, uint64_t now) {
  if (now + f->sync_ms / 2 < f->refresh_at_ms) return 0;
  f->refresh_at_ms = now + (uint64_t)f->sync_ms * REFRESH_TICKS;
  return 1;
}

int sl_fleet_due_test(struct sl_fleet *f, uint32_t idx, uint64_t now) {
  struct sl_fleet_key *k = &f->keys[idx & f->mask];
  char why = key_due(f, k, now, refresh_epoch(f, now));
  if (!why) return 0;
  struct call *cl = new_call(f, 1, 1);
  k->flag = why;
  name_key(f, cl, 0, idx & f->mask, now);
  free(cl);
  return why;
}

static void sync_now(struct sl_fleet *f, uint64_t now) {
  if (!sl_db_ready(f->db) || f->inflight) return;
  int keys_allowed = !f->outage || !f->ever_synced || now >= f->joined_at_ms;
  if (f->rejoin && f->ever_synced) keys_allowed = 0; /* a cluster back after an outage: on_heartbeat */
  uint32_t n = 0;
  /* Alone: heartbeats only (alone_or_not); while keys are busy here,
   * every tick so that another instance's arrival is seen within a tick,
   * unless the bell says when one arrives. */
  int alone = f->ever_synced && f->n_last <= 1;
  if (keys_allowed && alone && f->nused && !f->bell_up) {
    sync_keys(f, 0, keys_allowed, now);
    return;
  }
  /* Keys whose share can wait a tick (a demand move, a retry, a release,
   * a refresh) go every other tick, together, unless a call goes anyway:
   * a call costs Redis more than the keys in it. */
  int urgent = f->bell || !f->ever_synced;
  for (uint32_t i = 0; i < f->nused && !urgent; i++) {
    const struct sl_fleet_key *k = &f->keys[f->used[i]];
    urgent = !k->sent_ms || k->redo || k->nudged;
  }
  if (keys_allowed && !(alone && f->nused) && (urgent || ++f->odd_tick % 2 == 0)) {
    int epoch = refresh_epoch(f, now);
    for (uint32_t i = 0; i < f->nused; i++) {
      struct sl_fleet_key *k = &f->keys[f->used[i]];
      if ((k->flag = key_due(f, k, now, epoch))) f->pick[n++] = f->used[i];
    }
  }
  if (n == 0) {
    /* Nothing to sync: a heartbeat (and the announcements) is enough a few
     * times per ttl, and at once when the bell rang (another instance added
     * to the stream, joined, or found one expired). Without a bell (a
     * cluster, or its subscription down) every POLL_TICKS ticks while keys
     * are coordinated, to read the nudges soon. */
    uint64_t every = f->ttl_ms / 3 < HEARTBEAT_IDLE_MS ? f->ttl_ms / 3 : HEARTBEAT_IDLE_MS;
    if (f->nused && !f->bell_up && every > (uint64_t)POLL_TICKS * f->sync_ms)
      every = (uint64_t)POLL_TICKS * f->sync_ms;
    if (f->ever_synced && keys_allowed && !f->bell && now - f->last_sent_ms + f->sync_ms / 2 < every) return;
  }
  sync_keys(f, n, keys_allowed, now);
}

/* The bell (one server): another session's call added to the stream,
 * joined, saw one expire, or left; this one reads at its next tick rather
 * than polling every POLL_TICKS. A message lost while the subscription is
 * down is covered by the read that follows its return. */
static void on_bell(redisAsyncContext *c, void *reply, void *priv) {
  if (!sl_redis_owner(c, NULL)) return; /* dropped; not progress either: the command connection's replies are */
  struct sl_fleet *f = priv;
  const redisReply *r = reply;
  if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 3 || r->element[0]->type != REDIS_REPLY_STRING)
    return;
  const redisReply *kind = r->element[0], *msg = r->element[2];
  if (kind->len == 9 && !memcmp(kind->str, "subscribe", 9)) {
    f->bell_up = 1;
    sl_stat_set(&f->stats.bell_up, 1);
    f->bell = 1; /* what rang before it was up */
  } else if (kind->len == 7 && !memcmp(kind->str, "message", 7) && msg->type == REDIS_REPLY_STRING &&
             !(msg->len == strlen(f->member) && !memcmp(msg->str, f->member, msg->len))) {
    f->bell = 1;
    sl_stat_inc(&f->stats.bells, 1);
  }
}

static void subscribe_bell(struct sl_fleet *f) {
  redisAsyncContext *s = sl_redis_sub(sl_db_single(f->db));
  if (s) redisAsyncCommand(s, on_bell, f, "SUBSCRIBE %s" SL_CHANNEL_SHARE_BELL, f->prefix);
}

static void on_redis_ready(void *data) {
  struct sl_fleet *f = data;
  if (sl_db_cluster(f->db)) { /* the first slot map: commands sent meanwhile are still answered */
    sync_now(f, sl_mono_ms());
    return;
  }
  f->inflight = 0;
  subscribe_bell(f);
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
  f->bell_up = 0; /* the subscriber went down with the command connection */
  sl_stat_set(&f->stats.bell_up, 0);
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
    "for m in string.gmatch(ARGV[3], '%S+') do redis.call('ZREM', p .. '" SL_KEY_SHARE_INSTANCES "', m) end "
    "for i = 4, #ARGV do redis.call('HDEL', p .. '" SL_KEY_SHARE "' .. ARGV[i], me) end "
    "redis.call('PUBLISH', p .. '" SL_CHANNEL_SHARE_BELL "', me) "
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

/* A cluster's leave: ZREM (this session and the earlier ones not dropped
 * yet) on the zset's slot, an HDEL per key on its own. */
static void send_leave_cluster(struct sl_fleet *f) {
  char key[256];
  int l = snprintf(key, sizeof key, "%s" SL_KEY_SHARE_INSTANCES, f->prefix);
  const char *argv[8] = {"ZREM", key, f->member};
  size_t lens[8] = {4, (size_t)l, strlen(f->member)};
  int argc = 3;
  for (const char *p = f->old_members; *p && argc < 8;) {
    size_t n = strcspn(p, " ");
    if (n) argv[argc] = p, lens[argc++] = n;
    p += n + (p[n] == ' ');
  }
  if (sl_db_command(f->db, sl_db_key_slot(key, (size_t)l), on_left, NULL, argc, argv, lens) == 0) f->leaving++;
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
  size_t argc = 6 + (size_t)f->nused;
  const char **argv = sl_malloc(argc * sizeof(char *));
  size_t *lens = sl_malloc(argc * sizeof(size_t)), a = 0;
  argv[a] = "EVAL", lens[a++] = 4;
  argv[a] = leave_script, lens[a++] = sizeof(leave_script) - 1;
  argv[a] = "0", lens[a++] = 1;
  argv[a] = f->prefix, lens[a++] = strlen(f->prefix);
  argv[a] = f->member, lens[a++] = strlen(f->member);
  argv[a] = f->old_members, lens[a++] = strlen(f->old_members);
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
    if (*p == ':' || *p == '"' || *p == '\\' || *p == '#' || (unsigned char)*p < 0x21 || (unsigned char)*p > 0x7e)
      *p = '_';
  if (getrandom(&rnd, sizeof(rnd), 0) != sizeof(rnd)) rnd = (uint32_t)uv_hrtime();
  snprintf(f->id, sizeof(f->id), "%s/%d/%08x", host, (int)getpid(), rnd);
  new_session(f);
}

/* The table and what the workers use, without the thread. */
static int table_init(struct sl_fleet *f, unsigned cap, unsigned nworkers) {
  f->cap = cap;
  uint32_t slots = 16;
  while (slots < 2 * f->cap) slots <<= 1;
  f->mask = slots - 1;
  f->nworkers = nworkers;
  f->n_last = 1;
  _Static_assert(sizeof(f->scripts) / sizeof(f->scripts[0]) == SC_N, "a slot per script");
  for (int i = 0; i < SC_N; i++) sl_db_script_init(&f->scripts[i], scripts[i], script_len[i]);
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
  new_session(f);
  f->ttl_ms = 1500;
  f->sync_ms = 100;
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

void sl_fleet_measure_test(struct sl_fleet *f, uint64_t now, uint64_t dt_ms) { measure(f, now, dt_ms); }

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
      .subscriber = 1,       /* the bell (one server; a cluster polls) */
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
