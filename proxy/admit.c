/* Admission (SPEC section 4): classify the request, find the account, refuse
 * suspended accounts, apply the (UID, feature, region) QPS limit, and route
 * admitted calls to their tier's pool. The order of the checks is the order
 * of the answers: 400 (cannot classify), 403 (no such AccessKeyId), 403
 * (suspended), 429 (over the limit). */
#include "admit.h"

#include <string.h>
#include <strings.h>

#include "http_util.h"
#include "limiter.h"
#include "proxy.h"

_Static_assert(SL_BUCKET_KEY_MAX <= SL_FLEET_KEY_MAX, "a bucket key fits the fleet's table");

size_t sl_bucket_key(char *out, const char *uid, size_t uid_len, int feature, const char *region,
                     size_t region_len) {
  size_t fl = strlen(sl_features[feature].name), n = 0;
  memcpy(out, uid, uid_len);
  n += uid_len;
  out[n++] = '\x1f';
  memcpy(out + n, sl_features[feature].name, fl);
  n += fl;
  out[n++] = '\x1f';
  memcpy(out + n, region, region_len);
  return n + region_len;
}

static void decide(struct sl_conn *c, enum sl_outcome o) {
  c->call.outcome = (uint8_t)o;
  c->call.decided = 1;
}

static void hdr_value(const struct sl_conn *c, int idx, const char **p, size_t *n) {
  if (idx < 0) {
    *p = NULL;
    *n = 0;
    return;
  }
  *p = c->req.buf + c->req.hdrs.h[idx].val_off;
  *n = c->req.hdrs.h[idx].val_len;
}

/* Header names equal ignoring case, '_' and '-' alike: CGI, WSGI and PHP
 * backends read X_Sluice_Uid as X-Sluice-Uid (HTTP_X_SLUICE_UID). */
static int same_name(const char *a, const char *b, size_t n) {
  for (size_t i = 0; i < n; i++) {
    char x = a[i] == '_' ? '-' : a[i], y = b[i] == '_' ? '-' : b[i];
    if (x >= 'A' && x <= 'Z') x = (char)(x | 0x20);
    if (y >= 'A' && y <= 'Z') y = (char)(y | 0x20);
    if (x != y) return 0;
  }
  return 1;
}

/* With --trusted-uid-header: when the request carries that header, its
 * value becomes the directory key (0x01 + UID, which no AccessKeyId can
 * be). Returns 1 when it did, -1 when the header is given twice: a front
 * end that adds its own line after the client's would have this proxy
 * read one account and the backend maybe the other (as for Host); -1 too
 * for the name with '_' for '-' (or the reverse), which such a backend
 * reads as the same header. */
static int trusted_uid(struct sl_conn *c) {
  const char *name = c->w->cfg->trusted_uid_header;
  size_t nl = strlen(name);
  const struct sl_hdr *h = NULL;
  for (unsigned i = 0; i < c->req.hdrs.n; i++) {
    const struct sl_hdr *x = &c->req.hdrs.h[i];
    if (x->name_len != nl || !same_name(c->req.buf + x->name_off, name, nl)) continue;
    if (sl_req_conn_listed(&c->req, x)) continue; /* not forwarded, so not trusted either */
    if (h || strncasecmp(c->req.buf + x->name_off, name, nl) != 0) return -1;
    h = x;
  }
  if (h) {
    const char *v = c->req.buf + h->val_off;
    if (h->val_len == 0 || h->val_len > SL_UID_MAX) return 0;
    for (uint32_t k = 0; k < h->val_len; k++)
      if ((unsigned char)v[k] < 0x20 || v[k] == 0x7f) return 0; /* it becomes part of Redis keys */
    c->call.cls.ak[0] = '\x01';
    memcpy(c->call.cls.ak + 1, v, h->val_len);
    c->call.cls.ak_len = (uint8_t)(h->val_len + 1);
    return 1;
  }
  return 0;
}

static void reject(struct sl_conn *c, enum sl_outcome o, int status, const char *code, const char *msg,
                   const char *extra) {
  decide(c, o);
  sl_conn_error(c, status, code, msg, extra, 0);
}

static void reject_two_uids(struct sl_conn *c) {
  reject(c, SL_OUT_BAD_REQUEST, 400, "InvalidParameter", "The request gives the trusted UID header more than once.",
         NULL);
}

static void reject_not_found(struct sl_conn *c) {
  reject(c, SL_OUT_UNAUTHENTICATED, 403, "InvalidAccessKeyId.NotFound", "Specified access key is not found.", NULL);
}

