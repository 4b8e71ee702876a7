/* Small shared helpers: container_of, an intrusive list, a bounded growable
 * byte buffer, and fatal allocation wrappers (allocation failure in the
 * proxy aborts with a message, as h2o does). */
#ifndef SL_COMMON_H
#define SL_COMMON_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define sl_container_of(ptr, type, member) \
  ((type *)((char *)(ptr) - offsetof(type, member)))
#define SL_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define SL_LIKELY(x) __builtin_expect(!!(x), 1)
#define SL_UNLIKELY(x) __builtin_expect(!!(x), 0)

void sl__oom(size_t n) __attribute__((noreturn));

static inline void *sl_malloc(size_t n) {
  void *p = malloc(n);
  if (SL_UNLIKELY(p == NULL)) sl__oom(n);
  return p;
}
static inline void *sl_calloc(size_t n, size_t sz) {
  void *p = calloc(n, sz);
  if (SL_UNLIKELY(p == NULL)) sl__oom(n * sz);
  return p;
}
static inline void *sl_realloc(void *old, size_t n) {
  void *p = realloc(old, n);
  if (SL_UNLIKELY(p == NULL)) sl__oom(n);
  return p;
}

/* Intrusive circular doubly-linked list; an empty list points at itself. */
struct sl_link {
  struct sl_link *prev, *next;
};
static inline void sl_list_init(struct sl_link *h) { h->prev = h->next = h; }
static inline int sl_list_empty(const struct sl_link *h) { return h->next == h; }
static inline void sl_list_push(struct sl_link *h, struct sl_link *n) {
  n->next = h;
  n->prev = h->prev;
  h->prev->next = n;
  h->prev = n;
}
static inline void sl_list_remove(struct sl_link *n) {
  n->prev->next = n->next;
  n->next->prev = n->prev;
  n->prev = n->next = n;
}

/* A byte buffer that grows up to `max` bytes. */
struct sl_buf {
  char *data;
  size_t len, cap, max;
};

/* Makes room for `extra` more bytes. Returns 0, or -ENOBUFS when that would
 * pass the buffer's bound (the buffer is then unchanged). */
int sl_buf_reserve(struct sl_buf *b, size_t extra);
/* Appends n bytes; returns 0 or -ENOBUFS at the bound. */
static inline int sl_buf_append(struct sl_buf *b, const void *p, size_t n) {
  if (SL_UNLIKELY(b->cap - b->len < n) && sl_buf_reserve(b, n) != 0) return -ENOBUFS;
  memcpy(b->data + b->len, p, n);
  b->len += n;
  return 0;
}
#define sl_buf_lit(b, s) sl_buf_append((b), (s), sizeof(s) - 1)
void sl_buf_free(struct sl_buf *b);
/* Drops the storage when it grew past `keep` bytes, so a connection that once
 * carried a big body does not hold that memory while idle. */
void sl_buf_shrink(struct sl_buf *b, size_t keep);

/* Writes the decimal form of v into out (>= 21 bytes); returns its length. */
size_t sl_u64toa(uint64_t v, char *out);

/* s (n bytes) as a NUL-terminated printable string in out (cap >= 8):
 * bytes outside printable ASCII and backslashes as \xHH (a value read from
 * a peer must not forge log lines); cut with "..." at cap. Returns out. */
const char *sl_printable(char *out, size_t cap, const char *s, size_t n);

/* At most one log line per period; what was held back is counted. */
struct sl_ratelog {
  uint64_t next_ms;
  uint32_t held;
};
/* Returns 1 when a line may be written at now_ms (*held: lines held back
 * since the last one; the next may come period_ms later), else counts this
 * one as held back and returns 0. The caller's thread owns r. */
int sl_ratelog_ok(struct sl_ratelog *r, uint64_t now_ms, uint64_t period_ms, uint32_t *held);

#endif
