/* Unit tests for proxy/catalog.c. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <string.h>

#include "catalog.h"

/* The expected catalogue, written out independently of catalog.c. */
static const struct {
  const char *action;
  const char *feature;
} expected[] = {
    {"TextModeration", "text"},
    {"TextModerationPlus", "text_llm"},
    {"ImageModeration", "image"},
    {"ImageBatchModeration", "image"},
    {"ImageAsyncModeration", "image"},
    {"ImageQueueModeration", "image"},
    {"DescribeImageModerationResult", "image"},
    {"DescribeImageResultExt", "image"},
    {"VoiceModeration", "voice"},
    {"VoiceModerationResult", "voice"},
    {"VoiceModerationCancel", "voice"},
    {"DescribeVoiceModerationResult", "voice"},
    {"VideoModeration", "video"},
    {"VideoModerationResult", "video"},
    {"VideoModerationCancel", "video"},
    {"DescribeVideoModerationResult", "video"},
    {"FileModeration", "document"},
    {"DescribeFileModerationResult", "document"},
    {"UrlAsyncModeration", "url"},
    {"DescribeUrlModerationResult", "url"},
    {"MultimodalAsyncModeration", "multimodal"},
    {"DescribeMultimodalModerationResult", "multimodal"},
    {"MultiModalGuard", "guard"},
    {"MultiModalGuardAsync", "guard"},
    {"MultiModalGuardAsyncResult", "guard"},
    {"MultiModalGuardForBase64", "guard"},
    {"MultiModalGuardWs", "guard"},
    {"MultiModalAgent", "guard"},
    {"MultiModalAgentSSE", "guard"},
    {"ManualModeration", "manual"},
    {"ManualModerationResult", "manual"},
    {"ManualCallback", "manual"},
    {"DescribeUploadToken", "upload"},
};

static int lookup(const char *action, const char *service) {
  return sl_catalog_lookup(action, strlen(action), service, service ? strlen(service) : 0, NULL);
}

static int fid(const char *name) { return sl_feature_id(name, strlen(name)); }

static void test_features(void **state) {
  (void)state;
  static const struct {
    const char *name;
    enum sl_tier tier;
    unsigned qps;
  } want[] = {
      {"text", SL_TIER_BASELINE, 100},     {"text_llm", SL_TIER_LLM, 100}, {"image", SL_TIER_BASELINE, 100},
      {"image_llm", SL_TIER_LLM, 50},      {"voice", SL_TIER_BASELINE, 100}, {"video", SL_TIER_BASELINE, 100},
      {"document", SL_TIER_BASELINE, 100}, {"url", SL_TIER_BASELINE, 100}, {"multimodal", SL_TIER_BASELINE, 100},
      {"guard", SL_TIER_LLM, 50},          {"manual", SL_TIER_BASELINE, 100}, {"upload", SL_TIER_BASELINE, 100},
  };
  assert_int_equal(sl_nfeatures, sizeof(want) / sizeof(want[0]));
  for (unsigned i = 0; i < sl_nfeatures; i++) {
    int id = fid(want[i].name);
    assert_int_not_equal(id, -1);
    assert_string_equal(sl_features[id].name, want[i].name);
    assert_int_equal(sl_features[id].tier, want[i].tier);
    assert_int_equal(sl_features[id].default_qps, want[i].qps);
  }
  /* Names are unique: each id finds itself back. */
  for (unsigned i = 0; i < sl_nfeatures; i++) assert_int_equal(fid(sl_features[i].name), (int)i);
  assert_int_equal(fid("tex"), -1);
  assert_int_equal(fid("text_llmx"), -1);
  assert_int_equal(fid("Text"), -1);
  assert_int_equal(fid(""), -1);
  assert_int_equal(sl_feature_id("textual", 4), SL_FEAT_TEXT); /* the length bounds the compare */
  assert_string_equal(sl_tier_name(SL_TIER_BASELINE), "baseline");
  assert_string_equal(sl_tier_name(SL_TIER_LLM), "llm");
  assert_string_equal(sl_tier_name((enum sl_tier)7), "unknown");
}

static void test_every_action(void **state) {
  (void)state;
  size_t n = sizeof(expected) / sizeof(expected[0]);
  assert_int_equal(sl_catalog_nactions, n);
  for (size_t i = 0; i < n; i++) {
    int want = fid(expected[i].feature);
    assert_int_not_equal(want, -1);
    int got = lookup(expected[i].action, NULL);
    if (got != want) fail_msg("%s: feature %d, want %s", expected[i].action, got, expected[i].feature);
    assert_int_equal(lookup(expected[i].action, ""), want);
    assert_int_equal(lookup(expected[i].action, "baselineCheck"), want);
  }
  /* The table is in strict byte order (the binary search relies on it), and
   * each of its entries is one of the expected ones. */
  for (unsigned i = 0; i < sl_catalog_nactions; i++) {
    const char *name = NULL;
    int f = sl_catalog_action_at(i, &name, NULL);
    assert_non_null(name);
    if (i > 0) {
      const char *prev = NULL;
      sl_catalog_action_at(i - 1, &prev, NULL);
      if (strcmp(prev, name) >= 0) fail_msg("actions out of order: %s before %s", prev, name);
    }
    size_t k = 0;
    while (k < n && strcmp(expected[k].action, name) != 0) k++;
    if (k == n) fail_msg("unexpected action %s", name);
    assert_int_equal(f, fid(expected[k].feature));
  }
  const char *name = "x";
  assert_int_equal(sl_catalog_action_at(sl_catalog_nactions, &name, NULL), -1);
  assert_string_equal(name, "x");
}

