#include "dir.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

uint64_t sl_dir_hash(const void *p, size_t n) {
  /* FNV-1a with a final avalanche: keys are short and this is off the
   * request's critical path except for one call per request. */
  const unsigned char *s = p;
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 0x100000001b3ull;
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  return h;
}

static inline unsigned shard_of(uint64_t hash) { return (unsigned)(hash >> 56) & (SL_DIR_SHARDS - 1); }

const struct sl_acct *sl_dir_find(const struct sl_dir_snap *s, const char *ak, size_t len, uint64_t hash) {
  const struct sl_acct_shard *sh = s->shards[shard_of(hash)];
  if (!sh) return NULL;
  for (uint32_t i = (uint32_t)hash & sh->mask;; i = (i + 1) & sh->mask) {
    const struct sl_acct *a = sh->slot[i];
    if (!a) return NULL;
    if (a->hash == hash && a->ak_len == len && memcmp(a->ak, ak, len) == 0) return a;
  }
}

int sl_strset_has(const struct sl_strset *set, const char *s, size_t len) {
  if (!set || set->n == 0) return 0;
  uint64_t h = sl_dir_hash(s, len);
  for (uint32_t i = (uint32_t)h & set->mask;; i = (i + 1) & set->mask) {
    if (set->slot[i].len == 0) return 0; /* empty strings are never members */
    if (set->slot[i].hash == h && set->slot[i].len == len && memcmp(set->blob + set->slot[i].off, s, len) == 0)
      return 1;
  }
}

int sl_dir_is_suspended(const struct sl_dir_snap *s, const char *uid, size_t len) {
  return sl_strset_has(s->suspended, uid, len);
}

uint64_t sl_dir_limit(const struct sl_dir_snap *s, const struct sl_acct *a, int feature, const char *region,
                      size_t region_len, int64_t now_s) {
  uint64_t limit = s->feature_qps[feature];
  for (uint32_t i = 0; i < a->npkgs; i++) {
    const struct sl_pkg *p = &a->pkgs[i];
    if (p->feature == feature && sl_pkg_active(p, now_s) && p->region_len == region_len &&
        memcmp(p->region, region, region_len) == 0)
      limit += p->qps;
  }
  return limit;
}

struct sl_strset *sl_strset_new(const char *const *strs, const size_t *lens, size_t n) {
  struct sl_strset *set = sl_calloc(1, sizeof(*set));
  uint32_t slots = 8;
  while (slots < 2 * n) slots *= 2;
  set->mask = slots - 1;
  set->slot = sl_calloc(slots, sizeof(*set->slot));
  size_t total = 0;
  for (size_t i = 0; i < n; i++) total += lens[i];
  set->blob = sl_malloc(total + 1);
  size_t off = 0;
  for (size_t i = 0; i < n; i++) {
    if (lens[i] == 0 || sl_strset_has(set, strs[i], lens[i])) continue;
    uint64_t h = sl_dir_hash(strs[i], lens[i]);
    uint32_t j = (uint32_t)h & set->mask;
    while (set->slot[j].len) j = (j + 1) & set->mask;
    memcpy(set->blob + off, strs[i], lens[i]);
    set->slot[j].hash = h;
    set->slot[j].off = (uint32_t)off;
    set->slot[j].len = (uint32_t)lens[i];
    off += lens[i];
    set->n++;
  }
  return set;
}

void sl_strset_free(void *p) {
  struct sl_strset *set = p;
  if (!set) return;
  free(set->slot);
  free(set->blob);
  free(set);
}

struct sl_acct *sl_acct_new(const char *ak, size_t ak_len, uint32_t npkgs) {
  struct sl_acct *a = sl_calloc(1, sizeof(*a) + npkgs * sizeof(struct sl_pkg));
  if (ak_len > SL_AK_MAX) ak_len = SL_AK_MAX;
  memcpy(a->ak, ak, ak_len);
  a->ak_len = (uint8_t)ak_len;
  a->hash = sl_dir_hash(ak, ak_len);
  a->npkgs = npkgs;
  return a;
}

/* ---- builder ---- */

static void retire(struct sl_dir_builder *b, uint64_t version, void *ptr, void (*fn)(void *)) {
  if (!ptr) return;
  if (b->nretired == b->capretired) {
    b->capretired = b->capretired ? 2 * b->capretired : 64;
    b->retired = sl_realloc(b->retired, b->capretired * sizeof(*b->retired));
  }
  b->retired[b->nretired++] = (struct sl_retired){version, ptr, fn};
}

