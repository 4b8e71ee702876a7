#include "classify.h"

#include <string.h>
#include <strings.h>

#include "common.h"
#include "http_util.h"

/* A raw (still encoded) value found in a query string or form body. */
struct span {
  const char *p;
  size_t n;
  int found;
  int conflict; /* the name occurs again with another value */
  /* The name in another case ("accesskeyid", "ACTION"): not a source of
   * the value (SPEC 3 names the parameters), but a backend that reads names
   * in any case would take it, so it must hold the value classified. */
  const char *vp;
  size_t vn;
  int vfound;
};

enum { P_ACTION, P_AK, P_SERVICE, P_COUNT };
static const struct {
  const char *name;
  size_t len;
} param_names[P_COUNT] = {
    [P_ACTION] = {"Action", 6},
    [P_AK] = {"AccessKeyId", 11},
    [P_SERVICE] = {"Service", 7},
};

/* Whether two raw values decode to the same bytes (a value that fails to
 * decode equals only its own raw bytes). */
static int same_value(const char *a, size_t an, const char *b, size_t bn) {
  char da[256], db[256];
  if (an == bn && memcmp(a, b, an) == 0) return 1;
  int la = sl_http_urldecode(a, an, da, sizeof(da));
  int lb = sl_http_urldecode(b, bn, db, sizeof(db));
  return la >= 0 && la == lb && memcmp(da, db, (size_t)la) == 0;
}

/* Records one name=value pair p[0..len) of scan_params. `spelt`: the pair
 * exists only as some backends split the string (after a ';').
 *
 * A name is compared as the backend reads it, decoded: "Access%4BeyId" is
 * AccessKeyId too. Names of the API are short and plain: a longer or
 * undecodable one is none of them. A name is also read as PHP and Rack
 * read it, which skip leading spaces, PHP ending it at a NUL too
 * ("+AccessKeyId", "AccessKeyId%00"): another spelling of the name, like
 * another case. */
static void scan_pair(const char *p, size_t len, struct span *out, int spelt) {
  const char *eq = memchr(p, '=', len);
  size_t kl = eq ? (size_t)(eq - p) : len;
  const char *vp = eq ? eq + 1 : p + len;
  size_t vn = eq ? (size_t)(p + len - eq - 1) : 0;
  const char *name = p;
  char dn[40];
  while (kl > 0 && *name == ' ') name++, kl--, spelt = 1;
  if (kl >= 6 && kl < 40 && (memchr(name, '%', kl) || memchr(name, '+', kl))) { /* 6: "Action", the shortest */
    int dl = sl_http_urldecode(name, kl, dn, sizeof(dn));
    const char *nul;
    name = dn;
    kl = dl < 0 ? 0 : (size_t)dl;
    if ((nul = memchr(dn, '\0', kl)) != NULL) kl = (size_t)(nul - dn), spelt = 1;
    while (kl > 0 && *name == ' ') name++, kl--, spelt = 1;
  }
  for (unsigned k = 0; k < P_COUNT; k++) {
    if (kl != param_names[k].len || strncasecmp(name, param_names[k].name, kl) != 0) continue;
    if (spelt || memcmp(name, param_names[k].name, kl) != 0) { /* another case or spelling */
      if (!out[k].vfound) {
        out[k].vfound = 1;
        out[k].vp = vp;
        out[k].vn = vn;
      } else if (!same_value(out[k].vp, out[k].vn, vp, vn)) {
        out[k].conflict = 1;
      }
    } else if (!out[k].found) {
      out[k].found = 1;
      out[k].p = vp;
      out[k].n = vn;
    } else if (!same_value(out[k].p, out[k].n, vp, vn)) {
      out[k].conflict = 1;
    }
    return;
  }
}

/* One pass over an application/x-www-form-urlencoded string (a query or a
 * form body) that records the raw value of the first occurrence of each name
 * in param_names, and whether a later one differs. Names are compared
 * decoded. The name in another case or spelling is recorded apart (vp/vn):
 * it must hold the same value as the name itself in that place (a conflict
 * otherwise), and, where the name itself is absent, the value classified
 * (pick). Pairs are split at '&'; Rack 2, Perl's CGI.pm and Python before
 * 3.9.2 split at ';' too, so each piece after a ';' is such a spelling
 * ("x=1;AccessKeyId=AKS"). */
