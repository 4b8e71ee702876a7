/*
 * Lock-free sharded GCRA buckets. docs/limiter.md explains the algorithm, the
 * slot life cycle and every memory order used here; the comments below say
 * why each one is enough.
 *
 * Slot life cycle (tags never go back to 0, so a key always lies between its
 * home slot and the first free slot of its probe window):
 *   free (tag 0, state 0)
 *     --CAS tag 0 -> fp (lock-free)-->  live(fp, gen g)
 *   live(fp, g) --decisions CAS the state word, gen unchanged--> live(fp, g)
 *   live(fp, g), idle (TAT <= now), under the shard's reclaim mutex:
 *     CAS state -> LOCKED(g); store tag fp'; store state (TAT 0, gen g+1)
 *     --> live(fp', g+1)
 */
#include "limiter.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>

#define LIM__NS_PER_S UINT64_C(1000000000)
#define LIM__CACHE_LINE 64
#define LIM__HUGE_PAGE ((size_t)2 << 20)
#define LIM__MIN_SHARD_SLOTS 16u

/* The state word: theoretical arrival time (ns) in the high 60 bits, a
 * 4-bit generation in the low bits. The generation changes each time the
 * slot is given to another key, so a decision that read the state of the
 * previous owner fails its CAS instead of charging the new one. A TAT of all
 * ones marks a slot that is being reclaimed. */
#define LIM__GEN_BITS 4
#define LIM__GEN_MASK ((UINT64_C(1) << LIM__GEN_BITS) - 1)
#define LIM__TAT_LOCKED ((UINT64_C(1) << 60) - 1)

struct lim_slot {
  _Atomic uint64_t tag;   /* key fingerprint, never 0 once claimed; 0 = free */
  _Atomic uint64_t state; /* TAT << 4 | generation; see above */
};

/* Only the slow paths touch a shard header; the fast path needs none of it. */
struct lim_shard {
  alignas(LIM__CACHE_LINE) pthread_mutex_t reclaim_lock;
  _Atomic uint64_t keys;     /* free slots claimed */
  _Atomic uint64_t reclaims; /* idle slots given to another key */
  _Atomic uint64_t full;     /* LIM_FULL answers */
};

struct lim_table {
  struct lim_slot *slots;    /* nshards << slot_bits slots, shard-major */
  struct lim_shard *shards;
  uint64_t slot_mask;        /* slots per shard - 1 */
  unsigned slot_bits;
  unsigned shard_bits;
  unsigned nshards;
  unsigned window;           /* min(LIM_WINDOW, slots per shard) */
  uint64_t fp_seed;          /* secret seed of the key fingerprints */
  size_t capacity;
  void *map;                 /* the mapping that holds slots */
  size_t map_len;
};

/* GCRA parameters for one rate of M milli-requests per second: emission
 * interval I = ceil(1e12 / M) ns and tolerance tau = B * I ns with the burst
 * B = max(1, floor(M / 1000)), so that exactly B requests fit in a burst
 * (about one second's worth) and the long-run rate 1e12 / I never exceeds M.
 * A whole rate R (M = 1000 R) gives I = ceil(1e9 / R) and tau = R * I. */
struct lim__gcra {
  uint64_t rate;     /* whole requests per second, as reported */
  uint64_t burst;    /* requests that fit in tau */
  uint64_t interval;
  uint64_t tau;
};

enum { LIM__MINE, LIM__OTHER, LIM__FREE };

/* ---- hashing ---------------------------------------------------------- */

#define LIM__K0 UINT64_C(0x9e3779b97f4a7c15)
#define LIM__K1 UINT64_C(0xbf58476d1ce4e5b9)
#define LIM__K2 UINT64_C(0x94d049bb133111eb)
#define LIM__K3 UINT64_C(0xd6e8feb86659fd93)
#define LIM__HASH_SEED UINT64_C(0x736c756963652d6c)

/* Multiplies to 128 bits and folds the halves together: the mixing step. */
static inline uint64_t lim__fold(uint64_t a, uint64_t b) {
  __extension__ unsigned __int128 r = (unsigned __int128)a * b;
  return (uint64_t)r ^ (uint64_t)(r >> 64);
}

