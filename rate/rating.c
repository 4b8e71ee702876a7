/* The pure computation of sluice-rate: see rating.h. */
#include "rating.h"

#include <errno.h>
#include <stdarg.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *const rate_pkg_fields[RATE_PF_N] = {"quota", "remaining", "purchased_at", "expires_at"};

void *rate__xrealloc(void *p, size_t n) {
  void *q = realloc(p, n ? n : 1);
  if (q == NULL) {
    fprintf(stderr, "sluice-rate: out of memory (%zu bytes)\n", n);
    abort();
  }
  return q;
}

char *rate__xstrndup(const char *s, size_t n) {
  char *d = rate__xrealloc(NULL, n + 1);
  memcpy(d, s, n);
  d[n] = '\0';
  return d;
}

void *rate__grow(void *p, size_t n, size_t *cap, size_t size) {
  if (n < *cap) return p;
  *cap = *cap ? 2 * *cap : 8;
  return rate__xrealloc(p, *cap * size);
}

static int is_digit(char c) { return c >= '0' && c <= '9'; }

int rate_int_parse(const char *s, size_t len, int64_t *out) {
  size_t i = 0;
  int neg = 0;
  if (len > 0 && s[0] == '-') neg = i = 1;
  if (i == len) return -EINVAL;
  /* The magnitude may reach INT64_MAX + 1 when negative. */
  uint64_t limit = (uint64_t)INT64_MAX + (uint64_t)neg, v = 0;
  int big = 0;
  for (; i < len; i++) {
    if (!is_digit(s[i])) return -EINVAL;
    unsigned d = (unsigned)(s[i] - '0');
    if (v > (limit - d) / 10) big = 1; /* keep scanning: syntax errors win */
    else v = v * 10 + d;
  }
  if (big) return -ERANGE;
  *out = neg ? (int64_t)(0 - v) : (int64_t)v;
  return 0;
}

int rate_dec_parse(const char *s, size_t len, int64_t *out) {
  size_t i = 0;
  int neg = 0, big = 0;
  if (len > 0 && s[0] == '-') neg = i = 1;
  uint64_t ip = 0, frac = 0;
  size_t nint = 0, nfrac = 0;
  for (; i < len && is_digit(s[i]); i++, nint++) {
    if (ip > (uint64_t)INT64_MAX / RATE_SCALE) big = 1;
    else ip = ip * 10 + (unsigned)(s[i] - '0');
  }
  if (nint == 0) return -EINVAL;
  if (i < len && s[i] == '.') {
    size_t first = ++i;
    for (; i < len && is_digit(s[i]); i++) {
      if (nfrac < 6) {
        frac = frac * 10 + (unsigned)(s[i] - '0');
        nfrac++;
      } else if (s[i] != '0') {
        return -EINVAL; /* finer than a micro-unit: refuse rather than round */
      }
    }
    if (i == first) return -EINVAL;
  }
  if (i != len) return -EINVAL;
  for (; nfrac < 6; nfrac++) frac *= 10;
  if (big || ip > ((uint64_t)INT64_MAX - frac) / RATE_SCALE) return -ERANGE;
  int64_t v = (int64_t)(ip * RATE_SCALE + frac);
  *out = neg ? -v : v;
  return 0;
}

size_t rate_dec_format(int64_t v, char *out) {
  uint64_t m = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
  uint64_t ip = m / RATE_SCALE, fp = m % RATE_SCALE;
  int n = snprintf(out, RATE_DEC_MAX, "%s%" PRIu64, v < 0 ? "-" : "", ip);
  if (fp != 0) {
    char frac[8];
    snprintf(frac, sizeof(frac), "%06" PRIu64, fp);
    size_t fl = 6;
    while (frac[fl - 1] == '0') fl--;
    n += snprintf(out + n, RATE_DEC_MAX - (size_t)n, ".%.*s", (int)fl, frac);
  }
  return (size_t)n;
}

/* Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
 * days_from_civil). */
