#include "addr.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int sl_redis_parse_addr(const char *addr, char *host, size_t cap, int *port) {
  if (!strncmp(addr, "unix:", 5)) {
    size_t n = strlen(addr + 5);
    if (n == 0 || n >= cap) return -1;
    memcpy(host, addr + 5, n + 1);
    *port = 0;
    return 0;
  }
  const char *colon = strrchr(addr, ':');
  if (!colon) return -1;
  const char *h = addr;
  size_t hl = (size_t)(colon - addr);
  if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') h++, hl -= 2; /* [::1]:6379 */
  long p = 0;
  const char *d = colon + 1;
  for (; *d >= '0' && *d <= '9' && p <= 65535; d++) p = p * 10 + (*d - '0');
  if (hl == 0 || hl >= cap || d == colon + 1 || *d || p < 1 || p > 65535) return -1;
  memcpy(host, h, hl);
  host[hl] = '\0';
  *port = (int)p;
  return 0;
}

static int fail(char *err, size_t errlen, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
  return -1;
}

static int master_char_ok(char ch) {
  return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '.' ||
         ch == '_' || ch == '-';
}

#define SENTINEL_FORM "sentinel://HOST:PORT[,HOST:PORT...]/MASTER"

/* sentinel://HOST:PORT[,HOST:PORT...]/MASTER: the last '/' ends the list
 * (no host, [V6] included, and no master name holds one). */
static int parse_sentinel(struct sl_redis_url *u, const char *full, char *err, size_t errlen) {
  /* quoted in messages: at most 100 bytes of it, so that the reason fits */
  char text[112];
  snprintf(text, sizeof(text), "%.100s%s", full, strlen(full) > 100 ? "..." : "");
  const char *list = full + strlen(SL_REDIS_SENTINEL_SCHEME);
  const char *slash = strrchr(list, '/');
  if (!slash) return fail(err, errlen, "redis: '%s' names no master (%s)", text, SENTINEL_FORM);
  if (slash == list) return fail(err, errlen, "redis: '%s' names no sentinel (%s)", text, SENTINEL_FORM);
  const char *m = slash + 1;
  size_t ml = strlen(m);
  if (ml == 0) return fail(err, errlen, "redis: '%s' names no master (%s)", text, SENTINEL_FORM);
  if (ml > SL_REDIS_MASTER_MAX)
    return fail(err, errlen, "redis: '%s': the master name is longer than %d bytes", text, SL_REDIS_MASTER_MAX);
  for (size_t i = 0; i < ml; i++)
    if (!master_char_ok(m[i]))
      return fail(err, errlen, "redis: '%s': the master name holds '%c'; it may hold A-Z a-z 0-9 . _ - only", text,
                  m[i] >= 0x20 && m[i] < 0x7f ? m[i] : '?');
  memcpy(u->master, m, ml + 1);
  for (const char *p = list; p < slash;) {
    const char *end = memchr(p, ',', (size_t)(slash - p));
    if (!end) end = slash;
    size_t n = (size_t)(end - p);
    char one[SL_REDIS_HOST_MAX + 8];
    if (n == 0) return fail(err, errlen, "redis: '%s' has an empty sentinel address (%s)", text, SENTINEL_FORM);
    if (u->n_sentinels == SL_REDIS_SENTINELS_MAX)
      return fail(err, errlen, "redis: '%s' names more than %d sentinels", text, SL_REDIS_SENTINELS_MAX);
    if (n >= sizeof(one)) return fail(err, errlen, "redis: '%s': a sentinel address is too long", text);
    memcpy(one, p, n);
    one[n] = '\0';
    struct sl_redis_hostport *s = &u->sentinels[u->n_sentinels];
    if (!strncmp(one, "unix:", 5) || sl_redis_parse_addr(one, s->host, sizeof(s->host), &s->port) != 0)
      return fail(err, errlen, "redis: '%s': sentinel '%s' is not HOST:PORT", text, one);
    u->n_sentinels++;
    p = end == slash ? slash : end + 1;
    if (end != slash && p == slash)
      return fail(err, errlen, "redis: '%s' has an empty sentinel address (%s)", text, SENTINEL_FORM);
  }
  return 0;
}

int sl_redis_url_parse(struct sl_redis_url *u, const char *text, char *err, size_t errlen) {
  memset(u, 0, sizeof(*u));
  if (!strncmp(text, SL_REDIS_SENTINEL_SCHEME, strlen(SL_REDIS_SENTINEL_SCHEME))) {
    u->kind = SL_REDIS_SENTINEL;
    return parse_sentinel(u, text, err, errlen);
  }
  const char *scheme = strncmp(text, "unix:", 5) ? strstr(text, "://") : NULL;
  if (scheme)
    return fail(err, errlen, "redis: '%s': the scheme '%.*s://' is not supported (HOST:PORT, unix:PATH or %s)", text,
                (int)(scheme - text) > 32 ? 32 : (int)(scheme - text), text, SENTINEL_FORM);
  u->kind = SL_REDIS_SERVER;
  if (sl_redis_parse_addr(text, u->server.host, sizeof(u->server.host), &u->server.port) != 0)
    return fail(err, errlen, "redis: '%s' is neither HOST:PORT, unix:PATH nor %s", text, SENTINEL_FORM);
  return 0;
}
