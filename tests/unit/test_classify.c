/* Unit tests for proxy/classify.c. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include "catalog.h"
#include "classify.h"

#define FORM "application/x-www-form-urlencoded"
#define V3(ak) "ACS3-HMAC-SHA256 Credential=" ak ",SignedHeaders=host;x-acs-action,Signature=abc123"

/* A request under test; NULL strings are absent headers. */
struct req {
  const char *url, *host, *auth, *acs_action, *ct, *body, *region;
};

/* Copies s into an exact-size heap block (no NUL), so that ASan catches a
 * read past the length the classifier was given. */
static const char *exact(const char *s, size_t *n, char **keep) {
  *n = s ? strlen(s) : 0;
  if (s == NULL) return NULL;
  *keep = malloc(*n ? *n : 1);
  assert_non_null(*keep);
  memcpy(*keep, s, *n);
  return *keep;
}

static enum sl_class_err run(const struct req *r, struct sl_class *c) {
  char *keep[6] = {0};
  struct sl_class_input in = {.default_region = r->region ? r->region : "cn-shanghai"};
  in.url = exact(r->url, &in.url_len, &keep[0]);
  in.host = exact(r->host, &in.host_len, &keep[1]);
  in.authorization = exact(r->auth, &in.auth_len, &keep[2]);
  in.acs_action = exact(r->acs_action, &in.acs_action_len, &keep[3]);
  in.content_type = exact(r->ct, &in.ct_len, &keep[4]);
  in.body = exact(r->body, &in.body_len, &keep[5]);
  memset(c, 0x5a, sizeof(*c)); /* poison: every field must be written */
  enum sl_class_err e = sl_classify(&in, c);
  for (int i = 0; i < 6; i++) free(keep[i]);
  return e;
}

