/* How every request ends (SPEC section 6), plus the admission answers that
 * are not in the billing vocabulary (`unavailable`: Redis could not be
 * asked, or a bound was reached). The one list of outcome numbers and
 * names: the proxy decides them, metering counts and names them. */
#ifndef SL_OUTCOME_H
#define SL_OUTCOME_H

enum sl_outcome {
  SL_OUT_OK = 0,         /* the backend answered 200: billable */
  SL_OUT_UPSTREAM_ERROR, /* another status, or the backend failed */
  SL_OUT_THROTTLED,
  SL_OUT_SUSPENDED,
  SL_OUT_UNAUTHENTICATED,
  SL_OUT_BAD_REQUEST,
  SL_OUT_UNAVAILABLE,
  SL_NOUTCOMES
};

/* The names metering writes into Redis (`calls` fields) and /metrics uses.
 * The billable one is also a literal: the flusher's Lua script is built
 * from it (only `ok` calls count in `usage`). */
#define SL_OUT_OK_NAME "ok"
extern const char *const sl_outcome_names[SL_NOUTCOMES];

/* Outcomes of calls refused before a backend was asked: their metering keys
 * are capped (meter.h). */
#define SL_OUTCOMES_REFUSED \
  ((1u << SL_OUT_SUSPENDED) | (1u << SL_OUT_UNAUTHENTICATED) | (1u << SL_OUT_BAD_REQUEST) | (1u << SL_OUT_UNAVAILABLE))

#endif
