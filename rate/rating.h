/* rating: the pure computation behind sluice-rate (SPEC section 8).
 *
 * Given one account's billable calls of one day (per feature and service),
 * the deduction coefficient and price of each, its resource packages and
 * the day's bounds, it works out what is drawn from each package (in order
 * of purchase), what is left as pay-as-you-go, what that costs, and which
 * packages fall under the account's alert threshold. It does no I/O: the
 * driver (main.c) reads Redis, calls this, and applies the result.
 *
 * Every quantity is int64 fixed point, never floating point: units,
 * coefficients, quotas in micro-units (RATE_SCALE per unit); prices in
 * micro-units of the currency per 1,000 calls; amounts and balances in
 * micro-units of the currency. Every sum and product is checked for
 * overflow. Functions return 0 or a negative errno: -EINVAL for malformed
 * input, -ERANGE for overflow. Nothing here is shared between threads. */
#ifndef RATE_RATING_H
#define RATE_RATING_H

#include <stddef.h>
#include <stdint.h>

#define RATE_SCALE INT64_C(1000000) /* micro-units per unit: 6 decimals */
#define RATE_DEC_MAX 32             /* rate_dec_format's output size, NUL included */
#define RATE_DAY_SECONDS 86400
#define RATE_PKG_VALIDITY (INT64_C(365) * RATE_DAY_SECONDS) /* expires_at when absent */
#define RATE_ALERT_PCT_DEFAULT (INT64_C(10) * RATE_SCALE)  /* micro-percent */
#define RATE_NO_SERVICE "-" /* the service of a call that names none (SPEC 6) */

/* Parses a decimal number ("20", "0.5", "-2.25") of at most 6 significant
 * decimals (more are accepted only when they are zeros) into micro-units.
 * No sign but '-', no spaces, no exponent. Returns 0, -EINVAL (malformed) or
 * -ERANGE (out of int64 micro-units). */
int rate_dec_parse(const char *s, size_t len, int64_t *out);
/* Writes v (micro-units) as a decimal without trailing zeros ("1.5", "20",
 * "-0.000001") into out (>= RATE_DEC_MAX bytes); returns its length. */
size_t rate_dec_format(int64_t v, char *out);
/* Writes v (micro-units of the currency) with exactly 6 decimals ("12.340000",
 * "-0.000001", "0.000000") into out (>= RATE_DEC_MAX bytes); returns its
 * length. */
size_t rate_money_format(int64_t v, char *out);
/* Parses a decimal integer with an optional '-'. Returns 0, -EINVAL or
 * -ERANGE. */
int rate_int_parse(const char *s, size_t len, int64_t *out);
/* Bounds [*start, *end) in unix seconds of the calendar day `day`
 * ("yyyymmdd", a real date, year 1970 to 9999) in the time zone that is
 * tz_offset_min minutes east of UTC (|offset| < 1440). Returns 0 or -EINVAL. */
int rate_day_bounds(const char *day, int tz_offset_min, int64_t *start, int64_t *end);
/* The day ("yyyymmdd" into out, 9 bytes) that holds unix second t in the
 * zone tz_offset_min minutes east of UTC. */
void rate_day_of(int64_t t, int tz_offset_min, char out[9]);
/* (a * b) / (c * d) in integers, rounded half up; a, b >= 0, c, d > 0.
 * Returns 0 or -ERANGE when the result does not fit int64. */
int rate_muldiv(int64_t a, int64_t b, int64_t c, int64_t d, int64_t *out);

/* Splits a usage field "<feature>:<service>:<region>" (SPEC 6). A field
 * with one ':' is "<feature>:<region>" (the metering before services) and
 * one without ':' is a feature alone: their service is RATE_NO_SERVICE.
 * The service is what lies between the first and the last ':'. Returns 0,
 * or -EINVAL when the feature or the service is empty or a NUL byte is in
 * the field. The pointers point into field. */
int rate_usage_split(const char *field, size_t flen, const char **feature, size_t *feature_len,
                     const char **service, size_t *service_len);

/* The fields of a package hash, in the order of rate_pkg.raw. */
enum { RATE_PF_QUOTA, RATE_PF_REMAINING, RATE_PF_PURCHASED_AT, RATE_PF_EXPIRES_AT, RATE_PF_N };
extern const char *const rate_pkg_fields[RATE_PF_N];

/* Whether a package is drawn from on the day; set by rate_account_compute. */
enum rate_pkg_state {
  RATE_PKG_USABLE,
  RATE_PKG_EXHAUSTED, /* remaining == 0 */
  RATE_PKG_NOT_YET,   /* purchased_at >= the day's end */
  RATE_PKG_EXPIRED,   /* expires_at <= the day's start */
};
const char *rate_pkg_state_name(enum rate_pkg_state s);