int sl_dir_builder_init(struct sl_dir_builder *b, uint32_t max_accts, const uint32_t *qps, const uint8_t *tier,
                        unsigned nfeatures) {
  memset(b, 0, sizeof(*b));
  if (nfeatures > SL_MAX_FEATURES) return -EINVAL;
  struct sl_dir_snap *s = sl_calloc(1, sizeof(*s));
  s->version = 1;
  for (unsigned i = 0; i < nfeatures; i++) {
    s->feature_qps[i] = qps[i];
    s->feature_tier[i] = tier[i];
  }
  b->max_accts = max_accts ? max_accts : 1;
  atomic_init(&b->current, s);
  return 0;
}

struct sl_dir_snap *sl_dir_edit(struct sl_dir_builder *b) {
  if (!b->next) {
    b->next = sl_malloc(sizeof(*b->next));
    *b->next = *atomic_load_explicit(&b->current, memory_order_relaxed);
    memset(b->shard_copied, 0, sizeof(b->shard_copied));
  }
  return b->next;
}

/* A private, writable copy of shard k in the snapshot being built, with room
 * for one more record (load factor <= 1/2). */
static struct sl_acct_shard *shard_writable(struct sl_dir_builder *b, unsigned k, uint32_t extra) {
  struct sl_dir_snap *s = sl_dir_edit(b);
  const struct sl_acct_shard *old = s->shards[k];
  uint32_t n = old ? old->n : 0;
  if (b->shard_copied[k] && 2 * (n + extra) <= old->mask + 1) return (struct sl_acct_shard *)old;
  uint32_t slots = old ? old->mask + 1 : 8;
  while (2 * (n + extra) > slots) slots *= 2;
  struct sl_acct_shard *sh = sl_calloc(1, sizeof(*sh) + slots * sizeof(sh->slot[0]));
  sh->mask = slots - 1;
  if (old) {
    for (uint32_t i = 0; i <= old->mask; i++) {
      const struct sl_acct *a = old->slot[i];
      if (!a) continue;
      uint32_t j = (uint32_t)a->hash & sh->mask;
      while (sh->slot[j]) j = (j + 1) & sh->mask;
      sh->slot[j] = a;
    }
    sh->n = old->n;
    /* An unpublished copy of our own is simply replaced; a published one is
     * retired at the next publish. */
    if (b->shard_copied[k])
      free((void *)old);
    else
      retire(b, 0, (void *)old, free);
  }
  s->shards[k] = sh;
  b->shard_copied[k] = 1;
  return sh;
}

/* Deletes slot i of an open-addressing shard, re-seating the cluster after it. */
static void shard_delete(struct sl_acct_shard *sh, uint32_t i) {
  sh->slot[i] = NULL;
  sh->n--;
  for (uint32_t j = (i + 1) & sh->mask; sh->slot[j]; j = (j + 1) & sh->mask) {
    const struct sl_acct *a = sh->slot[j];
    sh->slot[j] = NULL;
    uint32_t k = (uint32_t)a->hash & sh->mask;
    while (sh->slot[k]) k = (k + 1) & sh->mask;
    sh->slot[k] = a;
  }
}

static int shard_find(const struct sl_acct_shard *sh, const char *ak, size_t len, uint64_t hash, uint32_t *at) {
  for (uint32_t i = (uint32_t)hash & sh->mask;; i = (i + 1) & sh->mask) {
    const struct sl_acct *a = sh->slot[i];
    if (!a) return 0;
    if (a->hash == hash && a->ak_len == len && memcmp(a->ak, ak, len) == 0) {
      *at = i;
      return 1;
    }
  }
}

static void evict_one(struct sl_dir_builder *b, struct sl_acct_shard *sh, uint64_t now_ms) {
  uint32_t victim = UINT32_MAX;
  uint64_t oldest = UINT64_MAX;
  for (uint32_t i = 0; i <= sh->mask; i++) {
    const struct sl_acct *a = sh->slot[i];
    if (!a) continue;
    if (a->kind != SL_ACCT_FOUND && a->valid_until_ms <= now_ms) {
      victim = i;
      break;
    }
    if (a->loaded_ms < oldest) {
      oldest = a->loaded_ms;
      victim = i;
    }
  }
  if (victim == UINT32_MAX) return;
  retire(b, 0, (void *)sh->slot[victim], free);
  shard_delete(sh, victim);
  sl_dir_edit(b)->naccts--;
  b->evictions++;
}

