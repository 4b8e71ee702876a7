/* Redis Cluster routing, the part without I/O (issue 14, SPEC 10): a key's
 * hash slot, the slot map a CLUSTER SLOTS reply describes, the MOVED / ASK /
 * TRYAGAIN / CLUSTERDOWN errors a node answers, and the cluster form of the
 * per-account key names (the UID as a hash tag). hiredis 0.14 has no cluster
 * support; cluster_client.h routes commands with these.
 *
 * Every function is pure: no allocation survives a call, no global state,
 * callable from any thread. Errors are 0 or a negative errno (UV_E* codes),
 * as in libuv. */
#ifndef SL_REDIS_CLUSTER_H
#define SL_REDIS_CLUSTER_H

#include <hiredis/hiredis.h>
#include <stddef.h>
#include <stdint.h>

#define SL_CLUSTER_SLOTS 16384   /* hash slots of a Redis Cluster (fixed by Redis) */
#define SL_CLUSTER_MAX_NODES 64  /* masters one map holds at most: a larger cluster is refused */
#define SL_CLUSTER_HOST_MAX 256  /* bytes of a node's host, NUL included */
#define SL_CLUSTER_NO_NODE 0xff  /* map.slot[] of a slot no master serves */

/* ---- hash slots ---- */

/* CRC16-XMODEM (poly 0x1021, init 0, not reflected: Redis's crc16.c) of
 * p[0..len). */
uint16_t sl_cluster_crc16(const void *p, size_t len);

/* The hash slot (0..16383) of key[0..len), as Redis computes it: CRC16 of the
 * key mod 16384, or of the hash tag only when the key has one: the bytes
 * between its first '{' and the first '}' after it, when there is at least
 * one. key may hold any bytes; key may be NULL when len is 0. */
unsigned sl_cluster_key_slot(const char *key, size_t len);

/* A slot's tag: a string of 1 to 3 characters of [0-9A-Za-z] whose slot
 * (as a hash tag, "{<tag>}") is that slot; SL_CLUSTER_TAG_SIZE bytes with
 * the NUL. */
#define SL_CLUSTER_TAG_SIZE 4

/* Fills tags[slot] for every slot with the first string that hashes to it
 * in this order: by length (1, 2, 3), then by bytes (ASCII order of
 * [0-9A-Za-z]). Every slot has one (all of them within 3 characters). The
 * order is fixed for good: keys named with these tags (metering's
 * high-water marks) must keep their names across versions. About 240,000
 * CRC16s of 3 bytes: compute it once. */
void sl_cluster_slot_tags(char (*tags)[SL_CLUSTER_TAG_SIZE]);
/* One slot's tag, the same as sl_cluster_slot_tags' (at most ~240,000
 * CRC16s: for a key now and then, not per request). */
void sl_cluster_slot_tag(unsigned slot, char tag[SL_CLUSTER_TAG_SIZE]);

/* ---- the slot map ---- */

struct sl_cluster_node {
  char host[SL_CLUSTER_HOST_MAX]; /* an IP (v6 without brackets) or a host name */
  int port;                       /* 1..65535 */
  unsigned replicas;              /* a map's master: the most replicas CLUSTER SLOTS listed with one of its ranges */
};

/* Which master serves each slot. About 33 KiB: allocate it, do not put it on
 * a small stack. Only sl_cluster_map_parse writes it. */
struct sl_cluster_map {
  unsigned nnodes;                                      /* masters in nodes[], each (host, port) once */
  struct sl_cluster_node nodes[SL_CLUSTER_MAX_NODES];
  uint8_t slot[SL_CLUSTER_SLOTS];                       /* index into nodes[], or SL_CLUSTER_NO_NODE */
};

/* Reads a CLUSTER SLOTS reply into *m: an array of [start, end, master,
 * replica...] where each node is [endpoint, port, id?, metadata?...]. A
 * node's endpoint NULL or "" means "the address this reply came from":
 * origin (the host the command was sent to) is then used, and the reply is
 * refused when origin is NULL. Replicas are checked as masters are, not
 * kept. Slots in no range map to SL_CLUSTER_NO_NODE.
 *
 * Returns 0 with *m replaced, or, with *m untouched (the old map kept) and
 * a printable reason in err (NUL-terminated within errcap; err may be NULL
 * when errcap is 0):
 *   UV_EINVAL  not an array of ranges (an error reply, NULL, no range at
 *              all), a range or node of the wrong shape or types, a slot out
 *              of 0..16383, start > end, a slot in two ranges, a port out of
 *              1..65535, a host too long or with bytes other than
 *              [A-Za-z0-9.:%_-] (the endpoint "?" of a node that should
 *              announce a host name and has none is one);
 *   UV_ENOSPC  more than SL_CLUSTER_MAX_NODES masters. */
int sl_cluster_map_parse(struct sl_cluster_map *m, const redisReply *r, const char *origin, char *err,
                         size_t errcap);

/* The master that serves slot (< SL_CLUSTER_SLOTS), or NULL when none does. */
static inline const struct sl_cluster_node *sl_cluster_map_node(const struct sl_cluster_map *m, unsigned slot) {
  uint8_t i = m->slot[slot & (SL_CLUSTER_SLOTS - 1)];
  return i == SL_CLUSTER_NO_NODE ? NULL : &m->nodes[i];
}