static inline uint64_t lim__rd64(const unsigned char *p) {
  uint64_t v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline uint64_t lim__rd32(const unsigned char *p) {
  uint32_t v;
  memcpy(&v, p, sizeof v);
  return v;
}

/* Returns a 64-bit hash of the bytes under `seed`; different seeds give
 * unrelated functions (the seed is folded into two per-seed secrets that
 * enter every mixing step). */
static uint64_t lim__hash_seeded(const void *key, size_t len, uint64_t seed) {
  const unsigned char *p = key;
  size_t n = len;
  uint64_t s1 = lim__fold(seed ^ LIM__K0, LIM__K1);
  uint64_t s2 = lim__fold(seed ^ LIM__K2, LIM__K3);
  uint64_t h = seed ^ s2;
  uint64_t a = 0, b = 0;

  while (n > 16) {
    h = lim__fold(lim__rd64(p) ^ s1 ^ h, lim__rd64(p + 8) ^ s2);
    p += 16;
    n -= 16;
  }
  if (n >= 8) {
    a = lim__rd64(p);
    b = lim__rd64(p + n - 8);
  } else if (n >= 4) {
    a = lim__rd32(p);
    b = lim__rd32(p + n - 4);
  } else if (n > 0) {
    a = ((uint64_t)p[0] << 16) | ((uint64_t)p[n >> 1] << 8) | p[n - 1];
  }
  h = lim__fold(a ^ s1 ^ h, b ^ s2 ^ (uint64_t)len);
  return lim__fold(h ^ LIM__K0, h ^ s1 ^ LIM__K3);
}

uint64_t lim_hash(const void *key, size_t len) {
  return lim__hash_seeded(key, len, LIM__HASH_SEED);
}

/* Returns the key's fingerprint in this table, never 0 (0 marks free). */
static inline uint64_t lim__tag(const struct lim_table *t, const void *key,
                                size_t len) {
  uint64_t f = lim__hash_seeded(key, len, t->fp_seed);
  return f ? f : 1;
}

/* ---- GCRA ------------------------------------------------------------- */

static inline uint64_t lim__st_tat(uint64_t s) { return s >> LIM__GEN_BITS; }
static inline uint64_t lim__st_gen(uint64_t s) { return s & LIM__GEN_MASK; }
static inline uint64_t lim__st_make(uint64_t tat, uint64_t gen) {
  return tat << LIM__GEN_BITS | (gen & LIM__GEN_MASK);
}
static inline bool lim__st_locked(uint64_t s) {
  return lim__st_tat(s) == LIM__TAT_LOCKED;
}

static inline void lim__gcra_init(struct lim__gcra *g, uint64_t rate) {
  if (rate > LIM_RATE_MAX)
    rate = LIM_RATE_MAX;
  g->rate = rate;
  g->burst = rate;
  /* 32-bit division (rate <= 1e9, so 1e9 + rate - 1 < 2^32): faster. */
  g->interval = (uint32_t)(LIM__NS_PER_S + rate - 1) / (uint32_t)rate;
  g->tau = rate * g->interval;
}

/* The same for a rate in milli-requests per second (>= 1). A whole rate
 * takes the 32-bit path above; only a fractional one pays a 64-bit division
 * (and its interval may exceed a second: a rate under 1/s). */
static inline void lim__gcra_init_milli(struct lim__gcra *g, uint64_t milli) {
  if (milli % 1000 == 0 || milli >= LIM_RATE_MAX * 1000) {
    lim__gcra_init(g, milli / 1000);
    return;
  }
  g->rate = milli / 1000;
  g->burst = g->rate ? g->rate : 1;
  g->interval = (LIM__NS_PER_S * 1000 + milli - 1) / milli; /* <= 1e12 */
  g->tau = g->burst * g->interval; /* < 1e12 + 1e9: fits with any TAT below LIM_NOW_MAX */
}

/* Fills *out (all but result) for a bucket whose TAT is `tat` at `now`, as
 * seen by the next request of cost 1. */
static inline void lim__describe(const struct lim__gcra *g, uint64_t tat,
                                 uint64_t now, struct lim_decision *out) {
  uint64_t debt = tat > now ? tat - now : 0;

  out->limit = g->rate;
  out->reset_ns = debt;
  if (debt >= g->tau)
    out->remaining = 0;
  else if (g->tau <= UINT32_MAX) /* whole rates: tau < 2^31, interval <= 1e9 */
    out->remaining = (uint32_t)(g->tau - debt) / (uint32_t)g->interval;
  else /* a rate under 1/s: tau is one interval of over a second */
    out->remaining = (g->tau - debt) / g->interval;
  out->retry_after_ns =
      out->remaining > 0 ? 0 : debt + g->interval - g->tau;
}

/* Decides `cost` at `now` against TAT `tat`: fills *out and returns the TAT
 * the bucket must hold afterwards (`tat` itself unless admitted). A rejected
 * request changes nothing. */
static inline uint64_t lim__gcra_eval(const struct lim__gcra *g, uint64_t tat,
                                      uint64_t now, uint32_t cost,
                                      struct lim_decision *out) {
  uint64_t start = tat > now ? tat : now;
  uint64_t inc;

  if (cost > g->burst) { /* larger than the whole burst: never admissible */
    lim__describe(g, tat, now, out);
    out->result = LIM_REJECT;
    out->retry_after_ns = LIM_NEVER;
    return tat;
  }
  inc = (uint64_t)cost * g->interval; /* <= tau */
  if (start + inc - now <= g->tau) {
    lim__describe(g, start + inc, now, out);
    out->result = LIM_ADMIT;
    return start + inc;
  }
  lim__describe(g, tat, now, out);
  out->result = LIM_REJECT;
  out->retry_after_ns = start + inc - g->tau - now;
  return tat;
}

static void lim__never(struct lim_decision *out) {
  out->result = LIM_REJECT;
  out->limit = 0;
  out->remaining = 0;
  out->retry_after_ns = LIM_NEVER;
  out->reset_ns = 0;
}

/* ---- table ------------------------------------------------------------ */

static inline void lim__relax(unsigned *spins) {
  if (++*spins % 64 == 0) {
    sched_yield(); /* the reclaimer holding the slot may be descheduled */
  } else {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
}

static inline unsigned lim__shard_of(const struct lim_table *t,
                                     uint64_t hash) {
  return t->shard_bits ? (unsigned)(hash >> (64 - t->shard_bits)) : 0;
}

static inline struct lim_slot *lim__slot(const struct lim_table *t,
                                         unsigned shard, uint64_t home,
                                         unsigned i) {
  return &t->slots[((size_t)shard << t->slot_bits) +
                   ((home + i) & t->slot_mask)];
}

/* Reads one slot for `tag`. Returns LIM__MINE with *state set to a state
 * word that belongs to `tag` (unlocked), LIM__FREE, or LIM__OTHER. Lock-free;
 * spins only while a reclaimer is between its two stores. */
static int lim__read(struct lim_slot *sl, uint64_t tag, uint64_t *state) {
  unsigned spins = 0;

  for (;;) {
    /* acquire: if this is a tag stored by a reclaim, the CAS that locked
     * the old owner's state happens-before our later CAS, which then fails
     * (pairs with the release store of the tag in lim__reclaim). */
    uint64_t t1 = atomic_load_explicit(&sl->tag, memory_order_acquire);
    uint64_t s;

    if (t1 != tag)
      return t1 == 0 ? LIM__FREE : LIM__OTHER;
    /* acquire: a state of a new generation comes with its tag store
     * visible, so the tag re-read below sees that tag or a later one
     * (pairs with the release store of the fresh state in lim__reclaim;
     * decisions' CASes continue that release sequence). */
    s = atomic_load_explicit(&sl->state, memory_order_acquire);
    if (lim__st_locked(s)) {
      lim__relax(&spins);
      continue;
    }
    /* acquire: same pairing as the first tag load. State read between two
     * equal tag reads belongs to that tag: a reclaim locks the state
     * before it changes the tag. */
    if (atomic_load_explicit(&sl->tag, memory_order_acquire) != tag)
      continue;
    *state = s;
    return LIM__MINE;
  }
}

/* Charges the decision to a slot whose state `s` was read for this key.
 * Returns 0 with *out filled, or -EAGAIN if the slot changed owner meanwhile
 * (the caller looks the key up again). Lock-free. */
static int lim__apply(struct lim_slot *sl, uint64_t s,
                      const struct lim__gcra *g, uint32_t cost, uint64_t now,
                      struct lim_decision *out) {
  uint64_t gen = lim__st_gen(s);

  for (;;) {
    uint64_t tat = lim__gcra_eval(g, lim__st_tat(s), now, cost, out);

    if (out->result != LIM_ADMIT)
      return 0; /* nothing to charge: decided on the snapshot */
    /* relaxed: the state word holds the whole bucket, so the CAS needs no
     * order with other memory; the acquire loads in lim__read that precede
     * it order it after the tag check, and an ownership change in between
     * alters the generation or locks the word, which fails this CAS. */
    if (atomic_compare_exchange_weak_explicit(
            &sl->state, &s, lim__st_make(tat, gen), memory_order_relaxed,
            memory_order_relaxed))
      return 0;
    if (lim__st_locked(s) || lim__st_gen(s) != gen)
      return -EAGAIN;
  }
}

/* Scans the key's probe window. Returns LIM__MINE (*slot, *state set),
 * LIM__FREE (*slot is the first free slot) or LIM__OTHER (window full of
 * other keys). Lock-free. */
static int lim__find(const struct lim_table *t, unsigned shard, uint64_t home,
                     uint64_t tag, struct lim_slot **slot, uint64_t *state) {
  for (unsigned i = 0; i < t->window; i++) {
    struct lim_slot *sl = lim__slot(t, shard, home, i);
    int r = lim__read(sl, tag, state);

    if (r != LIM__OTHER) {
      *slot = sl;
      return r;
    }
  }
  return LIM__OTHER;
}

/* Returns whether the window holds an idle bucket (full again at `now`). */
static bool lim__any_idle(const struct lim_table *t, unsigned shard,
                          uint64_t home, uint64_t now) {
  for (unsigned i = 0; i < t->window; i++) {
    struct lim_slot *sl = lim__slot(t, shard, home, i);
    /* relaxed: only a hint to skip the mutex; the real choice is remade
     * under it. */
    uint64_t s = atomic_load_explicit(&sl->state, memory_order_relaxed);

    if (!lim__st_locked(s) && lim__st_tat(s) <= now)
      return true;
  }
  return false;
}

static void lim__full(struct lim_shard *sh, const struct lim__gcra *g,
                      struct lim_decision *out) {
  /* relaxed: a statistics counter; readers want a value, not an order. */
  atomic_fetch_add_explicit(&sh->full, 1, memory_order_relaxed);
  out->result = LIM_FULL;
  out->limit = g->rate;
  out->remaining = 0;
  out->retry_after_ns = 0;
  out->reset_ns = 0;
}

/* Slow path: the window holds neither the key nor a free slot. Gives the
 * idlest idle bucket of the window to the key and decides on it, or answers
 * LIM_FULL. Returns 0 when *out is filled, 1 when the caller must look again.
 * Takes the shard's mutex (reclaims of one shard are serialised, so one key
 * never gets two slots); decisions on other keys go on meanwhile. */
static int lim__reclaim(struct lim_table *t, unsigned shard, uint64_t home,
                        uint64_t tag, const struct lim__gcra *g,
                        uint32_t cost, uint64_t now,
                        struct lim_decision *out) {
  struct lim_shard *sh = &t->shards[shard];
  struct lim_slot *victim = NULL;
  uint64_t vs = 0, fresh;
  int rc;

  if (!lim__any_idle(t, shard, home, now)) {
    lim__full(sh, g, out);
    return 0;
  }
  pthread_mutex_lock(&sh->reclaim_lock);
  for (unsigned i = 0; i < t->window; i++) {
    struct lim_slot *sl = lim__slot(t, shard, home, i);
    /* relaxed: under the mutex the tags of this window change only by
     * our own stores (no slot here is free, and reclaims hold the mutex);
     * the mutex orders us after earlier reclaimers. */
    uint64_t tg = atomic_load_explicit(&sl->tag, memory_order_relaxed);
    uint64_t s;

    if (tg == tag || tg == 0) { /* another thread placed the key: look again */
      pthread_mutex_unlock(&sh->reclaim_lock);
      return 1;
    }
    /* relaxed: the value is checked again by the CAS below. */
    s = atomic_load_explicit(&sl->state, memory_order_relaxed);
    if (!lim__st_locked(s) && lim__st_tat(s) <= now &&
        (!victim || lim__st_tat(s) < lim__st_tat(vs))) {
      victim = sl;
      vs = s;
    }
  }
  if (!victim) {
    pthread_mutex_unlock(&sh->reclaim_lock);
    lim__full(sh, g, out);
    return 0;
  }
  /* relaxed: locking publishes nothing; the release store of the tag below
   * orders this CAS before the new tag for any thread that reads it. A
   * failure means the old owner was just charged: it is no longer idle. */
  if (!atomic_compare_exchange_strong_explicit(
          &victim->state, &vs, lim__st_make(LIM__TAT_LOCKED, lim__st_gen(vs)),
          memory_order_relaxed, memory_order_relaxed)) {
    pthread_mutex_unlock(&sh->reclaim_lock);
    return 1;
  }
  /* release: a reader that sees the new tag also sees the state locked (or
   * a later value), so a decision that read the old owner's state cannot
   * succeed its CAS (pairs with the acquire tag loads in lim__read). */
  atomic_store_explicit(&victim->tag, tag, memory_order_release);
  /* A fresh bucket (TAT 0: full) of the next generation. An idle bucket is
   * full too, so the key that lost it sees no difference when it returns. */
  fresh = lim__st_make(0, lim__st_gen(vs) + 1);
  /* release: whoever reads this state then reads the new tag or a later
   * one (pairs with the acquire state load in lim__read). */
  atomic_store_explicit(&victim->state, fresh, memory_order_release);
  /* relaxed: a statistics counter. */
  atomic_fetch_add_explicit(&sh->reclaims, 1, memory_order_relaxed);
  /* Decide while still holding the mutex, so that no other reclaim takes
   * the fresh (idle) bucket before this request is charged to it. */
  rc = lim__apply(victim, fresh, g, cost, now, out);
  pthread_mutex_unlock(&sh->reclaim_lock);
  return rc == 0 ? 0 : 1;
}

/* lim_decide() and lim_decide_milli() once the arguments are checked and
 * the rate is not 0: `milli` set says the rate is in milli-requests/s. */
static int lim__decide(struct lim_table *t, const void *key, size_t keylen,
                       uint64_t hash, uint64_t rate, int milli, uint32_t cost,
                       uint64_t now_ns, struct lim_decision *out) {
  struct lim__gcra g;
  unsigned shard;
  uint64_t tag, home;

  shard = lim__shard_of(t, hash);
  home = hash & t->slot_mask;
  /* Ask for the home slot's line in exclusive state now: the fingerprint
   * and GCRA set-up below overlap the memory wait, and the CAS later needs
   * no second coherence round to upgrade a shared copy. */
  __builtin_prefetch(lim__slot(t, shard, home, 0), 1, 3);
  if (milli)
    lim__gcra_init_milli(&g, rate);
  else
    lim__gcra_init(&g, rate);
  if (now_ns > LIM_NOW_MAX)
    now_ns = LIM_NOW_MAX;
  tag = lim__tag(t, key, keylen);

  for (;;) {
    struct lim_slot *sl;
    uint64_t s, expect = 0;

    switch (lim__find(t, shard, home, tag, &sl, &s)) {
    case LIM__MINE:
      if (lim__apply(sl, s, &g, cost, now_ns, out) == 0)
        return 0;
      break; /* reclaimed under us: look again */
    case LIM__FREE:
      /* relaxed: the claim publishes only the tag; the state it guards has
       * been zero since before the table was shared. Tags never return to
       * 0, so two threads cannot both claim this slot, and a key is never
       * claimed twice: both claimants would stop at the same first free
       * slot. */
      if (atomic_compare_exchange_strong_explicit(&sl->tag, &expect, tag,
                                                  memory_order_relaxed,
                                                  memory_order_relaxed))
        /* relaxed: a statistics counter. */
        atomic_fetch_add_explicit(&t->shards[shard].keys, 1,
                                  memory_order_relaxed);
      break; /* ours or another key's now: look again */
    default:
      if (lim__reclaim(t, shard, home, tag, &g, cost, now_ns, out) == 0)
        return 0;
      break;
    }
  }
}

int lim_decide(struct lim_table *t, const void *key, size_t keylen,
               uint64_t hash, uint64_t rate_per_s, uint32_t cost,
               uint64_t now_ns, struct lim_decision *out) {
  if (!t || !out || (!key && keylen) || cost == 0)
    return -EINVAL;
  if (rate_per_s == 0) {
    lim__never(out);
    return 0;
  }
  return lim__decide(t, key, keylen, hash, rate_per_s, 0, cost, now_ns, out);
}

int lim_decide_milli(struct lim_table *t, const void *key, size_t keylen,
                     uint64_t hash, uint64_t rate_milli, uint32_t cost,
                     uint64_t now_ns, struct lim_decision *out) {
  if (!t || !out || (!key && keylen) || cost == 0)
    return -EINVAL;
  if (rate_milli == 0) {
    lim__never(out);
    return 0;
  }
  return lim__decide(t, key, keylen, hash, rate_milli, 1, cost, now_ns, out);
}

void lim_prefetch(const struct lim_table *t, uint64_t hash) {
  /* For writing (rw = 1): a decision will CAS the state word. */
  __builtin_prefetch(lim__slot(t, lim__shard_of(t, hash), hash & t->slot_mask,
                               0),
                     1, 3);
}

int lim_peek(const struct lim_table *t, const void *key, size_t keylen,
             uint64_t hash, uint64_t rate_per_s, uint64_t now_ns,
             struct lim_decision *out) {
  uint64_t milli = rate_per_s > LIM_RATE_MAX ? LIM_RATE_MAX * 1000
                                             : rate_per_s * 1000;
  return lim_peek_milli(t, key, keylen, hash, milli, now_ns, out);
}

int lim_peek_milli(const struct lim_table *t, const void *key, size_t keylen,
                   uint64_t hash, uint64_t rate_milli, uint64_t now_ns,
                   struct lim_decision *out) {
  struct lim__gcra g;
  struct lim_slot *sl;
  uint64_t s, tat = 0;
  int rc = -ENOENT;

  if (!t || !out || (!key && keylen))
    return -EINVAL;
  if (now_ns > LIM_NOW_MAX)
    now_ns = LIM_NOW_MAX;
  if (lim__find(t, lim__shard_of(t, hash), hash & t->slot_mask,
                lim__tag(t, key, keylen), &sl, &s) == LIM__MINE) {
    tat = lim__st_tat(s);
    rc = 0;
  }
  if (rate_milli == 0) {
    lim__never(out);
    return rc;
  }
  lim__gcra_init_milli(&g, rate_milli);
  lim__describe(&g, tat, now_ns, out);
  out->result = out->remaining > 0 ? LIM_ADMIT : LIM_REJECT;
  return rc;
}

void lim_table_stats(const struct lim_table *t, struct lim_stats *out) {
  memset(out, 0, sizeof *out);
  out->capacity = t->capacity;
  out->slots = (uint64_t)t->nshards << t->slot_bits;
  out->shards = t->nshards;
  out->bytes = t->map_len + sizeof *t +
               (uint64_t)t->nshards * sizeof(struct lim_shard);
  for (unsigned i = 0; i < t->nshards; i++) {
    const struct lim_shard *sh = &t->shards[i];
    /* relaxed: statistics; each counter is read whole, not all together. */
    out->keys += atomic_load_explicit(&sh->keys, memory_order_relaxed);
    out->reclaims += atomic_load_explicit(&sh->reclaims, memory_order_relaxed);
    out->full += atomic_load_explicit(&sh->full, memory_order_relaxed);
  }
}

/* Maps zeroed memory for the slots, 2 MiB-aligned and with transparent huge
 * pages asked for when large: random probes over a big table would
 * otherwise miss the TLB on nearly every decision. Returns 0 or -ENOMEM. */
static int lim__map_slots(struct lim_table *t, size_t bytes) {
  size_t len = bytes >= LIM__HUGE_PAGE ? bytes + LIM__HUGE_PAGE : bytes;
  void *m = mmap(NULL, len, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  uintptr_t p;

  if (m == MAP_FAILED)
    return -ENOMEM;
  p = (uintptr_t)m;
  if (bytes >= LIM__HUGE_PAGE) {
    p = (p + LIM__HUGE_PAGE - 1) & ~(uintptr_t)(LIM__HUGE_PAGE - 1);
#ifdef MADV_HUGEPAGE
    (void)madvise((void *)p, bytes, MADV_HUGEPAGE); /* a hint; may fail */
#endif
  }
  t->map = m;
  t->map_len = len;
  t->slots = (struct lim_slot *)p;
  return 0;
}

struct lim_table *lim_table_new(size_t capacity, unsigned shards) {
  struct lim_table *t;
  unsigned shard_bits = 0, slot_bits = 0, inited = 0;
  size_t per_shard;

  if (capacity == 0 || capacity > ((size_t)1 << 40) || shards == 0 ||
      shards > 65536 || (shards & (shards - 1))) {
    errno = EINVAL;
    return NULL;
  }
  while ((1u << shard_bits) < shards)
    shard_bits++;
  /* At least two slots a key, so that probe windows stay short. */
  per_shard = (2 * capacity + shards - 1) / shards;
  while (((size_t)1 << slot_bits) < per_shard ||
         ((size_t)1 << slot_bits) < LIM__MIN_SHARD_SLOTS)
    slot_bits++;

  t = calloc(1, sizeof *t);
  if (!t)
    goto err;
  t->capacity = capacity;
  t->nshards = shards;
  t->shard_bits = shard_bits;
  t->slot_bits = slot_bits;
  t->slot_mask = ((uint64_t)1 << slot_bits) - 1;
  t->window = t->slot_mask + 1 < LIM_WINDOW ? (unsigned)t->slot_mask + 1
                                            : LIM_WINDOW;
  if (getrandom(&t->fp_seed, sizeof t->fp_seed, GRND_NONBLOCK) !=
      (ssize_t)sizeof t->fp_seed)
    t->fp_seed = lim_now_ns() ^ (uint64_t)(uintptr_t)t ^ LIM__K2;

  t->shards = aligned_alloc(LIM__CACHE_LINE, shards * sizeof *t->shards);
  if (!t->shards)
    goto err;
  memset(t->shards, 0, shards * sizeof *t->shards);
  for (; inited < shards; inited++)
    if (pthread_mutex_init(&t->shards[inited].reclaim_lock, NULL) != 0)
      goto err;
  if (lim__map_slots(t, ((size_t)shards << slot_bits) *
                            sizeof(struct lim_slot)) != 0)
    goto err;
  return t;

err:
  if (t) {
    while (inited > 0)
      pthread_mutex_destroy(&t->shards[--inited].reclaim_lock);
    free(t->shards);
    free(t);
  }
  errno = ENOMEM;
  return NULL;
}

void lim_table_free(struct lim_table *t) {
  if (!t)
    return;
  munmap(t->map, t->map_len);
  for (unsigned i = 0; i < t->nshards; i++)
    pthread_mutex_destroy(&t->shards[i].reclaim_lock);
  free(t->shards);
  free(t);
}

uint64_t lim_now_ns(void) {
  struct timespec ts;

  if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
    return 0;
  return (uint64_t)ts.tv_sec * LIM__NS_PER_S + (uint64_t)ts.tv_nsec;
}
