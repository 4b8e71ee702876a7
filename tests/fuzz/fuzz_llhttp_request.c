/* Fuzzes the request side as sluice drives it: strict llhttp over a stream
 * of pipelined requests (fuzz_llhttp.h), each complete request classified
 * (sl_classify) from the Host, Authorization, x-acs-action and Content-Type
 * it carries and its de-chunked body. A placeholder until the request
 * parser module (proxy/reqparse.h) gets a harness of its own.
 *
 * Input: one byte that seeds the read sizes (0: all at once), then the
 * stream. */
#include "catalog.h"
#include "classify.h"
#include "fuzz_llhttp.h"

static llhttp_settings_t settings;

static int on_headers_complete(llhttp_t *p) { return fz_check_head(p, 1); }

static int on_message_complete(llhttp_t *p) {
  (void)p;
  return HPE_PAUSED; /* one request at a time, as sluice answers them in order */
}

/* The last header of a kind, as sluice's connection keeps it. */
static const struct fz_hdr *last_of(const struct fz_msg *m, enum sl_hdr_kind k) {
  const struct fz_hdr *h = NULL;
  for (unsigned i = 0; i < m->n; i++)
    if (m->h[i].kind == k) h = &m->h[i];
  return h;
}

static int request_done(llhttp_t *p, struct fz_msg *m) {
  fz_check_framing(m, 1);
  if (m->has_cl) FZ_CHECK(m->body.len == m->content_length);
  if (!m->has_cl && !(m->flags & F_CHUNKED)) FZ_CHECK(m->body.len == 0); /* a request has no close-delimited body */

  const struct fz_hdr *host = last_of(m, SL_H_HOST), *auth = last_of(m, SL_H_AUTHORIZATION),
                      *act = last_of(m, SL_H_X_ACS_ACTION), *ct = last_of(m, SL_H_CONTENT_TYPE);
#define VAL(h) ((h) ? m->base + (h)->value.off : NULL)
#define VLEN(h) ((h) ? (h)->value.len : 0)
  struct sl_class_input in = {
      .url = m->base + m->url.off, .url_len = m->url.len,
      .host = VAL(host), .host_len = VLEN(host),
      .authorization = VAL(auth), .auth_len = VLEN(auth),
      .acs_action = VAL(act), .acs_action_len = VLEN(act),
      .content_type = VAL(ct), .ct_len = VLEN(ct),
      .body = m->body.len ? m->body.data : NULL, .body_len = m->body.len,
      .default_region = "cn-shanghai",
  };
#undef VAL
#undef VLEN
  struct sl_class c;
  enum sl_class_err e = sl_classify(&in, &c);
  FZ_CHECK(e >= SL_CLASS_OK);
  FZ_CHECK(c.action_len < sizeof(c.action) && c.ak_len < sizeof(c.ak) && c.service_len < sizeof(c.service) &&
           c.region_len < sizeof(c.region));
  FZ_CHECK(c.feature >= -1 && c.feature < (int)sl_nfeatures);
  llhttp_resume(p);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  if (settings.on_message_complete == NULL) {
    fz_settings(&settings);
    settings.on_headers_complete = on_headers_complete;
    settings.on_message_complete = on_message_complete;
  }
  static struct fz_msg m; /* 2 KiB of spans: not on the stack */
  memset(&m, 0, sizeof(m));
  llhttp_t p;
  llhttp_init(&p, HTTP_REQUEST, &settings);
  p.data = &m;
  (void)fz_run(&p, &m, data + 1, size - 1, data[0], 0, request_done);
  return 0;
}
