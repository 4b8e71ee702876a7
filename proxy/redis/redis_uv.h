/* hiredis' async API on a libuv loop. Debian's hiredis 0.14 ships an adapter
 * (adapters/libuv.h) that drops poll errors, so a refused connect is never
 * reported and the context hangs in "connecting" forever. This one passes
 * errors on to hiredis, which then reports the failed connect or the broken
 * connection through the usual callbacks.
 *
 * It also guards hiredis 0.14 against a peer that is not Redis: its async
 * layer assert()s (aborting the process) on a reply that no command asked
 * for and on a malformed pub/sub message. Such a reply is refused before it
 * is built: hiredis then drops the connection as on a protocol error (its
 * errstr says "Out of memory"; sl_redis_refused says what happened). And
 * reading stops while more than SL_REDIS_MAX_BUFFER bytes of one reply are
 * buffered, and an array header of more than SL_REDIS_MAX_ELEMENTS is
 * refused, so a peer cannot grow memory without bound: the owner's reply
 * timeout, or the refusal, then drops the connection. */
#ifndef SL_REDIS_UV_H
#define SL_REDIS_UV_H

#include <hiredis/async.h>
#include <uv.h>

#define SL_REDIS_MAX_BUFFER (256u << 20) /* bytes of unparsed reply held at most */
/* Elements of one array reply at most: hiredis 0.14 allocates an array's
 * element pointers when it reads the header ("*666666666" is 5 GB at once,
 * found by fuzz_flusher_reply), before any element arrives. 4M elements is
 * 32 MiB of pointers; with hiredis' nesting limit (7) at most 224 MiB. */
#define SL_REDIS_MAX_ELEMENTS (1 << 22)

/* Whether an array header of `elements` may be built (the guard's rule). */
static inline int sl_redis_array_ok(long long elements) { return elements <= SL_REDIS_MAX_ELEMENTS; }

/* Attaches ac to loop. Returns REDIS_OK or REDIS_ERR. */
int sl_redis_attach(redisAsyncContext *ac, uv_loop_t *loop);

/* Why the guard refused what the peer sent on ac (NUL-terminated), or NULL
 * when it refused nothing. Valid until ac's disconnect callback returns. */
const char *sl_redis_refused(const redisAsyncContext *ac);

#endif
