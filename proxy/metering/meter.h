/* Metering tables (SPEC section 6): every request's outcome is counted per
 * (day, UID, feature, region, tier, outcome) in a table owned by one worker,
 * with no lock and no atomic on the request path. The flusher thread
 * (flusher.c) takes full or rotated tables through a lock-free ring and
 * gives cleared ones back. */
#ifndef SL_METER_H
#define SL_METER_H

#include <stdint.h>
#include <time.h>

#include "dir.h"
#include "outcome.h"
#include "ring.h"

#define SL_METER_NO_FEATURE 255

/* Refused calls (outcomes suspended, unauthenticated, bad_request and
 * unavailable: answered without the backend, and without the saturation
 * check that admitted calls pass) are counted under their own UID, feature
 * and region for at most SL_METER_REFUSED_KEYS keys per table (a quarter of
 * the table when that is smaller); beyond it a refused call is counted under
 * the fixed shape (day, UID "-", feature "-", region "-", baseline tier,
 * outcome). A flood of distinct refused requests therefore adds at most that
 * many keys plus four per day to a table: it never fills one. The bits are
 * the outcomes of outcome.h. */
#define SL_METER_REFUSED_KEYS 64
/* And over time: a worker counts at most this many distinct refused keys
 * under their own shape per billing day (a set of their hashes, emptied
 * when the day turns); later new ones take the fixed shape. So a flood of
 * distinct refused requests adds at most workers * this + 4 keys per day
 * to the queue, the spool and Redis, however long it lasts. */
#define SL_METER_REFUSED_PER_DAY 256
#define SL_METER_REFUSED_MASK SL_OUTCOMES_REFUSED
/* Full tables a worker keeps aside while the hand-off ring is full: the
 * worker is saturated (admission answers 503) from the first one, so only
 * calls admitted before that and still in flight add keys after it. Beyond
 * this many the worker keeps more (one per --meter-keys such calls, so at
 * most --max-conns keys) and says so, rather than lose a count or abort. */
#define SL_METER_ASIDE_MAX 64
/* Tables in each worker's hand-off and spare rings. */
#define SL_METER_RING 16

#define SL_METER_SERVICE_MAX 127 /* the Service as classified (classify.h) */

struct sl_meter_key {
  uint32_t day; /* yyyymmdd in the billing time zone, by arrival time */
  uint8_t feature, tier, outcome;
  uint8_t uid_len, region_len;
  /* An ok of a billable Action (catalog.h) goes to usage, once per service
   * its Service names (comma-separated; none: "-"). The service is kept
   * only for such keys (else service_len 0): other outcomes are counted
   * per feature, so a client's made-up Services make no keys of their own. */
  uint8_t billable;
  uint8_t service_len;
  char uid[SL_UID_MAX + 1];
  char region[SL_REGION_MAX + 1];
  char service[SL_METER_SERVICE_MAX + 1];
};

struct sl_meter_entry {
  uint64_t hash; /* never 0 */
  uint64_t count;
  uint32_t born; /* the table's epoch when the key came in (the flusher: its flush) */
  struct sl_meter_key k;
};

/* Entries are dense, in insertion order (walking and clearing cost O(keys));
 * the open-addressing index holds entry numbers + 1 (0: empty), 4 bytes a
 * slot, so that a table's memory is its keys', not twice its keys'. */
struct sl_meter_table {
  uint32_t mask;  /* index slots - 1; slots = 2 * capacity, a power of two */
  uint32_t n;     /* keys held: e[0..n) */
  uint32_t limit; /* capacity in keys */
  uint64_t total; /* sum of counts */
  uint32_t refused;     /* refused-call keys held under their own shape */
  uint32_t refused_max; /* their bound (SL_METER_REFUSED_KEYS); 0: none (the flusher's accumulator) */
  uint32_t epoch;       /* new keys' born */
  struct sl_meter_entry *e;
  uint32_t *index;
};

