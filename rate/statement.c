/* sluice-rate statement: one account's days D1..D2 from its bills (or its
 * usage, for a day not rated yet), its payments and its balance, as JSON or
 * CSV (SPEC section 8, docs/rating.md). Reads only: three round trips. */
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "driver.h"
#include "keys.h"
#include "rating.h"

#define MAX_DAYS 366

/* One line of a day or of the total: a service (or a feature without one). */
struct line {
  char *name;
  int64_t calls, units, fromp, payg_units, payg_calls, amount; /* micro-units but calls */
};

struct period {
  struct line *lines;
  size_t n, cap;
  int rated;          /* a bill was found (for a day) */
  int64_t units, fromp, payg_units, payg_calls, amount, payments, calls;
  int64_t balance_after; /* the bill's; has_balance when there is one */
  int has_balance;
  int64_t adjustments;
};

static struct line *line_get(struct period *p, const char *name, size_t nl) {
  for (size_t i = 0; i < p->n; i++)
    if (strlen(p->lines[i].name) == nl && memcmp(p->lines[i].name, name, nl) == 0) return &p->lines[i];
  p->lines = rate__grow(p->lines, p->n, &p->cap, sizeof(*p->lines));
  struct line *l = &p->lines[p->n++];
  memset(l, 0, sizeof(*l));
  l->name = rate__xstrndup(name, nl);
  return l;
}

static int cmp_line(const void *a, const void *b) {
  return strcmp(((const struct line *)a)->name, ((const struct line *)b)->name);
}

static void period_free(struct period *p) {
  for (size_t i = 0; i < p->n; i++) free(p->lines[i].name);
  free(p->lines);
  memset(p, 0, sizeof(*p));
}

/* Adds v to *dst, saturating rather than wrapping (a statement of absurd
 * numbers stays readable; bills are checked when written). */
static void add(int64_t *dst, int64_t v) {
  if (__builtin_add_overflow(*dst, v, dst)) *dst = v > 0 ? INT64_MAX : INT64_MIN;
}

/* Parses a bill value; 0 when malformed (reported once on stderr). */
static int64_t num(const char *uid, const char *day, const redisReply *f, const redisReply *v, int integer) {
  int64_t x = 0;
  int e = integer ? rate_int_parse(v->str, v->len, &x) : rate_dec_parse(v->str, v->len, &x);
  if (e != 0) {
    fprintf(stderr, "sluice-rate: uid=%s: bill of %s: %s = '%s' is not a number (counted as 0)\n", uid, day,
            f->str, v->str);
    return 0;
  }
  return x;
}

/* Fills a day from its bill (rated) or its usage (not rated). */
static void day_fill(struct period *d, const char *uid, const char *day, const redisReply *bill,
                     const redisReply *usage) {
  static const struct {
    const char *prefix;
    size_t off;
    int integer;
  } per[] = {
      {"calls:", offsetof(struct line, calls), 1},
      {"units:", offsetof(struct line, units), 0},
      {"units_from_packages:", offsetof(struct line, fromp), 0},
      {"payg_units:", offsetof(struct line, payg_units), 0},
      {"payg_calls:", offsetof(struct line, payg_calls), 0},
      {"amount:", offsetof(struct line, amount), 0},
  };
  if (bill && bill->type == REDIS_REPLY_ARRAY && bill->elements > 0) {
    d->rated = 1;
    for (size_t i = 0; i + 1 < bill->elements; i += 2) {
      const redisReply *f = bill->element[i], *v = bill->element[i + 1];
      for (size_t k = 0; k < sizeof(per) / sizeof(per[0]); k++) {
        size_t pl = strlen(per[k].prefix);
        if (strncmp(f->str, per[k].prefix, pl) != 0) continue;
        struct line *l = line_get(d, f->str + pl, f->len - pl);
        *(int64_t *)((char *)l + per[k].off) = num(uid, day, f, v, per[k].integer);
      }
      if (strcmp(f->str, "units_total") == 0) d->units = num(uid, day, f, v, 0);
      else if (strcmp(f->str, "units_from_packages") == 0) d->fromp = num(uid, day, f, v, 0);
      else if (strcmp(f->str, "payg_units") == 0) d->payg_units = num(uid, day, f, v, 0);
      else if (strcmp(f->str, "amount") == 0) d->amount = num(uid, day, f, v, 0);
      else if (strcmp(f->str, "adjustments") == 0) d->adjustments = num(uid, day, f, v, 1);
      else if (strcmp(f->str, "balance_after") == 0) {
        d->balance_after = num(uid, day, f, v, 0);
        d->has_balance = 1;
      }
    }
    for (size_t i = 0; i < d->n; i++) {
      add(&d->payg_calls, d->lines[i].payg_calls);
      add(&d->calls, d->lines[i].calls);
    }
  } else if (usage && usage->type == REDIS_REPLY_ARRAY) {
    for (size_t i = 0; i + 1 < usage->elements; i += 2) {
      const redisReply *f = usage->element[i], *v = usage->element[i + 1];
      const char *fe, *sv;
      size_t fl, sl;
      int64_t calls;
      if (rate_usage_split(f->str, f->len, &fe, &fl, &sv, &sl) != 0 ||
          rate_int_parse(v->str, v->len, &calls) != 0) {
        fprintf(stderr, "sluice-rate: uid=%s: usage of %s: %s = '%s' skipped\n", uid, day, f->str, v->str);
        continue;
      }
      int none = sl == strlen(RATE_NO_SERVICE) && memcmp(sv, RATE_NO_SERVICE, sl) == 0;
      struct line *l = none ? line_get(d, fe, fl) : line_get(d, sv, sl);
      add(&l->calls, calls);
      add(&d->calls, calls);
    }
  }
  if (d->n > 1) qsort(d->lines, d->n, sizeof(*d->lines), cmp_line);
}

