/* Unit tests for rate/rating.c: the pure computation of sluice-rate. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "rating.h"

#define U(x) ((int64_t)(x) * RATE_SCALE) /* whole units in micro-units */

/* 2024-05-01 00:00:00 UTC and the day after. */
#define DAY_START INT64_C(1714521600)
#define DAY_END (DAY_START + 86400)

static int64_t dec(const char *s) {
  int64_t v = 0;
  assert_int_equal(rate_dec_parse(s, strlen(s), &v), 0);
  return v;
}

static const char *fmt(int64_t v) {
  static char buf[4][RATE_DEC_MAX];
  static int k;
  char *b = buf[k++ % 4];
  size_t n = rate_dec_format(v, b);
  assert_int_equal(n, strlen(b));
  return b;
}

static void usage(struct rate_account *a, const char *field, const char *calls) {
  int64_t n;
  assert_int_equal(rate_int_parse(calls, strlen(calls), &n), 0);
  assert_int_equal(rate_account_add_usage(a, field, strlen(field), n), 0);
}

/* Packages added with pkg() are bought one second apart, in the order they
 * are added, so that purchase order is the order of the calls. */
static int64_t next_purchase = DAY_START - 86400 * 10;

/* A package valid on the whole day, with quota and remaining as decimals. */
static void pkg(struct rate_account *a, const char *id, const char *quota, const char *remaining) {
  char purchased[24], expires[24];
  snprintf(purchased, sizeof(purchased), "%lld", (long long)next_purchase++);
  snprintf(expires, sizeof(expires), "%lld", (long long)(DAY_END + 86400 * 10));
  const char *raw[RATE_PF_N] = {quota, remaining, purchased, expires};
  assert_int_equal(rate_account_add_pkg(a, id, raw), 0);
}

static void pkg_dated(struct rate_account *a, const char *id, int64_t purchased_at, int64_t expires_at) {
  char purchased[24], expires[24];
  snprintf(purchased, sizeof(purchased), "%lld", (long long)purchased_at);
  snprintf(expires, sizeof(expires), "%lld", (long long)expires_at);
  const char *raw[RATE_PF_N] = {"100", "100", purchased, expires};
  assert_int_equal(rate_account_add_pkg(a, id, raw), 0);
}

static const struct rate_pkg *pkg_id(const struct rate_account *a, const char *id) {
  for (size_t i = 0; i < a->npkgs; i++)
    if (strcmp(a->pkgs[i].id, id) == 0) return &a->pkgs[i];
  fail_msg("no package %s", id);
  return NULL;
}

/* The coefficient of a feature's calls without a service. */
static void set_coef(struct rate_account *a, const char *feature, const char *coef) {
  struct rate_item *f = rate_account_item(a, feature, RATE_NO_SERVICE);
  assert_non_null(f);
  f->coef = dec(coef);
  f->coef_default = 0;
}

/* Computes the day; items without a price cost 1 per 1,000 calls. */
static int compute(struct rate_account *a) {
  for (size_t i = 0; i < a->nitems; i++)
    if (!a->items[i].price_set) {
      a->items[i].price = RATE_SCALE;
      a->items[i].price_set = 1;
    }
  return rate_account_compute(a, DAY_START, DAY_END);
}

static void test_decimal(void **state) {
  (void)state;
  assert_int_equal(dec("1"), RATE_SCALE);
  assert_int_equal(dec("0.5"), RATE_SCALE / 2);
  assert_int_equal(dec("2.25"), 2250000);
  assert_int_equal(dec("-2.25"), -2250000);
  assert_int_equal(dec("0.000001"), 1);
  assert_int_equal(dec("1.50000000"), 1500000); /* zeros past 6 decimals are fine */
  assert_int_equal(dec("007"), U(7));
  assert_int_equal(dec("9223372036854.775807"), INT64_MAX);
  int64_t v;
  const char *bad[] = {"", "-", ".5", "1.", "1e3", " 1", "1 ", "+1", "0x10", "1.0000001", "1,5", "--1", "nan"};
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
    assert_int_equal(rate_dec_parse(bad[i], strlen(bad[i]), &v), -EINVAL);
  assert_int_equal(rate_dec_parse("9223372036854.775808", 20, &v), -ERANGE);
  assert_int_equal(rate_dec_parse("99999999999999999999999", 23, &v), -ERANGE);

  assert_string_equal(fmt(U(20)), "20");
  assert_string_equal(fmt(1500000), "1.5");
  assert_string_equal(fmt(0), "0");
  assert_string_equal(fmt(1), "0.000001");
  assert_string_equal(fmt(-2250000), "-2.25");
  assert_string_equal(fmt(INT64_MAX), "9223372036854.775807");
  assert_string_equal(fmt(INT64_MIN), "-9223372036854.775808");
}