static void test_llm_services(void **state) {
  (void)state;
  static const char *image_family[] = {"ImageModeration",      "ImageBatchModeration",          "ImageAsyncModeration",
                                       "ImageQueueModeration", "DescribeImageModerationResult", "DescribeImageResultExt"};
  static const char *llm[] = {"postImageCheckByVL", "profilePhotoCheckByVL", "baselineCheck_byllm", "BYLLM", "byvl",
                              "xByVlx",             "llm_image",             "LLM_",                "Llm_x"};
  static const char *base[] = {"baselineCheck", "baselineCheck_pro", "tonalityImprove", "llm", "xllm_", "ByV",
                               "byll",          "b y v l",           "",                "_llm_"};
  for (size_t a = 0; a < sizeof(image_family) / sizeof(image_family[0]); a++) {
    for (size_t s = 0; s < sizeof(llm) / sizeof(llm[0]); s++) {
      if (lookup(image_family[a], llm[s]) != SL_FEAT_IMAGE_LLM) fail_msg("%s/%s not image_llm", image_family[a], llm[s]);
    }
    for (size_t s = 0; s < sizeof(base) / sizeof(base[0]); s++) {
      if (lookup(image_family[a], base[s]) != SL_FEAT_IMAGE) fail_msg("%s/%s not image", image_family[a], base[s]);
    }
  }
  /* The Service length bounds the scan: "...ByVL" cut before the pattern. */
  assert_int_equal(sl_catalog_lookup("ImageModeration", 15, "postImageCheckByVL", 16, NULL), SL_FEAT_IMAGE);
  assert_int_equal(sl_catalog_lookup("ImageModeration", 15, "llm_", 3, NULL), SL_FEAT_IMAGE);
  /* Other families ignore the Service. */
  assert_int_equal(lookup("TextModeration", "llm_query_moderation"), SL_FEAT_TEXT);
  assert_int_equal(lookup("TextModerationPlus", "baselineCheck"), SL_FEAT_TEXT_LLM);
  assert_int_equal(lookup("VideoModeration", "liveStreamCheckByVL"), SL_FEAT_VIDEO);
  assert_int_equal(lookup("MultiModalGuard", "query_security_check"), SL_FEAT_GUARD);
  assert_true(sl_catalog_llm_service("xBYVLx", 6));
  assert_false(sl_catalog_llm_service(NULL, 0));
}

static void test_unknown(void **state) {
  (void)state;
  static const char *bad[] = {"textmoderation", "TEXTMODERATION", "TextModeratio", "TextModerationX", "TextModeration ",
                              " TextModeration", "",              "A",             "AAAA",            "ZZZZ",
                              "Image",           "ImageModerationResult",          "MultiModalGuardX",
                              "DescribeUploadTokens", "Describe",  "VoiceModerationPlus"};
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
    if (lookup(bad[i], "") != -1) fail_msg("'%s' found", bad[i]);
  /* The length bounds the compare on both sides. */
  assert_int_equal(sl_catalog_lookup("TextModerationPlus", 14, NULL, 0, NULL), SL_FEAT_TEXT);
  assert_int_equal(sl_catalog_lookup("TextModeration", 13, NULL, 0, NULL), -1);
  char big[300];
  memset(big, 'T', sizeof(big));
  assert_int_equal(sl_catalog_lookup(big, sizeof(big), NULL, 0, NULL), -1);
  assert_int_equal(sl_catalog_lookup(NULL, 0, NULL, 0, NULL), -1);
}

/* SPEC 3: moderation submissions are billable; result queries (*Result,
 * Describe*), cancels, callbacks and upload tokens are not. */
static void test_billable(void **state) {
  (void)state;
  const char *yes[] = {"TextModeration", "TextModerationPlus", "ImageModeration", "ImageBatchModeration",
                       "VideoModeration", "VoiceModeration", "FileModeration", "UrlAsyncModeration",
                       "MultiModalGuard", "MultimodalAsyncModeration", "ManualModeration"};
  const char *no[] = {"VideoModerationResult", "VoiceModerationResult", "DescribeImageModerationResult",
                      "DescribeUploadToken", "VideoModerationCancel", "VoiceModerationCancel",
                      "MultiModalGuardAsyncResult", "ManualModerationResult", "ManualCallback",
                      "DescribeFileModerationResult", "DescribeUrlModerationResult"};
  for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
    int b = -1;
    assert_true(sl_catalog_lookup(yes[i], strlen(yes[i]), NULL, 0, &b) >= 0);
    assert_int_equal(b, 1);
  }
  for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++) {
    int b = -1;
    assert_true(sl_catalog_lookup(no[i], strlen(no[i]), NULL, 0, &b) >= 0);
    assert_int_equal(b, 0);
  }
  /* every Action whose name says result, cancel or token is marked so */
  for (unsigned i = 0; i < sl_catalog_nactions; i++) {
    const char *name;
    int b;
    sl_catalog_action_at(i, &name, &b);
    int query = strstr(name, "Result") || strstr(name, "Describe") == name || strstr(name, "Cancel") ||
                strstr(name, "Token") || strstr(name, "Callback");
    assert_int_equal(b, !query);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_billable),
      cmocka_unit_test(test_features),
      cmocka_unit_test(test_every_action),
      cmocka_unit_test(test_llm_services),
      cmocka_unit_test(test_unknown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
