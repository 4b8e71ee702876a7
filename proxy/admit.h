/* Admission (SPEC section 4): the glue between a client connection and the
 * admission layer (classification, the directory, the limiter). It owns a
 * call's admission state, struct sl_call, which the connection embeds and
 * metering reads once the call has ended. */
#ifndef SL_ADMIT_H
#define SL_ADMIT_H

#include <stdint.h>

#include "classify.h"
#include "common.h"
#include "dir.h"

struct sl_conn;
struct sl_worker;

/* What admission knows and decided about the call being served. */
struct sl_call {
  struct sl_class cls;
  struct sl_link park; /* in w->parked while waiting for an account lookup */
  uint64_t ak_hash;
  uint8_t outcome; /* enum sl_outcome once decided */
  uint8_t uid_len;
  char uid[SL_UID_MAX + 1]; /* the account's UID once known, for metering */
  uint32_t day;             /* arrival day (billing time zone) */
  int64_t arrival_s;        /* arrival wall-clock time, unix seconds */
  uint8_t tier;             /* the tier the call is routed (and counted) by */
  unsigned parked : 1;
  unsigned head_asked : 1; /* parked while its body is read: only steps 2 and 3 wait for the lookup */
  unsigned decided : 1; /* outcome set by admission (else by the backend's answer) */
};

/* The limiter key of a bucket: UID, feature and region joined by a byte
 * none of them holds. Returns its length; out holds SL_BUCKET_KEY_MAX. */
#define SL_BUCKET_KEY_MAX (SL_UID_MAX + 1 + 32 + 1 + SL_REGION_MAX)
size_t sl_bucket_key(char *out, const char *uid, size_t uid_len, int feature, const char *region,
                     size_t region_len);
/* Classifies the complete request and decides it: answers it, parks it
 * for an account lookup, or forwards it. */
void sl_admit(struct sl_conn *c);
/* The head of a request with a body is complete: answers at once (and
 * returns 1) when the head alone decides it (400 for a bad identity or
 * region, 403 for a missing, unknown or suspended account), so that no
 * body is read for it. Returns 0 when the request goes on; an account the
 * directory does not hold yet is asked for now (SPEC 4: steps 2 and 3 do
 * not wait for the body) and its 403, if any, sent when the answer comes,
 * while the body is read meanwhile. */
int sl_admit_head(struct sl_conn *c);
/* Resumes parked requests whose account the directory now holds. */
void sl_admit_resume(struct sl_worker *w);
void sl_admit_unpark(struct sl_conn *c);

#endif
