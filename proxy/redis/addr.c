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
#define CLUSTER_FORM "cluster://HOST:PORT[,HOST:PORT...]"

/* The value as messages quote it: at most 100 bytes, so that the reason
 * fits. */
static void quoted(char *text, size_t cap, const char *full) {
  snprintf(text, cap, "%.100s%s", full, strlen(full) > 100 ? "..." : "");
}

/* The HOST:PORT list list[0..end) of a sentinel:// or cluster:// URL into
 * u->hosts. what: "sentinel" or "cluster node"; form: the URL's form for
 * the messages. */
static int parse_hosts(struct sl_redis_url *u, const char *text, const char *list, const char *end_of_list,
                       const char *what, const char *form, char *err, size_t errlen) {
  for (const char *p = list; p < end_of_list;) {
    const char *end = memchr(p, ',', (size_t)(end_of_list - p));
    if (!end) end = end_of_list;
    size_t n = (size_t)(end - p);
    char one[SL_REDIS_HOST_MAX + 8];
    if (n == 0) return fail(err, errlen, "redis: '%s' has an empty %s address (%s)", text, what, form);
    if (u->n_hosts == SL_REDIS_SENTINELS_MAX)
      return fail(err, errlen, "redis: '%s' names more than %d %ss", text, SL_REDIS_SENTINELS_MAX, what);
    if (n >= sizeof(one)) return fail(err, errlen, "redis: '%s': a %s address is too long", text, what);
    memcpy(one, p, n);
    one[n] = '\0';
    struct sl_redis_hostport *s = &u->hosts[u->n_hosts];
    if (!strncmp(one, "unix:", 5) || sl_redis_parse_addr(one, s->host, sizeof(s->host), &s->port) != 0)
      return fail(err, errlen, "redis: '%s': %s '%s' is not HOST:PORT", text, what, one);
    u->n_hosts++;
    p = end == end_of_list ? end_of_list : end + 1;
    if (end != end_of_list && p == end_of_list)
      return fail(err, errlen, "redis: '%s' has an empty %s address (%s)", text, what, form);
  }
  return 0;
}

/* sentinel://HOST:PORT[,HOST:PORT...]/MASTER: the last '/' ends the list
 * (no host, [V6] included, and no master name holds one). */
static int parse_sentinel(struct sl_redis_url *u, const char *full, char *err, size_t errlen) {
  char text[112];
  quoted(text, sizeof(text), full);
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
  return parse_hosts(u, text, list, slash, "sentinel", SENTINEL_FORM, err, errlen);
}

/* cluster://HOST:PORT[,HOST:PORT...]: seed nodes only, no path (a '/' is
 * refused: it would be read as part of a port). */
static int parse_cluster(struct sl_redis_url *u, const char *full, char *err, size_t errlen) {
  char text[112];
  quoted(text, sizeof(text), full);
  const char *list = full + strlen(SL_REDIS_CLUSTER_SCHEME);
  if (!*list) return fail(err, errlen, "redis: '%s' names no cluster node (%s)", text, CLUSTER_FORM);
  return parse_hosts(u, text, list, list + strlen(list), "cluster node", CLUSTER_FORM, err, errlen);
}

int sl_redis_url_parse(struct sl_redis_url *u, const char *text, char *err, size_t errlen) {
  memset(u, 0, sizeof(*u));
  if (!strncmp(text, SL_REDIS_SENTINEL_SCHEME, strlen(SL_REDIS_SENTINEL_SCHEME))) {
    u->kind = SL_REDIS_SENTINEL;
    return parse_sentinel(u, text, err, errlen);
  }
  if (!strncmp(text, SL_REDIS_CLUSTER_SCHEME, strlen(SL_REDIS_CLUSTER_SCHEME))) {
    u->kind = SL_REDIS_CLUSTER;
    return parse_cluster(u, text, err, errlen);
  }
  const char *scheme = strncmp(text, "unix:", 5) ? strstr(text, "://") : NULL;
  if (scheme)
    return fail(err, errlen, "redis: '%s': the scheme '%.*s://' is not supported (HOST:PORT, unix:PATH, %s or %s)",
                text, (int)(scheme - text) > 32 ? 32 : (int)(scheme - text), text, SENTINEL_FORM, CLUSTER_FORM);
  u->kind = SL_REDIS_SERVER;
  if (sl_redis_parse_addr(text, u->server.host, sizeof(u->server.host), &u->server.port) != 0)
    return fail(err, errlen, "redis: '%s' is neither HOST:PORT, unix:PATH, %s nor %s", text, SENTINEL_FORM,
                CLUSTER_FORM);
  return 0;
}
