/* Fuzzes the YAML configuration loader (sl_config_load with a file): any
 * input is either accepted, giving a configuration that holds its own
 * invariants, or refused with a message; never a crash or a leak.
 *
 * The loader takes a path, so the input goes into a memfd that the loader
 * opens as /proc/self/fd/N: no file on disk. Host names are resolved with
 * AI_NUMERICHOST (getaddrinfo is wrapped at link time, -Wl,--wrap), so that
 * no input waits for DNS and the answer does not depend on the network. */
#include <netdb.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "config.h"
#include "fuzz.h"

int __real_getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res);
int __wrap_getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res);

int __wrap_getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res) {
  struct addrinfo h = {0};
  if (hints) h = *hints;
  h.ai_flags |= AI_NUMERICHOST | AI_NUMERICSERV;
  return __real_getaddrinfo(node, service, &h, res);
}

static int fd = -1;
static char path[64];

/* Whether s is NUL-terminated within cap bytes. */
static int terminated(const char *s, size_t cap) { return memchr(s, '\0', cap) != NULL; }

static void check_addr(const struct sl_addr *a) {
  FZ_CHECK(terminated(a->text, sizeof(a->text)) && a->text[0] != '\0');
  FZ_CHECK(a->salen > 0 && a->salen <= sizeof(a->sa));
  FZ_CHECK(a->sa.ss_family == AF_INET || a->sa.ss_family == AF_INET6);
}

static void check_config(const struct sl_config *c) {
  check_addr(&c->listen);
  check_addr(&c->admin);
  FZ_CHECK(c->n_upstream >= 1 && c->n_upstream <= SL_MAX_UPSTREAMS);
  FZ_CHECK(c->n_upstream_llm <= SL_MAX_UPSTREAMS);
  for (unsigned i = 0; i < c->n_upstream; i++) check_addr(&c->upstream[i]);
  for (unsigned i = 0; i < c->n_upstream_llm; i++) check_addr(&c->upstream_llm[i]);
  FZ_CHECK(terminated(c->redis, sizeof(c->redis)) && terminated(c->redis_prefix, sizeof(c->redis_prefix)));
  FZ_CHECK(terminated(c->region, sizeof(c->region)) && terminated(c->access_log, sizeof(c->access_log)));
  FZ_CHECK(terminated(c->spool_dir, sizeof(c->spool_dir)) && terminated(c->instance_id, sizeof(c->instance_id)));
  FZ_CHECK(terminated(c->trusted_uid_header, sizeof(c->trusted_uid_header)));
  FZ_CHECK(c->metering_on == 0 || c->metering_on == 1);
  FZ_CHECK(c->admission_on == 0 || c->admission_on == 1);
  FZ_CHECK(c->limiter_full == SL_LIMITER_FULL_OPEN || c->limiter_full == SL_LIMITER_FULL_CLOSED);
  FZ_CHECK(terminated(c->regions, sizeof(c->regions)) && c->regions[0] != '\0');
  FZ_CHECK(c->workers >= 1 && c->workers <= 256);
  FZ_CHECK(c->max_header_bytes >= 1024 && c->max_headers >= 8 && c->max_headers <= 256);
  FZ_CHECK(c->billing_tz_offset_min >= -720 && c->billing_tz_offset_min <= 840);
  FZ_CHECK(c->flush_ms >= 10 && c->max_conns >= 1 && c->meter_keys >= 16 && c->limiter_keys >= 16);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (fd < 0) {
    fd = memfd_create("sluice-fuzz-config", MFD_CLOEXEC);
    if (fd < 0) abort();
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
  }
  if (ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != (ssize_t)size) abort();

  struct sl_cli cli = {.file = path};
  struct sl_config c;
  char err[256];
  memset(err, 0x7f, sizeof(err)); /* every refusal must write its message */
  int rc = sl_config_load(&c, &cli, err, sizeof(err));
  if (rc == 0) {
    check_config(&c);
  } else {
    FZ_CHECK(rc == -1);
    FZ_CHECK(terminated(err, sizeof(err)) && err[0] != '\0');
  }
  return 0;
}
