/* hiredis' async API on a libuv loop. Debian's hiredis 0.14 ships an adapter
 * (adapters/libuv.h) that drops poll errors, so a refused connect is never
 * reported and the context hangs in "connecting" forever. This one passes
 * errors on to hiredis, which then reports the failed connect or the broken
 * connection through the usual callbacks. */
#ifndef SL_REDIS_UV_H
#define SL_REDIS_UV_H

#include <hiredis/async.h>
#include <uv.h>

/* Attaches ac to loop. Returns REDIS_OK or REDIS_ERR. */
int sl_redis_attach(redisAsyncContext *ac, uv_loop_t *loop);

#endif
