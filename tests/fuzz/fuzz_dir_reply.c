/* Fuzzes the directory thread's reply parsers (proxy/admission/dirsync_int.h): the
 * account script's and the state script's replies, as redisReply trees
 * built from the input, go through the same functions the hiredis
 * callbacks call. Any tree is either used or set aside; never a crash, a
 * leak, or a directory entry that breaks the directory's bounds.
 *
 * Input: byte 0 chooses the reply (bit 0-1: state, accounts, or an
 * arbitrary tree to each; bit 2: the suspended set already read; bits 3-5:
 * accounts in the batch, 1-8); the rest builds the tree (build()). The
 * directory persists across inputs, as in the thread (bounded by
 * max-accounts and the bad-key table). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "catalog.h"
#include "dirsync_int.h"
#include "fuzz.h"

struct in {
  const uint8_t *p;
  size_t n;
};

static int take(struct in *in) {
  if (!in->n) return -1;
  in->n--;
  return *in->p++;
}

static redisReply *mkstr(int type, const char *s, size_t n) {
  redisReply *r = calloc(1, sizeof(*r));
  if (!r) abort();
  r->type = type;
  r->str = malloc(n + 1);
  if (!r->str) abort();
  memcpy(r->str, s, n);
  r->str[n] = '\0';
  r->len = n;
  return r;
}

/* One node (and its children) from the input; the end of the input gives
 * nils. Strings are raw bytes or the words the scripts return (numbers,
 * feature names, a region, the empty string) so that the fuzzer reaches
 * the parsers' inner checks quickly. */
static redisReply *build(struct in *in, int depth) {
  int t = take(in);
  char num[24];
  if (t < 0) t = 4;
  switch (t % 10) {
  case 0: case 1: case 2: {
    int len = take(in);
    size_t n = len < 0 ? 0 : (size_t)len;
    if (n > in->n) n = in->n;
    redisReply *r = mkstr(t % 10 == 0 ? REDIS_REPLY_STRING : t % 10 == 1 ? REDIS_REPLY_STATUS : REDIS_REPLY_ERROR,
                          (const char *)in->p, n);
    in->p += n;
    in->n -= n;
    return r;
  }
  case 3: {
    redisReply *r = calloc(1, sizeof(*r));
    if (!r) abort();
    r->type = REDIS_REPLY_INTEGER;
    int v = take(in);
    r->integer = v < 0 ? 1 : v < 4 ? v : v > 200 ? 100000 + v : (int8_t)v;
    return r;
  }
  case 5: {
    if (depth >= 4) break;
    int c = take(in);
    size_t count = c < 0 ? 0 : (size_t)(c % 80); /* past SL_MAX_PKGS + 4 */
    redisReply *r = calloc(1, sizeof(*r));
    if (!r) abort();
    r->type = REDIS_REPLY_ARRAY;
    r->elements = count;
    r->element = count ? calloc(count, sizeof(redisReply *)) : NULL;
    if (count && !r->element) abort();
    for (size_t i = 0; i < count; i++) r->element[i] = build(in, depth + 1);
    return r;
  }
  case 6: {
    int v = take(in), w = take(in);
    long long x = v < 0 ? 0 : v * 257LL + (w < 0 ? 0 : w);
    if (w >= 0 && (w & 1)) x = -x;
    if (w >= 0 && (w & 2)) x *= 100000000000LL;
    int n = snprintf(num, sizeof(num), "%lld", x);
    return mkstr(REDIS_REPLY_STRING, num, (size_t)n);
  }
  case 7: {
    int v = take(in);
    const char *f = sl_features[(v < 0 ? 0 : v) % sl_nfeatures].name;
    return mkstr(REDIS_REPLY_STRING, f, strlen(f));
  }
  case 8:
    return mkstr(REDIS_REPLY_STRING, "cn-shanghai", 11);
  case 9:
    return mkstr(REDIS_REPLY_STRING, "", 0);
  default:
    break;
  }
  redisReply *r = calloc(1, sizeof(*r));
  if (!r) abort();
  r->type = REDIS_REPLY_NIL;
  return r;
}

static void drop(redisReply *r) {
  if (!r) return;
  if (r->type == REDIS_REPLY_ARRAY) {
    for (size_t i = 0; i < r->elements; i++) drop(r->element[i]);
    free(r->element);
  }
  free(r->str);
  free(r);
}

/* A top-level array of `count` children built from the input. */
static redisReply *array_of(struct in *in, size_t count) {
  redisReply *r = calloc(1, sizeof(*r));
  if (!r) abort();
  r->type = REDIS_REPLY_ARRAY;
  r->elements = count;
  r->element = calloc(count, sizeof(redisReply *));
  if (!r->element) abort();
  for (size_t i = 0; i < count; i++) r->element[i] = build(in, 1);
  return r;
}

