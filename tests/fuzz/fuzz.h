/* Helpers shared by the libFuzzer harnesses (docs/fuzzing.md). A harness
 * checks the invariants of the code it drives with FZ_CHECK, which traps:
 * libFuzzer then saves the input as a crash, like any sanitizer report. */
#ifndef SL_FUZZ_H
#define SL_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FZ_CHECK(cond)                                \
  do {                                                \
    if (!(cond)) fz_fail(#cond, __FILE__, __LINE__);  \
  } while (0)

/* Says which check failed (the only output of a harness), then traps. */
__attribute__((noreturn, noinline, cold)) static void fz_fail(const char *what, const char *file, int line) {
  fprintf(stderr, "FZ_CHECK failed: %s (%s:%d)\n", what, file, line);
  __builtin_trap();
}

/* A private copy of p[0..n) in a heap block of exactly n bytes (at least one
 * byte is allocated for n == 0, but none of it may be read), so that ASan
 * catches a read one byte past a length. Returns NULL when p is NULL. */
static inline char *fz_dup(const void *p, size_t n) {
  if (p == NULL) return NULL;
  char *d = malloc(n ? n : 1);
  if (d == NULL) abort();
  if (n) memcpy(d, p, n);
  return d;
}

/* A NUL-terminated heap copy of p[0..n) (which may hold NULs itself). */
static inline char *fz_cstr(const void *p, size_t n) {
  char *d = malloc(n + 1);
  if (d == NULL) abort();
  if (n) memcpy(d, p, n);
  d[n] = '\0';
  return d;
}

/* Splits off the bytes of *p up to the next `sep` (or the end) as one field;
 * advances past the separator. */
static inline void fz_field(const uint8_t **p, size_t *n, uint8_t sep, const uint8_t **f, size_t *fn) {
  const uint8_t *e = memchr(*p, sep, *n);
  *f = *p;
  *fn = e ? (size_t)(e - *p) : *n;
  *p += *fn + (e != NULL);
  *n -= *fn + (e != NULL);
}

/* Whether p[0..n) holds a control byte (below 0x20, or DEL). */
static inline int fz_has_ctl(const char *p, size_t n) {
  for (size_t i = 0; i < n; i++)
    if ((unsigned char)p[i] < 0x20 || p[i] == 0x7f) return 1;
  return 0;
}

#endif
