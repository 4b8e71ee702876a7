/* Growable byte buffer used for a connection's request and reply bytes.
 *
 * A buffer grows to its high-water mark and is then reused, so steady traffic
 * does not allocate. Allocation failure aborts (a test stand-in has no better
 * answer). Not thread-safe: each buffer belongs to one loop thread. */
#ifndef MODSTUB_BUF_H
#define MODSTUB_BUF_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

struct ms_buf {
  char *p;
  size_t len;
  size_t cap;
};

/* Makes room for at least `extra` more bytes; aborts when memory runs out. */
void ms__buf_grow(struct ms_buf *b, size_t extra);

static inline void ms_buf_reserve(struct ms_buf *b, size_t extra) {
  if (b->cap - b->len < extra)
    ms__buf_grow(b, extra);
}

static inline void ms_buf_put(struct ms_buf *b, const void *s, size_t n) {
  ms_buf_reserve(b, n);
  if (n)
    memcpy(b->p + b->len, s, n);
  b->len += n;
}

static inline void ms_buf_putc(struct ms_buf *b, char ch) {
  ms_buf_reserve(b, 1);
  b->p[b->len++] = ch;
}

#define ms_buf_lit(b, s) ms_buf_put((b), (s), sizeof(s) - 1)

static inline void ms_buf_puts(struct ms_buf *b, const char *s) {
  ms_buf_put(b, s, strlen(s));
}

/* Appends `n` copies of `ch`. */
void ms_buf_fill(struct ms_buf *b, char ch, size_t n);
/* Appends `v` in decimal. */
void ms_buf_put_u64(struct ms_buf *b, uint64_t v);
/* Appends `v` as lowercase hex, at least `width` digits (0-padded). */
void ms_buf_put_hex(struct ms_buf *b, uint64_t v, int width);
/* Appends `s` as a quoted JSON string. Valid UTF-8 passes through; control
 * characters, quote and backslash are escaped; a byte that is not part of a
 * valid UTF-8 sequence is written as \u00XX (read as Latin-1). Returns 1 when
 * the input was valid UTF-8, else 0. */
int ms_buf_put_json_str(struct ms_buf *b, const char *s, size_t n);
/* Frees the memory and leaves an empty buffer. */
void ms_buf_free(struct ms_buf *b);

#endif
