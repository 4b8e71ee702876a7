/* sluice-rate topup: a payment (SPEC section 8). Adds the amount to the
 * balance, records it in the account's payments stream, and lifts an
 * overdue suspension once the balance is >= 0, all in one Lua script. A
 * suspension with another reason, or with none recorded, stays. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "driver.h"
#include "keys.h"
#include "rating.h"

/* KEYS: 1 balance, 2 suspended set, 3 suspension hash, 4 payments stream,
 * 5 payment references set. ARGV: 1 amount (micro-units), 2 amount
 * (decimal), 3 reference ("" none), 4 uid, 5 changes channel, 6 now.
 * In a Redis Cluster (every key in the account's slot) KEYS[2] is the
 * account's outbox stream, where a lift is left as op lift for the driver
 * (outbox_drain), and ARGV[5] is '1' or '0': whether the UID was in
 * P suspended when last read.
 * Checks every type first, then INCRBY (which refuses a balance that is not
 * an integer, or an overflow, before anything is written). Returns
 * {status, balance, suspension}: status "ok" or "duplicate" (the reference
 * was credited before: nothing changed); suspension "none", "lifted" or
 * "kept:<reason>" ("kept:" when no reason is recorded). */
static const char topup_lua[] =
    "local function want(k, ok)\n"
    "  local t = redis.call('TYPE', KEYS[k])['ok']\n"
    "  if t ~= 'none' and t ~= ok then\n"
    "    return redis.error_reply('ERR ' .. KEYS[k] .. ' is a ' .. t .. ', not a ' .. ok)\n"
    "  end\n"
    "end\n"
    "local cl = ARGV[5] == '0' or ARGV[5] == '1'\n"
    "local e = want(1, 'string') or want(2, cl and 'stream' or 'set') or want(3, 'hash') or want(4, 'stream') or want(5, 'set')\n"
    "if e then return e end\n"
    "if ARGV[3] ~= '' and redis.call('SISMEMBER', KEYS[5], ARGV[3]) == 1 then\n"
    "  return {'duplicate', redis.call('GET', KEYS[1]) or '0', ''}\n"
    "end\n"
    "local b = redis.call('INCRBY', KEYS[1], ARGV[1])\n"
    "local bal = redis.call('GET', KEYS[1])\n"
    "local state = 'none'\n"
    "local member\n"
    "if cl then member = ARGV[5] == '1' else member = redis.call('SISMEMBER', KEYS[2], ARGV[4]) == 1 end\n"
    "if member then\n"
    "  local reason = redis.call('HGET', KEYS[3], '" SL_FIELD_REASON "')\n"
    "  if b >= 0 and reason == '" SL_REASON_OVERDUE "' then\n"
    "    redis.call('DEL', KEYS[3])\n"
    "    if cl then redis.call('XADD', KEYS[2], '*', 'op', 'lift')\n"
    "    else\n"
    "      redis.call('SREM', KEYS[2], ARGV[4])\n"
    "      redis.call('PUBLISH', ARGV[5], KEYS[2])\n"
    "    end\n"
    "    state = 'lifted'\n"
    "  else\n"
    "    state = 'kept:' .. (reason or '')\n"
    "  end\n"
    "end\n"
    "redis.call('XADD', KEYS[4], '*', 'amount', ARGV[2], 'balance', bal, 'ref', ARGV[3], 'suspension', state,\n"
    "           'at', ARGV[6])\n"
    "if ARGV[3] ~= '' then redis.call('SADD', KEYS[5], ARGV[3]) end\n"
    "return {'ok', bal, state}\n";

static void usage(FILE *f) {
  fprintf(f, "usage: sluice-rate topup --uid U --amount A [--ref R] [--redis HOST:PORT|unix:PATH|sentinel://...|cluster://...] [--redis-prefix P]\n"
             "Adds A (a decimal amount of the currency, > 0, at most 6 decimals) to the balance of U,\n"
             "records the payment, and lifts a suspension for overdue once the balance is >= 0.\n"
             "  --ref R   a payment reference: a reference already credited changes nothing\n"
             "Exit status: 0 credited (or a duplicate reference), 1 Redis failed, 2 usage error.\n");
}

