#include "uv_util.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Set once by main before any background thread starts, read by each at
 * its start: no lock needed. */
static int bg_nice = SL_BACKGROUND_NICE_DEFAULT;
static cpu_set_t bg_cpus;
static int bg_pinned;

void sl_background_configure(int nice_value, const cpu_set_t *cpus) {
  bg_nice = nice_value;
  bg_pinned = cpus != NULL;
  if (cpus) bg_cpus = *cpus;
}

struct loop_thread {
  uv_loop_t *loop;
  char name[16];
};

static void loop_thread_main(void *arg) {
  struct loop_thread lt = *(struct loop_thread *)arg;
  free(arg);
  (void)pthread_setname_np(pthread_self(), lt.name); /* top -H, perf */
  /* Background work (the flusher, the directory, the fleet sync) must not
   * take the workers' CPU in bursts (p99): it runs at a higher nice value,
   * and on --background-cpus where the operator keeps it off the workers'
   * CPUs. Best effort, said once: a refusal leaves the thread as it was. */
  pid_t tid = (pid_t)syscall(SYS_gettid);
  /* Relative to the process's own nice value (inherited): a sluice started
   * under nice 10 keeps its background below its workers, not above. */
  errno = 0;
  int base = getpriority(PRIO_PROCESS, (id_t)tid);
  int target = (errno ? 0 : base) + bg_nice;
  if (target > 19) target = 19;
  if (bg_nice && !errno && target != base && setpriority(PRIO_PROCESS, (id_t)tid, target) != 0)
    fprintf(stderr, "sluice: %s: --background-nice %d refused: %s\n", lt.name, bg_nice, strerror(errno));
  if (bg_pinned && sched_setaffinity(tid, sizeof(bg_cpus), &bg_cpus) != 0)
    fprintf(stderr, "sluice: %s: --background-cpus refused: %s\n", lt.name, strerror(errno));
  uv_run(lt.loop, UV_RUN_DEFAULT);
}

int sl_loop_thread_start(uv_thread_t *t, uv_loop_t *loop, const char *name) {
  struct loop_thread *lt = malloc(sizeof(*lt));
  if (!lt) return UV_ENOMEM;
  lt->loop = loop;
  snprintf(lt->name, sizeof(lt->name), "%s", name);
  int r = uv_thread_create(t, loop_thread_main, lt);
  if (r != 0) free(lt);
  return r;
}

int sl_cpu_list_parse(const char *s, cpu_set_t *out, unsigned ncpu) {
  CPU_ZERO(out);
  if (!*s) return -1;
  for (const char *p = s;;) {
    char *end;
    if (*p < '0' || *p > '9') return -1;
    unsigned long lo = strtoul(p, &end, 10), hi = lo;
    p = end;
    if (*p == '-') {
      if (p[1] < '0' || p[1] > '9') return -1;
      hi = strtoul(p + 1, &end, 10);
      p = end;
    }
    if (lo > hi || hi >= ncpu || hi >= CPU_SETSIZE) return -1;
    for (unsigned long c = lo; c <= hi; c++) CPU_SET(c, out);
    if (!*p) return 0;
    if (*p++ != ',') return -1;
  }
}