static int64_t days_from_civil(int64_t y, unsigned m, unsigned d) {
  y -= m <= 2;
  int64_t era = (y >= 0 ? y : y - 399) / 400;
  unsigned yoe = (unsigned)(y - era * 400);
  unsigned doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
  unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + (int64_t)doe - 719468;
}

int rate_day_bounds(const char *day, int tz_offset_min, int64_t *start, int64_t *end) {
  static const unsigned mdays[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  if (strlen(day) != 8 || tz_offset_min <= -1440 || tz_offset_min >= 1440) return -EINVAL;
  unsigned v[8];
  for (int i = 0; i < 8; i++) {
    if (!is_digit(day[i])) return -EINVAL;
    v[i] = (unsigned)(day[i] - '0');
  }
  unsigned y = v[0] * 1000 + v[1] * 100 + v[2] * 10 + v[3];
  unsigned m = v[4] * 10 + v[5], d = v[6] * 10 + v[7];
  if (y < 1970 || m < 1 || m > 12 || d < 1) return -EINVAL;
  int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
  if (d > mdays[m - 1] + (m == 2 && leap)) return -EINVAL;
  /* Local midnight is UTC midnight moved back by the zone's offset. */
  *start = days_from_civil(y, m, d) * RATE_DAY_SECONDS - (int64_t)tz_offset_min * 60;
  *end = *start + RATE_DAY_SECONDS;
  return 0;
}

size_t rate_money_format(int64_t v, char *out) {
  uint64_t m = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
  int n = snprintf(out, RATE_DEC_MAX, "%s%" PRIu64 ".%06" PRIu64, v < 0 ? "-" : "", m / RATE_SCALE,
                   m % RATE_SCALE);
  return (size_t)n;
}

/* The date of a day number since 1970-01-01 (H. Hinnant's civil_from_days). */
static void civil_from_days(int64_t z, int64_t *y, unsigned *m, unsigned *d) {
  z += 719468;
  int64_t era = (z >= 0 ? z : z - 146096) / 146097;
  unsigned doe = (unsigned)(z - era * 146097);
  unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
  unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
  unsigned mp = (5 * doy + 2) / 153;
  *d = doy - (153 * mp + 2) / 5 + 1;
  *m = mp < 10 ? mp + 3 : mp - 9;
  *y = (int64_t)yoe + era * 400 + (*m <= 2);
}

void rate_day_of(int64_t t, int tz_offset_min, char out[9]) {
  int64_t local = t + (int64_t)tz_offset_min * 60;
  int64_t days = local >= 0 ? local / RATE_DAY_SECONDS : -((-local + RATE_DAY_SECONDS - 1) / RATE_DAY_SECONDS);
  int64_t y;
  unsigned m, d;
  civil_from_days(days, &y, &m, &d);
  unsigned v[3] = {(unsigned)(y % 10000), m % 100, d % 100};
  snprintf(out, 9, "%04u%02u%02u", v[0], v[1], v[2]);
}

int rate_muldiv(int64_t a, int64_t b, int64_t c, int64_t d, int64_t *out) {
  /* a, b < 2^63: the product fits 126 bits; c * d < 2^126 as well. */
  unsigned __int128 num = (unsigned __int128)(uint64_t)a * (uint64_t)b;
  unsigned __int128 den = (unsigned __int128)(uint64_t)c * (uint64_t)d;
  unsigned __int128 q = num / den, r = num % den;
  if (r >= den - r) q++; /* half up: r >= den / 2 without overflow */
  if (q > INT64_MAX) return -ERANGE;
  *out = (int64_t)q;
  return 0;
}

int rate_usage_split(const char *field, size_t flen, const char **feature, size_t *feature_len,
                     const char **service, size_t *service_len) {
  if (memchr(field, '\0', flen) != NULL) return -EINVAL;
  const char *first = memchr(field, ':', flen);
  const char *last = first;
  for (const char *p = field + flen; first && p > first; p--)
    if (p[-1] == ':') {
      last = p - 1;
      break;
    }
  *feature = field;
  *feature_len = first ? (size_t)(first - field) : flen;
  if (first == NULL || first == last) {
    *service = RATE_NO_SERVICE;
    *service_len = strlen(RATE_NO_SERVICE);
  } else {
    *service = first + 1;
    *service_len = (size_t)(last - first - 1);
  }
  return *feature_len == 0 || *service_len == 0 ? -EINVAL : 0;
}

const char *rate_pkg_state_name(enum rate_pkg_state s) {
  switch (s) {
  case RATE_PKG_USABLE: return "usable";
  case RATE_PKG_EXHAUSTED: return "exhausted";
  case RATE_PKG_NOT_YET: return "not yet purchased";
  case RATE_PKG_EXPIRED: return "expired";
  }
  return "?";
}

static void why(struct rate_account *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void why(struct rate_account *a, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(a->why, sizeof(a->why), fmt, ap);
  va_end(ap);
}

void rate_account_init(struct rate_account *a) {
  memset(a, 0, sizeof(*a));
  a->alert_pct = RATE_ALERT_PCT_DEFAULT;
}

void rate_account_free(struct rate_account *a) {
  for (size_t i = 0; i < a->nitems; i++) {
    free(a->items[i].feature);
    free(a->items[i].service);
  }
  for (size_t i = 0; i < a->npkgs; i++) {
    free(a->pkgs[i].id);
    for (int f = 0; f < RATE_PF_N; f++) free(a->pkgs[i].raw[f]);
  }
  free(a->items);
  free(a->pkgs);
  rate_account_init(a);
}

/* Compares NUL-terminated a with the n bytes of b (no NUL in b). */
static int name_cmp(const char *a, const char *b, size_t n) {
  int r = strncmp(a, b, n);
  if (r != 0) return r;
  return a[n] != '\0';
}

/* The bill's name of an item: its service, else its feature. */
static void item_name(const char *feature, size_t fl, const char *service, size_t sl, const char **name,
                      size_t *nl) {
  int none = sl == strlen(RATE_NO_SERVICE) && memcmp(service, RATE_NO_SERVICE, sl) == 0;
  *name = none ? feature : service;
  *nl = none ? fl : sl;
}

/* Index of the item (name, feature), or where it would be inserted when
 * absent (*found = 0). */
static size_t item_find(const struct rate_account *a, const char *name, size_t nl, const char *feature,
                        size_t fl, int *found) {
  size_t lo = 0, hi = a->nitems;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    int r = name_cmp(a->items[mid].name, name, nl);
    if (r == 0) r = name_cmp(a->items[mid].feature, feature, fl);
    if (r == 0) {
      *found = 1;
      return mid;
    }
    if (r < 0) lo = mid + 1;
    else hi = mid;
  }
  *found = 0;
  return lo;
}

struct rate_item *rate_account_item(struct rate_account *a, const char *feature, const char *service) {
  const char *name;
  size_t nl;
  item_name(feature, strlen(feature), service, strlen(service), &name, &nl);
  int found;
  size_t i = item_find(a, name, nl, feature, strlen(feature), &found);
  return found ? &a->items[i] : NULL;
}

int rate_account_add_usage(struct rate_account *a, const char *field, size_t flen, int64_t calls) {
  const char *f, *s, *name;
  size_t fl, sl, nl;
  if (rate_usage_split(field, flen, &f, &fl, &s, &sl) != 0) {
    why(a, "usage field '%.*s' is not <feature>:<service>:<region>", (int)flen, field);
    return -EINVAL;
  }
  if (calls < 0) {
    why(a, "usage field '%.*s' holds a negative count", (int)flen, field);
    return -EINVAL;
  }
  item_name(f, fl, s, sl, &name, &nl);
  int found;
  size_t i = item_find(a, name, nl, f, fl, &found);
  if (found) {
    if (__builtin_add_overflow(a->items[i].calls, calls, &a->items[i].calls)) {
      why(a, "the calls of '%.*s' overflow", (int)flen, field);
      return -ERANGE;
    }
    return 0;
  }
  a->items = rate__grow(a->items, a->nitems, &a->items_cap, sizeof(*a->items));
  memmove(&a->items[i + 1], &a->items[i], (a->nitems - i) * sizeof(*a->items));
  a->nitems++;
  struct rate_item *it = &a->items[i];
  memset(it, 0, sizeof(*it));
  it->feature = rate__xstrndup(f, fl);
  it->service = rate__xstrndup(s, sl);
  it->name = name == f ? it->feature : it->service;
  it->calls = calls;
  it->coef = RATE_SCALE;
  it->coef_default = 1;
  return 0;
}

int rate_account_add_pkg(struct rate_account *a, const char *id, const char *const raw[RATE_PF_N]) {
  for (size_t i = 0; i < a->npkgs; i++)
    if (strcmp(a->pkgs[i].id, id) == 0) return 1; /* listed twice: one package */
  int present = 0;
  for (int f = 0; f < RATE_PF_N; f++) present |= raw[f] != NULL;
  if (!present) {
    why(a, "package %s is listed but its hash does not exist", id);
    return -EINVAL;
  }
  struct rate_pkg p;
  memset(&p, 0, sizeof(p));
  int64_t *num[RATE_PF_N] = {&p.quota, &p.remaining, &p.purchased_at, &p.expires_at};
  for (int f = 0; f < RATE_PF_N; f++) {
    if (raw[f] == NULL) {
      if (f == RATE_PF_EXPIRES_AT) continue;
      why(a, "package %s has no %s", id, rate_pkg_fields[f]);
      return -EINVAL;
    }
    size_t len = strlen(raw[f]);
    int dec = f == RATE_PF_QUOTA || f == RATE_PF_REMAINING;
    int r = dec ? rate_dec_parse(raw[f], len, num[f]) : rate_int_parse(raw[f], len, num[f]);
    if (r != 0) {
      why(a, "package %s: %s '%s' is not %s", id, rate_pkg_fields[f], raw[f],
          r == -ERANGE ? "in range" : dec ? "a decimal number" : "an integer (unix seconds)");
      return -EINVAL;
    }
    if (*num[f] < 0) {
      why(a, "package %s: %s '%s' is negative", id, rate_pkg_fields[f], raw[f]);
      return -EINVAL;
    }
  }
  if (raw[RATE_PF_EXPIRES_AT] == NULL) {
    if (__builtin_add_overflow(p.purchased_at, RATE_PKG_VALIDITY, &p.expires_at)) {
      why(a, "package %s: purchased_at '%s' is not in range", id, raw[RATE_PF_PURCHASED_AT]);
      return -EINVAL;
    }
  }
  if (p.remaining > p.quota) {
    why(a, "package %s: remaining %s is more than its quota %s", id, raw[RATE_PF_REMAINING], raw[RATE_PF_QUOTA]);
    return -EINVAL;
  }
  if (p.purchased_at > p.expires_at) {
    why(a, "package %s: purchased_at %s is after expires_at %s", id, raw[RATE_PF_PURCHASED_AT],
        raw[RATE_PF_EXPIRES_AT]);
    return -EINVAL;
  }
  p.id = rate__xstrndup(id, strlen(id));
  for (int f = 0; f < RATE_PF_N; f++)
    if (raw[f]) p.raw[f] = rate__xstrndup(raw[f], strlen(raw[f]));
  p.remaining_after = p.remaining;
  a->pkgs = rate__grow(a->pkgs, a->npkgs, &a->pkgs_cap, sizeof(*a->pkgs));
  a->pkgs[a->npkgs++] = p;
  return 0;
}

static int pkg_cmp(const void *x, const void *y) {
  const struct rate_pkg *a = x, *b = y;
  if (a->purchased_at != b->purchased_at) return a->purchased_at < b->purchased_at ? -1 : 1;
  return strcmp(a->id, b->id);
}

/* v is under pct (micro-percent) of quota: v * 100 < quota * pct / 1e6,
 * in 128 bits. */
static int below(int64_t v, int64_t quota, int64_t pct) {
  return (__int128)v * 100 * RATE_SCALE < (__int128)quota * pct;
}

int rate_account_compute(struct rate_account *a, int64_t day_start, int64_t day_end) {
  a->units_total = a->units_from_packages = a->payg_units = a->amount = 0;
  a->why[0] = '\0';
  if (a->npkgs > 1) qsort(a->pkgs, a->npkgs, sizeof(*a->pkgs), pkg_cmp);
  for (size_t i = 0; i < a->npkgs; i++) {
    struct rate_pkg *p = &a->pkgs[i];
    p->drawn = 0;
    p->remaining_after = p->remaining;
    p->alert = 0;
    /* Valid on the day: bought before it ends, expiring after it starts. */
    if (p->purchased_at >= day_end) p->state = RATE_PKG_NOT_YET;
    else if (p->expires_at <= day_start) p->state = RATE_PKG_EXPIRED;
    else if (p->remaining <= 0) p->state = RATE_PKG_EXHAUSTED;
    else p->state = RATE_PKG_USABLE;
  }
  for (size_t k = 0; k < a->nitems; k++) {
    struct rate_item *it = &a->items[k];
    if (it->coef < 0) {
      why(a, "the coefficient of %s is negative", it->name);
      return -EINVAL;
    }
    if (it->price_set && it->price < 0) {
      why(a, "the price of %s is negative", it->name);
      return -EINVAL;
    }
    if (__builtin_mul_overflow(it->calls, it->coef, &it->units)) {
      why(a, "overflow: the units of %s do not fit 64-bit micro-units", it->name);
      return -ERANGE;
    }
    int64_t need = it->units;
    for (size_t i = 0; i < a->npkgs && need > 0; i++) {
      struct rate_pkg *p = &a->pkgs[i];
      if (p->state != RATE_PKG_USABLE || p->remaining_after <= 0) continue;
      int64_t d = need < p->remaining_after ? need : p->remaining_after;
      p->remaining_after -= d;
      p->drawn += d;
      need -= d;
    }
    it->from_packages = it->units - need;
    it->payg_units = need;
    it->payg_calls = it->amount = 0;
    if (need > 0) { /* so coef > 0 */
      if (!it->price_set) {
        why(a, "no price for %s (feature %s): set its price per 1,000 calls", it->name, it->feature);
        return -ENOENT;
      }
      if (rate_muldiv(need, RATE_SCALE, it->coef, 1, &it->payg_calls) != 0 ||
          rate_muldiv(need, it->price, it->coef, 1000, &it->amount) != 0) {
        why(a, "overflow: the amount of %s does not fit 64-bit micro-units", it->name);
        return -ERANGE;
      }
    }
    if (__builtin_add_overflow(a->units_total, it->units, &a->units_total) ||
        __builtin_add_overflow(a->units_from_packages, it->from_packages, &a->units_from_packages) ||
        __builtin_add_overflow(a->payg_units, it->payg_units, &a->payg_units) ||
        __builtin_add_overflow(a->amount, it->amount, &a->amount)) {
      why(a, "overflow: the account's totals do not fit 64-bit micro-units");
      return -ERANGE;
    }
  }
  for (size_t i = 0; i < a->npkgs; i++) {
    struct rate_pkg *p = &a->pkgs[i];
    p->alert = p->drawn > 0 && !below(p->remaining, p->quota, a->alert_pct) &&
               below(p->remaining_after, p->quota, a->alert_pct);
  }
  return 0;
}

enum rate_outcome rate_outcome_parse(const char *s, size_t len) {
  if (len == 2 && memcmp(s, "ok", 2) == 0) return RATE_RATED;
  if (len == 7 && memcmp(s, "already", 7) == 0) return RATE_ALREADY;
  if (len == 5 && memcmp(s, "retry", 5) == 0) return RATE_RETRY;
  return RATE_FAILED;
}

enum rate_outcome rate_attempts(enum rate_outcome (*attempt)(void *arg, unsigned n), void *arg,
                                unsigned max_attempts) {
  for (unsigned n = 1; n <= max_attempts; n++) {
    enum rate_outcome o = attempt(arg, n);
    if (o != RATE_RETRY) return o;
  }
  return RATE_FAILED;
}