int topup_main(int argc, char **argv) {
  const char *uid = NULL, *amount_s = NULL, *ref = NULL;
  struct common_opts co;
  const struct opt_spec specs[] = {
      {"--uid", NULL, &uid}, {"--amount", NULL, &amount_s}, {"--ref", NULL, &ref}, {NULL, NULL, NULL}};
  int a = parse_opts(argc, argv, 2, specs, &co, 0);
  if (a == 1) {
    usage(stdout);
    return 0;
  }
  int64_t amount = 0;
  if (a == 0 && (uid == NULL || uid[0] == '\0' || amount_s == NULL)) {
    fprintf(stderr, "sluice-rate: topup needs --uid and --amount\n");
    a = -1;
  }
  if (a == 0 && (rate_dec_parse(amount_s, strlen(amount_s), &amount) != 0 || amount <= 0)) {
    fprintf(stderr, "sluice-rate: --amount '%s' is not a positive decimal with at most 6 decimals\n", amount_s);
    a = -1;
  }
  if (a < 0) {
    usage(stderr);
    return EXIT_USAGE;
  }
  struct rconn *c = connect_redis(&co);
  if (c == NULL) return 1;
  struct strv args = {0};
  char money[RATE_DEC_MAX], err[512];
  redisReply *rep = NULL;
  int status = 1, cl = rconn_cluster(c), member = 0;
  rate_money_format(amount, money);
  /* A cluster: a lift an earlier top-up left in the outbox goes out first,
   * so that a rerun (a duplicate --ref) completes it. */
  if (cl && (outbox_drain(c, &co, uid, err, sizeof(err)) != 0 ||
             suspended_member(c, &co, uid, &member, err, sizeof(err)) != 0)) {
    fprintf(stderr, "sluice-rate: uid=%s: top-up not applied: %s\n", uid, err);
    goto out;
  }
  strv_pushf(&args, "EVAL");
  strv_pushf(&args, "%s", topup_lua);
  strv_pushf(&args, "5");
  strv_push(&args, acct_key(&co, SL_KEY_BALANCE, uid, ""));
  strv_push(&args, cl ? acct_key(&co, SL_KEY_OUTBOX, uid, "") : xformat("%s" SL_KEY_SUSPENDED, co.prefix));
  strv_push(&args, acct_key(&co, SL_KEY_SUSPENSION, uid, ""));
  strv_push(&args, acct_key(&co, SL_KEY_PAYMENTS, uid, ""));
  strv_push(&args, acct_key(&co, SL_KEY_PAYREFS, uid, ""));
  strv_pushf(&args, "%" PRId64, amount);
  strv_pushf(&args, "%s", money);
  strv_pushf(&args, "%s", ref ? ref : "");
  strv_pushf(&args, "%s", uid);
  if (cl) strv_pushf(&args, "%d", member);
  else strv_pushf(&args, "%s" SL_CHANNEL_CHANGES, co.prefix);
  strv_pushf(&args, "%lld", (long long)time(NULL));
  rep = command(c, &args, err, sizeof(err));
  strv_free(&args);
  if (rep == NULL) {
    fprintf(stderr, "sluice-rate: uid=%s: top-up not applied: %s\n", uid, err);
    goto out;
  }
  if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 3) {
    fprintf(stderr, "sluice-rate: uid=%s: unexpected reply from the top-up script\n", uid);
    goto out;
  }
  if (cl && outbox_drain(c, &co, uid, err, sizeof(err)) != 0) {
    fprintf(stderr, "sluice-rate: uid=%s: credited, but the suspension is not lifted yet (run the top-up again "
                    "with its --ref): %s\n", uid, err);
    goto out;
  }
  const char *st = rep->element[0]->str, *bal = rep->element[1]->str, *susp = rep->element[2]->str;
  int64_t b = 0;
  char bm[RATE_DEC_MAX] = "?";
  if (rate_int_parse(bal, strlen(bal), &b) == 0) rate_money_format(b, bm);
  if (strcmp(st, "duplicate") == 0) {
    printf("uid=%s status=duplicate ref=%s balance=%s\n", uid, ref, bm);
    fprintf(stderr, "sluice-rate: uid=%s: payment %s was credited before: nothing changed\n", uid, ref);
    status = 0;
    goto out;
  }
  const char *kept = strncmp(susp, "kept:", 5) == 0 ? susp + 5 : NULL;
  printf("uid=%s status=ok amount=%s balance=%s suspension=%s%s%s\n", uid, money, bm, kept ? "kept" : susp,
         kept ? " reason=" : "", kept ? (kept[0] ? kept : "none") : "");
  if (kept && strcmp(kept, SL_REASON_OVERDUE) == 0)
    fprintf(stderr, "sluice-rate: uid=%s: still suspended for overdue: the balance is still below zero\n", uid);
  else if (kept)
    fprintf(stderr, "sluice-rate: uid=%s: suspended for %s%s%s: a payment does not lift that\n", uid,
            kept[0] ? "reason '" : "no recorded reason", kept, kept[0] ? "'" : "");
  status = 0;
out:
  if (rep) freeReplyObject(rep);
  rconn_free(c);
  return status;
}
