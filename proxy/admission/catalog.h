/* The built-in feature catalogue: which feature (and so which QPS bucket,
 * tier and upstream pool) a green-cip 2022-03-02 Action belongs to. Pure
 * functions over constant tables; safe from any thread, no allocation.
 * docs/catalog.md lists every Action and the Service rules. */
#ifndef SL_CATALOG_H
#define SL_CATALOG_H

#include <stddef.h>
#include <stdint.h>

enum sl_tier { SL_TIER_BASELINE = 0, SL_TIER_LLM = 1 };

struct sl_feature_def {
  const char *name;
  enum sl_tier tier;
  uint32_t default_qps; /* requests per second per (UID, feature, region) */
};

/* Feature ids: indexes into sl_features. The order is part of no external
 * format (Redis and metrics use the names), so features may be appended. */
enum sl_feature_ids {
  SL_FEAT_TEXT = 0,
  SL_FEAT_TEXT_LLM,
  SL_FEAT_IMAGE,
  SL_FEAT_IMAGE_LLM,
  SL_FEAT_VOICE,
  SL_FEAT_VIDEO,
  SL_FEAT_DOCUMENT,
  SL_FEAT_URL,
  SL_FEAT_MULTIMODAL,
  SL_FEAT_GUARD,
  SL_FEAT_MANUAL,
  SL_FEAT_UPLOAD,
  SL_FEAT_COUNT
};

extern const struct sl_feature_def sl_features[]; /* index = feature id */
extern const unsigned sl_nfeatures;

/* Returns the id of the feature named name[0..len) (exact, case-sensitive),
 * or -1 when there is none. */
int sl_feature_id(const char *name, size_t len);

/* Returns "baseline" or "llm" (a static string); "unknown" for other values. */
const char *sl_tier_name(enum sl_tier t);

/* Returns the feature id of (Action, Service), or -1 for an Action that is not
 * in the catalogue. Actions match exactly (case-sensitive, as the API does);
 * service may be empty (slen 0, service may then be NULL). Cost: a binary
 * search over the sorted Action table (about 6 memcmp) plus, for the image
 * family only, one case-insensitive scan of the Service. *billable (if not
 * NULL) is set for a known Action: 1 for a moderation submission, 0 for a
 * result query, a cancel or an upload token (SPEC 3: never in usage). */
int sl_catalog_lookup(const char *action, size_t alen, const char *service, size_t slen, int *billable);

/* Whether a Service names a large-model (llm) variant: it contains "byvl" or
 * "byllm", or starts with "llm_", all case-insensitively. */
int sl_catalog_llm_service(const char *service, size_t slen);

/* The Action table, for tests and docs: entry i (0 <= i < sl_catalog_nactions)
 * has its name in *name and returns its feature id for an empty Service. */
extern const unsigned sl_catalog_nactions;
int sl_catalog_action_at(unsigned i, const char **name, int *billable);

#endif
