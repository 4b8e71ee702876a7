/* The metering spool: an append-only local file of the batches made and
 * the acks of those Redis applied, fsync'd every round, so that a restart
 * sends again what Redis had not taken (the flusher's queue, flusher.h).
 * Records: [magic u32][type u8][pad 3][payload length u32][crc32 u32]
 * [payload], native byte order (the spool never leaves its host). A torn
 * record at the end (a crash mid-write) is cut off at start.
 *
 * The encoders, decoders and the record walk are exposed for the unit test
 * and the fuzz harness (tests/fuzz/fuzz_spool.c). One thread at a time (the
 * flusher's, or main's before that thread starts). */
#ifndef SL_SPOOL_H
#define SL_SPOOL_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "meter.h"

#define SL_BATCH_MAX 1000 /* keys per batch (one EVAL) */

struct sl_batch_entry {
  struct sl_meter_key k;
  uint64_t count;
  uint8_t sadd_done; /* scratch of the flusher while it names the batch's SADD members */
};

struct sl_batch {
  struct sl_batch *next;
  uint64_t created_ms;
  uint32_t n;
  uint8_t id_len;
  uint8_t spooled;
  uint8_t replayed; /* read back from the spool at start (perhaps written by an earlier version) */
  char id[96];
  struct sl_batch_entry e[];
};

/* Record types. Keys are written in format v2 (with the billable flag and
 * the service); v1 batch records, as earlier versions wrote them, are
 * still read (replayed after an upgrade). */
#define SL_SPOOL_REC_BATCH_V1 1
#define SL_SPOOL_REC_ACK 2
#define SL_SPOOL_REC_BATCH 4
/* Counts gathered in a round that are not in a batch yet (the Redis
 * interval is longer than the spool interval): same payload as a batch,
 * id "d". A batch record covers every delta record before it (the batches
 * made at a flush hold everything gathered until then). */
#define SL_SPOOL_REC_DELTA 3

struct sl_spool {
  int fd; /* -1: none */
  char path[512];
  uint64_t bytes, max;
  int dirty; /* written since the last sync */
  uint64_t full_said_ms;
  /* the owner's /metrics (flusher.h), written by the owner's thread */
  _Atomic uint64_t *st_bytes, *st_full, *st_errors;
};

/* A batch for n keys (zeroed; the caller frees it). */
struct sl_batch *sl_batch_new(uint32_t n);

/* Opens (or creates, 0600) dir/meter.spool and walks it: on_record(arg,
 * type, payload, length) for each whole record, in order, until it returns
 * non-zero; what follows the last record taken is cut off. s->max and the
 * st_ pointers must be set. Returns 0, or a negative errno with a message
 * in err; s->fd is then -1. */
int sl_spool_open(struct sl_spool *s, const char *dir,
                  int (*on_record)(void *arg, int type, const unsigned char *payload, uint32_t plen), void *arg,
                  char *err, size_t errlen);
void sl_spool_close(struct sl_spool *s);
/* Appends batch b and marks it spooled, unless the spool is at its bound
 * (then said in the log, at most once a minute, and b stays in memory
 * only). */
void sl_spool_batch(struct sl_spool *s, struct sl_batch *b);
/* Appends a delta record (b's id is ignored). Returns 0, or -1 when the
 * spool is at its bound (said as for batches). */
int sl_spool_delta(struct sl_spool *s, const struct sl_batch *b);
/* Replaces the whole file by the records in buf[0..n) (a new file written,
 * synced and renamed over the old one, so that a crash leaves either).
 * Returns 0 or -1 (the old file stays). */
int sl_spool_rewrite(struct sl_spool *s, const unsigned char *buf, size_t n);
/* Appends the ack of a spooled batch that Redis applied. */
void sl_spool_ack(struct sl_spool *s, const struct sl_batch *b);
/* fdatasync if anything was written since the last one. */
void sl_spool_sync(struct sl_spool *s);
/* Starts the file afresh once it is big enough; only when every batch in
 * it is acked (the caller's queue is empty). */
void sl_spool_compact(struct sl_spool *s);
/* 1 when the file is big enough to be started afresh. */
int sl_spool_should_compact(const struct sl_spool *s);

/* Spool record encoding, exposed for tests. Returns the bytes written into
 * out (which must hold sl_spool_batch_size(b)). */
size_t sl_spool_batch_size(const struct sl_batch *b);
size_t sl_spool_encode_batch(const struct sl_batch *b, unsigned char *out);
size_t sl_spool_delta_size(const struct sl_batch *b); /* b's id is not written: "d" is */
size_t sl_spool_encode_delta(const struct sl_batch *b, unsigned char *out); /* sl_spool_delta_size(b) bytes */
uint32_t sl_crc32(const void *p, size_t n);
/* Decodes a batch record's payload (after the 16-byte header); NULL when
 * malformed (anything encode would not write). The caller frees the batch. */
struct sl_batch *sl_spool_decode_batch(const unsigned char *payload, size_t len);
/* The same for a v1 batch record (SL_SPOOL_REC_BATCH_V1): billable 1, no service. */
struct sl_batch *sl_spool_decode_batch_v1(const unsigned char *payload, size_t len);
/* Decodes a delta record's payload (id "d"); NULL when malformed. */
struct sl_batch *sl_spool_decode_delta(const unsigned char *payload, size_t len);
/* Decodes an ack record's payload: 0 with the acked batch's id (pointing
 * into payload), or -1 when malformed. */
int sl_spool_decode_ack(const unsigned char *payload, size_t len, const unsigned char **id, uint8_t *id_len);
/* Walks the records of a spool image data[0..len): calls on_record(arg,
 * type, payload, payload length) for each whole record whose framing and
 * CRC hold, in order, until one does not or on_record returns non-zero.
 * Returns the offset just past the last record taken (the rest is cut off
 * at start as a torn write). */
size_t sl_spool_scan(const unsigned char *data, size_t len,
                     int (*on_record)(void *arg, int type, const unsigned char *payload, uint32_t plen), void *arg);

#endif