static void test_int(void **state) {
  (void)state;
  int64_t v;
  assert_int_equal(rate_int_parse("0", 1, &v), 0);
  assert_int_equal(v, 0);
  assert_int_equal(rate_int_parse("-17", 3, &v), 0);
  assert_int_equal(v, -17);
  assert_int_equal(rate_int_parse("9223372036854775807", 19, &v), 0);
  assert_int_equal(v, INT64_MAX);
  assert_int_equal(rate_int_parse("-9223372036854775808", 20, &v), 0);
  assert_int_equal(v, INT64_MIN);
  assert_int_equal(rate_int_parse("9223372036854775808", 19, &v), -ERANGE);
  assert_int_equal(rate_int_parse("", 0, &v), -EINVAL);
  assert_int_equal(rate_int_parse("1.5", 3, &v), -EINVAL);
  assert_int_equal(rate_int_parse("12a", 3, &v), -EINVAL);
}

static void test_day_bounds(void **state) {
  (void)state;
  int64_t s, e;
  assert_int_equal(rate_day_bounds("20240501", 0, &s, &e), 0);
  assert_int_equal(s, DAY_START);
  assert_int_equal(e, DAY_END);
  assert_int_equal(rate_day_bounds("19700101", 0, &s, &e), 0);
  assert_int_equal(s, 0);
  /* UTC+8: the day starts at 16:00 UTC the day before. */
  assert_int_equal(rate_day_bounds("20240501", 480, &s, &e), 0);
  assert_int_equal(s, DAY_START - 8 * 3600);
  assert_int_equal(e, DAY_END - 8 * 3600);
  assert_int_equal(rate_day_bounds("20240501", -300, &s, &e), 0);
  assert_int_equal(s, DAY_START + 5 * 3600);
  assert_int_equal(rate_day_bounds("20240229", 0, &s, &e), 0);
  assert_int_equal(s, INT64_C(1709164800));
  assert_int_equal(rate_day_bounds("20000229", 0, &s, &e), 0);
  const char *bad[] = {"20230229", "19000229", "20240431", "20241301", "20240001", "20240500", "2024051",
                       "202405011", "2024-5-1", "19691231", "abcdefgh"};
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
    assert_int_equal(rate_day_bounds(bad[i], 0, &s, &e), -EINVAL);
  assert_int_equal(rate_day_bounds("20240501", 1440, &s, &e), -EINVAL);
  assert_int_equal(rate_day_bounds("20240501", -1440, &s, &e), -EINVAL);
}

static void test_purchase_order(void **state) {
  (void)state;
  struct rate_account a;
  rate_account_init(&a);
  usage(&a, "text:cn-shanghai", "150");
  pkg(&a, "older", "100", "100");
  pkg(&a, "newer", "100", "100");
  assert_int_equal(compute(&a), 0);
  assert_int_equal(a.pkgs[0].drawn, U(100));
  assert_int_equal(a.pkgs[0].remaining_after, 0);
  assert_int_equal(a.pkgs[1].drawn, U(50));
  assert_int_equal(a.pkgs[1].remaining_after, U(50));
  assert_int_equal(a.units_total, U(150));
  assert_int_equal(a.units_from_packages, U(150));
  assert_int_equal(a.payg_units, 0);
  assert_int_equal(a.items[0].payg_calls, 0);
  rate_account_free(&a);
}

static void test_regions_summed(void **state) {
  (void)state;
  struct rate_account a;
  rate_account_init(&a);
  usage(&a, "text:cn-shanghai", "10");
  usage(&a, "text:cn-beijing", "5");
  usage(&a, "text", "1"); /* no region: still the feature */
  assert_int_equal(a.nitems, 1);
  assert_int_equal(a.items[0].calls, 16);
  assert_string_equal(a.items[0].service, RATE_NO_SERVICE);
  assert_int_equal(rate_account_add_usage(&a, ":cn", 3, 1), -EINVAL);
  assert_int_equal(rate_account_add_usage(&a, "text::cn", 8, 1), -EINVAL); /* empty service */
  assert_int_equal(rate_account_add_usage(&a, "text:cn", 7, -1), -EINVAL);
  assert_non_null(strstr(a.why, "negative"));
  /* Services are lines of their own; the region does not count. */
  usage(&a, "text:chat_detection:cn-shanghai", "4");
  usage(&a, "text:chat_detection:cn-beijing", "6");
  assert_int_equal(a.nitems, 2);
  assert_string_equal(a.items[0].name, "chat_detection");
  assert_string_equal(a.items[0].feature, "text");
  assert_int_equal(a.items[0].calls, 10);
  assert_string_equal(a.items[1].name, "text");
  assert_string_equal(a.items[1].service, RATE_NO_SERVICE);
  rate_account_free(&a);
}