/* The index in m->nodes of (host, port), or -1. */
int sl_cluster_map_find(const struct sl_cluster_map *m, const char *host, int port);

/* ---- errors a cluster node answers ---- */

enum sl_cluster_err {
  SL_CLUSTER_ERR_OTHER = 0,   /* not a cluster error: the command's own answer */
  SL_CLUSTER_ERR_MOVED,       /* "MOVED <slot> <host>:<port>": the slot lives there now; refresh the map */
  SL_CLUSTER_ERR_ASK,         /* "ASK <slot> <host>:<port>": this once, ASKING + the command there */
  SL_CLUSTER_ERR_TRYAGAIN,    /* "TRYAGAIN ...": keys of a slot being migrated; retry after a delay */
  SL_CLUSTER_ERR_CLUSTERDOWN, /* "CLUSTERDOWN ...": no quorum or slot unserved; retry after a delay */
};

/* Which of the above an error reply's text s[0..len) is (hiredis' str,
 * without the '-'): the word, then a space or the end. */
enum sl_cluster_err sl_cluster_error_kind(const char *s, size_t len);

struct sl_cluster_redirect {
  enum sl_cluster_err kind;       /* SL_CLUSTER_ERR_MOVED or SL_CLUSTER_ERR_ASK */
  unsigned slot;                  /* 0..16383 */
  int port;                       /* 1..65535 */
  char host[SL_CLUSTER_HOST_MAX]; /* "" when the node announced no endpoint: the node that answered */
};

/* Reads "MOVED <slot> <endpoint>" or "ASK <slot> <endpoint>" (exactly one
 * space between the fields, nothing after) from s[0..len), where endpoint
 * is HOST:PORT, [V6]:PORT or V6:PORT (the last colon splits: Redis writes
 * IPv6 without brackets), with an empty HOST allowed (":6381": the node
 * that answered) and HOST as in sl_cluster_map_parse. The slot is decimal
 * 0..16383 and the port 1..65535, at most five digits each. Returns 0 with
 * *out set, or UV_EINVAL (*out then undefined). */
int sl_cluster_parse_redirect(const char *s, size_t len, struct sl_cluster_redirect *out);

/* ---- a batch's items grouped by master, then slot ---- */

/* The sort key of item index (< 65536) whose keys are in slot: the index
 * in m->nodes of the slot's master (SL_CLUSTER_NO_NODE when m is NULL or
 * no master serves it), the slot, the index. Sorted, the items of one
 * master are adjacent, within them those of one slot, in index order
 * (metering sends one script per master, one exactly-once marker per slot). */
static inline uint64_t sl_cluster_group_key(const struct sl_cluster_map *m, unsigned slot, uint32_t index) {
  slot &= SL_CLUSTER_SLOTS - 1;
  uint64_t node = m ? m->slot[slot] : SL_CLUSTER_NO_NODE;
  return node << 32 | (uint64_t)slot << 16 | (index & 0xffff);
}
static inline unsigned sl_cluster_group_node(uint64_t key) { return (unsigned)(key >> 32); }
static inline unsigned sl_cluster_group_slot(uint64_t key) { return (unsigned)(key >> 16) & (SL_CLUSTER_SLOTS - 1); }
static inline uint32_t sl_cluster_group_index(uint64_t key) { return (uint32_t)(key & 0xffff); }

/* Sorts keys[0..n) (sl_cluster_group_key values) ascending. */
void sl_cluster_group_sort(uint64_t *keys, size_t n);

/* In sorted keys[0..n), the end of the run that starts at from (< n): the
 * first index past it whose master (by_slot 0) or slot (by_slot 1)
 * differs, or n. */
size_t sl_cluster_group_end(const uint64_t *keys, size_t n, size_t from, int by_slot);

/* ---- key names in cluster mode (SPEC 10) ---- */

/* Builds the key <head><uid><tail> into out (NUL-terminated), or with
 * cluster set <head>{<uid>}<tail>, the UID as the hash tag, so that every
 * key of one account is in the slot sl_cluster_uid_slot(uid) names. head
 * is the prefix and the name up to the UID ("sluice:" SL_KEY_USAGE
 * "20240101:"), tail what follows it (":" id for SL_KEY_QPSPKG; may be
 * empty). With one server or Sentinel (cluster 0) the names of keys.h are
 * kept exactly.
 * Returns the key's length (< cap), or UV_ENOSPC (it does not fit) or, with
 * cluster set, UV_EINVAL: an empty UID, or a '{' or '}' in the UID or a '{'
 * in head (the tag would not be the UID). */
int sl_cluster_uid_key(char *out, size_t cap, int cluster, const char *head, size_t headlen, const char *uid,
                       size_t uidlen, const char *tail, size_t taillen);

/* The slot of every key sl_cluster_uid_key built for uid in cluster mode:
 * what a metering batch, a directory lookup or a shared-limit update groups
 * its keys by. */
static inline unsigned sl_cluster_uid_slot(const char *uid, size_t len) {
  return sl_cluster_crc16(uid, len) & (SL_CLUSTER_SLOTS - 1);
}

#endif
