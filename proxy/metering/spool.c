#include "spool.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "catalog.h"
#include "common.h"
#include "stat.h"
#include "uv_util.h"

#define SPOOL_MAGIC 0x314d4c53u /* "SLM1" */
#define REC_BATCH SL_SPOOL_REC_BATCH
#define REC_BATCH_V1 SL_SPOOL_REC_BATCH_V1
#define REC_ACK SL_SPOOL_REC_ACK
#define REC_DELTA SL_SPOOL_REC_DELTA
#define FULL_SAY_MS 60000 /* "spool full" at most once per this */

uint32_t sl_crc32(const void *p, size_t n) {
  static uint32_t table[256];
  static int ready;
  if (!ready) { /* built once, on the flusher thread, before any concurrent use */
    for (uint32_t i = 0; i < 256; i++) {
      uint32_t c = i;
      for (int k = 0; k < 8; k++) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
      table[i] = c;
    }
    ready = 1;
  }
  const unsigned char *s = p;
  uint32_t c = 0xffffffffu;
  for (size_t i = 0; i < n; i++) c = table[(c ^ s[i]) & 0xff] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

/* ---- records: [magic u32][type u8][pad 3][len u32][crc u32][payload] ---- */

#define HDR 16
size_t sl_spool_batch_size(const struct sl_batch *b) {
  size_t n = HDR + 1 + b->id_len + 4;
  for (uint32_t i = 0; i < b->n; i++)
    n += 4 + 7 + b->e[i].k.uid_len + b->e[i].k.region_len + b->e[i].k.service_len + 8;
  return n;
}

static void put_hdr(unsigned char *o, uint8_t type, uint32_t len, const unsigned char *payload) {
  uint32_t magic = SPOOL_MAGIC, crc = sl_crc32(payload, len);
  memcpy(o, &magic, 4);
  o[4] = type;
  o[5] = o[6] = o[7] = 0;
  memcpy(o + 8, &len, 4);
  memcpy(o + 12, &crc, 4);
}

static size_t encode(const struct sl_batch *b, uint8_t type, const char *id, uint8_t id_len, unsigned char *out) {
  unsigned char *p = out + HDR;
  *p++ = id_len;
  memcpy(p, id, id_len);
  p += id_len;
  memcpy(p, &b->n, 4);
  p += 4;
  for (uint32_t i = 0; i < b->n; i++) {
    const struct sl_meter_key *k = &b->e[i].k;
    memcpy(p, &k->day, 4);
    p += 4;
    *p++ = k->feature;
    *p++ = k->tier;
    *p++ = k->outcome;
    *p++ = k->uid_len;
    *p++ = k->region_len;
    *p++ = k->billable;
    *p++ = k->service_len;
    memcpy(p, k->uid, k->uid_len);
    p += k->uid_len;
    memcpy(p, k->region, k->region_len);
    p += k->region_len;
    memcpy(p, k->service, k->service_len);
    p += k->service_len;
    memcpy(p, &b->e[i].count, 8);
    p += 8;
  }
  put_hdr(out, type, (uint32_t)(p - out - HDR), out + HDR);
  return (size_t)(p - out);
}

size_t sl_spool_encode_batch(const struct sl_batch *b, unsigned char *out) {
  return encode(b, REC_BATCH, b->id, b->id_len, out);
}

size_t sl_spool_encode_delta(const struct sl_batch *b, unsigned char *out) { return encode(b, REC_DELTA, "d", 1, out); }

struct sl_batch *sl_batch_new(uint32_t n) { return sl_calloc(1, sizeof(struct sl_batch) + n * sizeof(struct sl_batch_entry)); }

/* Decodes a batch payload of format v1 (the first spool format: no
 * billable flag, no service; read at a start after an upgrade) or v2;
 * NULL when malformed. */
static struct sl_batch *decode(const unsigned char *p, size_t len, int v2) {
  const unsigned char *end = p + len;
  size_t fixed = v2 ? 11 : 9;
  if (len < 5 || p[0] == 0 || p[0] >= sizeof(((struct sl_batch *)0)->id) || (size_t)(1 + p[0] + 4) > len)
    return NULL;
  uint8_t idl = p[0];
  uint32_t n;
  memcpy(&n, p + 1 + idl, 4);
  if (n > SL_BATCH_MAX) return NULL;
  struct sl_batch *b = sl_batch_new(n);
  b->id_len = idl;
  memcpy(b->id, p + 1, idl);
  const unsigned char *q = p + 1 + idl + 4;
  for (uint32_t i = 0; i < n; i++) {
    struct sl_meter_key *k = &b->e[i].k;
    if ((size_t)(end - q) < fixed) goto bad;
    memcpy(&k->day, q, 4);
    k->feature = q[4];
    k->tier = q[5];
    k->outcome = q[6];
    k->uid_len = q[7];
    k->region_len = q[8];
    /* v1: every ok was billable, and usage had no service */
    k->billable = v2 ? q[9] : 1;
    k->service_len = v2 ? q[10] : 0;
    q += fixed;
    /* send_next names the feature, tier and outcome from these bytes */
    if (k->uid_len > SL_UID_MAX || k->region_len > SL_REGION_MAX || k->outcome >= SL_NOUTCOMES ||
        (k->feature >= sl_nfeatures && k->feature != SL_METER_NO_FEATURE) || k->tier > SL_TIER_LLM ||
        k->billable > 1 || k->service_len > SL_METER_SERVICE_MAX ||
        (k->service_len && (k->outcome != SL_OUT_OK || !k->billable)) ||
        (size_t)(end - q) < (size_t)k->uid_len + k->region_len + k->service_len + 8)
      goto bad;
    memcpy(k->uid, q, k->uid_len);
    q += k->uid_len;
    memcpy(k->region, q, k->region_len);
    q += k->region_len;
    memcpy(k->service, q, k->service_len);
    q += k->service_len;
    memcpy(&b->e[i].count, q, 8);
    q += 8;
  }
  if (q != end) goto bad; /* what encode writes, and nothing else */
  b->n = n;
  return b;
bad:
  free(b);
  return NULL;
}

struct sl_batch *sl_spool_decode_batch(const unsigned char *p, size_t len) { return decode(p, len, 1); }

struct sl_batch *sl_spool_decode_batch_v1(const unsigned char *p, size_t len) { return decode(p, len, 0); }

struct sl_batch *sl_spool_decode_delta(const unsigned char *p, size_t len) {
  if (len < 2 || p[0] != 1 || p[1] != 'd') return NULL; /* what sl_spool_encode_delta writes */
  return sl_spool_decode_batch(p, len);
}

int sl_spool_decode_ack(const unsigned char *p, size_t len, const unsigned char **id, uint8_t *id_len) {
  if (len < 2 || p[0] == 0 || p[0] >= sizeof(((struct sl_batch *)0)->id) || (size_t)p[0] + 1 != len) return -1;
  *id = p + 1;
  *id_len = p[0];
  return 0;
}

size_t sl_spool_scan(const unsigned char *data, size_t len,
                     int (*on_record)(void *arg, int type, const unsigned char *payload, uint32_t plen), void *arg) {
  size_t off = 0;
  while (len - off >= HDR) {
    uint32_t magic, plen, crc;
    memcpy(&magic, data + off, 4);
    memcpy(&plen, data + off + 8, 4);
    memcpy(&crc, data + off + 12, 4);
    uint8_t type = data[off + 4];
    if (magic != SPOOL_MAGIC ||
        (type != REC_BATCH && type != REC_ACK && type != REC_DELTA && type != REC_BATCH_V1) ||
        plen > len - off - HDR ||
        sl_crc32(data + off + HDR, plen) != crc)
      break;
    if (on_record(arg, type, data + off + HDR, plen) != 0) break;
    off += HDR + plen;
  }
  return off;
}

/* ---- the file ---- */

static void spool_write(struct sl_spool *s, const void *p, size_t n) {
  if (s->fd < 0) return;
  const char *c = p;
  while (n) {
    ssize_t w = write(s->fd, c, n);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) {
      fprintf(stderr, "sluice: spool %s: write: %s\n", s->path, strerror(errno));
      sl_stat_inc(s->st_errors, 1);
      return;
    }
    c += w;
    n -= (size_t)w;
    s->bytes += (uint64_t)w;
  }
  s->dirty = 1;
  sl_stat_set(s->st_bytes, s->bytes);
}