static void test_fractional_coefficients(void **state) {
  (void)state;
  struct rate_account a;
  rate_account_init(&a);
  usage(&a, "image:cn-shanghai", "3");
  usage(&a, "text_llm:cn-shanghai", "10");
  set_coef(&a, "image", "0.5");
  set_coef(&a, "text_llm", "2.25");
  pkg(&a, "p1", "10", "10");
  assert_int_equal(compute(&a), 0);
  /* image: 3 x 0.5 = 1.5 units, all from p1; text_llm: 22.5 units, 8.5 from p1. */
  assert_string_equal(fmt(a.items[0].units), "1.5");
  assert_string_equal(fmt(a.items[0].from_packages), "1.5");
  assert_string_equal(fmt(a.items[1].units), "22.5");
  assert_string_equal(fmt(a.items[1].from_packages), "8.5");
  assert_string_equal(fmt(a.items[1].payg_units), "14");
  /* 14 units / 2.25 per call = 6.222222(2) calls */
  assert_string_equal(fmt(a.items[1].payg_calls), "6.222222");
  assert_string_equal(fmt(a.units_total), "24");
  assert_string_equal(fmt(a.units_from_packages), "10");
  assert_string_equal(fmt(a.payg_units), "14");
  assert_int_equal(a.pkgs[0].remaining_after, 0);
  rate_account_free(&a);
}

static void test_payg_calls_rounding_and_free_feature(void **state) {
  (void)state;
  struct rate_account a;
  rate_account_init(&a);
  usage(&a, "a:r", "2");
  usage(&a, "b:r", "7");
  set_coef(&a, "a", "0.000003"); /* 2 calls = 0.000006 units */
  set_coef(&a, "b", "0");
  pkg(&a, "p", "1", "0.000001");
  assert_int_equal(compute(&a), 0);
  /* a: 0.000005 payg units / 0.000003 = 1.6666..7 calls */
  assert_string_equal(fmt(a.items[0].payg_units), "0.000005");
  assert_string_equal(fmt(a.items[0].payg_calls), "1.666667");
  /* b: coefficient 0 is free: no units, no pay-as-you-go calls, nothing
   * to pay (issue 13: it used to leave payg_calls at 7). */
  assert_int_equal(a.items[1].units, 0);
  assert_int_equal(a.items[1].payg_units, 0);
  assert_int_equal(a.items[1].payg_calls, 0);
  assert_int_equal(a.items[1].amount, 0);
  rate_account_free(&a);
}

static void test_expired_and_future_skipped(void **state) {
  (void)state;
  struct rate_account a;
  rate_account_init(&a);
  usage(&a, "text:r", "500");
  pkg_dated(&a, "expired_at_start", DAY_START - 100, DAY_START);      /* expires as the day starts */
  pkg_dated(&a, "bought_at_end", DAY_END, DAY_END + 100);             /* bought as the day ends */
  pkg_dated(&a, "expired_long_ago", 0, DAY_START - 86400);
  pkg_dated(&a, "last_second", DAY_START - 100, DAY_START + 1);       /* valid 1 s of the day */
  pkg_dated(&a, "bought_last_second", DAY_END - 1, DAY_END + 86400);  /* valid the last second */
  assert_int_equal(compute(&a), 0);
  assert_int_equal(pkg_id(&a, "expired_at_start")->state, RATE_PKG_EXPIRED);
  assert_int_equal(pkg_id(&a, "bought_at_end")->state, RATE_PKG_NOT_YET);
  assert_int_equal(pkg_id(&a, "expired_long_ago")->state, RATE_PKG_EXPIRED);
  assert_int_equal(pkg_id(&a, "last_second")->state, RATE_PKG_USABLE);
  assert_int_equal(pkg_id(&a, "bought_last_second")->state, RATE_PKG_USABLE);
  const char *unused[] = {"expired_at_start", "bought_at_end", "expired_long_ago"};
  for (int i = 0; i < 3; i++) {
    assert_int_equal(pkg_id(&a, unused[i])->drawn, 0);
    assert_int_equal(pkg_id(&a, unused[i])->remaining_after, U(100));
  }
  assert_int_equal(pkg_id(&a, "last_second")->drawn, U(100));
  assert_int_equal(pkg_id(&a, "bought_last_second")->drawn, U(100));
  assert_string_equal(rate_pkg_state_name(RATE_PKG_EXPIRED), "expired");
  assert_int_equal(a.payg_units, U(300));
  rate_account_free(&a);
}