static void reject_suspended(struct sl_conn *c) {
  reject(c, SL_OUT_SUSPENDED, 403, "Forbidden.AccountSuspended",
         "The account is suspended for overdue payment. Settle the overdue bill to resume service.", NULL);
}

static void reject_no_key(struct sl_conn *c) {
  reject(c, SL_OUT_UNAUTHENTICATED, 403, "InvalidAccessKeyId.NotFound",
         "The request carries no AccessKeyId (query AccessKeyId or Authorization Credential).", NULL);
}

/* The account is known (found, unknown, or unreachable): finish the decision. */
static void admit_account(struct sl_conn *c, const struct sl_dir_snap *s, const struct sl_acct *a) {
  struct sl_worker *w = c->w;
  if (a->kind == SL_ACCT_NOT_FOUND) {
    reject_not_found(c);
    return;
  }
  if (a->kind == SL_ACCT_UNAVAILABLE) {
    reject(c, SL_OUT_UNAVAILABLE, 503, "ServiceUnavailable",
           "The account directory cannot be reached; retry later.", "Retry-After: 1\r\n");
    return;
  }
  memcpy(c->call.uid, a->uid, a->uid_len);
  c->call.uid_len = a->uid_len;
  if (sl_dir_is_suspended(s, a->uid, a->uid_len)) {
    reject_suspended(c);
    return;
  }
  if (sl_meter_saturated(&w->meter)) { /* a call that cannot be counted is not forwarded */
    reject(c, SL_OUT_UNAVAILABLE, 503, "ServiceUnavailable", "Metering is backed up; retry later.",
           "Retry-After: 1\r\n");
    return;
  }
  int f = c->call.cls.feature;
  uint64_t limit = sl_dir_limit(s, a, f, c->call.cls.region, c->call.cls.region_len, c->call.arrival_s);
  char key[SL_BUCKET_KEY_MAX];
  size_t kl = sl_bucket_key(key, a->uid, a->uid_len, f, c->call.cls.region, c->call.cls.region_len);
  uint64_t hash = lim_hash(key, kl);
  struct lim_decision d;
  struct sl_fleet *fleet = w->shared->fleet;
  if (!fleet) {
    lim_decide(w->shared->lim, key, kl, hash, limit, 1, lim_now_ns(), &d);
  } else {
    /* This instance's share of the fleet's limit (fleet.h): its lease when
     * the key is coordinated, else R/N. */
    struct sl_fleet_slot *slot;
    uint64_t share = sl_fleet_share(fleet, hash, limit, &slot);
    lim_decide_milli(w->shared->lim, key, kl, hash, limit * share / 1000, 1, lim_now_ns(), &d);
    /* A key busy here (its bucket more than half used) needs the fleet to
     * agree on shares; a quiet one never costs a Redis command. */
    if (!slot && limit && (d.result == LIM_REJECT || d.remaining * 2 < d.limit))
      sl_fleet_want(fleet, w->id, hash, key, kl, limit, uv_now(&w->loop));
    d.limit = limit; /* the headers state the account's limit, not this instance's part of it */
  }
  if (d.result == LIM_REJECT) {
    /* A limit of 0 never admits (LIM_NEVER): the hint then says a minute,
     * so SDKs that read TimeLeft do not retry at once; the limit can be
     * raised at any time, so "never" would be wrong too. */
    uint64_t retry_ns = d.retry_after_ns > SL_RETRY_MAX_NS ? SL_RETRY_MAX_NS : d.retry_after_ns;
    uint64_t ms = (retry_ns + 999999) / 1000000;
    uint64_t secs = (retry_ns + 999999999) / 1000000000;
    uint64_t reset = (d.reset_ns + 999999999) / 1000000000;
    if (secs == 0) secs = 1;
    /* Appended by hand, not printf'd: under overload this is the hot path. */
    char extra[256], *p = extra;
#define LIT(s) (memcpy(p, s, sizeof(s) - 1), p += sizeof(s) - 1)
#define NUM(v) (p += sl_u64toa((v), p))
    LIT("Retry-After: ");
    NUM(secs);
    LIT("\r\nx-ratelimit-user: TimeLeft:");
    NUM(ms);
    LIT("\r\nRateLimit-Policy: ");
    NUM(d.limit);
    LIT(";w=1\r\nRateLimit: limit=");
    NUM(d.limit);
    LIT(", remaining=");
    NUM(d.remaining);
    LIT(", reset=");
    NUM(reset);
    LIT("\r\n");
#undef LIT
#undef NUM
    *p = '\0';
    reject(c, SL_OUT_THROTTLED, 429, "Throttling.User", "Request was denied due to user flow control.", extra);
    return;
  }
  if (d.result == LIM_FULL) {
    sl_stat_inc(&w->stats.limiter_full, 1);
    if (w->cfg->limiter_full == SL_LIMITER_FULL_CLOSED) {
      reject(c, SL_OUT_UNAVAILABLE, 503, "ServiceUnavailable", "The rate limiter is full; retry later.",
             "Retry-After: 1\r\n");
      return;
    }
  }
  c->pool = c->call.tier == SL_TIER_LLM ? SL_POOL_LLM : SL_POOL_DEFAULT;
  sl_conn_forward(c);
}