void sl_spool_sync(struct sl_spool *s) {
  if (s->fd >= 0 && s->dirty) {
    if (fdatasync(s->fd) != 0) sl_stat_inc(s->st_errors, 1);
    s->dirty = 0;
  }
}

/* Says the spool is full (at most once a minute). Returns 1 when s->bytes +
 * need is past the bound. */
static int full(struct sl_spool *s, size_t need) {
  if (s->bytes + need > s->max) {
    sl_stat_set(s->st_full, 1);
    uint64_t now = sl_mono_ms();
    if (now - s->full_said_ms > FULL_SAY_MS || s->full_said_ms == 0) {
      fprintf(stderr,
              "sluice: METERING SPOOL FULL (%llu of %llu bytes in %s): batches are kept in memory only and are "
              "lost if the process dies before Redis takes them\n",
              (unsigned long long)s->bytes, (unsigned long long)s->max, s->path);
      s->full_said_ms = now;
    }
    return 1;
  }
  return 0;
}

void sl_spool_batch(struct sl_spool *s, struct sl_batch *b) {
  size_t need = sl_spool_batch_size(b);
  if (full(s, need)) return;
  unsigned char *buf = sl_malloc(need);
  size_t n = sl_spool_encode_batch(b, buf);
  spool_write(s, buf, n);
  free(buf);
  b->spooled = 1;
}