static void test_bounds_follow_time_zone(void **state) {
  (void)state;
  int64_t s, e;
  assert_int_equal(rate_day_bounds("20240501", 480, &s, &e), 0);
  struct rate_account a;
  rate_account_init(&a);
  usage(&a, "text:r", "10");
  /* Bought at 20:00 UTC on May 1st: after the UTC+8 day ended (16:00 UTC). */
  pkg_dated(&a, "late", DAY_START + 20 * 3600, DAY_END + 86400);
  a.items[0].price_set = 1;
  assert_int_equal(rate_account_compute(&a, s, e), 0);
  assert_int_equal(a.pkgs[0].state, RATE_PKG_NOT_YET);
  rate_account_free(&a);
}

/* Adds a package of raw fields; returns rate_account_add_pkg's result. */
static int add_raw(struct rate_account *a, const char *id, const char *q, const char *r, const char *p,
                   const char *e) {
  const char *raw[RATE_PF_N] = {q, r, p, e};
  return rate_account_add_pkg(a, id, raw);
}

static void test_malformed_refused(void **state) {
  (void)state;
  struct {
    const char *raw[RATE_PF_N];
    const char *why;
  } bad[] = {
      {{NULL, NULL, NULL, NULL}, "hash does not exist"},
      {{NULL, "10", "0", "99"}, "has no quota"},
      {{"10", NULL, "0", "99"}, "has no remaining"},
      {{"10", "10", NULL, "99"}, "has no purchased_at"},
      {{"10", "ten", "0", "99"}, "remaining 'ten' is not a decimal number"},
      {{"10", "10", "0.5", "99"}, "purchased_at '0.5' is not an integer"},
      {{"10", "10", "0", "soon"}, "expires_at 'soon' is not an integer"},
      {{"10", "-1", "0", "99"}, "remaining '-1' is negative"},
      {{"-10", "0", "0", "99"}, "quota '-10' is negative"},
      {{"10", "10", "-5", "99"}, "purchased_at '-5' is negative"},
      {{"10", "10.5", "0", "99"}, "remaining 10.5 is more than its quota 10"},
      {{"10", "10", "100", "99"}, "purchased_at 100 is after expires_at 99"},
      {{"10", "1.0000001", "0", "99"}, "not a decimal number"},
      {{"10", "10", "9223372036854775807", NULL}, "not in range"},
  };
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    struct rate_account a;
    rate_account_init(&a);
    assert_int_equal(rate_account_add_pkg(&a, "p", bad[i].raw), -EINVAL);
    if (strstr(a.why, bad[i].why) == NULL) fail_msg("case %zu: '%s' lacks '%s'", i, a.why, bad[i].why);
    assert_non_null(strstr(a.why, "package p"));
    assert_int_equal(a.npkgs, 0);
    rate_account_free(&a);
  }
  /* The edges that are fine: remaining == quota, purchased == expires, 0. */
  struct rate_account a;
  rate_account_init(&a);
  assert_int_equal(add_raw(&a, "full", "10", "10", "5", "5"), 0);
  assert_int_equal(add_raw(&a, "empty", "0", "0", "0", "99"), 0);
  assert_int_equal(add_raw(&a, "full", "10", "10", "5", "5"), 1); /* listed twice: one package */
  assert_int_equal(a.npkgs, 2);
  rate_account_free(&a);
}

/* A package without expires_at is valid one year (365 days) from purchase. */
static void test_default_validity(void **state) {
  (void)state;
  char p1[24], p2[24];
  struct rate_account a;
  rate_account_init(&a);
  usage(&a, "text:r", "30");
  /* Bought 364 days before the day: valid on it. Bought 365 days before
   * the day starts: expired as it starts. */
  snprintf(p1, sizeof(p1), "%lld", (long long)(DAY_START - 364 * 86400));
  snprintf(p2, sizeof(p2), "%lld", (long long)(DAY_START - 365 * 86400));
  assert_int_equal(add_raw(&a, "recent", "10", "10", p1, NULL), 0);
  assert_int_equal(add_raw(&a, "old", "10", "10", p2, NULL), 0);
  assert_int_equal(compute(&a), 0);
  assert_int_equal(pkg_id(&a, "recent")->expires_at, DAY_START + 86400);
  assert_int_equal(pkg_id(&a, "recent")->state, RATE_PKG_USABLE);
  assert_int_equal(pkg_id(&a, "recent")->drawn, U(10));
  assert_int_equal(pkg_id(&a, "old")->expires_at, DAY_START);
  assert_int_equal(pkg_id(&a, "old")->state, RATE_PKG_EXPIRED);
  assert_int_equal(a.payg_units, U(20));
  rate_account_free(&a);
}

/* Issue 13: packages are drawn in order of purchased_at (ties by id),
 * whatever the order they were listed in. */