int sl_dir_put(struct sl_dir_builder *b, struct sl_acct *a) {
  unsigned k = shard_of(a->hash);
  struct sl_acct_shard *sh = shard_writable(b, k, 1);
  struct sl_dir_snap *s = b->next;
  uint32_t at;
  if (shard_find(sh, a->ak, a->ak_len, a->hash, &at)) {
    retire(b, 0, (void *)sh->slot[at], free);
    sh->slot[at] = a;
    return 0;
  }
  if (s->naccts >= b->max_accts) {
    /* The bound: make room in this shard, or (an empty shard) elsewhere. */
    if (sh->n) {
      evict_one(b, sh, a->loaded_ms);
    } else {
      for (unsigned j = 1; j < SL_DIR_SHARDS && s->naccts >= b->max_accts; j++) {
        unsigned o = (k + j) & (SL_DIR_SHARDS - 1);
        if (s->shards[o] && s->shards[o]->n) evict_one(b, shard_writable(b, o, 0), a->loaded_ms);
      }
    }
  }
  uint32_t i = (uint32_t)a->hash & sh->mask;
  while (sh->slot[i]) i = (i + 1) & sh->mask;
  sh->slot[i] = a;
  sh->n++;
  s->naccts++;
  return 0;
}

int sl_dir_remove(struct sl_dir_builder *b, const char *ak, size_t len, uint64_t hash) {
  unsigned k = shard_of(hash);
  const struct sl_dir_snap *cur = b->next ? b->next : atomic_load_explicit(&b->current, memory_order_relaxed);
  uint32_t at;
  if (!cur->shards[k] || !shard_find(cur->shards[k], ak, len, hash, &at)) return 0;
  struct sl_acct_shard *sh = shard_writable(b, k, 0);
  shard_find(sh, ak, len, hash, &at);
  retire(b, 0, (void *)sh->slot[at], free);
  shard_delete(sh, at);
  b->next->naccts--;
  return 1;
}

void sl_dir_set_suspended(struct sl_dir_builder *b, struct sl_strset *set) {
  struct sl_dir_snap *s = sl_dir_edit(b);
  const struct sl_dir_snap *cur = atomic_load_explicit(&b->current, memory_order_relaxed);
  if (s->suspended != cur->suspended)
    sl_strset_free((void *)s->suspended); /* ours, never published */
  else
    retire(b, 0, (void *)s->suspended, sl_strset_free);
  s->suspended = set;
}

void sl_dir_set_feature(struct sl_dir_builder *b, unsigned f, uint32_t qps, uint8_t tier, int overridden) {
  if (f >= SL_MAX_FEATURES) return;
  struct sl_dir_snap *s = sl_dir_edit(b);
  s->feature_qps[f] = qps;
  s->feature_tier[f] = tier;
  s->feature_overridden[f] = (uint8_t)overridden;
}

const struct sl_dir_snap *sl_dir_publish(struct sl_dir_builder *b) {
  struct sl_dir_snap *cur = atomic_load_explicit(&b->current, memory_order_relaxed);
  if (!b->next) return cur;
  struct sl_dir_snap *s = b->next;
  s->version = cur->version + 1;
  /* Everything retired while building was reachable from `cur` (or older):
   * readers may hold it until they have seen the new version. */
  for (size_t i = 0; i < b->nretired; i++)
    if (b->retired[i].version == 0) b->retired[i].version = s->version;
  retire(b, s->version, cur, free);
  /* seq_cst (release would do for workers): the snapshot and everything it
   * points to are complete before a reader's load can return it, and the
   * store takes part in the Dekker pairing of sl_dirsync_enter/reclaim. */
  atomic_store_explicit(&b->current, s, memory_order_seq_cst);
  b->next = NULL;
  return s;
}

void sl_dir_reclaim(struct sl_dir_builder *b, uint64_t min_seen) {
  size_t keep = 0;
  for (size_t i = 0; i < b->nretired; i++) {
    struct sl_retired r = b->retired[i];
    if (r.version != 0 && r.version <= min_seen)
      r.free_fn(r.ptr);
    else
      b->retired[keep++] = r;
  }
  b->nretired = keep;
}

static void snap_free_all(struct sl_dir_snap *s, int free_records) {
  for (unsigned k = 0; k < SL_DIR_SHARDS; k++) {
    const struct sl_acct_shard *sh = s->shards[k];
    if (!sh) continue;
    if (free_records)
      for (uint32_t i = 0; i <= sh->mask; i++) free((void *)sh->slot[i]);
    free((void *)sh);
  }
  sl_strset_free((void *)s->suspended);
  free(s);
}

void sl_dir_builder_free(struct sl_dir_builder *b) {
  sl_dir_publish(b); /* unpublished work joins the rest, to be freed with it */
  sl_dir_reclaim(b, UINT64_MAX - 1);
  for (size_t i = 0; i < b->nretired; i++) b->retired[i].free_fn(b->retired[i].ptr);
  free(b->retired);
  snap_free_all(atomic_load_explicit(&b->current, memory_order_relaxed), 1);
}
