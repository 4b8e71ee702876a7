/* Fuzzes the request classifier (proxy/classify.h) through its public API.
 *
 * Input: one flag byte, then the fields url, host, authorization,
 * x-acs-action, content-type and the default region, each ended by '\n',
 * then the body (the rest, newlines included). Flag bit i set makes field i
 * absent (NULL) rather than present (possibly empty). Every field lives
 * in a heap block of its exact length so that ASan sees a read past it. */
#include <stdint.h>
#include <string.h>

#include "catalog.h"
#include "classify.h"
#include "fuzz.h"

enum { F_URL, F_HOST, F_AUTH, F_ACTION, F_CTYPE, F_REGION, F_COUNT };

/* The invariants of one decoded field: its length fits the buffer, it is
 * NUL-terminated there and holds no NUL or other control byte before. */
static void check_field(const char *f, size_t cap, uint8_t len) {
  FZ_CHECK(len < cap);
  FZ_CHECK(f[len] == '\0');
  FZ_CHECK(strlen(f) == len);
  FZ_CHECK(!fz_has_ctl(f, len));
}

static void check_class(const struct sl_class *c, enum sl_class_err e) {
  FZ_CHECK(e >= SL_CLASS_OK); /* the enum grows: no upper bound here */
  check_field(c->action, sizeof(c->action), c->action_len);
  check_field(c->ak, sizeof(c->ak), c->ak_len);
  check_field(c->service, sizeof(c->service), c->service_len);
  check_field(c->region, sizeof(c->region), c->region_len);
  for (size_t i = 0; i < c->region_len; i++) FZ_CHECK(!(c->region[i] >= 'A' && c->region[i] <= 'Z'));
  FZ_CHECK(c->feature >= -1 && c->feature < (int)sl_nfeatures);
  if (c->feature >= 0) {
    FZ_CHECK(c->tier == sl_features[c->feature].tier);
    FZ_CHECK(c->action_len > 0);
  } else {
    FZ_CHECK(c->tier == SL_TIER_BASELINE);
  }
  if (e == SL_CLASS_OK) FZ_CHECK(c->feature >= 0);
  if (e == SL_CLASS_NO_ACTION) FZ_CHECK(c->action_len == 0 && c->feature < 0);
  /* The error texts go into JSON unescaped. */
  const char *code = sl_class_err_code(e), *msg = sl_class_err_message(e);
  FZ_CHECK(code != NULL && msg != NULL && code[0] != '\0');
  FZ_CHECK(strpbrk(msg, "\"\\") == NULL && !fz_has_ctl(msg, strlen(msg)));
  FZ_CHECK((e == SL_CLASS_OK) == (msg[0] == '\0'));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  uint8_t flags = data[0];
  const uint8_t *p = data + 1, *f[F_COUNT];
  size_t n = size - 1, fn[F_COUNT];
  for (int i = 0; i < F_COUNT; i++) fz_field(&p, &n, '\n', &f[i], &fn[i]);

  char *url = (flags & 1u << F_URL) ? NULL : fz_dup(f[F_URL], fn[F_URL]);
  char *host = (flags & 1u << F_HOST) ? NULL : fz_dup(f[F_HOST], fn[F_HOST]);
  char *auth = (flags & 1u << F_AUTH) ? NULL : fz_dup(f[F_AUTH], fn[F_AUTH]);
  char *action = (flags & 1u << F_ACTION) ? NULL : fz_dup(f[F_ACTION], fn[F_ACTION]);
  char *ctype = (flags & 1u << F_CTYPE) ? NULL : fz_dup(f[F_CTYPE], fn[F_CTYPE]);
  char *region = NULL; /* NUL-terminated, as --region is */
  if (!(flags & 1u << F_REGION)) region = fz_cstr(f[F_REGION], fn[F_REGION]);
  char *body = n ? fz_dup(p, n) : NULL;

  /* Designated initializers: fields the struct may gain stay zero. */
  struct sl_class_input in = {
      .url = url, .url_len = url ? fn[F_URL] : 0,
      .host = host, .host_len = host ? fn[F_HOST] : 0,
      .authorization = auth, .auth_len = auth ? fn[F_AUTH] : 0,
      .acs_action = action, .acs_action_len = action ? fn[F_ACTION] : 0,
      .content_type = ctype, .ct_len = ctype ? fn[F_CTYPE] : 0,
      .body = body, .body_len = n,
      .default_region = region,
  };
  struct sl_class a, b;
  memset(&a, 0xa5, sizeof(a)); /* no field may depend on what `out` held */
  memset(&b, 0x5a, sizeof(b));
  enum sl_class_err ea = sl_classify(&in, &a);
  check_class(&a, ea);
  enum sl_class_err eb = sl_classify(&in, &b); /* a pure function: same answer */
  FZ_CHECK(ea == eb && a.feature == b.feature && a.tier == b.tier);
  FZ_CHECK(a.action_len == b.action_len && memcmp(a.action, b.action, a.action_len) == 0);
  FZ_CHECK(a.ak_len == b.ak_len && memcmp(a.ak, b.ak, a.ak_len) == 0);
  FZ_CHECK(a.service_len == b.service_len && memcmp(a.service, b.service, a.service_len) == 0);
  FZ_CHECK(a.region_len == b.region_len && memcmp(a.region, b.region, a.region_len) == 0);

  free(body);
  free(region);
  free(ctype);
  free(action);
  free(auth);
  free(host);
  free(url);
  return 0;
}