static void scan_params(const char *s, size_t n, struct span *out) {
  size_t i = 0;
  while (i < n) {
    const char *amp = memchr(s + i, '&', n - i);
    size_t e = amp ? (size_t)(amp - s) : n;
    scan_pair(s + i, e - i, out, 0);
    const char *semi = memchr(s + i, ';', e - i);
    while (semi != NULL) {
      const char *piece = semi + 1;
      semi = memchr(piece, ';', (size_t)(s + e - piece));
      scan_pair(piece, (size_t)((semi ? semi : s + e) - piece), out, 1);
    }
    i = e + 1;
  }
  for (unsigned k = 0; k < P_COUNT; k++)
    if (out[k].found && out[k].vfound && !same_value(out[k].p, out[k].n, out[k].vp, out[k].vn)) out[k].conflict = 1;
}

static int is_hex(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* Whether every '%' in p[0..n) starts a complete %XX escape. */
static int escapes_ok(const char *p, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (p[i] == '%') {
      if (i + 2 >= n || !is_hex(p[i + 1]) || !is_hex(p[i + 2])) return 0;
      i += 2;
    }
  return 1;
}

/* Control bytes (NUL, CR, LF...) never belong in an Action, key, Service or
 * region; refusing them keeps them out of Redis keys and log lines. */
static int has_ctl(const char *p, size_t n) {
  for (size_t i = 0; i < n; i++)
    if ((unsigned char)p[i] < 0x20 || p[i] == 0x7f) return 1;
  return 0;
}

/* Percent-decodes a raw value into out (cap bytes, NUL-terminated). Returns
 * SL_CLASS_OK, SL_CLASS_BAD_ENCODING or SL_CLASS_FIELD_TOO_LONG; on error
 * *len is 0 and out is empty. */
static enum sl_class_err decode_into(const struct span *v, char *out, size_t cap, uint8_t *len) {
  int r = sl_http_urldecode(v->p, v->n, out, cap - 1);
  enum sl_class_err e = SL_CLASS_OK;
  if (r < 0)
    e = escapes_ok(v->p, v->n) ? SL_CLASS_FIELD_TOO_LONG : SL_CLASS_BAD_ENCODING;
  else if (has_ctl(out, (size_t)r))
    e = SL_CLASS_BAD_ENCODING;
  if (e != SL_CLASS_OK) r = 0;
  out[r] = '\0';
  *len = (uint8_t)r;
  return e;
}

/* Copies a header-borne value as it is (no decoding). Same results as
 * decode_into. */
static enum sl_class_err copy_into(const char *p, size_t n, char *out, size_t cap, uint8_t *len) {
  enum sl_class_err e = SL_CLASS_OK;
  if (n > cap - 1)
    e = SL_CLASS_FIELD_TOO_LONG;
  else if (has_ctl(p, n))
    e = SL_CLASS_BAD_ENCODING;
  if (e != SL_CLASS_OK) n = 0;
  if (n > 0) memcpy(out, p, n);
  out[n] = '\0';
  *len = (uint8_t)n;
  return e;
}

static int is_ows(char c) { return c == ' ' || c == '\t'; }

static void trim(const char **p, size_t *n) {
  while (*n > 0 && is_ows(**p)) (*p)++, (*n)--;
  while (*n > 0 && is_ows((*p)[*n - 1])) (*n)--;
}

/* Finds the Credential of "ACS3-HMAC-SHA256 Credential=AK,SignedHeaders=...,
 * Signature=..." (V3 signature). Every ACS3- algorithm counts (the V3
 * signature also has ACS3-HMAC-SM3 and ACS3-RSA-SHA256: a backend
 * authenticates those too, so their Credential is an identity like any
 * other). The scheme and parameter name match case-insensitively (RFC 9110
 * 11.1), and whitespace may stand around the '=' (BWS in RFC 9110 11.2's
 * auth-param: "Credential = AK" is a Credential to a backend that follows
 * it); the value ends at ',', whitespace or the end. Returns 1 and the
 * value (possibly empty), 0 when there is none, -1 when Credential is given
 * twice with different values. */
static int v3_credential(const char *p, size_t n, const char **v, size_t *vn) {
  size_t i = 0, s;
  int found = 0;
  while (i < n && is_ows(p[i])) i++;
  s = i;
  while (i < n && !is_ows(p[i])) i++;
  if (i - s <= 5 || !SL_IEQ(p + s, 5, "acs3-")) return 0;
  while (i < n) {
    while (i < n && (is_ows(p[i]) || p[i] == ',')) i++;
    s = i;
    while (i < n && p[i] != '=' && p[i] != ',' && !is_ows(p[i])) i++;
    size_t name_end = i;
    while (i < n && is_ows(p[i])) i++;
    if (i < n && p[i] == '=' && SL_IEQ(p + s, name_end - s, "credential")) {
      for (i++; i < n && is_ows(p[i]); i++) continue;
      s = i;
      while (i < n && p[i] != ',' && !is_ows(p[i])) i++;
      if (found && (*vn != i - s || memcmp(*v, p + s, i - s) != 0)) return -1;
      *v = p + s;
      *vn = i - s;
      found = 1;
      continue;
    }
    while (i < n && p[i] != ',') i++;
  }
  return found;
}

static int is_label_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-';
}

