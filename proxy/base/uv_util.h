/* Small libuv helpers every thread uses. */
#ifndef SL_UV_UTIL_H
#define SL_UV_UTIL_H

#include <sched.h>
#include <stdint.h>
#include <uv.h>

/* Closes (with uv_close) a handle unless it is already closing. */
static inline void sl__close(uv_handle_t *h, uv_close_cb cb) {
  if (!uv_is_closing(h)) uv_close(h, cb);
}

/* Monotonic milliseconds, from any thread (uv_now is per loop). */
static inline uint64_t sl_mono_ms(void) { return uv_hrtime() / 1000000; }

/* Starts a thread named `name` (15 bytes shown) that runs `loop` until it
 * has nothing left to do: background work (the directory, the flusher, the
 * fleet sync), --background-nice above the process's nice value (at most
 * 19) and on the CPUs sl_background_configure set. Returns 0 or a negative errno (uv_thread_create's). */
int sl_loop_thread_start(uv_thread_t *t, uv_loop_t *loop, const char *name);

#define SL_BACKGROUND_NICE_DEFAULT 5
/* --background-nice and --background-cpus (NULL: the process's CPUs), for
 * the background threads started after this call. Main thread, once. */
void sl_background_configure(int nice_value, const cpu_set_t *cpus);

/* Parses a CPU list as taskset -c writes it ("3", "0-3", "1,4-5") into
 * out. Returns 0, or -1 when it is malformed or names a CPU >= ncpu. */
int sl_cpu_list_parse(const char *s, cpu_set_t *out, unsigned ncpu);

#endif
