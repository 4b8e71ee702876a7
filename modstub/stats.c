#include "modstub.h"

#include <stdlib.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "buf.h"

/* Interned Action names. Readers scan the first `count` names without a lock:
 * a name is fully written before `count` is raised with release order, and
 * readers load `count` with acquire order, so they never see a half-written
 * name. Writers serialise on `lock`. */
static struct {
  uv_mutex_t lock;
  atomic_uint count;
  char names[MS_MAX_ACTIONS][MS_ACTION_NAME];
  unsigned char lens[MS_MAX_ACTIONS];
} actions;

void ms_stats_init(void) {
  if (uv_mutex_init(&actions.lock) != 0)
    abort();
}

void ms_stats_fini(void) {
  uv_mutex_destroy(&actions.lock);
}

static int action_find(const char *name, size_t n, unsigned count) {
  unsigned i;

  for (i = 0; i < count; i++)
    if (actions.lens[i] == n && memcmp(actions.names[i], name, n) == 0)
      return (int)i;
  return -1;
}

int ms_action_index(const char *name, size_t n) {
  unsigned count;
  int i;

  if (n == 0 || n >= MS_ACTION_NAME)
    return -1;
  /* Acquire: pairs with the release below, so names[0..count) are complete. */
  count = atomic_load_explicit(&actions.count, memory_order_acquire);
  i = action_find(name, n, count);
  if (i >= 0)
    return i;
  uv_mutex_lock(&actions.lock);
  count = atomic_load_explicit(&actions.count, memory_order_relaxed);
  i = action_find(name, n, count);
  if (i < 0 && count < MS_MAX_ACTIONS) {
    memcpy(actions.names[count], name, n);
    actions.lens[count] = (unsigned char)n;
    i = (int)count;
    /* Release: publishes the name written above before the new count. */
    atomic_store_explicit(&actions.count, count + 1, memory_order_release);
  }
  uv_mutex_unlock(&actions.lock);
  return i;
}

/* The sum over workers of the counter at byte `off` in struct ms_stats. */
static uint64_t sum(size_t off) {
  uint64_t v = 0;
  unsigned w;

  for (w = 0; w < ms_nworkers; w++)
    v += atomic_load_explicit((atomic_uint_fast64_t *)((char *)&ms_workers[w].stats + off),
                              memory_order_relaxed);
  return v;
}

/* Appends "key":v (key JSON-escaped), after a comma unless *first. */
static void put_count(struct ms_buf *b, int *first, const char *key, size_t n, uint64_t v) {
  if (!*first)
    ms_buf_putc(b, ',');
  *first = 0;
  ms_buf_put_json_str(b, key, n);
  ms_buf_putc(b, ':');
  ms_buf_put_u64(b, v);
}

void ms_stats_json(struct ms_buf *b) {
  char key[8];
  unsigned i, count;
  uint64_t v;
  int first;

  ms_buf_lit(b, "{\"requests\":");
  ms_buf_put_u64(b, sum(offsetof(struct ms_stats, requests)));
  ms_buf_lit(b, ",\"connections\":");
  ms_buf_put_u64(b, sum(offsetof(struct ms_stats, connections)));
  ms_buf_lit(b, ",\"by_status\":{");
  first = 1;
  for (i = 0; i < MS_STATUS_SLOTS; i++) {
    v = sum(offsetof(struct ms_stats, by_status) + i * sizeof(atomic_uint_fast64_t));
    if (v != 0)
      put_count(b, &first, key, (size_t)snprintf(key, sizeof(key), "%u", i), v);
  }
  ms_buf_lit(b, "},\"by_action\":{");
  first = 1;
  count = atomic_load_explicit(&actions.count, memory_order_acquire);
  for (i = 0; i < count; i++) {
    v = sum(offsetof(struct ms_stats, by_action) + i * sizeof(atomic_uint_fast64_t));
    if (v != 0)
      put_count(b, &first, actions.names[i], actions.lens[i], v);
  }
  ms_buf_lit(b, "}}");
}

void ms_stats_reset(void) {
  unsigned w, i;

  for (w = 0; w < ms_nworkers; w++) {
    struct ms_stats *s = &ms_workers[w].stats;

    atomic_store_explicit(&s->requests, 0, memory_order_relaxed);
    atomic_store_explicit(&s->connections, 0, memory_order_relaxed);
    for (i = 0; i < MS_STATUS_SLOTS; i++)
      atomic_store_explicit(&s->by_status[i], 0, memory_order_relaxed);
    for (i = 0; i < MS_MAX_ACTIONS; i++)
      atomic_store_explicit(&s->by_action[i], 0, memory_order_relaxed);
  }
}
