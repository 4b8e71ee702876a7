/* The account directory: what sluice knows from Redis (AccessKeyId -> UID,
 * each account's QPS packages, the suspended set, feature overrides), held
 * as immutable, versioned snapshots. The directory thread (dirsync.c) is the
 * only writer: it builds a new snapshot copy-on-write (only the shards that
 * changed are copied) and publishes it with one release store. Workers read
 * the current snapshot with one acquire load and never block.
 *
 * Reclamation: a worker never keeps a snapshot pointer across loop
 * iterations; between iterations it records the version it has seen
 * (sl_dir_quiescent). What a publish of version V replaced is freed once
 * every worker has recorded V or later. */
#ifndef SL_DIR_H
#define SL_DIR_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define SL_DIR_SHARDS 256
#define SL_MAX_FEATURES 32
#define SL_AK_MAX 127
#define SL_UID_MAX 63
#define SL_REGION_MAX 63
#define SL_PKGID_MAX 63
#define SL_MAX_PKGS 64 /* per account; more are ignored (and logged) */

struct sl_pkg {
  int32_t feature; /* feature id; -1 when the package names an unknown feature */
  uint32_t qps;
  int64_t starts_at, expires_at; /* unix seconds; counts while starts_at <= now < expires_at */
  uint8_t region_len, id_len;
  char region[SL_REGION_MAX + 1];
  char id[SL_PKGID_MAX + 1];
};

/* Whether package p counts at now_s (unix seconds): the one rule for the
 * limit (sl_dir_limit) and for what /explain shows. */
static inline int sl_pkg_active(const struct sl_pkg *p, int64_t now_s) {
  return p->starts_at <= now_s && now_s < p->expires_at;
}

enum sl_acct_kind {
  SL_ACCT_FOUND = 0,
  SL_ACCT_NOT_FOUND,   /* no P ak:<AK>: cached briefly */
  SL_ACCT_UNAVAILABLE, /* Redis could not be asked: cached very briefly */
};

struct sl_acct {
  uint64_t hash;           /* sl_dir_hash(ak) */
  uint64_t valid_until_ms; /* monotonic ms (uv_hrtime / 1e6); UINT64_MAX for FOUND */
  uint64_t loaded_ms;
  uint8_t kind, ak_len, uid_len;
  char ak[SL_AK_MAX + 1];
  char uid[SL_UID_MAX + 1];
  uint32_t npkgs;
  struct sl_pkg pkgs[];
};

struct sl_acct_shard {
  uint32_t mask; /* slots - 1 */
  uint32_t n;
  const struct sl_acct *slot[];
};

struct sl_strset {
  uint32_t mask, n;
  struct {
    uint64_t hash;
    uint32_t off, len; /* into blob */
  } *slot;
  char *blob;
};

struct sl_dir_snap {
  uint64_t version;
  uint32_t feature_qps[SL_MAX_FEATURES];
  uint8_t feature_tier[SL_MAX_FEATURES];
  uint8_t feature_overridden[SL_MAX_FEATURES];
  const struct sl_strset *suspended;
  const struct sl_acct_shard *shards[SL_DIR_SHARDS];
  uint32_t naccts;
};

uint64_t sl_dir_hash(const void *p, size_t n);

/* Lookups on a snapshot: pure reads, any thread. */
const struct sl_acct *sl_dir_find(const struct sl_dir_snap *s, const char *ak, size_t len, uint64_t hash);
int sl_dir_is_suspended(const struct sl_dir_snap *s, const char *uid, size_t len);
/* The effective QPS for (account, feature, region) at unix time now_s:
 * the feature's default plus every package active at now_s. */
uint64_t sl_dir_limit(const struct sl_dir_snap *s, const struct sl_acct *a, int feature, const char *region,
                      size_t region_len, int64_t now_s);

/* ---- building (the directory thread only) ---- */

struct sl_retired {
  uint64_t version; /* freeable once every reader has seen this version */
  void *ptr;
  void (*free_fn)(void *);
};

struct sl_dir_builder {
  _Atomic(struct sl_dir_snap *) current; /* what readers load */
  struct sl_dir_snap *next;              /* being built, NULL when nothing changed */
  uint8_t shard_copied[SL_DIR_SHARDS];
  uint32_t max_accts;
  struct sl_retired *retired;
  size_t nretired, capretired;
  uint64_t evictions;
};

/* Starts with an empty snapshot (version 1) holding the built-in feature
 * defaults given. Returns 0 or -ENOMEM. */
int sl_dir_builder_init(struct sl_dir_builder *b, uint32_t max_accts, const uint32_t *qps, const uint8_t *tier,
                        unsigned nfeatures);
/* Frees everything, published or not; no reader may remain. */
void sl_dir_builder_free(struct sl_dir_builder *b);

/* Makes a record (not yet in any snapshot); the caller fills pkgs. */
struct sl_acct *sl_acct_new(const char *ak, size_t ak_len, uint32_t npkgs);

/* Adds or replaces the record for a->ak (taking ownership). At the
 * max_accts bound, first evicts another record of the same shard (an expired
 * negative one if any, else the oldest loaded). Returns 0. */
int sl_dir_put(struct sl_dir_builder *b, struct sl_acct *a);
/* Removes ak's record if present; returns 1 if it was there. */
int sl_dir_remove(struct sl_dir_builder *b, const char *ak, size_t len, uint64_t hash);
/* Replaces the suspended set (taking ownership; built with sl_strset_new). */
void sl_dir_set_suspended(struct sl_dir_builder *b, struct sl_strset *set);
void sl_dir_set_feature(struct sl_dir_builder *b, unsigned feature, uint32_t qps, uint8_t tier, int overridden);
/* The snapshot being built (creating it from the current one). */
struct sl_dir_snap *sl_dir_edit(struct sl_dir_builder *b);
/* Publishes what was built, if anything; returns the current snapshot. */
const struct sl_dir_snap *sl_dir_publish(struct sl_dir_builder *b);
/* Frees what every reader has moved past (min_seen = lowest version any
 * worker recorded). */
void sl_dir_reclaim(struct sl_dir_builder *b, uint64_t min_seen);

struct sl_strset *sl_strset_new(const char *const *strs, const size_t *lens, size_t n);
void sl_strset_free(void *set);
int sl_strset_has(const struct sl_strset *set, const char *s, size_t len);

#endif