/* Finds <region> in a Host "green-cip[-vpc].<region>.aliyuncs.com[.][:port]"
 * (case-insensitive). Returns 1 and the region, or 0 for any other host. */
static int host_region(const char *h, size_t n, const char **r, size_t *rn) {
  static const char suffix[] = ".aliyuncs.com";
  const size_t sl = sizeof(suffix) - 1;
  const char *colon;
  size_t pl;
  trim(&h, &n);
  if ((colon = memchr(h, ':', n)) != NULL) n = (size_t)(colon - h);
  if (n > 0 && h[n - 1] == '.') n--; /* absolute form "...aliyuncs.com." */
  if (n >= 10 && SL_IEQ(h, 10, "green-cip."))
    pl = 10;
  else if (n >= 14 && SL_IEQ(h, 14, "green-cip-vpc."))
    pl = 14;
  else
    return 0;
  if (n < pl + 1 + sl || !SL_IEQ(h + n - sl, sl, suffix)) return 0;
  *r = h + pl;
  *rn = n - pl - sl;
  for (size_t i = 0; i < *rn; i++)
    if (!is_label_char((*r)[i])) return 0;
  return 1;
}

/* Whether ct[0..n) holds the lowercase `needle`, ignoring case. */
static int holds_ci(const char *ct, size_t n, const char *needle) {
  size_t ln = strlen(needle);
  for (size_t i = 0; i + ln <= n; i++)
    if (sl_http_ieq(ct + i, ln, needle, ln)) return 1;
  return 0;
}

/* Whether a Content-Type names application/x-www-form-urlencoded, parameters
 * such as "; charset=UTF-8" allowed: 1 when it does, 0 when it names another
 * type, -1 when the form type appears in it otherwise ("...urlencodedX",
 * "application/x-www-form-urlencoded, text/plain"): a backend could read
 * that body as a form, and its Service, where sluice would not. -1 too for
 * multipart/form-data: its fields are parameters to a backend as much as a
 * form's (Go's FormValue, servlets' getParameter and PHP read them, Go's
 * before the query's), AccessKeyId and Service included, and sluice does
 * not read them. */
static int is_form(const char *ct, size_t n) {
  static const char form[] = "application/x-www-form-urlencoded";
  const char *semi, *p = ct;
  size_t pn = n;
  if (ct == NULL) return 0;
  if ((semi = memchr(p, ';', pn)) != NULL) pn = (size_t)(semi - p);
  trim(&p, &pn);
  if (SL_IEQ(p, pn, form)) return 1;
  if (holds_ci(ct, n, form + 12) || holds_ci(ct, n, "form-data")) return -1;
  return 0;
}

/* Whether the comma-separated list holds region r (already lowercase). */
static int region_known(const char *list, const char *r, size_t rn) {
  const char *p = list;
  while (*p) {
    const char *comma = strchr(p, ',');
    size_t n = comma ? (size_t)(comma - p) : strlen(p);
    const char *q = p;
    size_t qn = n;
    trim(&q, &qn);
    if (qn == rn && rn > 0 && sl_http_ieq(q, qn, r, rn)) return 1;
    if (!comma) break;
    p = comma + 1;
  }
  return 0;
}

