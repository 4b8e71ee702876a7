#include "common.h"

#include <errno.h>

void sl__oom(size_t n) {
  fprintf(stderr, "sluice: out of memory allocating %zu bytes\n", n);
  abort();
}

int sl_buf_reserve(struct sl_buf *b, size_t extra) {
  if (b->cap - b->len >= extra) return 0;
  if (extra > b->max || b->len > b->max - extra) return -ENOBUFS;
  size_t need = b->len + extra;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < need) cap = cap > SIZE_MAX / 2 ? need : cap * 2;
  if (cap > b->max) cap = b->max;
  b->data = sl_realloc(b->data, cap);
  b->cap = cap;
  return 0;
}

void sl_buf_free(struct sl_buf *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

void sl_buf_shrink(struct sl_buf *b, size_t keep) {
  if (b->cap > keep && b->len == 0) sl_buf_free(b);
}

size_t sl_u64toa(uint64_t v, char *out) {
  char tmp[20];
  size_t n = 0;
  do {
    tmp[n++] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  for (size_t i = 0; i < n; i++) out[i] = tmp[n - 1 - i];
  out[n] = '\0';
  return n;
}

const char *sl_printable(char *out, size_t cap, const char *s, size_t n) {
  static const char hex[] = "0123456789abcdef";
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)s[i];
    size_t need = ch >= 0x20 && ch < 0x7f && ch != '\\' ? 1 : 4;
    if (o + need + 4 > cap) { /* keep room for "..." and the NUL */
      memcpy(out + o, "...", 3);
      o += 3;
      break;
    }
    if (need == 1) {
      out[o++] = (char)ch;
    } else {
      out[o++] = '\\';
      out[o++] = 'x';
      out[o++] = hex[ch >> 4];
      out[o++] = hex[ch & 15];
    }
  }
  out[o] = '\0';
  return out;
}

int sl_ratelog_ok(struct sl_ratelog *r, uint64_t now_ms, uint64_t period_ms, uint32_t *held) {
  if (now_ms < r->next_ms) {
    r->held++;
    return 0;
  }
  *held = r->held;
  r->held = 0;
  r->next_ms = now_ms + period_ms;
  return 1;
}