static void test_purchase_time_order(void **state) {
  (void)state;
  struct rate_account a;
  rate_account_init(&a);
  usage(&a, "text:r", "150");
  assert_int_equal(add_raw(&a, "late", "100", "100", "1700000100", NULL), 0);
  assert_int_equal(add_raw(&a, "early", "100", "100", "1700000000", NULL), 0);
  assert_int_equal(compute(&a), 0);
  assert_int_equal(pkg_id(&a, "early")->remaining_after, 0);
  assert_int_equal(pkg_id(&a, "late")->remaining_after, U(50));
  assert_string_equal(a.pkgs[0].id, "early");
  rate_account_free(&a);
  /* Bought the same second: by id. */
  rate_account_init(&a);
  usage(&a, "text:r", "150");
  assert_int_equal(add_raw(&a, "b", "100", "100", "1700000000", NULL), 0);
  assert_int_equal(add_raw(&a, "a", "100", "100", "1700000000", NULL), 0);
  assert_int_equal(compute(&a), 0);
  assert_int_equal(pkg_id(&a, "a")->remaining_after, 0);
  assert_int_equal(pkg_id(&a, "b")->remaining_after, U(50));
  rate_account_free(&a);
}

/* Prices: currency per 1,000 calls, exact in micro-units, half up. */
static void test_amounts(void **state) {
  (void)state;
  struct rate_account a;
  rate_account_init(&a);
  usage(&a, "text:chat_detection:r", "7");
  usage(&a, "image:baselineCheck:r", "3");
  usage(&a, "image:r", "1");
  struct rate_item *t = rate_account_item(&a, "text", "chat_detection");
  struct rate_item *im = rate_account_item(&a, "image", "baselineCheck");
  struct rate_item *plain = rate_account_item(&a, "image", RATE_NO_SERVICE);
  assert_non_null(t);
  assert_non_null(im);
  assert_non_null(plain);
  t->price = dec("1.5"), t->price_set = 1;      /* 7 x 1.5 / 1000 = 0.0105 */
  im->coef = dec("2.5"), im->coef_default = 0;  /* 7.5 units */
  im->price = dec("0.7"), im->price_set = 1;    /* 3 x 0.7 / 1000 = 0.0021 */
  plain->price = dec("0.0005"), plain->price_set = 1; /* 0.0000005: half up to 0.000001 */
  pkg(&a, "p", "1", "1");                       /* 1 unit: baselineCheck draws it first */
  assert_int_equal(rate_account_compute(&a, DAY_START, DAY_END), 0);
  assert_string_equal(fmt(im->from_packages), "1");
  assert_string_equal(fmt(im->payg_units), "6.5");
  assert_string_equal(fmt(im->payg_calls), "2.6");
  assert_int_equal(im->amount, 1820); /* 2.6 x 0.7 / 1000 = 0.00182 */
  assert_int_equal(t->amount, 10500);
  assert_int_equal(plain->amount, 1);
  assert_int_equal(a.amount, 1820 + 10500 + 1);
  char m[RATE_DEC_MAX];
  rate_money_format(a.amount, m);
  assert_string_equal(m, "0.012321");
  rate_account_free(&a);

  /* No price for what goes pay-as-you-go: the account fails, naming it. */
  rate_account_init(&a);
  usage(&a, "video:vs:r", "2");
  assert_int_equal(rate_account_compute(&a, DAY_START, DAY_END), -ENOENT);
  assert_non_null(strstr(a.why, "no price for vs"));
  rate_account_free(&a);
  /* ...but none is needed when packages cover it, or the coefficient is 0. */
  rate_account_init(&a);
  usage(&a, "video:vs:r", "2");
  usage(&a, "video:free:r", "2");
  rate_account_item(&a, "video", "free")->coef = 0;
  pkg(&a, "p", "5", "5");
  assert_int_equal(rate_account_compute(&a, DAY_START, DAY_END), 0);
  assert_int_equal(a.amount, 0);
  rate_account_free(&a);
  /* A negative price is refused. */
  rate_account_init(&a);
  usage(&a, "video:vs:r", "2");
  a.items[0].price = -1, a.items[0].price_set = 1;
  assert_int_equal(rate_account_compute(&a, DAY_START, DAY_END), -EINVAL);
  rate_account_free(&a);
  /* The largest price x units overflows the amount: refused, not wrapped. */
  rate_account_init(&a);
  usage(&a, "video:vs:r", "9000000000000");
  a.items[0].price = INT64_MAX, a.items[0].price_set = 1;
  assert_int_equal(rate_account_compute(&a, DAY_START, DAY_END), -ERANGE);
  rate_account_free(&a);
}

static void test_alert_threshold_per_account(void **state) {
  (void)state;
  struct rate_account a;
  rate_account_init(&a);
  a.alert_pct = dec("50");
  usage(&a, "text:r", "51");
  pkg(&a, "p", "100", "100"); /* 49 left: under 50% */
  assert_int_equal(compute(&a), 0);
  assert_true(a.pkgs[0].alert);
  rate_account_free(&a);
  rate_account_init(&a);
  a.alert_pct = 0; /* 0: never */
  usage(&a, "text:r", "100");
  pkg(&a, "p", "100", "100");
  assert_int_equal(compute(&a), 0);
  assert_false(a.pkgs[0].alert);
  rate_account_free(&a);
}