/* Asks the directory for c's account (one ask per worker and account: the
 * directory thread merges the rest) and puts c on the parked list.
 * Returns 0, -1 with too many parked, -2 with the directory's queue full. */
static int park_on_list(struct sl_conn *c) {
  struct sl_worker *w = c->w;
  if (w->nparked >= w->cfg->max_parked) return -1;
  int asked = 0;
  for (struct sl_link *l = w->parked.next; l != &w->parked && !asked; l = l->next) {
    const struct sl_conn *o = sl_container_of(l, struct sl_conn, call.park);
    asked = o->call.ak_hash == c->call.ak_hash && o->call.cls.ak_len == c->call.cls.ak_len && !memcmp(o->call.cls.ak, c->call.cls.ak, c->call.cls.ak_len);
  }
  if (!asked && sl_dirsync_lookup(&w->shared->dir, w->id, c->call.cls.ak, c->call.cls.ak_len, c->call.ak_hash) != 0)
    return -2;
  sl_list_push(&w->parked, &c->call.park);
  c->call.parked = 1;
  w->nparked++;
  sl_stat_inc(&w->stats.parked, 1);
  sl_stat_inc(&w->stats.parked_now, 1);
  return 0;
}

static void park(struct sl_conn *c) {
  int r = park_on_list(c);
  if (r) {
    reject(c, SL_OUT_UNAVAILABLE, 503, "ServiceUnavailable",
           r == -1 ? "Too many requests wait for account lookups." : "Too many account lookups are queued.",
           "Retry-After: 1\r\n");
    return;
  }
  /* A safety net: the directory answers within lookup-timeout-ms. */
  c->deadline = uv_now(&c->w->loop) + c->w->cfg->lookup_timeout_ms + 2000;
}

void sl_admit_unpark(struct sl_conn *c) {
  if (!c->call.parked) return;
  sl_list_remove(&c->call.park);
  c->call.parked = 0;
  c->w->nparked--;
  sl_stat_dec(&c->w->stats.parked_now, 1);
  if (c->call.head_asked)
    c->call.head_asked = 0; /* its deadline is the request's own (header-timeout-ms) */
  else
    c->deadline = 0;
}

/* Steps 2 and 3 for an account the directory holds (a: usable): answers
 * (returns 1) an unknown or suspended account. */
static int head_decide(struct sl_conn *c, const struct sl_dir_snap *s, const struct sl_acct *a) {
  if (a->kind == SL_ACCT_NOT_FOUND) {
    reject_not_found(c);
    return 1;
  }
  if (a->kind == SL_ACCT_FOUND && sl_dir_is_suspended(s, a->uid, a->uid_len)) {
    memcpy(c->call.uid, a->uid, a->uid_len);
    c->call.uid_len = a->uid_len;
    reject_suspended(c);
    return 1;
  }
  return 0;
}

static inline int usable(const struct sl_acct *a, uint64_t now) {
  return a && (a->kind == SL_ACCT_FOUND || a->valid_until_ms > now);
}

void sl_admit_resume(struct sl_worker *w) {
  if (!w->nparked) return;
  const struct sl_dir_snap *s = sl_dirsync_snap(&w->shared->dir);
  uint64_t now = uv_now(&w->loop);
  struct sl_link *l, *next;
  for (l = w->parked.next; l != &w->parked; l = next) {
    next = l->next;
    struct sl_conn *c = sl_container_of(l, struct sl_conn, call.park);
    if (c->call.head_asked && c->phase != SL_C_READING) { /* answered meanwhile (408, 413, 503) */
      sl_admit_unpark(c);
      continue;
    }
    const struct sl_acct *a = sl_dir_find(s, c->call.cls.ak, c->call.cls.ak_len, c->call.ak_hash);
    if (!usable(a, now)) continue;
    int head = c->call.head_asked;
    sl_admit_unpark(c);
    if (head) { /* its body is still being read: steps 2 and 3 only */
      if (head_decide(c, s, a))
        sl_stat_inc(&w->stats.early_answers, 1);
      else
        sl_conn_send_continue(c); /* held for this answer */
      continue;
    }
    /* May answer c, and so parse (and park) its next pipelined request:
     * c is then re-queued at the tail, and `next` stays valid. */
    admit_account(c, s, a);
  }
}