/* Checks a field's bytes, its length and its NUL terminator. */
#define FIELD_EQ(c, f, want)                               \
  do {                                                     \
    assert_int_equal((c).f##_len, strlen(want));           \
    assert_memory_equal((c).f, (want), strlen(want) + 1); \
  } while (0)

/* Classifies r, expecting success and `want` in the AccessKeyId (ak = 1) or
 * the region (ak = 0); `label` names the case in a failure. */
static void expect_ok(const struct req *r, int ak, const char *want, const char *label) {
  struct sl_class c;
  enum sl_class_err e = run(r, &c);
  const char *got = ak ? c.ak : c.region;
  size_t len = ak ? c.ak_len : c.region_len;
  if (e != SL_CLASS_OK || len != strlen(want) || strcmp(got, want) != 0)
    fail_msg("'%s': err %d, got '%s', want '%s'", label, e, got, want);
}

/* Classifies r, expecting success with exactly these fields; the tier must
 * be the feature's. */
static void expect_all(const struct req *r, const char *action, const char *ak, const char *service,
                       const char *region, int feature) {
  struct sl_class c;
  assert_int_equal(run(r, &c), SL_CLASS_OK);
  FIELD_EQ(c, action, action);
  FIELD_EQ(c, ak, ak);
  FIELD_EQ(c, service, service);
  FIELD_EQ(c, region, region);
  assert_int_equal(c.feature, feature);
  assert_int_equal(c.tier, sl_features[feature].tier);
}

static void test_v1_query(void **state) {
  (void)state;
  struct sl_class c;
  struct req r = {.url = "/?Action=TextModeration&AccessKeyId=LTAI5tAbc&Service=comment_detection&Version=2022-03-02",
                  .host = "green-cip.cn-beijing.aliyuncs.com"};
  expect_all(&r, "TextModeration", "LTAI5tAbc", "comment_detection", "cn-beijing", SL_FEAT_TEXT);

  /* Parameters in any order, a fragment cut off, a repeat with the same value. */
  r.url = "/?Version=2022-03-02&AccessKeyId=AK1&Action=ImageModeration&AccessKeyId=AK%31#Service=llm_x";
  expect_all(&r, "ImageModeration", "AK1", "", "cn-beijing", SL_FEAT_IMAGE);

  /* One identity, one Action: a repeat with another value is refused. */
  r.url = "/?AccessKeyId=AK1&Action=ImageModeration&AccessKeyId=AK2";
  assert_int_equal(run(&r, &c), SL_CLASS_CONFLICT);
  r.url = "/?AccessKeyId=&Action=ImageModeration&AccessKeyId=AK2";
  assert_int_equal(run(&r, &c), SL_CLASS_CONFLICT);
  r.url = "/?AccessKeyId=AK1&Action=ImageModeration&Action=X";
  assert_int_equal(run(&r, &c), SL_CLASS_CONFLICT);
  /* Names are compared decoded, as the backend reads them. */
  r.url = "/?AccessKeyId=AK1&Action=ImageModeration&Access%4BeyId=AK2";
  assert_int_equal(run(&r, &c), SL_CLASS_CONFLICT);
  r.url = "/?Acti%6Fn=ImageModeration&AccessKeyId=AK1";
  expect_all(&r, "ImageModeration", "AK1", "", "cn-beijing", SL_FEAT_IMAGE);
  r.url = "/?AccessKeyId=AK1&Action=ImageModeration";
  r.auth = "ACS3-HMAC-SHA256 Credential=AK1,SignedHeaders=host,Credential=AK2,Signature=x";
  assert_int_equal(run(&r, &c), SL_CLASS_CONFLICT);
  r.auth = NULL;
  r.url = "/?AccessKeyId=AK1&Action=ImageModeration";
  r.auth = "ACS3-HMAC-SHA256 Credential=AK2,SignedHeaders=host,Signature=x";
  assert_int_equal(run(&r, &c), SL_CLASS_CONFLICT);
  r.auth = "ACS3-HMAC-SHA256 Credential=AK1,SignedHeaders=host,Signature=x";
  assert_int_equal(run(&r, &c), SL_CLASS_OK);
  r.auth = NULL;
  r.ct = "application/x-www-form-urlencoded";
  r.body = "Service=baselineCheck&AccessKeyId=AK2";
  assert_int_equal(run(&r, &c), SL_CLASS_CONFLICT);
  r.body = "Service=baselineCheck&Service=postImageCheckByVL";
  assert_int_equal(run(&r, &c), SL_CLASS_CONFLICT);
  r.body = "Action=ImageModeration&AccessKeyId=AK1&Service=baselineCheck";
  expect_all(&r, "ImageModeration", "AK1", "baselineCheck", "cn-beijing", SL_FEAT_IMAGE);
  r.ct = r.body = NULL;

  /* Names match exactly: "action" and "ActionX" are other parameters. */
  r.url = "/?action=TextModeration&ActionX=TextModeration&XAction=TextModeration";
  assert_int_equal(run(&r, &c), SL_CLASS_NO_ACTION);
  assert_int_equal(c.feature, -1);
  /* ...but a name in another case must hold the value classified: a
   * backend that reads names in any case would take it. */
  static const char *other_case[] = {"/?Action=TextModeration&action=TextModerationPlus",
                                     "/?Action=TextModeration&AccessKeyId=AK1&accessKeyId=AK2",
                                     "/?Action=TextModeration&accesskeyid=AK2&ACCESSKEYID=AK2&AccessKeyId=AK1",
                                     "/?Action=TextModeration&accesskeyid=AK1&ACCESSKEYID=AK2"};
  for (size_t i = 0; i < sizeof(other_case) / sizeof(other_case[0]); i++) {
    r.url = other_case[i];
    if (run(&r, &c) != SL_CLASS_CONFLICT) fail_msg("'%s' is no conflict", other_case[i]);
  }
  r.url = "/?Action=TextModeration&AccessKeyId=AK1&accesskeyid=A%4B1&ACTION=TextModeration";
  expect_all(&r, "TextModeration", "AK1", "", "cn-beijing", SL_FEAT_TEXT);
  r.url = "/?accesskeyid=AK2";
  r.acs_action = "TextModeration";
  r.auth = "ACS3-HMAC-SHA256 Credential=AK1";
  assert_int_equal(run(&r, &c), SL_CLASS_CONFLICT); /* against the Credential */
  r.acs_action = r.auth = NULL;

  /* A '?' inside the query is data; only the first one starts it. */
  r.url = "/path?x=?&Action=VoiceModeration";
  assert_int_equal(run(&r, &c), SL_CLASS_OK);
  assert_int_equal(c.feature, SL_FEAT_VOICE);
}

static void test_v3_header(void **state) {
  (void)state;
  struct sl_class c;
  struct req r = {.url = "/", .acs_action = "TextModerationPlus", .auth = V3("LTAI5tV3key"), .ct = FORM,
                  .body = "Service=llm_query_moderation&ServiceParameters=%7B%7D"};
  expect_all(&r, "TextModerationPlus", "LTAI5tV3key", "llm_query_moderation", "cn-shanghai", SL_FEAT_TEXT_LLM);

  /* A query Action that differs from the header is refused; the same one
   * passes; an empty one falls back to the header. */
  r.url = "/?Action=VideoModeration";
  assert_int_equal(run(&r, &c), SL_CLASS_CONFLICT);
  r.url = "/?Action=TextModerationPlus";
  assert_int_equal(run(&r, &c), SL_CLASS_OK);
  assert_int_equal(c.feature, SL_FEAT_TEXT_LLM);
  r.url = "/?Action=";
  assert_int_equal(run(&r, &c), SL_CLASS_OK);
  assert_int_equal(c.feature, SL_FEAT_TEXT_LLM);
  r.url = "/?Action";
  assert_int_equal(run(&r, &c), SL_CLASS_OK);
  assert_int_equal(c.feature, SL_FEAT_TEXT_LLM);

  /* The header is taken as it is (no URL-decoding), around whitespace trimmed. */
  r.url = "/";
  r.acs_action = " \tMultiModalGuard ";
  assert_int_equal(run(&r, &c), SL_CLASS_OK);
  FIELD_EQ(c, action, "MultiModalGuard");
  assert_int_equal(c.feature, SL_FEAT_GUARD);
  r.acs_action = "Text%4Doderation";
  assert_int_equal(run(&r, &c), SL_CLASS_UNKNOWN_ACTION);
  FIELD_EQ(c, action, "Text%4Doderation");

  /* A query AccessKeyId that differs from the Credential is refused (one
   * identity); the same one passes; an empty one falls back to it. */
  r.url = "/?AccessKeyId=V1KEY";
  r.acs_action = "TextModeration";
  assert_int_equal(run(&r, &c), SL_CLASS_CONFLICT);
  r.url = "/?AccessKeyId=LTAI5tV3key";
  assert_int_equal(run(&r, &c), SL_CLASS_OK);
  FIELD_EQ(c, ak, "LTAI5tV3key");
  r.url = "/?AccessKeyId=";
  assert_int_equal(run(&r, &c), SL_CLASS_OK);
  FIELD_EQ(c, ak, "LTAI5tV3key");
}

static void test_authorization(void **state) {
  (void)state;
  static const struct {
    const char *auth, *ak;
  } cases[] = {
      {V3("AK1"), "AK1"},
      {"ACS3-HMAC-SHA256 Credential=AK2, SignedHeaders=host, Signature=x", "AK2"},
      {"  ACS3-HMAC-SHA256   Credential=AK3 ,SignedHeaders=host", "AK3"},
      {"acs3-hmac-sha256 credential=AK4,SignedHeaders=host", "AK4"},
      {"ACS3-HMAC-SHA256 SignedHeaders=host;x-acs-date, Credential=AK5, Signature=x", "AK5"},
      {"ACS3-HMAC-SHA256 Credential=AK6", "AK6"},
      {"ACS3-HMAC-SHA256 Credential=AK7\t,Signature=x", "AK7"},
      {"ACS3-HMAC-SHA256 Credential=", ""},
      {"ACS3-HMAC-SHA256 Credential=,SignedHeaders=host", ""},
      {"ACS3-HMAC-SHA256 SignedHeaders=host,Signature=x", ""},    /* no Credential */
      {"ACS3-HMAC-SHA256 XCredential=AK8,Signature=x", ""},       /* other parameter */
      {"ACS3-HMAC-SHA256 Signature=Credential=AK9", ""},          /* inside a value */
      {"ACS3-HMAC-SHA256", ""},
      {"ACS3-HMAC-SHA256Credential=AK10", ""},                    /* no scheme separator */
      {"ACS3-HMAC-SM3 Credential=AK11,SignedHeaders=host", "AK11"}, /* every ACS3- algorithm */
      {"ACS3-RSA-SHA256 Credential=AK14,SignedHeaders=host", "AK14"},
      {"ACS3- Credential=AK15", ""},                              /* no algorithm */
      {"ACS2-HMAC-SHA256 Credential=AK16", ""},                   /* other scheme */
      {"Bearer Credential=AK12", ""},
      {"Credential=AK13", ""},
      {"", ""},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    struct req r = {.url = "/?Action=TextModeration", .auth = cases[i].auth};
    expect_ok(&r, 1, cases[i].ak, cases[i].auth);
  }
  /* No key at all is not classify's error. */
  struct req r = {.url = "/?Action=TextModeration"};
  expect_ok(&r, 1, "", "no Authorization");
}

static void test_host(void **state) {
  (void)state;
  static const struct {
    const char *host, *region;
  } cases[] = {
      {"green-cip.cn-beijing.aliyuncs.com", "cn-beijing"},
      {"green-cip-vpc.cn-hangzhou.aliyuncs.com", "cn-hangzhou"},
      {"green-cip.ap-southeast-1.aliyuncs.com:443", "ap-southeast-1"},
      {"GREEN-CIP.CN-SHENZHEN.ALIYUNCS.COM", "cn-shenzhen"},
      {"Green-Cip-Vpc.Cn-Beijing.AliyunCS.com:8080", "cn-beijing"},
      {"green-cip.cn-beijing.aliyuncs.com.", "cn-beijing"},
      {" green-cip.us-east-1.aliyuncs.com ", "us-east-1"},
      {"green-cip..aliyuncs.com", "cn-shanghai"},         /* empty region */
      {"green-cip.aliyuncs.com", "cn-shanghai"},
      {"green-cip.a.b.aliyuncs.com", "cn-shanghai"},      /* not one label */
      {"green-cip.cn beijing.aliyuncs.com", "cn-shanghai"},
      {"green.cn-beijing.aliyuncs.com", "cn-shanghai"},
      {"xgreen-cip.cn-beijing.aliyuncs.com", "cn-shanghai"},
      {"green-cip.cn-beijing.aliyuncs.com.evil.example", "cn-shanghai"},
      {"green-cip.cn-beijing.example.com", "cn-shanghai"},
      {"127.0.0.1:8080", "cn-shanghai"},
      {"[::1]:8080", "cn-shanghai"},
      {"localhost", "cn-shanghai"},
      {"", "cn-shanghai"},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    struct req r = {.url = "/?Action=TextModeration", .host = cases[i].host};
    expect_ok(&r, 0, cases[i].region, cases[i].host);
  }
  struct sl_class c;
  struct req r = {.url = "/?Action=TextModeration", .region = "cn-hangzhou"};
  expect_ok(&r, 0, "cn-hangzhou", "no Host");
  /* No default region: empty, not an error. */
  struct sl_class_input in = {.url = "/?Action=TextModeration", .url_len = 23};
  assert_int_equal(sl_classify(&in, &c), SL_CLASS_OK);
  FIELD_EQ(c, region, "");
}

/* A Host that matches the shape up to a bad character falls back to the
 * default region, read from its own start (the length found in the Host
 * was once kept: a read past a short default region). */
static void test_host_partial_match(void **state) {
  (void)state;
  static const char short_default[] = "eu";
  static const char *hosts[] = {"green-cip.cn-shanghai!x.aliyuncs.com", "green-cip.a_b.aliyuncs.com",
                                "green-cip-vpc.cn-beijing.aliyuncs.com\x01"};
  for (size_t i = 0; i < sizeof(hosts) / sizeof(hosts[0]); i++) {
    struct req r = {.url = "/?Action=TextModeration", .host = hosts[i], .region = short_default};
    expect_ok(&r, 0, "eu", hosts[i]);
  }
  struct sl_class c;
  char host[] = "green-cip.cn-shanghai!x.aliyuncs.com";
  struct sl_class_input in = {.url = "/?Action=TextModeration", .url_len = 23, .host = host,
                              .host_len = sizeof(host) - 1};
  assert_int_equal(sl_classify(&in, &c), SL_CLASS_OK); /* no default at all: empty */
  FIELD_EQ(c, region, "");
}

/* Only known regions count: another one is SL_CLASS_UNKNOWN_REGION with no
 * region (so it gets no bucket or metering key of its own). */
static void test_region_list(void **state) {
  (void)state;
  struct sl_class c;
  static const char list[] = "cn-shanghai, cn-beijing,eu-west-9";
  struct {
    const char *host;
    enum sl_class_err want;
    const char *region;
  } cases[] = {
      {"green-cip.cn-beijing.aliyuncs.com", SL_CLASS_OK, "cn-beijing"},
      {"GREEN-CIP.EU-WEST-9.aliyuncs.com", SL_CLASS_OK, "eu-west-9"},
      {"green-cip.cn-hangzhou.aliyuncs.com", SL_CLASS_UNKNOWN_REGION, ""},
      {"green-cip.cn-beijin.aliyuncs.com", SL_CLASS_UNKNOWN_REGION, ""},
      {"green-cip.cn-beijing2.aliyuncs.com", SL_CLASS_UNKNOWN_REGION, ""},
      {"green-cip.eu-west-9x.aliyuncs.com", SL_CLASS_UNKNOWN_REGION, ""},
      {"example.com", SL_CLASS_OK, "cn-shanghai"}, /* no region in the Host: the default */
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    char *keep[2] = {0};
    struct sl_class_input in = {.default_region = "cn-shanghai", .regions = list};
    in.url = exact("/?Action=TextModeration", &in.url_len, &keep[0]);
    in.host = exact(cases[i].host, &in.host_len, &keep[1]);
    enum sl_class_err e = sl_classify(&in, &c);
    free(keep[0]);
    free(keep[1]);
    if (e != cases[i].want || strcmp(c.region, cases[i].region) != 0)
      fail_msg("'%s': err %d region '%s'", cases[i].host, e, c.region);
  }
  assert_string_equal(sl_class_err_code(SL_CLASS_UNKNOWN_REGION), "InvalidRegionId");
  assert_string_equal(sl_class_err_code(SL_CLASS_CONFLICT), "InvalidParameter");
}

static void test_service(void **state) {
  (void)state;
  struct sl_class c;
  struct req r = {.url = "/?Action=ImageModeration&Service=baselineCheck", .ct = FORM,
                  .body = "ServiceParameters=%7B%22imageUrl%22%3A%22x%22%7D&Service=postImageCheckByVL"};
  /* The form body wins over the query. */
  assert_int_equal(run(&r, &c), SL_CLASS_OK);
  FIELD_EQ(c, service, "postImageCheckByVL");
  assert_int_equal(c.feature, SL_FEAT_IMAGE_LLM);
  assert_int_equal(c.tier, SL_TIER_LLM);

  /* Content-Type parameters and case. */
  static const char *forms[] = {FORM "; charset=UTF-8", "Application/X-WWW-Form-Urlencoded;charset=utf-8",
                                " " FORM " ; charset=UTF-8", FORM "\t"};
  for (size_t i = 0; i < sizeof(forms) / sizeof(forms[0]); i++) {
    r.ct = forms[i];
    assert_int_equal(run(&r, &c), SL_CLASS_OK);
    if (c.feature != SL_FEAT_IMAGE_LLM) fail_msg("'%s' not read as a form", forms[i]);
  }

  /* Other content types: the body is not a form, the query counts. */
  static const char *others[] = {"application/json", "multipart/mixed; boundary=x", "text/plain", ""};
  for (size_t i = 0; i < sizeof(others) / sizeof(others[0]); i++) {
    r.ct = others[i];
    assert_int_equal(run(&r, &c), SL_CLASS_OK);
    FIELD_EQ(c, service, "baselineCheck");
    assert_int_equal(c.feature, SL_FEAT_IMAGE);
  }
  r.ct = NULL;
  assert_int_equal(run(&r, &c), SL_CLASS_OK);
  FIELD_EQ(c, service, "baselineCheck");

  /* The form type inside something else: a backend may read the body as a
   * form where sluice would not. */
  static const char *unsure[] = {"application/x-www-form-urlencodedx", FORM ", text/plain",
                                 "text/plain, " FORM, "multipart/x-www-form-urlencoded",
                                 /* its fields are parameters to a backend too, unread here */
                                 "multipart/form-data; boundary=x", "Multipart/Form-Data"};
  for (size_t i = 0; i < sizeof(unsure) / sizeof(unsure[0]); i++) {
    r.ct = unsure[i];
    assert_int_equal(run(&r, &c), SL_CLASS_BAD_CONTENT_TYPE);
  }
  assert_string_equal(sl_class_err_code(SL_CLASS_BAD_CONTENT_TYPE), "InvalidParameter");

  /* A form without Service (or with an empty one) falls back to the query. */
  r.ct = FORM;
  r.body = "ServiceParameters=%7B%7D&XService=llm_x&Service_=llm_x";
  assert_int_equal(run(&r, &c), SL_CLASS_OK);
  FIELD_EQ(c, service, "baselineCheck");
  r.body = "Service=&ServiceParameters=%7B%7D";
  assert_int_equal(run(&r, &c), SL_CLASS_OK);
  FIELD_EQ(c, service, "baselineCheck");
  r.body = "";
  assert_int_equal(run(&r, &c), SL_CLASS_OK);
  FIELD_EQ(c, service, "baselineCheck");

  /* No Service anywhere. */
  r.url = "/?Action=ImageModeration";
  r.body = "ServiceParameters=%7B%7D";
  assert_int_equal(run(&r, &c), SL_CLASS_OK);
  FIELD_EQ(c, service, "");
  assert_int_equal(c.feature, SL_FEAT_IMAGE);

  /* The body's length bounds the scan (no NUL terminator needed). */
  const char body[] = "Service=postByVL&Service=x";
  struct sl_class_input in = {.url = "/?Action=ImageModeration", .url_len = 24, .content_type = FORM,
                              .ct_len = sizeof(FORM) - 1, .body = body, .body_len = 14};
  assert_int_equal(sl_classify(&in, &c), SL_CLASS_OK);
  FIELD_EQ(c, service, "postBy");
  assert_int_equal(c.feature, SL_FEAT_IMAGE);
}

static void test_decoding(void **state) {
  (void)state;
  struct sl_class c;
  struct req r = {.url = "/?Action=Text%4Doderation&AccessKeyId=LTAI%2Bab+c%2fd", .ct = FORM,
                  .body = "Service=%E4%B8%AD%e6%96%87+x%20y"};
  assert_int_equal(run(&r, &c), SL_CLASS_OK);
  FIELD_EQ(c, action, "TextModeration");
  FIELD_EQ(c, ak, "LTAI+ab c/d");
  FIELD_EQ(c, service, "\xe4\xb8\xad\xe6\x96\x87 x y");

  static const char *bad_urls[] = {"/?Action=Text%4", "/?Action=Text%", "/?Action=%zzText", "/?Action=%4gx",
                                   "/?Action=TextModeration&AccessKeyId=AK%2",
                                   "/?Action=TextModeration&Service=a%G1"};
  for (size_t i = 0; i < sizeof(bad_urls) / sizeof(bad_urls[0]); i++) {
    struct req b = {.url = bad_urls[i]};
    if (run(&b, &c) != SL_CLASS_BAD_ENCODING) fail_msg("'%s' accepted", bad_urls[i]);
  }
  struct req b = {.url = "/?Action=TextModeration", .ct = FORM, .body = "Service=%"};
  assert_int_equal(run(&b, &c), SL_CLASS_BAD_ENCODING);
  FIELD_EQ(c, action, "TextModeration");
  FIELD_EQ(c, service, "");
  assert_int_equal(c.feature, -1);

  /* A bad escape in a parameter classify does not read is not its business. */
  b.url = "/?Action=TextModeration&Other=%zz";
  b.body = "ServiceParameters=%&Service=ok";
  assert_int_equal(run(&b, &c), SL_CLASS_OK);
  FIELD_EQ(c, service, "ok");

  /* Decoded control bytes are refused. */
  static const char *ctl_urls[] = {"/?Action=TextModeration%00", "/?Action=TextModeration&AccessKeyId=a%0D%0Ab",
                                   "/?Action=TextModeration&Service=%7F", "/?Action=TextModeration&Service=a%09"};
  for (size_t i = 0; i < sizeof(ctl_urls) / sizeof(ctl_urls[0]); i++) {
    struct req t = {.url = ctl_urls[i]};
    if (run(&t, &c) != SL_CLASS_BAD_ENCODING) fail_msg("'%s' accepted", ctl_urls[i]);
  }
  struct req t = {.url = "/", .acs_action = "Text\x01Moderation"};
  assert_int_equal(run(&t, &c), SL_CLASS_BAD_ENCODING);
}

/* Builds "<prefix><n x fill><suffix>" into buf. */
static const char *make(char *buf, const char *prefix, size_t n, char fill, const char *suffix) {
  size_t pl = strlen(prefix);
  memcpy(buf, prefix, pl);
  memset(buf + pl, fill, n);
  strcpy(buf + pl + n, suffix);
  return buf;
}

static void test_bounds(void **state) {
  (void)state;
  struct sl_class c;
  char url[1024], hdr[1024], body[1024];
  struct req r;

  /* Action: 63 bytes fit (and are unknown), 64 do not; also as %XX escapes,
   * which count decoded. */
  r = (struct req){.url = make(url, "/?Action=", 63, 'A', "")};
  assert_int_equal(run(&r, &c), SL_CLASS_UNKNOWN_ACTION);
  assert_int_equal(c.action_len, 63);
  assert_int_equal(c.action[63], '\0');
  r.url = make(url, "/?Action=", 64, 'A', "");
  assert_int_equal(run(&r, &c), SL_CLASS_FIELD_TOO_LONG);
  FIELD_EQ(c, action, "");
  char esc[64 * 3 + 16] = "/?Action=";
  for (int i = 0; i < 63; i++) strcat(esc, "%41");
  r.url = esc;
  assert_int_equal(run(&r, &c), SL_CLASS_UNKNOWN_ACTION);
  assert_int_equal(c.action_len, 63);
  strcat(esc, "%41");
  assert_int_equal(run(&r, &c), SL_CLASS_FIELD_TOO_LONG);
  r = (struct req){.url = "/", .acs_action = make(hdr, "", 63, 'A', "")};
  assert_int_equal(run(&r, &c), SL_CLASS_UNKNOWN_ACTION);
  assert_int_equal(c.action_len, 63);
  r.acs_action = make(hdr, "", 64, 'A', "");
  assert_int_equal(run(&r, &c), SL_CLASS_FIELD_TOO_LONG);

  /* AccessKeyId: 127 and 128, in the query and in Authorization. */
  r = (struct req){.url = make(url, "/?Action=TextModeration&AccessKeyId=", 127, 'k', "&x=1")};
  assert_int_equal(run(&r, &c), SL_CLASS_OK);
  assert_int_equal(c.ak_len, 127);
  assert_int_equal(c.ak[127], '\0');
  r.url = make(url, "/?Action=TextModeration&AccessKeyId=", 128, 'k', "&x=1");
  assert_int_equal(run(&r, &c), SL_CLASS_FIELD_TOO_LONG);
  FIELD_EQ(c, ak, "");
  assert_int_equal(c.feature, SL_FEAT_TEXT); /* the rest is still classified */
  r = (struct req){.url = "/?Action=TextModeration",
                   .auth = make(hdr, "ACS3-HMAC-SHA256 Credential=", 127, 'k', ",Signature=x")};
  assert_int_equal(run(&r, &c), SL_CLASS_OK);
  assert_int_equal(c.ak_len, 127);
  r.auth = make(hdr, "ACS3-HMAC-SHA256 Credential=", 128, 'k', ",Signature=x");
  assert_int_equal(run(&r, &c), SL_CLASS_FIELD_TOO_LONG);

  /* Service: 127 and 128, in the body and in the query. */
  r = (struct req){.url = "/?Action=ImageModeration", .ct = FORM, .body = make(body, "Service=", 123, 's', "ByVL")};
  assert_int_equal(run(&r, &c), SL_CLASS_OK);
  assert_int_equal(c.service_len, 127);
  assert_int_equal(c.feature, SL_FEAT_IMAGE_LLM);
  r.body = make(body, "Service=", 124, 's', "ByVL");
  assert_int_equal(run(&r, &c), SL_CLASS_FIELD_TOO_LONG);
  assert_int_equal(c.feature, -1);
  r = (struct req){.url = make(url, "/?Action=ImageModeration&Service=", 127, 's', "")};
  assert_int_equal(run(&r, &c), SL_CLASS_OK);
  assert_int_equal(c.service_len, 127);
  r.url = make(url, "/?Action=ImageModeration&Service=", 128, 's', "");
  assert_int_equal(run(&r, &c), SL_CLASS_FIELD_TOO_LONG);

  /* Region: 63 and 64, from Host and from the default. */
  r = (struct req){.url = "/?Action=TextModeration", .host = make(hdr, "green-cip.", 63, 'r', ".aliyuncs.com:80")};
  assert_int_equal(run(&r, &c), SL_CLASS_OK);
  assert_int_equal(c.region_len, 63);
  assert_int_equal(c.region[63], '\0');
  r.host = make(hdr, "green-cip.", 64, 'r', ".aliyuncs.com");
  assert_int_equal(run(&r, &c), SL_CLASS_FIELD_TOO_LONG);
  FIELD_EQ(c, region, "");
  r = (struct req){.url = "/?Action=TextModeration", .region = make(hdr, "", 63, 'r', "")};
  assert_int_equal(run(&r, &c), SL_CLASS_OK);
  assert_int_equal(c.region_len, 63);
  r.region = make(hdr, "", 64, 'r', "");
  assert_int_equal(run(&r, &c), SL_CLASS_FIELD_TOO_LONG);
}

static void test_errors(void **state) {
  (void)state;
  struct sl_class c;
  struct req r = {.url = "/"};
  assert_int_equal(run(&r, &c), SL_CLASS_NO_ACTION);
  assert_int_equal(c.feature, -1);
  assert_int_equal(c.tier, SL_TIER_BASELINE);
  r.url = "/?";
  assert_int_equal(run(&r, &c), SL_CLASS_NO_ACTION);
  r.url = "";
  r.acs_action = "  ";
  assert_int_equal(run(&r, &c), SL_CLASS_NO_ACTION);

  /* Missing Action still reports the other fields. */
  r = (struct req){.url = "/?AccessKeyId=AK&Service=s", .host = "green-cip.cn-beijing.aliyuncs.com"};
  assert_int_equal(run(&r, &c), SL_CLASS_NO_ACTION);
  FIELD_EQ(c, ak, "AK");
  FIELD_EQ(c, service, "s");
  FIELD_EQ(c, region, "cn-beijing");

  r = (struct req){.url = "/?Action=DeleteEverything&AccessKeyId=AK"};
  assert_int_equal(run(&r, &c), SL_CLASS_UNKNOWN_ACTION);
  FIELD_EQ(c, action, "DeleteEverything");
  FIELD_EQ(c, ak, "AK");
  assert_int_equal(c.feature, -1);

  /* The first problem in field order is the one reported. */
  r = (struct req){.url = "/?Action=Nope&Service=%zz"};
  assert_int_equal(run(&r, &c), SL_CLASS_BAD_ENCODING);
  r = (struct req){.url = "/?Service=%zz"};
  assert_int_equal(run(&r, &c), SL_CLASS_NO_ACTION);

  /* A NULL url and body are tolerated. */
  struct sl_class_input in = {.acs_action = "FileModeration", .acs_action_len = 14, .default_region = "cn-beijing"};
  assert_int_equal(sl_classify(&in, &c), SL_CLASS_OK);
  assert_int_equal(c.feature, SL_FEAT_DOCUMENT);

  assert_string_equal(sl_class_err_code(SL_CLASS_NO_ACTION), "MissingAction");
  assert_string_equal(sl_class_err_code(SL_CLASS_UNKNOWN_ACTION), "InvalidAction.NotFound");
  assert_string_equal(sl_class_err_code(SL_CLASS_BAD_ENCODING), "InvalidParameter");
  assert_string_equal(sl_class_err_code(SL_CLASS_FIELD_TOO_LONG), "InvalidParameter");
  for (int e = SL_CLASS_NO_ACTION; e <= SL_CLASS_FIELD_TOO_LONG; e++) {
    const char *m = sl_class_err_message((enum sl_class_err)e);
    assert_true(strlen(m) > 10);
    assert_null(strpbrk(m, "\"\\")); /* pasted into JSON unescaped */
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_v1_query), cmocka_unit_test(test_v3_header), cmocka_unit_test(test_authorization),
      cmocka_unit_test(test_host),     cmocka_unit_test(test_service),   cmocka_unit_test(test_decoding),
      cmocka_unit_test(test_bounds),   cmocka_unit_test(test_errors),    cmocka_unit_test(test_host_partial_match),
      cmocka_unit_test(test_region_list),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
