#include "uv_util.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

static void loop_thread_main(void *arg) {
  /* Background work: under CFS a small nice value keeps it from taking the
   * workers' core in bursts (p99), without starving it. Best effort: a
   * refusal leaves the thread at the default priority. */
  (void)setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 5);
  uv_run(arg, UV_RUN_DEFAULT);
}

int sl_loop_thread_start(uv_thread_t *t, uv_loop_t *loop) { return uv_thread_create(t, loop_thread_main, loop); }
