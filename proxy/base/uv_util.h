/* Small libuv helpers every thread uses. */
#ifndef SL_UV_UTIL_H
#define SL_UV_UTIL_H

#include <stdint.h>
#include <uv.h>

/* Closes (with uv_close) a handle unless it is already closing. */
static inline void sl__close(uv_handle_t *h, uv_close_cb cb) {
  if (!uv_is_closing(h)) uv_close(h, cb);
}

/* Monotonic milliseconds, from any thread (uv_now is per loop). */
static inline uint64_t sl_mono_ms(void) { return uv_hrtime() / 1000000; }

/* Starts a thread that runs `loop` until it has nothing left to do, at a
 * lower priority (background work: the directory, the flusher). Returns 0
 * or a negative errno (uv_thread_create's). */
int sl_loop_thread_start(uv_thread_t *t, uv_loop_t *loop);

#endif