static enum sl_class_err region_of(const struct sl_class_input *in, struct sl_class *out) {
  const char *r = NULL;
  size_t rn = 0;
  int from_host = in->host != NULL && host_region(in->host, in->host_len, &r, &rn);
  if (!from_host) {
    r = in->default_region;
    rn = 0; /* host_region may have set it before it failed */
    if (r != NULL)
      while (rn < sizeof(out->region) && r[rn] != '\0') rn++;
  }
  enum sl_class_err e = copy_into(r, rn, out->region, sizeof(out->region), &out->region_len);
  for (size_t i = 0; i < out->region_len; i++) /* region names are lowercase */
    if (out->region[i] >= 'A' && out->region[i] <= 'Z') out->region[i] = (char)(out->region[i] | 0x20);
  /* Only the service's regions count: each other name would be a bucket
   * (and a metering key) of its own. */
  if (e == SL_CLASS_OK && from_host && in->regions != NULL &&
      !region_known(in->regions, out->region, out->region_len)) {
    out->region[0] = '\0';
    out->region_len = 0;
    e = SL_CLASS_UNKNOWN_REGION;
  }
  return e;
}

/* Whether a raw value decodes to exactly v[0..vn). */
static int decodes_to(const struct span *s, const char *v, size_t vn) {
  char d[256];
  int n = sl_http_urldecode(s->p, s->n, d, sizeof(d));
  return n >= 0 && (size_t)n == vn && memcmp(d, v, vn) == 0;
}

/* Decodes the value found in the first place that has one (q, then f, then
 * plain) into out; with `agree`, every other place that has one must hold
 * the same value; a place with the name only in another case must hold it
 * too, `agree` or not. */
static enum sl_class_err pick(const struct span *q, const struct span *f, const char *plain, size_t plain_n,
                              int agree, char *out, size_t cap, uint8_t *len) {
  enum sl_class_err e = SL_CLASS_OK;
  *len = 0;
  out[0] = '\0';
  if ((q && q->conflict) || (f && f->conflict)) return SL_CLASS_CONFLICT;
  /* The first non-empty place wins; every later non-empty one must match
   * it (the winner is not compared with itself). */
  int has_q = q && q->found && q->n > 0, has_f = f && f->found && f->n > 0, has_p = plain && plain_n > 0;
  if (has_q)
    e = decode_into(q, out, cap, len);
  else if (has_f)
    e = decode_into(f, out, cap, len);
  else if (has_p)
    e = copy_into(plain, plain_n, out, cap, len);
  else
    return SL_CLASS_OK; /* nothing to compare a name in another case with: it names nothing */
  if (e != SL_CLASS_OK) return e;
  /* A place with the name only in another case: that value must be this
   * one (an empty one counts as absent, as across places). */
  const struct span *places[2] = {q, f};
  for (int k = 0; k < 2; k++) {
    const struct span *x = places[k];
    if (x && !x->found && x->vfound && x->vn > 0) {
      struct span t = {.p = x->vp, .n = x->vn, .found = 1};
      if (!decodes_to(&t, out, *len)) return SL_CLASS_CONFLICT;
    }
  }
  if (!agree) return e;
  if (has_q && has_f && !decodes_to(f, out, *len)) return SL_CLASS_CONFLICT;
  if (has_p && (plain_n != *len || memcmp(plain, out, plain_n) != 0)) return SL_CLASS_CONFLICT;
  return SL_CLASS_OK;
}

enum sl_class_err sl_classify(const struct sl_class_input *in, struct sl_class *out) {
  struct span q[P_COUNT] = {{0}}, f[P_COUNT] = {{0}};
  enum sl_class_err err = SL_CLASS_OK, e;
  const char *qs = NULL, *v = NULL;
  size_t qn = 0, vn = 0;
  int action_ok, service_ok;

  out->action[0] = out->ak[0] = out->service[0] = out->region[0] = '\0';
  out->action_len = out->ak_len = out->service_len = out->region_len = 0;
  out->feature = -1;
  out->tier = SL_TIER_BASELINE;

  /* The query is what follows the first '?', up to a '#'. */
  if (in->url != NULL && (qs = memchr(in->url, '?', in->url_len)) != NULL) {
    qs++;
    qn = in->url_len - (size_t)(qs - in->url);
    if ((v = memchr(qs, '#', qn)) != NULL) qn = (size_t)(v - qs);
    scan_params(qs, qn, q);
  }
  /* Most Actions carry Service in the form body; the query is the fallback.
   * A form body can carry Action and AccessKeyId too (RPC style). */
  int form = is_form(in->content_type, in->ct_len);
  /* A coded (gzip...) form body is not read: its bytes are not the fields a
   * backend that decodes it would read (refused below). */
  if (in->body_len > 0 && form > 0 && !in->body_coded) scan_params(in->body, in->body_len, f);