struct rate_pkg {
  char *id;                         /* owned */
  char *raw[RATE_PF_N];             /* the fields as read (NULL: absent); owned */
  int64_t quota, remaining;         /* micro-units, as read */
  int64_t purchased_at, expires_at; /* unix seconds; expires_at defaulted */
  enum rate_pkg_state state;
  int64_t drawn;           /* micro-units drawn by this rating */
  int64_t remaining_after; /* micro-units */
  int alert;               /* fell from at or over the threshold to under it */
};

/* One line of the bill: the calls of one (feature, service). */
struct rate_item {
  char *feature, *service; /* owned; service RATE_NO_SERVICE when none */
  const char *name;        /* the name the bill uses: the service, else the feature */
  int64_t calls;
  /* Set by the caller before rate_account_compute: */
  int64_t coef;     /* micro-units per call; RATE_SCALE until set */
  int coef_default; /* neither coef:<service> nor coef:<feature> exists */
  int64_t price;    /* micro-units of currency per 1,000 calls */
  int price_set;    /* 0: no price known (fails the account only if needed) */
  /* Results: */
  int64_t units;         /* calls x coef, micro-units */
  int64_t from_packages; /* drawn from packages */
  int64_t payg_units;    /* units - from_packages */
  int64_t payg_calls;    /* payg_units / coef, micro (rounded half up); 0 when coef is 0 */
  int64_t amount;        /* payg_units / coef x price / 1000, micro-currency, half up */
};

/* One account's rating. Items are kept sorted by (name, feature), packages
 * in the order they were added until rate_account_compute sorts them by
 * (purchased_at, id). */
struct rate_account {
  struct rate_item *items;
  size_t nitems, items_cap;
  struct rate_pkg *pkgs;
  size_t npkgs, pkgs_cap;
  int64_t alert_pct; /* micro-percent of quota; RATE_ALERT_PCT_DEFAULT */
  int64_t units_total, units_from_packages, payg_units, amount; /* results */
  char why[256]; /* why the last call failed, for the operator */
};

/* Allocation failure aborts with a message, as in the proxy. rate__xstrndup
 * copies n bytes and adds a NUL. */
void *rate__xrealloc(void *p, size_t n);
char *rate__xstrndup(const char *s, size_t n);
/* Grows the array p of *cap elements of `size` bytes, n of them in use, so
 * that one more fits (doubling, 8 at first). Returns the array. */
void *rate__grow(void *p, size_t n, size_t *cap, size_t size);

void rate_account_init(struct rate_account *a);
/* Frees what the account owns and leaves it empty (initialised). */
void rate_account_free(struct rate_account *a);
/* Adds `calls` (>= 0) billable calls of a usage field (rate_usage_split).
 * Returns 0, -EINVAL (bad field, negative calls) or -ERANGE (the sum
 * overflows), with a->why set. */
int rate_account_add_usage(struct rate_account *a, const char *field, size_t flen, int64_t calls);
/* The item of (feature, service), or NULL. */
struct rate_item *rate_account_item(struct rate_account *a, const char *feature, const char *service);
/* Adds a package; raw[] holds its hash fields as read (NULL: absent; all
 * NULL: the hash does not exist). The strings are copied. Returns 0, 1 when
 * the id was added before (the entry is ignored), or -EINVAL with a->why set
 * when the package is malformed: the hash is missing, quota, remaining or
 * purchased_at is absent, a field is not a number (quota, remaining:
 * decimals; times: integers) or is negative, remaining > quota, or
 * purchased_at > expires_at. */
int rate_account_add_pkg(struct rate_account *a, const char *id, const char *const raw[RATE_PF_N]);
/* Rates the account for the day [day_start, day_end): sorts the packages by
 * (purchased_at, id), sets every item's results, every package's state,
 * drawn, remaining_after and alert, and the totals. Items draw in their
 * order, each from the packages valid on the day in purchase order.
 * Returns 0, -EINVAL (a negative coefficient or price), -ENOENT (pay-as-you-
 * go calls of an item without a price) or -ERANGE (overflow), with a->why
 * set; on error the results are meaningless. */
int rate_account_compute(struct rate_account *a, int64_t day_start, int64_t day_end);

/* What became of one attempt to apply an account's rating. */
enum rate_outcome {
  RATE_RATED,   /* applied */
  RATE_ALREADY, /* nothing new to bill: nothing changed */
  RATE_RETRY,   /* something changed since it was read: read and compute again */
  RATE_FAILED,
};
/* The outcome that the apply script's reply `s` means: "ok", "already",
 * "retry"; anything else is RATE_FAILED. */
enum rate_outcome rate_outcome_parse(const char *s, size_t len);
/* Calls attempt(arg, n) for n = 1, 2, ... while it returns RATE_RETRY, at
 * most max_attempts times. Returns its last outcome, except that RATE_RETRY
 * on the last attempt becomes RATE_FAILED. */
enum rate_outcome rate_attempts(enum rate_outcome (*attempt)(void *arg, unsigned n), void *arg,
                                unsigned max_attempts);

#endif
