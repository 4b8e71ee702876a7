/* rating: the pure computation behind sluice-rate (SPEC section 8).
 *
 * Given one account's usage of one day, the deduction coefficient of each
 * feature, its resource packages in purchase order and the day's bounds, it
 * works out what is drawn from each package, what is left as pay-as-you-go,
 * and which packages fall under 10% of their quota. It does no I/O: the
 * driver (main.c) reads Redis, calls this, and applies the result.
 *
 * Money-like quantities (units, coefficients, quotas) are int64 fixed point
 * with RATE_SCALE micro-units per unit, never floating point; every sum and
 * product is checked for overflow. Functions return 0 or a negative errno:
 * -EINVAL for malformed input, -ERANGE for overflow. Nothing here is shared
 * between threads. */
#ifndef RATE_RATING_H
#define RATE_RATING_H

#include <stddef.h>
#include <stdint.h>

#define RATE_SCALE INT64_C(1000000) /* micro-units per unit: 6 decimals */
#define RATE_DEC_MAX 32             /* rate_dec_format's output size, NUL included */
#define RATE_DAY_SECONDS 86400

/* Parses a decimal number ("20", "0.5", "-2.25") of at most 6 significant
 * decimals (more are accepted only when they are zeros) into micro-units.
 * No sign but '-', no spaces, no exponent. Returns 0, -EINVAL (malformed) or
 * -ERANGE (out of int64 micro-units). */
int rate_dec_parse(const char *s, size_t len, int64_t *out);
/* Writes v (micro-units) as a decimal without trailing zeros ("1.5", "20",
 * "-0.000001") into out (>= RATE_DEC_MAX bytes); returns its length. */
size_t rate_dec_format(int64_t v, char *out);
/* Parses a decimal integer with an optional '-'. Returns 0, -EINVAL or
 * -ERANGE. */
int rate_int_parse(const char *s, size_t len, int64_t *out);
/* Bounds [*start, *end) in unix seconds of the calendar day `day`
 * ("yyyymmdd", a real date, year 1970 to 9999) in the time zone that is
 * tz_offset_min minutes east of UTC (|offset| < 1440). Returns 0 or -EINVAL. */
int rate_day_bounds(const char *day, int tz_offset_min, int64_t *start, int64_t *end);

/* Why a package is or is not drawn from. Missing, malformed, duplicate and
 * exhausted packages are reported by the driver; the others are normal. */
enum rate_pkg_state {
  RATE_PKG_USABLE,
  RATE_PKG_MISSING,   /* the hash does not exist */
  RATE_PKG_MALFORMED, /* a field is absent or not a number, or quota <= 0 */
  RATE_PKG_DUPLICATE, /* listed twice: only the first entry counts */
  RATE_PKG_EXHAUSTED, /* remaining <= 0 */
  RATE_PKG_NOT_YET,   /* purchased_at >= the day's end */
  RATE_PKG_EXPIRED,   /* expires_at <= the day's start */
};
/* A short word for a state ("usable", "missing", ...). */
const char *rate_pkg_state_name(enum rate_pkg_state s);

/* The fields of a package hash, in the order of rate_pkg.raw. */
enum { RATE_PF_QUOTA, RATE_PF_REMAINING, RATE_PF_PURCHASED_AT, RATE_PF_EXPIRES_AT, RATE_PF_N };
extern const char *const rate_pkg_fields[RATE_PF_N];

struct rate_pkg {
  char *id;                         /* owned */
  char *raw[RATE_PF_N];             /* the fields as read (NULL: absent); owned */
  int64_t quota, remaining;         /* micro-units, as read */
  int64_t purchased_at, expires_at; /* unix seconds */
  enum rate_pkg_state state;
  int64_t drawn;           /* micro-units drawn by this rating */
  int64_t remaining_after; /* micro-units */
  int alert;               /* fell from >= 10% of quota to under 10% */
};

struct rate_feature {
  char *name;    /* owned */
  int64_t calls; /* billable calls, summed over the regions */
  int64_t coef;  /* micro-units per call; RATE_SCALE until the caller sets it */
  /* Results, micro-units: */
  int64_t units;         /* calls x coef */
  int64_t from_packages; /* drawn from packages */
  int64_t payg_units;    /* units - from_packages */
  int64_t payg_calls;    /* payg_units / coef, rounded half up to 1e-6;
                          * all the calls when coef is 0 (nothing to draw) */
};

/* One account's rating. Features are kept sorted by name (byte order),
 * packages in the order they were added (purchase order). */
struct rate_account {
  struct rate_feature *features;
  size_t nfeatures, features_cap;
  struct rate_pkg *pkgs;
  size_t npkgs, pkgs_cap;
  int64_t units_total, units_from_packages, payg_units; /* micro-units */
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
/* Adds one usage hash field: `field` is "<feature>:<region>" (a field with
 * no ':' is all feature), `value` a count of calls (integer >= 0). Returns 0,
 * -EINVAL (bad value or empty feature) or -ERANGE (the sum overflows). */
int rate_account_add_usage(struct rate_account *a, const char *field, size_t flen,
                           const char *value, size_t vlen);
/* The feature called `name`, or NULL. */
struct rate_feature *rate_account_feature(struct rate_account *a, const char *name);
/* Adds the next package in purchase order; raw[] holds its hash fields as
 * read (NULL: absent; all NULL: the hash is missing). The strings are
 * copied. Sets state to MISSING, MALFORMED or DUPLICATE when it is so, else
 * to USABLE; rate_account_compute refines it. Returns 0. */
int rate_account_add_pkg(struct rate_account *a, const char *id, const char *const raw[RATE_PF_N]);
/* Rates the account for the day [day_start, day_end): sets every feature's
 * results, every package's state, drawn, remaining_after and alert, and the
 * account's totals. Features draw in name order, each from the packages in
 * purchase order. Returns 0, -EINVAL (a negative coefficient) or -ERANGE
 * (overflow); on error the results are meaningless. Call it once. */
int rate_account_compute(struct rate_account *a, int64_t day_start, int64_t day_end);

/* What became of one attempt to apply an account's rating. */
enum rate_outcome {
  RATE_RATED,   /* applied */
  RATE_ALREADY, /* the bill already existed: nothing changed */
  RATE_RETRY,   /* a package changed since it was read: recompute */
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