  v = in->acs_action;
  vn = v ? in->acs_action_len : 0;
  trim(&v, &vn);
  e = pick(&q[P_ACTION], &f[P_ACTION], v, vn, 1, out->action, sizeof(out->action), &out->action_len);
  if (e == SL_CLASS_OK && out->action_len == 0) e = SL_CLASS_NO_ACTION;
  action_ok = e == SL_CLASS_OK;
  err = e;

  v = NULL;
  vn = 0;
  int cred = in->authorization != NULL ? v3_credential(in->authorization, in->auth_len, &v, &vn) : 0;
  if (cred <= 0) v = NULL;
  e = cred < 0 ? SL_CLASS_CONFLICT : pick(&q[P_AK], &f[P_AK], v, vn, 1, out->ak, sizeof(out->ak), &out->ak_len);
  if (err == SL_CLASS_OK) err = e;

  e = region_of(in, out);
  if (err == SL_CLASS_OK) err = e;

  /* SPEC 3: the form body's Service, else the query's (not a conflict). */
  e = pick(&f[P_SERVICE], &q[P_SERVICE], NULL, 0, 0, out->service, sizeof(out->service), &out->service_len);
  service_ok = e == SL_CLASS_OK;
  if (err == SL_CLASS_OK) err = e;

  /* A Content-Type that may or may not be a form: where Service comes
   * from is not certain. */
  if (form < 0 && err == SL_CLASS_OK) err = SL_CLASS_BAD_CONTENT_TYPE;
  if (form > 0 && in->body_coded && err == SL_CLASS_OK) err = SL_CLASS_CODED_FORM;

  if (action_ok && service_ok) {
    int billable = 1;
    out->feature = sl_catalog_lookup(out->action, out->action_len, out->service, out->service_len, &billable);
    out->billable = (uint8_t)billable;
    if (out->feature >= 0)
      out->tier = sl_features[out->feature].tier;
    else if (err == SL_CLASS_OK)
      err = SL_CLASS_UNKNOWN_ACTION;
  }
  return err;
}

const char *sl_class_err_code(enum sl_class_err e) {
  switch (e) {
    case SL_CLASS_OK: return "OK";
    case SL_CLASS_NO_ACTION: return "MissingAction";
    case SL_CLASS_UNKNOWN_ACTION: return "InvalidAction.NotFound";
    case SL_CLASS_BAD_ENCODING: return "InvalidParameter";
    case SL_CLASS_FIELD_TOO_LONG: return "InvalidParameter";
    case SL_CLASS_CONFLICT: return "InvalidParameter";
    case SL_CLASS_UNKNOWN_REGION: return "InvalidRegionId";
    case SL_CLASS_BAD_CONTENT_TYPE: return "InvalidParameter";
    case SL_CLASS_CODED_FORM: return "InvalidParameter";
  }
  return "InvalidParameter";
}

const char *sl_class_err_message(enum sl_class_err e) {
  switch (e) {
    case SL_CLASS_OK: return "";
    case SL_CLASS_NO_ACTION:
      return "The request names no Action: give the query parameter Action or the header x-acs-action.";
    case SL_CLASS_UNKNOWN_ACTION: return "Specified api is not found, please check your url and method.";
    case SL_CLASS_BAD_ENCODING:
      return "A value of Action, AccessKeyId or Service is badly URL-encoded or holds control characters.";
    case SL_CLASS_FIELD_TOO_LONG:
      return "A value of Action, AccessKeyId, Service or the region is longer than the API allows.";
    case SL_CLASS_CONFLICT:
      return "The request gives AccessKeyId, Action or Service more than once with different values.";
    case SL_CLASS_UNKNOWN_REGION: return "The region named by the Host header is not served here.";
    case SL_CLASS_BAD_CONTENT_TYPE:
      return "The Content-Type is multipart/form-data, or names application/x-www-form-urlencoded in a form that is "
             "not a single media type.";
    case SL_CLASS_CODED_FORM:
      return "A form body (application/x-www-form-urlencoded) must not have a Content-Encoding: its Service is read as sent.";
  }
  return "The request could not be classified.";
}
