/* Request classification (SPEC section 3): pulls Action, AccessKeyId,
 * Service and region out of a request and maps them to a catalogue feature.
 * A pure function over byte ranges: no allocation, no I/O, every copy bounded
 * by the fixed buffers of struct sl_class; safe from any thread. */
#ifndef SL_CLASSIFY_H
#define SL_CLASSIFY_H

#include <stddef.h>
#include <stdint.h>

#include "catalog.h"

struct sl_class_input {
  const char *url;
  size_t url_len; /* request target, e.g. "/?Action=...&AccessKeyId=..." */
  const char *host;
  size_t host_len; /* Host header value, may be NULL */
  const char *authorization;
  size_t auth_len; /* may be NULL */
  const char *acs_action;
  size_t acs_action_len; /* x-acs-action header, may be NULL */
  const char *content_type;
  size_t ct_len; /* may be NULL */
  int body_coded; /* the request has a Content-Encoding other than identity */
  const char *body;
  size_t body_len;            /* request body (already de-chunked); may be NULL when 0 */
  const char *default_region; /* --region, NUL-terminated; may be NULL */
  const char *regions;        /* known regions, comma-separated, NUL-terminated; NULL: any */
};

enum sl_class_err {
  SL_CLASS_OK = 0,
  SL_CLASS_NO_ACTION,
  SL_CLASS_UNKNOWN_ACTION,
  SL_CLASS_BAD_ENCODING,
  SL_CLASS_FIELD_TOO_LONG,
  SL_CLASS_CONFLICT,       /* AccessKeyId, Action or Service given twice with different values */
  SL_CLASS_UNKNOWN_REGION, /* the Host names a region not in the known list */
  SL_CLASS_BAD_CONTENT_TYPE, /* the form type appears in Content-Type, but it is not that media type; or multipart/form-data */
  SL_CLASS_CODED_FORM,       /* a form body with a Content-Encoding: its Service cannot be read as sent */
};

/* Every string field is NUL-terminated and also has its length, so a value
 * holds at most sizeof(field) - 1 bytes. A field that was absent, or that
 * failed to decode, has length 0. */
struct sl_class {
  char action[64];
  uint8_t action_len;
  char ak[128];
  uint8_t ak_len; /* 0 when absent */
  char service[128];
  uint8_t service_len;
  char region[64];
  uint8_t region_len;
  int feature; /* id in sl_features, -1 when unknown */
  uint8_t billable; /* the Action is a moderation submission (catalog.h); set with feature */
  enum sl_tier tier;
};

/* Classifies one request. Returns SL_CLASS_OK or the first problem met, in
 * field order Action, AccessKeyId, region, Service, then an Action missing from
 * the catalogue. On error `out` still holds every field that was found and
 * decoded (feature is set whenever Action and Service both decoded), except
 * that an unknown region leaves region_len 0. A missing AccessKeyId is not an
 * error here (ak_len 0): the caller answers 403.
 *
 * One identity, one Action: every place a value can come from must agree
 * (AccessKeyId: query, form body, the Authorization Credential; Action:
 * query, form body, x-acs-action), else SL_CLASS_CONFLICT: the backend could
 * read another one than the proxy admitted. Within the query or the body
 * every occurrence of a name (Service too) must be the same, an empty one
 * included; across places an empty value counts as absent, so the next
 * place is used. Service is the form body's, else the query's (SPEC 3). */
enum sl_class_err sl_classify(const struct sl_class_input *in, struct sl_class *out);

/* The JSON error Code for e ("MissingAction", "InvalidAction.NotFound",
 * "InvalidParameter"), and a human message without quotes or backslashes (safe
 * to paste into JSON unescaped). Static strings; "OK"/"" for SL_CLASS_OK. */
const char *sl_class_err_code(enum sl_class_err e);
const char *sl_class_err_message(enum sl_class_err e);

#endif