size_t sl_spool_delta_size(const struct sl_batch *b) { return sl_spool_batch_size(b) - b->id_len + 1; }

int sl_spool_delta(struct sl_spool *s, const struct sl_batch *b) {
  size_t need = sl_spool_delta_size(b);
  if (full(s, need)) return -1;
  unsigned char *buf = sl_malloc(need);
  size_t n = sl_spool_encode_delta(b, buf);
  spool_write(s, buf, n);
  free(buf);
  return 0;
}

int sl_spool_rewrite(struct sl_spool *s, const unsigned char *buf, size_t n) {
  if (s->fd < 0) return -1;
  char tmp[sizeof(s->path) + 8];
  snprintf(tmp, sizeof(tmp), "%s.new", s->path);
  int fd = open(tmp, O_RDWR | O_APPEND | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) goto fail;
  for (size_t off = 0; off < n;) {
    ssize_t w = write(fd, buf + off, n - off);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) goto fail_fd;
    off += (size_t)w;
  }
  if (fdatasync(fd) != 0 || rename(tmp, s->path) != 0) goto fail_fd;
  /* the rename itself is durable once the directory is synced */
  char dir[sizeof(s->path)];
  snprintf(dir, sizeof(dir), "%s", s->path);
  char *slash = strrchr(dir, '/');
  if (slash) *slash = '\0';
  int dfd = open(slash ? dir : ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    if (fsync(dfd) != 0) sl_stat_inc(s->st_errors, 1);
    close(dfd);
  }
  close(s->fd);
  s->fd = fd;
  s->bytes = n;
  s->dirty = 0;
  sl_stat_set(s->st_bytes, n);
  sl_stat_set(s->st_full, 0);
  return 0;
fail_fd:
  close(fd);
  unlink(tmp);
fail:
  fprintf(stderr, "sluice: spool %s: rewrite: %s (the old file stays)\n", s->path, strerror(errno));
  sl_stat_inc(s->st_errors, 1);
  return -1;
}

void sl_spool_ack(struct sl_spool *s, const struct sl_batch *b) {
  if (!b->spooled) return;
  unsigned char rec[HDR + 1 + sizeof(b->id)];
  rec[HDR] = b->id_len;
  memcpy(rec + HDR + 1, b->id, b->id_len);
  put_hdr(rec, REC_ACK, (uint32_t)(1 + b->id_len), rec + HDR);
  spool_write(s, rec, HDR + 1 + b->id_len);
}

int sl_spool_should_compact(const struct sl_spool *s) {
  uint64_t threshold = s->max / 2 < (1u << 20) ? s->max / 2 : (1u << 20);
  return s->fd >= 0 && s->bytes >= threshold;
}

void sl_spool_compact(struct sl_spool *s) {
  if (!sl_spool_should_compact(s)) return;
  if (ftruncate(s->fd, 0) == 0) {
    s->bytes = 0;
    s->dirty = 1;
    sl_stat_set(s->st_bytes, 0);
    sl_stat_set(s->st_full, 0);
  }
}

int sl_spool_open(struct sl_spool *s, const char *dir,
                  int (*on_record)(void *arg, int type, const unsigned char *payload, uint32_t plen), void *arg,
                  char *err, size_t errlen) {
  int r;
  struct stat st;
  snprintf(s->path, sizeof(s->path), "%s/meter.spool", dir);
  s->fd = open(s->path, O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  if (s->fd < 0) {
    r = -errno;
    snprintf(err, errlen, "%s: %s", s->path, strerror(errno));
    return r;
  }
  if (fstat(s->fd, &st) != 0) {
    r = -errno;
    snprintf(err, errlen, "%s: %s", s->path, strerror(errno));
    goto err_fd;
  }
  size_t size = (size_t)st.st_size;
  unsigned char *data = sl_malloc(size ? size : 1);
  size_t got = 0;
  while (got < size) {
    ssize_t n = pread(s->fd, data + got, size - got, (off_t)got);
    if (n <= 0) break;
    got += (size_t)n;
  }
  size_t off = sl_spool_scan(data, got, on_record, arg);
  free(data);
  if (off < size) {
    fprintf(stderr, "sluice: spool %s: %zu trailing bytes are not a whole record (a write cut short): dropped\n",
            s->path, size - off);
    if (ftruncate(s->fd, (off_t)off) != 0) {
      r = -errno;
      snprintf(err, errlen, "%s: truncate: %s", s->path, strerror(errno));
      goto err_fd;
    }
  }
  s->bytes = off;
  sl_stat_set(s->st_bytes, off);
  return 0;
err_fd:
  close(s->fd);
  s->fd = -1;
  return r;
}

void sl_spool_close(struct sl_spool *s) {
  if (s->fd >= 0) close(s->fd);
  s->fd = -1;
}
