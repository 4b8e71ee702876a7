/* The directory thread's reply parsers, for the fuzz harness
 * (tests/fuzz/fuzz_dir_reply.c) only: the thread itself calls them from
 * its hiredis callbacks. Directory thread (or the harness's one thread). */
#ifndef SL_DIRSYNC_INT_H
#define SL_DIRSYNC_INT_H

#include <hiredis/hiredis.h>

#include "dirsync.h"

/* ak's record from its element of the account script's reply; NULL when
 * the element is not what the script makes. The caller owns the record. */
struct sl_acct *sl__dirsync_acct_from_reply(struct sl_dirsync *d, const char *ak, size_t ak_len, const redisReply *r);
/* Applies the account script's reply r (NULL: no reply) for the n
 * AccessKeyIds asked: records put, pending lookups answered, published. */
void sl__dirsync_accounts_reply(struct sl_dirsync *d, unsigned n, const char (*aks)[SL_AK_MAX + 1],
                                const uint8_t *lens, const redisReply *r);
/* Applies the state script's reply r: the suspended set and the feature
 * overrides; published. */
void sl__dirsync_state_reply(struct sl_dirsync *d, const redisReply *r);

#endif