static struct sl_dirsync d;

static void setup(void) {
  strcpy(d.prefix, "sluice:");
  d.prefix_len = 7;
  d.resync_ms = 30000;
  d.negative_ttl_ms = 5000;
  d.unavailable_ttl_ms = 1000;
  uint32_t qps[SL_MAX_FEATURES];
  uint8_t tier[SL_MAX_FEATURES];
  for (unsigned f = 0; f < sl_nfeatures; f++) {
    qps[f] = sl_features[f].default_qps;
    tier[f] = (uint8_t)sl_features[f].tier;
  }
  if (sl_dir_builder_init(&d.b, 64, qps, tier, sl_nfeatures) != 0) abort();
}

/* What every reader relies on, whatever Redis sent. */
static void check_snapshot(const struct sl_dir_snap *s) {
  unsigned n = 0;
  for (unsigned k = 0; k < SL_DIR_SHARDS; k++) {
    const struct sl_acct_shard *sh = s->shards[k];
    if (!sh) continue;
    for (uint32_t i = 0; i <= sh->mask; i++) {
      const struct sl_acct *a = sh->slot[i];
      if (!a) continue;
      n++;
      FZ_CHECK(a->kind <= SL_ACCT_UNAVAILABLE);
      FZ_CHECK(a->ak_len <= SL_AK_MAX);
      if (a->kind != SL_ACCT_FOUND) {
        FZ_CHECK(a->npkgs == 0);
        continue;
      }
      FZ_CHECK(a->uid_len >= 1 && a->uid_len <= SL_UID_MAX);
      FZ_CHECK(a->npkgs <= SL_MAX_PKGS);
      for (uint32_t j = 0; j < a->npkgs; j++) {
        const struct sl_pkg *p = &a->pkgs[j];
        FZ_CHECK(p->region_len >= 1 && p->region_len <= SL_REGION_MAX);
        FZ_CHECK(p->id_len <= SL_PKGID_MAX);
        FZ_CHECK(p->feature >= -1 && p->feature < (int)sl_nfeatures);
      }
      /* the reader's own path over the record */
      (void)sl_dir_is_suspended(s, a->uid, a->uid_len);
      for (unsigned f = 0; f < sl_nfeatures; f++) (void)sl_dir_limit(s, a, (int)f, "cn-shanghai", 11, 1700000000);
    }
  }
  FZ_CHECK(n == s->naccts);
  FZ_CHECK(d.nbad <= SL_DIR_BADKEYS);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static int ready;
  if (!ready) {
    setup();
    ready = 1;
  }
  struct in in = {data, size};
  int ctl = take(&in);
  if (ctl < 0) return 0;
  unsigned n = 1 + ((unsigned)ctl >> 3 & 7);
  char aks[8][SL_AK_MAX + 1];
  uint8_t lens[8];
  for (unsigned i = 0; i < n; i++) {
    lens[i] = (uint8_t)snprintf(aks[i], sizeof(aks[i]), i == 7 ? "\001u%u" : "AK%u", i); /* one trusted UID */
    /* a first lookup waits for each (the pending path) */
    if (d.npending < SL_DIR_MAX_PENDING && (ctl & 0x40)) {
      d.pending[d.npending].hash = sl_dir_hash(aks[i], lens[i]);
      d.pending[d.npending].len = lens[i];
      memcpy(d.pending[d.npending].ak, aks[i], lens[i]);
      d.npending++;
    }
  }
  d.suspended_known = (ctl & 4) != 0;
  redisReply *r;
  switch (ctl & 3) {
  case 0:
    r = array_of(&in, 1 + 2 * sl_nfeatures);
    sl__dirsync_state_reply(&d, r);
    break;
  case 1:
    r = array_of(&in, n);
    sl__dirsync_accounts_reply(&d, n, (const char(*)[SL_AK_MAX + 1])aks, lens, r);
    break;
  default:
    r = build(&in, 0);
    sl__dirsync_state_reply(&d, r);
    sl__dirsync_accounts_reply(&d, n, (const char(*)[SL_AK_MAX + 1])aks, lens, r);
    break;
  }
  drop(r);
  d.npending = 0; /* answered or not, the next input starts afresh */
  const struct sl_dir_snap *s = sl_dir_publish(&d.b);
  check_snapshot(s);
  sl_dir_reclaim(&d.b, UINT64_MAX); /* no reader holds an older snapshot */
  return 0;
}