/* What classification reads: only what is forwarded (reqparse.c leaves out
 * headers that the Connection header lists). */
static void class_input(const struct sl_conn *c, struct sl_class_input *in) {
  memset(in, 0, sizeof(*in));
  in->url = c->req.buf + c->req.url_off;
  in->url_len = c->req.url_len;
  in->default_region = c->w->cfg->region;
  in->regions = c->w->cfg->regions;
  hdr_value(c, c->req.h_host, &in->host, &in->host_len);
  hdr_value(c, c->req.h_auth, &in->authorization, &in->auth_len);
  hdr_value(c, c->req.h_action, &in->acs_action, &in->acs_action_len);
  hdr_value(c, c->req.h_ctype, &in->content_type, &in->ct_len);
  in->body_coded = c->req.body_coded;
}

int sl_admit_head(struct sl_conn *c) {
  struct sl_worker *w = c->w;
  struct sl_class_input in;
  class_input(c, &in); /* no body yet: Service, and an Action in the body, come later */
  enum sl_class_err e = sl_classify(&in, &c->call.cls);
  /* The feature is not known before the body: an answer given here is
   * metered under "-" (and an unknown region gets no key of its own). */
  c->call.cls.feature = -1;
  if (e == SL_CLASS_BAD_ENCODING || e == SL_CLASS_FIELD_TOO_LONG || e == SL_CLASS_CONFLICT ||
      e == SL_CLASS_UNKNOWN_REGION || e == SL_CLASS_BAD_CONTENT_TYPE || e == SL_CLASS_CODED_FORM) {
    reject(c, SL_OUT_BAD_REQUEST, 400, sl_class_err_code(e), sl_class_err_message(e), NULL);
    return 1;
  }
  int t = w->cfg->trusted_uid_header[0] ? trusted_uid(c) : 0;
  if (t < 0) {
    reject_two_uids(c);
    return 1;
  }
  if (t > 0) {
    /* looked up below like an AccessKeyId */
  } else if (c->call.cls.ak_len == 0) {
    reject_no_key(c);
    return 1;
  }
  const struct sl_dir_snap *s = sl_dirsync_snap(&w->shared->dir);
  c->call.ak_hash = sl_dir_hash(c->call.cls.ak, c->call.cls.ak_len);
  const struct sl_acct *a = sl_dir_find(s, c->call.cls.ak, c->call.cls.ak_len, c->call.ak_hash);
  if (!usable(a, uv_now(&w->loop))) {
    /* Not known yet: asked now, the body read meanwhile (sl_admit_resume
     * answers a 403 when the account comes back unknown or suspended). With
     * the parked bound reached, the request goes on and is decided whole. */
    c->call.head_asked = 1;
    if (park_on_list(c) != 0) c->call.head_asked = 0;
    return 0;
  }
  return head_decide(c, s, a);
}

void sl_admit(struct sl_conn *c) {
  struct sl_worker *w = c->w;
  struct sl_class_input in;
  sl_admit_unpark(c); /* asked at the head and not answered yet: decided whole now */
  class_input(c, &in);
  if (c->req.chunked_req) {
    in.body = c->req.body.data;
    in.body_len = c->req.body.len;
  } else if (c->req.has_body) {
    in.body = c->req.buf + c->req.body_off;
    in.body_len = c->req.body_len;
  }
  enum sl_class_err e = sl_classify(&in, &c->call.cls);
  if (e != SL_CLASS_OK) {
    reject(c, SL_OUT_BAD_REQUEST, 400, sl_class_err_code(e), sl_class_err_message(e), NULL);
    return;
  }
  const struct sl_dir_snap *s = sl_dirsync_snap(&w->shared->dir);
  c->call.tier = s->feature_tier[c->call.cls.feature]; /* with any override: what the call is routed (and counted) by */
  int t = w->cfg->trusted_uid_header[0] ? trusted_uid(c) : 0;
  if (t < 0) {
    reject_two_uids(c);
    return;
  }
  if (t > 0) {
    /* The operator trusts a header to name the account: look the UID up
     * as its own directory key (0x01 + UID), with the UID's packages. */
  } else if (c->call.cls.ak_len == 0) {
    reject_no_key(c);
    return;
  }
  c->call.ak_hash = sl_dir_hash(c->call.cls.ak, c->call.cls.ak_len);
  const struct sl_acct *a = sl_dir_find(s, c->call.cls.ak, c->call.cls.ak_len, c->call.ak_hash);
  if (!usable(a, uv_now(&w->loop))) {
    park(c);
    return;
  }
  admit_account(c, s, a);
}
