#include "buf.h"

#include <stdio.h>
#include <stdlib.h>

void ms__buf_grow(struct ms_buf *b, size_t extra) {
  size_t need = b->len + extra;
  size_t cap = b->cap ? b->cap : 256;
  char *p;

  while (cap < need)
    cap *= 2;
  p = realloc(b->p, cap);
  if (p == NULL) {
    fprintf(stderr, "modstub: out of memory (%zu bytes)\n", cap);
    abort();
  }
  b->p = p;
  b->cap = cap;
}

void ms_buf_fill(struct ms_buf *b, char ch, size_t n) {
  ms_buf_reserve(b, n);
  memset(b->p + b->len, ch, n);
  b->len += n;
}

void ms_buf_put_u64(struct ms_buf *b, uint64_t v) {
  char tmp[24];
  int i = (int)sizeof(tmp);

  do {
    tmp[--i] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  ms_buf_put(b, tmp + i, sizeof(tmp) - (size_t)i);
}

void ms_buf_put_hex(struct ms_buf *b, uint64_t v, int width) {
  static const char digits[] = "0123456789abcdef";
  char tmp[16];
  int i = (int)sizeof(tmp);

  do {
    tmp[--i] = digits[v & 15];
    v >>= 4;
  } while (v);
  while ((int)sizeof(tmp) - i < width && i > 0)
    tmp[--i] = '0';
  ms_buf_put(b, tmp + i, sizeof(tmp) - (size_t)i);
}

/* Length of the valid UTF-8 sequence at s (1..4), or 0 when s[0] starts none.
 * Rejects overlong forms, surrogates and code points above U+10FFFF. */
static size_t utf8_seq(const unsigned char *s, size_t n) {
  unsigned char c = s[0];
  size_t len, i;
  uint32_t cp;

  if (c < 0xc2 || c > 0xf4)
    return 0;
  len = c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
  if (n < len)
    return 0;
  cp = c & (0x7f >> len);
  for (i = 1; i < len; i++) {
    if ((s[i] & 0xc0) != 0x80)
      return 0;
    cp = (cp << 6) | (s[i] & 0x3f);
  }
  if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
      (cp >= 0xd800 && cp <= 0xdfff))
    return 0;
  return len;
}

int ms_buf_put_json_str(struct ms_buf *b, const char *s, size_t n) {
  static const char hex[] = "0123456789abcdef";
  const unsigned char *u = (const unsigned char *)s;
  size_t i = 0, run = 0, k;
  int valid = 1;

  /* Worst case every byte becomes \u00XX. */
  ms_buf_reserve(b, n * 6 + 2);
  b->p[b->len++] = '"';
  while (i < n) {
    unsigned char c = u[i];
    char *o = b->p + b->len;

    if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') {
      run++;
      i++;
      continue;
    }
    /* Flush the plain run before the byte that needs attention. */
    memcpy(o, s + i - run, run);
    b->len += run;
    o += run;
    run = 0;
    if (c >= 0x80 && (k = utf8_seq(u + i, n - i)) != 0) {
      memcpy(o, s + i, k);
      b->len += k;
      i += k;
      continue;
    }
    if (c >= 0x80)
      valid = 0;
    if (c == '"' || c == '\\') {
      o[0] = '\\';
      o[1] = (char)c;
      b->len += 2;
    } else if (c == '\n' || c == '\r' || c == '\t') {
      o[0] = '\\';
      o[1] = c == '\n' ? 'n' : c == '\r' ? 'r' : 't';
      b->len += 2;
    } else {
      memcpy(o, "\\u00", 4);
      o[4] = hex[c >> 4];
      o[5] = hex[c & 15];
      b->len += 6;
    }
    i++;
  }
  memcpy(b->p + b->len, s + i - run, run);
  b->len += run;
  b->p[b->len++] = '"';
  return valid;
}

void ms_buf_free(struct ms_buf *b) {
  free(b->p);
  b->p = NULL;
  b->len = b->cap = 0;
}
