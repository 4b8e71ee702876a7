/* The --redis address (SPEC 2 and 10), parsed the same way by sluice's
 * configuration check, its Redis client and sluice-rate: HOST:PORT,
 * [V6]:PORT, unix:PATH, sentinel://HOST:PORT[,HOST:PORT...]/MASTER or
 * cluster://HOST:PORT[,HOST:PORT...] (the seed nodes of a Redis Cluster).
 * Plain string work, no I/O and no library: the configuration layer (base)
 * links it too. */
#ifndef SL_REDIS_ADDR_H
#define SL_REDIS_ADDR_H

#include <stddef.h>

#define SL_REDIS_HOST_MAX 256     /* bytes of a host (or unix path) with its NUL */
#define SL_REDIS_SENTINELS_MAX 16 /* sentinels (or cluster seeds) one URL names at most */
#define SL_REDIS_MASTER_MAX 64    /* bytes of a Sentinel master name, without the NUL */
#define SL_REDIS_SENTINEL_SCHEME "sentinel://"
#define SL_REDIS_CLUSTER_SCHEME "cluster://"

struct sl_redis_hostport {
  char host[SL_REDIS_HOST_MAX]; /* without the brackets of [V6]; the path for unix: */
  int port;                     /* 0: a unix socket at host */
};

enum sl_redis_kind { SL_REDIS_SERVER, SL_REDIS_SENTINEL, SL_REDIS_CLUSTER };

struct sl_redis_url {
  enum sl_redis_kind kind;
  struct sl_redis_hostport server; /* SL_REDIS_SERVER */
  /* SL_REDIS_SENTINEL: the sentinels in the order given, and the master's
   * name (A-Z a-z 0-9 . _ -: it travels unquoted in Sentinel's pub/sub
   * messages). SL_REDIS_CLUSTER: the seed nodes in the order given (TCP
   * only: a node's CLUSTER SLOTS names its peers by host and port). */
  unsigned n_hosts;
  struct sl_redis_hostport hosts[SL_REDIS_SENTINELS_MAX];
  char master[SL_REDIS_MASTER_MAX + 1];
};

/* Splits a HOST:PORT, [V6]:PORT or unix:PATH address: host (cap bytes) and
 * *port (0 for unix:). Returns 0 or -1 (no colon, an empty host, a port
 * that is not 1..65535, too long). */
int sl_redis_parse_addr(const char *addr, char *host, size_t cap, int *port);

/* Parses a --redis value into *u. Returns 0, or -1 with a message in err
 * (errlen bytes) that quotes the value and says what is wrong, e.g.
 * "redis: 'sentinel://a:1/' names no master (...)". */
int sl_redis_url_parse(struct sl_redis_url *u, const char *text, char *err, size_t errlen);

#endif
