/* Every Redis key, channel and hash field that sluice, its flusher and
 * sluice-rate share (docs/redis.md describes the values). Each is a string
 * literal so that the Lua scripts can be built from it at compile time
 * ("... GET', p .. '" SL_KEY_AK "' .. a ..."): a key renamed here is renamed
 * in every script and every C reader at once. Every name is relative to the
 * configured prefix (--redis-prefix, "sluice:" by default).
 *
 * Header only, no dependency: sluice-rate (rate/) includes it without
 * linking the proxy's libraries. Metering's outcome names are in
 * proxy/metering/outcome.h. */
#ifndef SL_REDIS_KEYS_H
#define SL_REDIS_KEYS_H

/* Bytes of a key literal, without the NUL. */
#define SL_KEYLEN(lit) (sizeof(lit) - 1)

/* ---- the account directory (read by sluice) ---- */
#define SL_KEY_AK "ak:"               /* ak:<AccessKeyId> -> UID (string) */
#define SL_KEY_SUSPENDED "suspended"  /* set of suspended UIDs */
#define SL_KEY_FEATURE "feature:"     /* feature:<name> hash: the fields below */
#define SL_FIELD_DEFAULT_QPS "default_qps"
#define SL_FIELD_TIER "tier"
#define SL_KEY_QPSPKGS "qpspkgs:"     /* qpspkgs:<uid> set of QPS package ids */
#define SL_KEY_QPSPKG "qpspkg:"       /* qpspkg:<uid>:<id> hash: the fields below */
#define SL_FIELD_FEATURE "feature"
#define SL_FIELD_REGION "region"
#define SL_FIELD_QPS "qps"
#define SL_FIELD_STARTS_AT "starts_at"   /* unix seconds */
#define SL_FIELD_EXPIRES_AT "expires_at" /* unix seconds */
#define SL_CHANNEL_CHANGES "changes"  /* pub/sub: a message names a changed key */
#define SL_KEY_DIR_MARK "dir:mark"    /* a random value the directory keeps: gone or changed means the data set
                                       * was flushed or replaced, which notifies nothing (FLUSHALL, SWAPDB) */

/* ---- global limits (sluice's fleet threads, SPEC 9; docs/limits.md) ---- */
#define SL_KEY_SHARE "share:"                     /* share:<uid>:<feature>:<region> hash: session ->
                                                   * demand_mrps * 1e7 + lease_ppm; "~a" -> last announced;
                                                   * "~e" -> expiry last set */
#define SL_KEY_SHARE_INSTANCES "share:instances" /* zset: session <id>#<n> -> heartbeat expiry (ms, server clock) */
#define SL_KEY_SHARE_ANNOUNCE "share:announce"   /* stream: keys to join (not registered) or sync (nudged) */
#define SL_CHANNEL_SHARE_BELL "share:bell"       /* pub/sub, one server: the stream or the instances changed; payload: the session */

/* ---- metering (written by sluice's flusher, read by sluice-rate) ---- */
#define SL_KEY_USAGE "usage:"              /* usage:<day>:<uid> hash <feature>:<service>:<region> -> billable calls;
                                            * usage:<day> set of the day's UIDs */
#define SL_KEY_CALLS "calls:"              /* calls:<day>:<uid> hash <feature>:<region>:<outcome> -> calls */
#define SL_KEY_USAGE_STREAM "usage:stream" /* one entry per batch: batch, keys, deltas (a line per key) */
#define SL_USAGE_STREAM_MAXLEN "2000"      /* entries kept, about (each up to SL_BATCH_MAX keys) */
#define SL_KEY_METER_BATCH "meter:batch:"  /* meter:batch:<id>: a batch applied (kept 7 days) */
#define SL_KEY_METER_HWM "meter:hwm:"      /* Redis Cluster: meter:hwm:{<slot tag>}:<instance>:<epoch> -> the
                                            * highest batch seq applied to that slot (kept 7 days, less at
                                            * most an hour, after the last) */
#define SL_KEY_METER_PROBE "meter:probe:"  /* Redis Cluster: meter:probe:{<slot tag>}, never written: read to
                                            * learn that the slot is served here and not being migrated */

/* ---- rating (sluice-rate; docs/rating.md) ---- */
#define SL_KEY_COEF "coef:"       /* coef:<service> or coef:<feature>: decimal units per call */
#define SL_KEY_PRICE "price:"     /* price:<service> or price:<feature>: decimal currency per 1,000 calls */
#define SL_KEY_RESPKGS "respkgs:" /* respkgs:<uid> set or list of resource package ids */
#define SL_KEY_RESPKG "respkg:"   /* respkg:<uid>:<id> hash: the fields below (rate/rating.c reads them in
                                   * this order: rate_pkg_fields) */
#define SL_FIELD_QUOTA "quota"
#define SL_FIELD_REMAINING "remaining"
#define SL_FIELD_PURCHASED_AT "purchased_at" /* unix seconds; expires_at: SL_FIELD_EXPIRES_AT (optional:
                                              * purchased_at + 365 days) */
#define SL_KEY_BILL "bill:"         /* bill:<day>:<uid> hash */
#define SL_KEY_RATED "rated:"       /* rated:<day> hash: at (unix seconds) the day was first rated without failures */
#define SL_KEY_ALERTS "alerts"      /* stream: quota_low and late_usage entries */
#define SL_KEY_ALERTPCT "alertpct:" /* alertpct:<uid>: decimal percent of quota (default 10) */
#define SL_KEY_BALANCE "balance:"   /* balance:<uid>: integer micro-units of the currency (may be < 0) */
#define SL_KEY_SUSPENSION "suspension:" /* suspension:<uid> hash: reason, since (unix seconds), ... */
#define SL_FIELD_REASON "reason"
#define SL_FIELD_SINCE "since"
#define SL_REASON_OVERDUE "overdue"     /* the only reason that a payment lifts */
#define SL_KEY_PAYMENTS "payments:" /* payments:<uid> stream: amount, balance, ref, suspension */
#define SL_KEY_PAYREFS "payrefs:"   /* payrefs:<uid> set: the payment references already credited */
#define SL_KEY_OUTBOX "outbox:"     /* outbox:{<uid>} stream, Redis Cluster only: what the account's scripts
                                     * leave for P alerts and P suspended (field op: alert, suspend, lift) */

#endif
