#include "catalog.h"

#include <string.h>

#include "common.h"
#include "http_util.h"

const struct sl_feature_def sl_features[SL_FEAT_COUNT] = {
    [SL_FEAT_TEXT] = {"text", SL_TIER_BASELINE, 100},
    [SL_FEAT_TEXT_LLM] = {"text_llm", SL_TIER_LLM, 100},
    [SL_FEAT_IMAGE] = {"image", SL_TIER_BASELINE, 100},
    [SL_FEAT_IMAGE_LLM] = {"image_llm", SL_TIER_LLM, 50},
    [SL_FEAT_VOICE] = {"voice", SL_TIER_BASELINE, 100},
    [SL_FEAT_VIDEO] = {"video", SL_TIER_BASELINE, 100},
    [SL_FEAT_DOCUMENT] = {"document", SL_TIER_BASELINE, 100},
    [SL_FEAT_URL] = {"url", SL_TIER_BASELINE, 100},
    [SL_FEAT_MULTIMODAL] = {"multimodal", SL_TIER_BASELINE, 100},
    [SL_FEAT_GUARD] = {"guard", SL_TIER_LLM, 50},
    [SL_FEAT_MANUAL] = {"manual", SL_TIER_BASELINE, 100},
    [SL_FEAT_UPLOAD] = {"upload", SL_TIER_BASELINE, 100},
};
const unsigned sl_nfeatures = SL_FEAT_COUNT;

/* Pseudo feature for the image family: resolved to image or image_llm by the
 * Service. Never returned. */
#define IMG 0xff

struct action_def {
  const char *name;
  uint8_t len;
  uint8_t feature;  /* an sl_feature_ids value, or IMG */
  uint8_t billable; /* a moderation submission (SPEC 3); result queries, cancels, tokens are not */
};

#define A(n, f) {n, sizeof(n) - 1, f, 1}
#define Q(n, f) {n, sizeof(n) - 1, f, 0} /* not billable: limited and counted in calls, never in usage */

/* Sorted in byte order (LC_ALL=C sort; test_catalog checks it) for the
 * binary search. A sorted table was chosen over a switch on length because it
 * is one place to add an Action, the docs table is generated from the same
 * list in the same order, and ~33 entries cost at most 6 compares.
 * DescribeVoiceModerationResult and DescribeVideoModerationResult are not in
 * Alibaba's SDKs (those use VoiceModerationResult/VideoModerationResult) but
 * are accepted as spellings clients use. */
static const struct action_def actions[] = {
    Q("DescribeFileModerationResult", SL_FEAT_DOCUMENT),
    Q("DescribeImageModerationResult", IMG),
    Q("DescribeImageResultExt", IMG),
    Q("DescribeMultimodalModerationResult", SL_FEAT_MULTIMODAL),
    Q("DescribeUploadToken", SL_FEAT_UPLOAD),
    Q("DescribeUrlModerationResult", SL_FEAT_URL),
    Q("DescribeVideoModerationResult", SL_FEAT_VIDEO),
    Q("DescribeVoiceModerationResult", SL_FEAT_VOICE),
    A("FileModeration", SL_FEAT_DOCUMENT),
    A("ImageAsyncModeration", IMG),
    A("ImageBatchModeration", IMG),
    A("ImageModeration", IMG),
    A("ImageQueueModeration", IMG),
    Q("ManualCallback", SL_FEAT_MANUAL),
    A("ManualModeration", SL_FEAT_MANUAL),
    Q("ManualModerationResult", SL_FEAT_MANUAL),
    A("MultiModalAgent", SL_FEAT_GUARD),
    A("MultiModalAgentSSE", SL_FEAT_GUARD),
    A("MultiModalGuard", SL_FEAT_GUARD),
    A("MultiModalGuardAsync", SL_FEAT_GUARD),
    Q("MultiModalGuardAsyncResult", SL_FEAT_GUARD),
    A("MultiModalGuardForBase64", SL_FEAT_GUARD),
    A("MultiModalGuardWs", SL_FEAT_GUARD),
    A("MultimodalAsyncModeration", SL_FEAT_MULTIMODAL),
    A("TextModeration", SL_FEAT_TEXT),
    A("TextModerationPlus", SL_FEAT_TEXT_LLM),
    A("UrlAsyncModeration", SL_FEAT_URL),
    A("VideoModeration", SL_FEAT_VIDEO),
    Q("VideoModerationCancel", SL_FEAT_VIDEO),
    Q("VideoModerationResult", SL_FEAT_VIDEO),
    A("VoiceModeration", SL_FEAT_VOICE),
    Q("VoiceModerationCancel", SL_FEAT_VOICE),
    Q("VoiceModerationResult", SL_FEAT_VOICE),
};
const unsigned sl_catalog_nactions = SL_ARRAY_SIZE(actions);

int sl_feature_id(const char *name, size_t len) {
  for (unsigned i = 0; i < SL_FEAT_COUNT; i++)
    if (strlen(sl_features[i].name) == len && memcmp(sl_features[i].name, name, len) == 0) return (int)i;
  return -1;
}

const char *sl_tier_name(enum sl_tier t) {
  switch (t) {
    case SL_TIER_BASELINE: return "baseline";
    case SL_TIER_LLM: return "llm";
  }
  return "unknown";
}

/* Whether lowercase needle[0..nl) occurs in p[0..n), ignoring case. */
static int icontains(const char *p, size_t n, const char *needle, size_t nl) {
  for (size_t i = 0; i + nl <= n; i++)
    if (sl_http_ieq(p + i, nl, needle, nl)) return 1;
  return 0;
}

int sl_catalog_llm_service(const char *s, size_t n) {
  if (n >= 4 && SL_IEQ(s, 4, "llm_")) return 1;
  return icontains(s, n, "byvl", 4) || icontains(s, n, "byllm", 5);
}

/* Byte-order compare of a[0..an) with the NUL-free string b[0..bn). */
static int cmp(const char *a, size_t an, const char *b, size_t bn) {
  int c = memcmp(a, b, an < bn ? an : bn);
  if (c != 0) return c;
  return an < bn ? -1 : an > bn;
}

static int resolve(uint8_t f, const char *service, size_t slen) {
  if (f != IMG) return f;
  return sl_catalog_llm_service(service, slen) ? SL_FEAT_IMAGE_LLM : SL_FEAT_IMAGE;
}

int sl_catalog_lookup(const char *action, size_t alen, const char *service, size_t slen, int *billable) {
  size_t lo = 0, hi = SL_ARRAY_SIZE(actions);
  if (alen == 0 || alen > UINT8_MAX) return -1;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    int c = cmp(action, alen, actions[mid].name, actions[mid].len);
    if (c == 0) {
      if (billable) *billable = actions[mid].billable;
      return resolve(actions[mid].feature, service, slen);
    }
    if (c < 0)
      hi = mid;
    else
      lo = mid + 1;
  }
  return -1;
}

int sl_catalog_action_at(unsigned i, const char **name, int *billable) {
  if (i >= SL_ARRAY_SIZE(actions)) return -1;
  *name = actions[i].name;
  if (billable) *billable = actions[i].billable;
  return resolve(actions[i].feature, NULL, 0);
}
