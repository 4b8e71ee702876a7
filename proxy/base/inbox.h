/* A thread's inbox: a uv_async_t plus a word of message kinds. A sender
 * sets its kind's bit (fetch_or, release) and wakes the loop; the owner
 * takes every pending bit at once (exchange, acquire) and runs one handler
 * per bit. The data a message announces travels through the sender's own
 * atomics (docs/architecture.md lists them); the bit says which handler to
 * run, and the release/acquire pair on the word orders those stores before
 * the handler's loads. Any number of senders; one owner. */
#ifndef SL_INBOX_H
#define SL_INBOX_H

#include <stdatomic.h>
#include <stdint.h>
#include <uv.h>

/* The kinds of message a worker receives. */
enum {
  SL_MSG_CONFIG = 1u << 0,      /* main: a new configuration snapshot (w->next_cfg) */
  SL_MSG_DRAIN = 1u << 1,       /* main: SIGTERM, drain (w->drain) */
  SL_MSG_DIRECTORY = 1u << 2,   /* directory: lookups answered or a new snapshot */
  SL_MSG_METER_ROUND = 1u << 3, /* flusher: hand over the metering table (round_req) */
};

struct sl_inbox {
  uv_async_t async;
  _Atomic uint32_t pending;
};

/* Any thread. */
static inline void sl_inbox_post(struct sl_inbox *in, uint32_t kind) {
  /* release: what the sender stored before is visible to the handler that
   * takes this bit. */
  atomic_fetch_or_explicit(&in->pending, kind, memory_order_release);
  uv_async_send(&in->async);
}

/* The owner's async callback: every kind posted since the last take. */
static inline uint32_t sl_inbox_take(struct sl_inbox *in) {
  return atomic_exchange_explicit(&in->pending, 0, memory_order_acquire);
}

#endif