/* A table for `capacity` keys. Aborts on allocation failure (proxy rule). */
struct sl_meter_table *sl_meter_table_new(uint32_t capacity);
void sl_meter_table_free(struct sl_meter_table *t);
void sl_meter_table_clear(struct sl_meter_table *t);
uint64_t sl_meter_key_hash(const struct sl_meter_key *k);
/* Keeps the entries keep() says 1 for (in their order) and drops the
 * others. Returns the keys kept. */
uint32_t sl_meter_table_retain(struct sl_meter_table *t, int (*keep)(const struct sl_meter_entry *, void *), void *arg);
/* Adds count to key k. Returns 0; -ENOBUFS when the key is new and the
 * table already holds `capacity` keys; -EDQUOT when the key is a new refused
 * key (not of the fixed shape) and the table holds refused_max of them.
 * Nothing is changed on an error. */
int sl_meter_add(struct sl_meter_table *t, const struct sl_meter_key *k, uint64_t hash, uint64_t count);

/* 1 when outcome is a refused call's (SL_METER_REFUSED_MASK). */
static inline int sl_meter_refused(uint8_t outcome) { return outcome < 32 && (SL_METER_REFUSED_MASK >> outcome & 1); }
/* Writes into out the fixed shape that k is counted under when its table
 * holds its bound of refused keys: same day and outcome, UID, feature and
 * region "-", baseline tier. */
void sl_meter_key_collapse(struct sl_meter_key *out, const struct sl_meter_key *k);

/* yyyymmdd of unix time `secs` shifted by tz_offset_min minutes. */
uint32_t sl_meter_day(int64_t secs, int tz_offset_min);

/* What a worker keeps for metering. The handoff ring carries tables to the
 * flusher, the spare ring brings them back cleared. */
struct sl_meter_worker {
  struct sl_meter_table *active;
  struct sl_meter_table **overflow; /* full tables the handoff ring had no room for, oldest first */
  unsigned noverflow, overflow_cap;  /* held; room in the array (SL_METER_ASIDE_MAX, grown only past it) */
  uint64_t over_bound;               /* tables kept aside past SL_METER_ASIDE_MAX (logged) */
  uint32_t refused_day;              /* the day refused_seen is for */
  uint32_t refused_n;                /* hashes in refused_seen */
  uint64_t refused_seen[2 * SL_METER_REFUSED_PER_DAY]; /* open addressing; 0 is empty */
  uint64_t over_bound_said_ms;
  struct sl_ring handoff, spare;
  uint32_t capacity;
  _Alignas(64) _Atomic uint64_t round_req; /* flusher: hand your table over for this round */
  _Alignas(64) _Atomic uint64_t round_done;
  /* day cache: the day is recomputed only when the clock passes midnight */
  int64_t day_start, day_end;
  uint32_t day;
  int tz_offset_min;
};

int sl_meter_worker_init(struct sl_meter_worker *m, uint32_t capacity, int tz_offset_min);
void sl_meter_worker_free(struct sl_meter_worker *m);
/* The arrival day of a request arriving at unix time `secs`. */
uint32_t sl_meter_worker_day(struct sl_meter_worker *m, int64_t secs);
/* Counts one request. Never loses it and never aborts: a refused call past
 * the table's refused-key bound is counted under the fixed shape; a full
 * table is handed off (or kept aside when the ring is full) and a fresh one
 * started. Worker thread. */
void sl_meter_count(struct sl_meter_worker *m, const struct sl_meter_key *k);
/* Hands the active table (if it holds anything) and any kept-aside ones to
 * the flusher. Returns the number handed over. Worker thread. */
unsigned sl_meter_handoff(struct sl_meter_worker *m);
/* 1 while full tables wait for room in the ring: new work should be refused. */
static inline int sl_meter_saturated(const struct sl_meter_worker *m) { return m->noverflow > 0; }

#endif
