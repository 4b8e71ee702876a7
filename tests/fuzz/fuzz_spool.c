/* Fuzzes the metering spool reader (proxy/flusher.c): the record walk that
 * replays a spool at start (sl_spool_scan), the batch, delta and ack decoders, and
 * the names a decoded key is sent to Redis under. Any bytes are either
 * taken as whole records or cut off at the first that is not one; never a
 * crash, an over-read or a leak. A batch that decodes encodes back to
 * exactly its bytes (decode takes nothing encode would not write), and its
 * keys hold the bounds the flusher relies on. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "flusher.h"
#include "fuzz.h"

struct walk {
  unsigned records, batches, acks;
};

static int on_record(void *arg, int type, const unsigned char *p, uint32_t len) {
  struct walk *w = arg;
  w->records++;
  /* the payload handed over is a private copy of exactly len bytes */
  unsigned char *copy = (unsigned char *)fz_dup(p, len);
  int rc = 0;
  if (type == SL_SPOOL_REC_BATCH || type == SL_SPOOL_REC_DELTA || type == SL_SPOOL_REC_BATCH_V1) {
    int delta = type == SL_SPOOL_REC_DELTA, v1 = type == SL_SPOOL_REC_BATCH_V1;
    struct sl_batch *b = delta ? sl_spool_decode_delta(copy, len)
                         : v1  ? sl_spool_decode_batch_v1(copy, len)
                               : sl_spool_decode_batch(copy, len);
    if (!b) {
      rc = -1;
    } else {
      w->batches++;
      FZ_CHECK(b->n <= SL_BATCH_MAX && b->id_len > 0 && b->id_len < sizeof(b->id));
      for (uint32_t i = 0; i < b->n; i++) {
        const struct sl_meter_key *k = &b->e[i].k;
        FZ_CHECK(k->uid_len <= SL_UID_MAX && k->region_len <= SL_REGION_MAX);
        const char *f, *t, *o;
        sl_flusher_key_names(k, &f, &t, &o);
        FZ_CHECK(f && t && o && strcmp(o, "-") != 0);
      }
      for (uint32_t i = 0; i < b->n; i++) /* a service only on billed keys */
        FZ_CHECK(b->e[i].k.service_len <= SL_METER_SERVICE_MAX && b->e[i].k.billable <= 1 &&
                 (!b->e[i].k.service_len || (b->e[i].k.outcome == SL_OUT_OK && b->e[i].k.billable)));
      if (!v1) { /* v1 is read, never written: v2 encodes back to exactly its bytes */
        size_t sz = delta ? sl_spool_delta_size(b) : sl_spool_batch_size(b);
        unsigned char *out = malloc(sz);
        if (!out) abort();
        FZ_CHECK((delta ? sl_spool_encode_delta(b, out) : sl_spool_encode_batch(b, out)) == sz);
        FZ_CHECK(out[4] == type);
        FZ_CHECK(sz == 16 + (size_t)len && memcmp(out + 16, copy, len) == 0);
        free(out);
      }
      free(b);
    }
  } else {
    FZ_CHECK(type == SL_SPOOL_REC_ACK);
    const unsigned char *id;
    uint8_t idl;
    if (sl_spool_decode_ack(copy, len, &id, &idl) != 0) {
      rc = -1;
    } else {
      w->acks++;
      FZ_CHECK(idl > 0 && id == copy + 1 && (size_t)idl + 1 == len);
    }
  }
  free(copy);
  return rc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  unsigned char *img = (unsigned char *)fz_dup(data, size);
  struct walk w = {0, 0, 0};
  size_t off = sl_spool_scan(img, size, on_record, &w);
  FZ_CHECK(off <= size);
  FZ_CHECK(w.batches + w.acks <= w.records);
  /* the walk stops where it stopped: what it took is taken again alike */
  struct walk again = {0, 0, 0};
  FZ_CHECK(sl_spool_scan(img, off, on_record, &again) == off);
  FZ_CHECK(again.batches == w.batches && again.acks == w.acks);
  free(img);
  return 0;
}
