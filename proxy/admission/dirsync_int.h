/* What the directory thread's two files share (dirsync.c: the thread,
 * lookups, notifications, the connection; dirsync_load.c: the scripts and
 * their replies), and the reply parsers for the fuzz harness
 * (tests/fuzz/fuzz_dir_reply.c). Directory thread only (or the harness's
 * one thread). */
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

/* Asks for the suspended set and the feature overrides (no-op unless the
 * connection is ready). */
void sl__dirsync_request_state(struct sl_dirsync *d);
/* d->scripts: the loads' scripts and their SHA-1s (at start). */
void sl__dirsync_scripts_init(struct sl_dirsync *d);
/* Asks for the n accounts aks (lengths akl) in batches; only while ready.
 * first: they are first lookups (one server: each call counted in
 * lookup_calls; the lookups that come while one is in flight wait for its
 * reply and go together, so that under load a call carries many accounts,
 * not one or two: a script call's fixed cost is most of a lookup's). */
void sl__dirsync_request_accounts(struct sl_dirsync *d, char (*aks)[SL_AK_MAX + 1], const uint8_t *akl, unsigned n,
                                  int first);
/* The first lookups not yet asked (waiting behind a call in flight), as
 * one call (first lookups, counted in lookup_calls). */
void sl__dirsync_request_unsent(struct sl_dirsync *d);
/* Forgets bad keys not seen for a while (the gauge counts recent ones). */
void sl__dirsync_badkey_sweep(struct sl_dirsync *d, uint64_t now);

/* The slot of the key <prefix><name> (a key without a UID). */
unsigned sl__dirsync_key_slot(const struct sl_dirsync *d, const char *name, size_t len);
/* Whether commands may be sent now. */
int sl__dirsync_cmd_ready(const struct sl_dirsync *d);
/* Sends the lookups waiting for the connection (or, in a cluster, for the
 * suspended set's first read). */
void sl__dirsync_request_pending(struct sl_dirsync *d);

/* dirsync.c: publishes the builder's next snapshot (if any) and wakes the
 * workers. */
void sl__dirsync_publish(struct sl_dirsync *d);
/* Puts an "unavailable" record for ak (a lookup that could not be done). */
void sl__dirsync_unavailable(struct sl_dirsync *d, const char *ak, size_t len);
/* The index of ak's lookup in flight, or -1. */
int sl__dirsync_pending_find(struct sl_dirsync *d, const char *ak, size_t len, uint64_t hash);
void sl__dirsync_pending_drop(struct sl_dirsync *d, unsigned i);

#endif
