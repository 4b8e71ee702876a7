/* The pure computation of sluice-rate: see rating.h. */
#include "rating.h"

#include <errno.h>
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

const char *rate_pkg_state_name(enum rate_pkg_state s) {
  switch (s) {
  case RATE_PKG_USABLE: return "usable";
  case RATE_PKG_MISSING: return "missing";
  case RATE_PKG_MALFORMED: return "malformed";
  case RATE_PKG_DUPLICATE: return "duplicate";
  case RATE_PKG_EXHAUSTED: return "exhausted";
  case RATE_PKG_NOT_YET: return "not yet purchased";
  case RATE_PKG_EXPIRED: return "expired";
  }
  return "?";
}

void rate_account_init(struct rate_account *a) { memset(a, 0, sizeof(*a)); }

void rate_account_free(struct rate_account *a) {
  for (size_t i = 0; i < a->nfeatures; i++) free(a->features[i].name);
  for (size_t i = 0; i < a->npkgs; i++) {
    free(a->pkgs[i].id);
    for (int f = 0; f < RATE_PF_N; f++) free(a->pkgs[i].raw[f]);
  }
  free(a->features);
  free(a->pkgs);
  rate_account_init(a);
}

/* strcmp of the NUL-terminated a against the n bytes of b (no NUL in b). */
static int name_cmp(const char *a, const char *b, size_t n) {
  int r = strncmp(a, b, n);
  if (r != 0) return r;
  return a[n] != '\0';
}

/* Index of the feature `name` (n bytes), or of where it would be inserted
 * when absent (*found = 0). */
