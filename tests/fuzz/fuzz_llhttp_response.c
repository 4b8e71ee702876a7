/* Fuzzes the response side as sluice's upstream connections drive it: strict
 * llhttp over what an upstream sends (fuzz_llhttp.h). Interim 1xx responses
 * are dropped; a response to HEAD has no body whatever it says; after a
 * final response the parser is initialised again (the connection goes back
 * to the pool) and parses what follows; the end of the input is a close.
 *
 * The callbacks skip the body of every response that has none and refuse a
 * status that is not three digits: what sluice's upstream side must do on
 * top of llhttp 8.1 (docs/fuzzing.md, Findings).
 *
 * Input: one byte, whose bit 7 says the request was HEAD and whose low bits
 * seed the read sizes (0: all at once), then the stream. */
#include "fuzz_llhttp.h"

static llhttp_settings_t settings;

static int on_headers_complete(llhttp_t *p) {
  struct fz_msg *m = p->data;
  int code = llhttp_get_status_code(p);
  FZ_CHECK(code >= 0 && code <= 999);
  /* llhttp 8.1 takes a status of one to three digits ("HTTP/1.1 20 OK" is
   * status 20): refused, sluice writes the status as three digits. */
  if (code < 100) return -1;
  fz_check_head(p, 0);
  m->status_code = code;
  if (code < 200) m->headers_done = 0; /* interim: dropped, the final response's head follows */
  /* llhttp 8.1 skips the body only when told to (return 1): a 1xx, 204 or
   * 304 response has none whatever its Content-Length or Transfer-Encoding
   * say (RFC 9112 6.3), nor has the response to a HEAD. Without this, a 304
   * with the Content-Length of the representation waits for a body that
   * never comes, and a 204 or 1xx with one sends its bytes to the client
   * (docs/fuzzing.md, Findings). */
  return code < 200 || code == 204 || code == 304 || m->head_request;
}

static int on_message_complete(llhttp_t *p) {
  struct fz_msg *m = p->data;
  return m->status_code < 200 ? 0 : HPE_PAUSED;
}

static int response_done(llhttp_t *p, struct fz_msg *m) {
  fz_check_framing(m, 0);
  FZ_CHECK(m->status_code >= 200);
  if (m->head_request || m->status_code == 204 || m->status_code == 304) FZ_CHECK(m->body.len == 0);
  else if (m->has_cl) FZ_CHECK(m->body.len == m->content_length);
  unsigned head = m->head_request;
  void *data = p->data;
  llhttp_init(p, HTTP_RESPONSE, &settings); /* back in the pool: a fresh parser */
  p->data = data;
  m->head_request = head;
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  if (settings.on_message_complete == NULL) {
    fz_settings(&settings);
    settings.on_headers_complete = on_headers_complete;
    settings.on_message_complete = on_message_complete;
  }
  static struct fz_msg m;
  memset(&m, 0, sizeof(m));
  m.head_request = data[0] >> 7;
  llhttp_t p;
  llhttp_init(&p, HTTP_RESPONSE, &settings);
  p.data = &m;
  (void)fz_run(&p, &m, data + 1, size - 1, data[0] & 0x7f, 1, response_done);
  return 0;
}