static void test_money_and_helpers(void **state) {
  (void)state;
  char b[RATE_DEC_MAX];
  rate_money_format(0, b);
  assert_string_equal(b, "0.000000");
  rate_money_format(12340000, b);
  assert_string_equal(b, "12.340000");
  rate_money_format(-1, b);
  assert_string_equal(b, "-0.000001");
  rate_money_format(INT64_MIN, b);
  assert_string_equal(b, "-9223372036854.775808");
  int64_t v;
  assert_int_equal(rate_muldiv(1, 1, 2, 1, &v), 0); /* 0.5 rounds up */
  assert_int_equal(v, 1);
  assert_int_equal(rate_muldiv(1, 1, 3, 1, &v), 0); /* 0.33 down */
  assert_int_equal(v, 0);
  assert_int_equal(rate_muldiv(INT64_MAX, INT64_MAX, INT64_MAX, 1, &v), 0); /* 126-bit product */
  assert_int_equal(v, INT64_MAX);
  assert_int_equal(rate_muldiv(INT64_MAX, 2, 1, 1, &v), -ERANGE);
  char d[9];
  rate_day_of(DAY_START, 0, d);
  assert_string_equal(d, "20240501");
  rate_day_of(DAY_END - 1, 0, d);
  assert_string_equal(d, "20240501");
  rate_day_of(DAY_START - 1, 0, d);
  assert_string_equal(d, "20240430");
  rate_day_of(DAY_START - 8 * 3600, 480, d); /* midnight in UTC+8 */
  assert_string_equal(d, "20240501");
  rate_day_of(0, 0, d);
  assert_string_equal(d, "19700101");
  rate_day_of(INT64_C(1709164800), 0, d);
  assert_string_equal(d, "20240229");
  const char *f, *s;
  size_t fl, sl;
  assert_int_equal(rate_usage_split("text:chat:cn-sh", 15, &f, &fl, &s, &sl), 0);
  assert_int_equal(fl, 4);
  assert_memory_equal(s, "chat", 4);
  assert_int_equal(sl, 4);
  assert_int_equal(rate_usage_split("a:b:c:r", 7, &f, &fl, &s, &sl), 0); /* service b:c */
  assert_int_equal(sl, 3);
  assert_int_equal(rate_usage_split("text:-:r", 8, &f, &fl, &s, &sl), 0);
  assert_int_equal(sl, 1);
  assert_memory_equal(s, RATE_NO_SERVICE, 1);
  assert_int_equal(rate_usage_split("text:r", 6, &f, &fl, &s, &sl), 0);
  assert_string_equal(s, RATE_NO_SERVICE);
  assert_int_equal(rate_usage_split("text", 4, &f, &fl, &s, &sl), 0);
  assert_int_equal(fl, 4);
  assert_int_equal(rate_usage_split(":s:r", 4, &f, &fl, &s, &sl), -EINVAL);
  assert_int_equal(rate_usage_split("f::r", 4, &f, &fl, &s, &sl), -EINVAL);
  char nul[] = {'f', '\0', ':', 'r'};
  assert_int_equal(rate_usage_split(nul, 4, &f, &fl, &s, &sl), -EINVAL);
}

static void test_payg_when_packages_run_out(void **state) {
  (void)state;
  struct rate_account a;
  rate_account_init(&a);
  usage(&a, "text:r", "1000");
  pkg(&a, "p1", "300", "120.5");
  pkg(&a, "p2", "50", "50");
  assert_int_equal(compute(&a), 0);
  assert_int_equal(a.pkgs[0].remaining_after, 0);
  assert_int_equal(a.pkgs[1].remaining_after, 0);
  assert_string_equal(fmt(a.units_from_packages), "170.5");
  assert_string_equal(fmt(a.payg_units), "829.5");
  assert_string_equal(fmt(a.items[0].payg_calls), "829.5");
  /* Both fall from above 10% of their quota to 0. */
  assert_true(a.pkgs[0].alert);
  assert_true(a.pkgs[1].alert);
  rate_account_free(&a);
}

static void test_no_packages(void **state) {
  (void)state;
  struct rate_account a;
  rate_account_init(&a);
  usage(&a, "video:r", "4");
  assert_int_equal(compute(&a), 0);
  assert_int_equal(a.units_total, U(4));
  assert_int_equal(a.payg_units, U(4));
  assert_int_equal(a.units_from_packages, 0);
  rate_account_free(&a);
}