static void total_add(struct period *t, const struct period *d) {
  for (size_t i = 0; i < d->n; i++) {
    const struct line *s = &d->lines[i];
    struct line *l = line_get(t, s->name, strlen(s->name));
    add(&l->calls, s->calls);
    add(&l->units, s->units);
    add(&l->fromp, s->fromp);
    add(&l->payg_units, s->payg_units);
    add(&l->payg_calls, s->payg_calls);
    add(&l->amount, s->amount);
  }
  add(&t->calls, d->calls);
  add(&t->units, d->units);
  add(&t->fromp, d->fromp);
  add(&t->payg_units, d->payg_units);
  add(&t->payg_calls, d->payg_calls);
  add(&t->amount, d->amount);
  add(&t->payments, d->payments);
  add(&t->adjustments, d->adjustments);
  t->rated += d->rated;
}

static void json_str(const char *s) {
  putchar('"');
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\') printf("\\%c", c);
    else if (c < 0x20) printf("\\u%04x", c);
    else putchar(c);
  }
  putchar('"');
}

static const char *dec(int64_t v, char *buf) {
  rate_dec_format(v, buf);
  return buf;
}
static const char *money(int64_t v, char *buf) {
  rate_money_format(v, buf);
  return buf;
}

/* The numbers of a period (or a line, rated = 1) as JSON members. */
static void json_nums(const struct period *p, int rated) {
  char b[RATE_DEC_MAX];
  printf("\"calls\":%" PRId64, p->calls);
  if (rated) {
    printf(",\"units\":\"%s\"", dec(p->units, b));
    printf(",\"units_from_packages\":\"%s\"", dec(p->fromp, b));
    printf(",\"payg_units\":\"%s\"", dec(p->payg_units, b));
    printf(",\"payg_calls\":\"%s\"", dec(p->payg_calls, b));
    printf(",\"amount\":\"%s\"", money(p->amount, b));
  }
}

static void json_period(const struct period *p, int rated) {
  char b[RATE_DEC_MAX];
  printf("\"services\":{");
  for (size_t i = 0; i < p->n; i++) {
    const struct line *l = &p->lines[i];
    struct period one = {.calls = l->calls, .units = l->units, .fromp = l->fromp, .payg_units = l->payg_units,
                         .payg_calls = l->payg_calls, .amount = l->amount};
    printf(i ? "," : "");
    json_str(l->name);
    printf(":{");
    json_nums(&one, rated);
    printf("}");
  }
  printf("},");
  json_nums(p, rated);
  printf(",\"payments\":\"%s\"", money(p->payments, b));
}

static void csv_field(const char *s) {
  if (strpbrk(s, ",\"\r\n") == NULL) {
    fputs(s, stdout);
    return;
  }
  putchar('"');
  for (; *s; s++) {
    if (*s == '"') putchar('"');
    putchar(*s);
  }
  putchar('"');
}

static void csv_row(const char *day, const char *service, int64_t calls, int rated, int64_t units, int64_t fromp,
                    int64_t pu, int64_t pc, int64_t amount, const char *payments, const char *balance) {
  char b[5][RATE_DEC_MAX];
  csv_field(day);
  putchar(',');
  csv_field(service);
  if (rated)
    printf(",%" PRId64 ",%s,%s,%s,%s,%s,%s,%s\n", calls, dec(units, b[0]), dec(fromp, b[1]), dec(pu, b[2]),
           dec(pc, b[3]), money(amount, b[4]), payments, balance);
  else
    printf(",%" PRId64 ",,,,,,%s,%s\n", calls, payments, balance);
}