static size_t feature_find(const struct rate_account *a, const char *name, size_t n, int *found) {
  size_t lo = 0, hi = a->nfeatures;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    int r = name_cmp(a->features[mid].name, name, n);
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

struct rate_feature *rate_account_feature(struct rate_account *a, const char *name) {
  int found;
  size_t i = feature_find(a, name, strlen(name), &found);
  return found ? &a->features[i] : NULL;
}

int rate_account_add_usage(struct rate_account *a, const char *field, size_t flen,
                           const char *value, size_t vlen) {
  int64_t calls;
  int r = rate_int_parse(value, vlen, &calls);
  if (r != 0) return r;
  if (calls < 0) return -EINVAL;
  const char *colon = memchr(field, ':', flen);
  size_t n = colon ? (size_t)(colon - field) : flen;
  if (n == 0 || memchr(field, '\0', n) != NULL) return -EINVAL;
  int found;
  size_t i = feature_find(a, field, n, &found);
  if (found) {
    if (__builtin_add_overflow(a->features[i].calls, calls, &a->features[i].calls)) return -ERANGE;
    return 0;
  }
  a->features = rate__grow(a->features, a->nfeatures, &a->features_cap, sizeof(*a->features));
  memmove(&a->features[i + 1], &a->features[i], (a->nfeatures - i) * sizeof(*a->features));
  a->nfeatures++;
  memset(&a->features[i], 0, sizeof(a->features[i]));
  a->features[i].name = rate__xstrndup(field, n);
  a->features[i].calls = calls;
  a->features[i].coef = RATE_SCALE;
  return 0;
}

int rate_account_add_pkg(struct rate_account *a, const char *id, const char *const raw[RATE_PF_N]) {
  a->pkgs = rate__grow(a->pkgs, a->npkgs, &a->pkgs_cap, sizeof(*a->pkgs));
  struct rate_pkg *p = &a->pkgs[a->npkgs++];
  memset(p, 0, sizeof(*p));
  p->id = rate__xstrndup(id, strlen(id));
  int present = 0, bad = 0;
  int64_t *num[RATE_PF_N] = {&p->quota, &p->remaining, &p->purchased_at, &p->expires_at};
  for (int f = 0; f < RATE_PF_N; f++) {
    if (raw[f] == NULL) {
      bad = 1;
      continue;
    }
    present = 1;
    p->raw[f] = rate__xstrndup(raw[f], strlen(raw[f]));
    size_t len = strlen(raw[f]);
    int r = f == RATE_PF_QUOTA || f == RATE_PF_REMAINING ? rate_dec_parse(raw[f], len, num[f])
                                                         : rate_int_parse(raw[f], len, num[f]);
    if (r != 0) bad = 1;
  }
  if (!present) p->state = RATE_PKG_MISSING;
  else if (bad || p->quota <= 0) p->state = RATE_PKG_MALFORMED;
  else p->state = RATE_PKG_USABLE;
  for (size_t i = 0; i + 1 < a->npkgs; i++) {
    if (strcmp(a->pkgs[i].id, p->id) == 0) {
      p->state = RATE_PKG_DUPLICATE; /* its balance is the first entry's */
      break;
    }
  }
  p->remaining_after = p->remaining;
  return 0;
}

/* v * 10 < quota, for quota > 0, without the product overflowing. */
static int below_tenth(int64_t v, int64_t quota) {
  if (v < 0) return 1;
  return v < quota / 10 || (v == quota / 10 && quota % 10 != 0);
}

/* units / coef in micro-units, rounded half up; coef > 0, units >= 0. */
static int div_micro(int64_t units, int64_t coef, int64_t *out) {
  unsigned __int128 q = ((unsigned __int128)units * RATE_SCALE + (uint64_t)coef / 2) / (uint64_t)coef;
  if (q > INT64_MAX) return -ERANGE;
  *out = (int64_t)q;
  return 0;
}

int rate_account_compute(struct rate_account *a, int64_t day_start, int64_t day_end) {
  a->units_total = a->units_from_packages = a->payg_units = 0;
  for (size_t i = 0; i < a->npkgs; i++) {
    struct rate_pkg *p = &a->pkgs[i];
    p->drawn = 0;
    p->remaining_after = p->remaining;
    p->alert = 0;
    if (p->state != RATE_PKG_USABLE) continue;
    /* Valid on the day: bought before it ends, expiring after it starts. */
    if (p->purchased_at >= day_end) p->state = RATE_PKG_NOT_YET;
    else if (p->expires_at <= day_start) p->state = RATE_PKG_EXPIRED;
    else if (p->remaining <= 0) p->state = RATE_PKG_EXHAUSTED;
  }
  for (size_t f = 0; f < a->nfeatures; f++) {
    struct rate_feature *ft = &a->features[f];
    if (ft->coef < 0) return -EINVAL;
    if (__builtin_mul_overflow(ft->calls, ft->coef, &ft->units)) return -ERANGE;
    int64_t need = ft->units;
    for (size_t i = 0; i < a->npkgs && need > 0; i++) {
      struct rate_pkg *p = &a->pkgs[i];
      if (p->state != RATE_PKG_USABLE || p->remaining_after <= 0) continue;
      int64_t d = need < p->remaining_after ? need : p->remaining_after;
      p->remaining_after -= d;
      p->drawn += d;
      need -= d;
    }
    ft->from_packages = ft->units - need;
    ft->payg_units = need;
    if (ft->coef == 0) {
      /* A free feature draws nothing; all its calls are outside packages. */
      if (__builtin_mul_overflow(ft->calls, RATE_SCALE, &ft->payg_calls)) return -ERANGE;
    } else if (div_micro(need, ft->coef, &ft->payg_calls) != 0) {
      return -ERANGE;
    }
    if (__builtin_add_overflow(a->units_total, ft->units, &a->units_total) ||
        __builtin_add_overflow(a->units_from_packages, ft->from_packages, &a->units_from_packages) ||
        __builtin_add_overflow(a->payg_units, ft->payg_units, &a->payg_units))
      return -ERANGE;
  }
  for (size_t i = 0; i < a->npkgs; i++) {
    struct rate_pkg *p = &a->pkgs[i];
    p->alert = p->drawn > 0 && !below_tenth(p->remaining, p->quota) &&
               below_tenth(p->remaining_after, p->quota);
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