/* Rates `calls` text calls against one package (quota 100, remaining
 * `remaining`); returns whether it raised an alert. */
static int alert_after(const char *remaining, const char *calls, const char *coef) {
  struct rate_account a;
  rate_account_init(&a);
  usage(&a, "text:r", calls);
  set_coef(&a, "text", coef);
  pkg(&a, "p", "100", remaining);
  assert_int_equal(compute(&a), 0);
  int alert = a.pkgs[0].alert;
  rate_account_free(&a);
  return alert;
}

static void test_ten_percent_threshold(void **state) {
  (void)state;
  assert_false(alert_after("20", "10", "1"));          /* lands on exactly 10: stays at 10% */
  assert_true(alert_after("20", "11", "1"));           /* 9: falls under */
  assert_true(alert_after("20", "10000001", "0.000001")); /* 9.999999: falls under */
  assert_true(alert_after("10", "1", "0.000001"));     /* from exactly 10% to under */
  assert_false(alert_after("9", "1", "1"));            /* was under already */
  assert_false(alert_after("50", "10", "1"));          /* 40: far above */
  assert_false(alert_after("20", "0", "1"));           /* nothing drawn */
  /* A quota that 10 does not divide: 10% of 105 is 10.5. */
  struct rate_account a;
  rate_account_init(&a);
  usage(&a, "text:r", "1");
  pkg(&a, "p", "105", "11.5");
  assert_int_equal(compute(&a), 0);
  assert_false(a.pkgs[0].alert); /* 10.5: at 10% */
  rate_account_free(&a);
  rate_account_init(&a);
  usage(&a, "text:r", "1");
  pkg(&a, "p", "105", "11.499999");
  assert_int_equal(compute(&a), 0);
  assert_true(a.pkgs[0].alert); /* 10.499999: under */
  rate_account_free(&a);
}

static void test_zero_usage(void **state) {
  (void)state;
  struct rate_account a;
  rate_account_init(&a);
  pkg(&a, "p", "100", "5");
  assert_int_equal(compute(&a), 0);
  assert_int_equal(a.nitems, 0);
  assert_int_equal(a.units_total, 0);
  assert_int_equal(a.payg_units, 0);
  assert_int_equal(a.pkgs[0].drawn, 0);
  assert_false(a.pkgs[0].alert);
  rate_account_free(&a);
  rate_account_init(&a);
  usage(&a, "text:r", "0");
  pkg(&a, "p", "100", "100");
  assert_int_equal(compute(&a), 0);
  assert_int_equal(a.units_total, 0);
  assert_int_equal(a.pkgs[0].remaining_after, U(100));
  rate_account_free(&a);
}

static void test_overflow_guard(void **state) {
  (void)state;
  struct rate_account a;
  rate_account_init(&a);
  /* Summing calls over regions overflows int64. */
  usage(&a, "text:a", "9223372036854775807");
  assert_int_equal(rate_account_add_usage(&a, "text:b", 6, 1), -ERANGE);
  rate_account_free(&a);
  /* calls x coefficient overflows micro-units: 1e13 calls x 1. */
  rate_account_init(&a);
  usage(&a, "text:a", "10000000000000");
  assert_int_equal(compute(&a), -ERANGE);
  rate_account_free(&a);
  /* Each feature fits, their total does not. */
  rate_account_init(&a);
  usage(&a, "a:r", "5000000000000");
  usage(&a, "b:r", "5000000000000");
  assert_int_equal(compute(&a), -ERANGE);
  rate_account_free(&a);
  /* The largest that fits is fine. */
  rate_account_init(&a);
  usage(&a, "a:r", "9223372036854");
  assert_int_equal(compute(&a), 0);
  assert_int_equal(a.payg_units, U(9223372036854));
  assert_int_equal(a.items[0].payg_calls, U(9223372036854));
  rate_account_free(&a);
  /* A negative coefficient is refused. */
  rate_account_init(&a);
  usage(&a, "a:r", "1");
  set_coef(&a, "a", "-1");
  assert_int_equal(compute(&a), -EINVAL);
  rate_account_free(&a);
}

static void test_feature_name_order(void **state) {
  (void)state;
  struct rate_account a;
  rate_account_init(&a);
  usage(&a, "video:r", "5");
  usage(&a, "text:r", "5");
  usage(&a, "image_llm:r", "5");
  usage(&a, "image:r", "5");
  assert_int_equal(a.nitems, 4);
  assert_string_equal(a.items[0].name, "image");
  assert_string_equal(a.items[1].name, "image_llm");
  assert_string_equal(a.items[2].name, "text");
  assert_string_equal(a.items[3].name, "video");
  pkg(&a, "p", "12", "12");
  assert_int_equal(compute(&a), 0);
  /* image draws first, then image_llm takes what is left; the rest pay. */
  assert_int_equal(a.items[0].from_packages, U(5));
  assert_int_equal(a.items[1].from_packages, U(5));
  assert_int_equal(a.items[2].from_packages, U(2));
  assert_int_equal(a.items[2].payg_units, U(3));
  assert_int_equal(a.items[3].from_packages, 0);
  assert_int_equal(a.items[3].payg_units, U(5));
  assert_null(rate_account_item(&a, "imag", RATE_NO_SERVICE));
  assert_null(rate_account_item(&a, "image", "x"));
  rate_account_free(&a);
}