static void csv_period(const char *label, const struct period *p, int rated, const char *balance) {
  char pay[RATE_DEC_MAX];
  for (size_t i = 0; i < p->n; i++) {
    const struct line *l = &p->lines[i];
    csv_row(label, l->name, l->calls, rated, l->units, l->fromp, l->payg_units, l->payg_calls, l->amount, "", "");
  }
  csv_row(label, "*", p->calls, rated, p->units, p->fromp, p->payg_units, p->payg_calls, p->amount,
          money(p->payments, pay), balance);
}

static void usage(FILE *f) {
  fprintf(f, "usage: sluice-rate statement --uid U --from yyyymmdd --to yyyymmdd [--format json|csv]\n"
             "                             [--redis HOST:PORT|unix:PATH|sentinel://...|cluster://...] [--redis-prefix P] [--tz-offset-min N]\n"
             "Per day and in total: calls and units by service, units drawn from packages,\n"
             "pay-as-you-go calls and amount, payments, the balance (at most %d days).\n",
          MAX_DAYS);
}

int statement_main(int argc, char **argv) {
  const char *uid = NULL, *from = NULL, *to = NULL, *format = "json";
  struct common_opts co;
  const struct opt_spec specs[] = {{"--uid", NULL, &uid},
                                   {"--from", NULL, &from},
                                   {"--to", NULL, &to},
                                   {"--format", NULL, &format},
                                   {NULL, NULL, NULL}};
  int a = parse_opts(argc, argv, 2, specs, &co, 1);
  if (a == 1) {
    usage(stdout);
    return 0;
  }
  int64_t s1 = 0, e1, s2 = 0, e2;
  if (a == 0 && (uid == NULL || uid[0] == '\0' || from == NULL || to == NULL)) {
    fprintf(stderr, "sluice-rate: statement needs --uid, --from and --to\n");
    a = -1;
  }
  if (a == 0 && (rate_day_bounds(from, co.tz_offset_min, &s1, &e1) != 0 ||
                 rate_day_bounds(to, co.tz_offset_min, &s2, &e2) != 0)) {
    fprintf(stderr, "sluice-rate: --from and --to must be dates yyyymmdd (from 19700101)\n");
    a = -1;
  }
  if (a == 0 && (s2 < s1 || (s2 - s1) / RATE_DAY_SECONDS >= MAX_DAYS)) {
    fprintf(stderr, "sluice-rate: --from %s --to %s: the period must run forward and span at most %d days\n", from,
            to, MAX_DAYS);
    a = -1;
  }
  int csv = a == 0 && strcmp(format, "csv") == 0;
  if (a == 0 && !csv && strcmp(format, "json") != 0) {
    fprintf(stderr, "sluice-rate: --format '%s' is neither json nor csv\n", format);
    a = -1;
  }
  if (a < 0) {
    usage(stderr);
    return EXIT_USAGE;
  }
  struct rconn *c = connect_redis(&co);
  if (c == NULL) return 1;
  size_t ndays = (size_t)((s2 - s1) / RATE_DAY_SECONDS) + 1;
  char(*days)[9] = rate__xrealloc(NULL, ndays * sizeof(*days));
  struct period *per = rate__xrealloc(NULL, ndays * sizeof(*per));
  memset(per, 0, ndays * sizeof(*per));
  redisReply **reps = rate__xrealloc(NULL, 2 * ndays * sizeof(*reps));
  memset(reps, 0, 2 * ndays * sizeof(*reps));
  redisReply *pay = NULL, *bal = NULL;
  struct period total = {0};
  int status = 1;
  for (size_t i = 0; i < ndays; i++) {
    rate_day_of(s1 + (int64_t)i * RATE_DAY_SECONDS, co.tz_offset_min, days[i]);
    char *hb = xformat(SL_KEY_BILL "%s:", days[i]), *hu = xformat(SL_KEY_USAGE "%s:", days[i]);
    char *kb = acct_key(&co, hb, uid, ""), *ku = acct_key(&co, hu, uid, "");
    free(hb);
    free(hu);
    const char *a1[] = {"HGETALL", kb}, *a2[] = {"HGETALL", ku};
    rconn_append(c, 2, a1);
    rconn_append(c, 2, a2);
    free(kb);
    free(ku);
  }
  char *kp = acct_key(&co, SL_KEY_PAYMENTS, uid, ""), *kbal = acct_key(&co, SL_KEY_BALANCE, uid, "");
  char lo[32], hi[32];
  snprintf(lo, sizeof(lo), "%" PRId64, s1 * 1000);
  snprintf(hi, sizeof(hi), "%" PRId64, e2 * 1000 - 1);
  const char *a3[] = {"XRANGE", kp, lo, hi}, *a4[] = {"GET", kbal};
  rconn_append(c, 4, a3);
  rconn_append(c, 2, a4);
  free(kp);
  free(kbal);
  for (size_t i = 0; i < 2 * ndays; i++) {
    if (rconn_get_reply(c, &reps[i]) != REDIS_OK) {
      fprintf(stderr, "sluice-rate: redis: %s\n", rconn_errstr(c));
      goto out;
    }
  }
  if (rconn_get_reply(c, &pay) != REDIS_OK || rconn_get_reply(c, &bal) != REDIS_OK) {
    fprintf(stderr, "sluice-rate: redis: %s\n", rconn_errstr(c));
    goto out;
  }
  for (size_t i = 0; i < 2 * ndays; i++) {
    if (reps[i]->type == REDIS_REPLY_ERROR) {
      fprintf(stderr, "sluice-rate: uid=%s: %s of %s is not a hash: %s\n", uid, i % 2 ? "usage" : "bill",
              days[i / 2], reps[i]->str);
      goto out;
    }
  }
  if (pay->type == REDIS_REPLY_ERROR || bal->type == REDIS_REPLY_ERROR) {
    fprintf(stderr, "sluice-rate: uid=%s: payments or balance of the wrong type: %s\n", uid,
            pay->type == REDIS_REPLY_ERROR ? pay->str : bal->str);
    goto out;
  }
  int64_t balance = 0;
  if (bal->type == REDIS_REPLY_STRING && rate_int_parse(bal->str, bal->len, &balance) != 0) {
    fprintf(stderr, "sluice-rate: uid=%s: the balance '%s' is not an integer of micro-units\n", uid, bal->str);
    goto out;
  }
  for (size_t i = 0; i < ndays; i++) day_fill(&per[i], uid, days[i], reps[2 * i], reps[2 * i + 1]);
  /* Payments: the stream entry id is the server's time in milliseconds. */
  for (size_t i = 0; i < pay->elements; i++) {
    const redisReply *e = pay->element[i];
    if (e->type != REDIS_REPLY_ARRAY || e->elements != 2) continue;
    int64_t ms = strtoll(e->element[0]->str, NULL, 10), amt = 0;
    const redisReply *kv = e->element[1];
    for (size_t k = 0; k + 1 < kv->elements; k += 2)
      if (strcmp(kv->element[k]->str, "amount") == 0)
        rate_dec_parse(kv->element[k + 1]->str, kv->element[k + 1]->len, &amt);
    int64_t di = (ms / 1000 - s1) / RATE_DAY_SECONDS;
    if (di >= 0 && (size_t)di < ndays) add(&per[di].payments, amt);
  }
  for (size_t i = 0; i < ndays; i++) total_add(&total, &per[i]);
  if (total.n > 1) qsort(total.lines, total.n, sizeof(*total.lines), cmp_line);
  char b[RATE_DEC_MAX];
  if (csv) {
    printf("day,service,calls,units,units_from_packages,payg_units,payg_calls,amount,payments,balance\n");
    for (size_t i = 0; i < ndays; i++) {
      char bb[RATE_DEC_MAX] = "";
      if (per[i].has_balance) money(per[i].balance_after, bb);
      csv_period(days[i], &per[i], per[i].rated, bb);
    }
    csv_period("total", &total, 1, money(balance, b));
  } else {
    printf("{\"uid\":");
    json_str(uid);
    printf(",\"from\":\"%s\",\"to\":\"%s\",\"tz_offset_min\":%d,\"days\":[", from, to, co.tz_offset_min);
    for (size_t i = 0; i < ndays; i++) {
      printf("%s{\"day\":\"%s\",\"rated\":%s,", i ? "," : "", days[i], per[i].rated ? "true" : "false");
      json_period(&per[i], per[i].rated);
      if (per[i].rated) {
        printf(",\"adjustments\":%" PRId64, per[i].adjustments);
        if (per[i].has_balance) printf(",\"balance_after_bill\":\"%s\"", money(per[i].balance_after, b));
      }
      printf("}");
    }
    printf("],\"total\":{\"days_rated\":%d,", total.rated);
    json_period(&total, 1);
    printf("},\"balance\":\"%s\"}\n", money(balance, b));
  }
  status = 0;
out:
  for (size_t i = 0; i < 2 * ndays; i++)
    if (reps[i]) freeReplyObject(reps[i]);
  if (pay) freeReplyObject(pay);
  if (bal) freeReplyObject(bal);
  for (size_t i = 0; i < ndays; i++) period_free(&per[i]);
  period_free(&total);
  free(reps);
  free(per);
  free(days);
  rconn_free(c);
  return status;
}