static void test_outcome_parse(void **state) {
  (void)state;
  assert_int_equal(rate_outcome_parse("ok", 2), RATE_RATED);
  assert_int_equal(rate_outcome_parse("already", 7), RATE_ALREADY);
  assert_int_equal(rate_outcome_parse("retry", 5), RATE_RETRY);
  assert_int_equal(rate_outcome_parse("retryx", 6), RATE_FAILED);
  assert_int_equal(rate_outcome_parse("", 0), RATE_FAILED);
}

struct script {
  const enum rate_outcome *outcomes;
  unsigned calls;
};

static enum rate_outcome scripted(void *arg, unsigned n) {
  struct script *s = arg;
  assert_int_equal(n, s->calls + 1);
  return s->outcomes[s->calls++];
}

static void test_retry_decision(void **state) {
  (void)state;
  /* A package changes twice between compute and apply, then holds still. */
  const enum rate_outcome twice[] = {RATE_RETRY, RATE_RETRY, RATE_RATED};
  struct script s = {twice, 0};
  assert_int_equal(rate_attempts(scripted, &s, 5), RATE_RATED);
  assert_int_equal(s.calls, 3);
  /* It keeps changing: bounded, then the account fails. */
  const enum rate_outcome always[] = {RATE_RETRY, RATE_RETRY, RATE_RETRY, RATE_RETRY, RATE_RETRY, RATE_RETRY};
  s = (struct script){always, 0};
  assert_int_equal(rate_attempts(scripted, &s, 5), RATE_FAILED);
  assert_int_equal(s.calls, 5);
  /* Another run billed it meanwhile: no more attempts. */
  const enum rate_outcome already[] = {RATE_RETRY, RATE_ALREADY, RATE_RATED};
  s = (struct script){already, 0};
  assert_int_equal(rate_attempts(scripted, &s, 5), RATE_ALREADY);
  assert_int_equal(s.calls, 2);
  const enum rate_outcome failed[] = {RATE_FAILED, RATE_RATED};
  s = (struct script){failed, 0};
  assert_int_equal(rate_attempts(scripted, &s, 5), RATE_FAILED);
  assert_int_equal(s.calls, 1);
}

/* A retry recomputes from what was read again: the same account rated a
 * second time from the new balance draws from it, not from the old one. */
static void test_recompute_from_new_balance(void **state) {
  (void)state;
  struct rate_account a;
  rate_account_init(&a);
  usage(&a, "text:r", "30");
  pkg(&a, "p", "100", "50");
  assert_int_equal(compute(&a), 0);
  assert_int_equal(a.pkgs[0].remaining_after, U(20));
  rate_account_free(&a); /* the driver starts each attempt empty */
  usage(&a, "text:r", "30");
  pkg(&a, "p", "100", "40");
  assert_int_equal(compute(&a), 0);
  assert_int_equal(a.pkgs[0].remaining_after, U(10));
  assert_false(a.pkgs[0].alert);
  rate_account_free(&a);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_decimal),
      cmocka_unit_test(test_int),
      cmocka_unit_test(test_day_bounds),
      cmocka_unit_test(test_purchase_order),
      cmocka_unit_test(test_regions_summed),
      cmocka_unit_test(test_fractional_coefficients),
      cmocka_unit_test(test_payg_calls_rounding_and_free_feature),
      cmocka_unit_test(test_expired_and_future_skipped),
      cmocka_unit_test(test_bounds_follow_time_zone),
      cmocka_unit_test(test_malformed_refused),
      cmocka_unit_test(test_default_validity),
      cmocka_unit_test(test_purchase_time_order),
      cmocka_unit_test(test_amounts),
      cmocka_unit_test(test_alert_threshold_per_account),
      cmocka_unit_test(test_money_and_helpers),
      cmocka_unit_test(test_payg_when_packages_run_out),
      cmocka_unit_test(test_no_packages),
      cmocka_unit_test(test_ten_percent_threshold),
      cmocka_unit_test(test_zero_usage),
      cmocka_unit_test(test_overflow_guard),
      cmocka_unit_test(test_feature_name_order),
      cmocka_unit_test(test_outcome_parse),
      cmocka_unit_test(test_retry_decision),
      cmocka_unit_test(test_recompute_from_new_balance),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
