/* The proxy's internal types: workers, client connections, upstream pools
 * and connections. One worker owns one libuv loop and everything reachable
 * from it; the only things shared between threads are the configuration
 * snapshot (immutable) and the statistics (relaxed atomics, one writer). */
#ifndef SL_PROXY_H
#define SL_PROXY_H

#include <llhttp.h>
#include <stdatomic.h>
#include <uv.h>

#include "admit.h"
#include "classify.h"
#include "common.h"
#include "config.h"
#include "dirsync.h"
#include "fleet.h"
#include "flusher.h"
#include "hdrs.h"
#include "inbox.h"
#include "http_util.h"
#include "meter.h"
#include "reqparse.h"
#include "stat.h"
#include "upstream.h"
#include "uv_util.h"

#define SL_CONN_BUF 16384   /* client read buffer; grows only for large bodies */
#define SL_SWEEP_MS 50 /* timeout resolution */
#define SL_RETRY_MAX_NS 60000000000ull /* Retry-After hint when a limit never admits (0 QPS) */
#define SL_LINGER_MS 2000 /* reading and dropping the rest of a request answered early */

/* Upstream latency histogram bounds, in microseconds. */
#define SL_LAT_BUCKETS 14
extern const uint64_t sl_lat_bounds_us[SL_LAT_BUCKETS];


/* Shared by all workers: only thread-safe things live here. */
struct sl_shared {
  struct sl_dirsync dir;
  struct lim_table *lim;
  struct sl_flusher flusher;
  struct sl_fleet *fleet; /* global limits; NULL when off (per-instance limits) */
  struct sl_fleet fleet_store;
};

/* Per-worker counters: written by the owning worker only, read by the admin
 * thread; relaxed atomics are enough because each value is independent and
 * only needs to be eventually visible. */
struct sl_stats {
  _Atomic uint64_t requests;
  _Atomic uint64_t status_class[6]; /* [1..5] = 1xx..5xx answered to clients */
  _Atomic uint64_t conns_open;      /* gauge */
  _Atomic uint64_t conns_accepted;
  _Atomic uint64_t conns_refused; /* over max-conns */
  _Atomic uint64_t up_connects;
  _Atomic uint64_t up_connect_errors;
  _Atomic uint64_t up_reused;
  _Atomic uint64_t up_errors;   /* reset/garbage mid-exchange */
  _Atomic uint64_t up_timeouts;
  _Atomic uint64_t up_retries;
  _Atomic uint64_t up_ejections;
  _Atomic uint64_t lat_count;
  _Atomic uint64_t lat_sum_us;
  _Atomic uint64_t lat_bucket[SL_LAT_BUCKETS + 1];
  /* [outcome][feature + 1][tier]: feature index 0 counts requests of no
   * known feature; the tier is the one the call was routed by */
  _Atomic uint64_t outcome[SL_NOUTCOMES][SL_MAX_FEATURES + 1][2];
  _Atomic uint64_t parked;        /* requests that waited for an account lookup */
  _Atomic uint64_t parked_now;    /* gauge */
  _Atomic uint64_t orphans;       /* requests whose client left while the backend's answer was due */
  _Atomic uint64_t limiter_full;  /* decisions the bucket table could not hold */
  _Atomic uint64_t refused_malformed; /* requests refused by the parser (400/413/431/408) */
  _Atomic uint64_t early_answers;     /* answered at the head, before the body was read */
  _Atomic uint64_t body_budget_full;  /* 503: the worker's body budget was spent */
  _Atomic uint64_t send_timeouts;     /* clients closed for not reading (send-timeout-ms) */
};


struct sl_worker;
struct sl_conn;

enum sl_conn_phase {
  SL_C_IDLE,     /* between requests, nothing buffered */
  SL_C_READING,  /* a request has started arriving */
  SL_C_WAITING,  /* request complete, waiting for the upstream */
  SL_C_SENDING,  /* response being relayed */
};

enum sl_resp_mode { SL_RESP_LENGTH, SL_RESP_CHUNKED, SL_RESP_EOF };

struct sl_conn {
  uv_tcp_t tcp;
  uv_write_t write_req;
  uv_shutdown_t shutdown_req;
  struct sl_worker *w;
  struct sl_link link; /* in w->conns */
  struct sl_req req;   /* the request being read or served; its buffer is ours */
  enum sl_conn_phase phase;
  uint64_t deadline;  /* loop ms: header/idle/send timeout */
  struct sl_upreq up; /* the request forwarded upstream, when in flight (up.conn) */
  struct sl_buf fwd;  /* the head of that request */
  struct sl_buf out;  /* bytes to the client, not yet handed to the socket */
  struct sl_buf inflight; /* bytes in a pending uv_write */
  char peer[48];      /* client IP for X-Forwarded-For and logs */
  struct sl_call call;  /* admission's state for the request (admit.h) */
  uint64_t body_reserved; /* bytes of this request's body counted in w->body_buffered */
  uint64_t resp_bytes;
  int status;         /* status answered to the client */
  int pool;
  enum sl_resp_mode resp_mode;
  char reqid[37];
  unsigned resp_done : 1;   /* response complete; finish once written */
  unsigned head_sent : 1;   /* response head queued to the client */
  unsigned close_after : 1;  /* close once the current response is out */
  unsigned eof : 1;          /* client sent FIN */
  unsigned closing : 1;
  unsigned read_paused : 1;
  unsigned write_pending : 1;
  unsigned in_parse : 1; /* conn_parse is on the stack: finishing a request returns to its loop */
  unsigned lingering : 1; /* answered before the body was read: draining it before the close */
  unsigned body_unread : 1; /* answered while the request was still arriving */
  unsigned counted : 1;     /* the current request's outcome is counted */
  unsigned orphan : 1;      /* closed while its backend answer is due: kept until it comes (w->orphans) */
  unsigned tcp_closed : 1;  /* an orphan's socket is closed: free it when the answer comes */
};

struct sl_worker {
  unsigned id;
  uv_loop_t loop;
  uv_thread_t thread;
  uv_tcp_t listener;
  int listen_fd;
  struct sl_inbox inbox; /* messages from main, the directory and the flusher */
  uv_timer_t sweep;
  const struct sl_config *cfg; /* snapshot in use by this worker */
  _Atomic(const struct sl_config *) next_cfg; /* published by the main thread */
  _Atomic uint64_t cfg_seen;   /* version this worker runs, for reclamation */
  _Atomic int drain;           /* set by the main thread */
  int draining;
  uint64_t drain_deadline;
  struct sl_shared *shared;
  struct sl_meter_worker meter;
  struct sl_link parked;
  unsigned nparked;
  struct sl_pool *pools[SL_NPOOLS];
  struct sl_link conns;
  struct sl_link orphans; /* connections closed while their backend answer is due (conn.c) */
  unsigned norphans;
  struct sl_link upconns;
  unsigned nconns;
  unsigned nupconns;
  uint64_t rid_hi, rid_seq;
  struct sl_stats stats;
  uint64_t body_buffered; /* request body bytes held by this worker's connections */
  struct sl_req_limits req_limits; /* from cfg, for every connection's parser */
  int log_fd;
  struct sl_buf log;
};

/* worker.c */
int sl_worker_init(struct sl_worker *w, unsigned id, const struct sl_config *cfg, int listen_fd,
                   struct sl_shared *shared);
int sl_worker_run(struct sl_worker *w);
/* After the thread has ended and nothing sends to it any more. */
void sl_worker_destroy(struct sl_worker *w);
/* The configuration version every one of the n workers runs (the least of
 * their cfg_seen; acquire: what a worker let go of before is done). */
uint64_t sl_workers_config_seen(struct sl_worker *w, unsigned n);

/* conn.c */
void sl_conn_accept(struct sl_worker *w);
/* Answers the current request with a JSON error (extra: CRLF-terminated
 * header lines or NULL); close: close the connection after it. */
void sl_conn_error(struct sl_conn *c, int status, const char *code, const char *msg, const char *extra, int close);
/* Sends "100 Continue" to a request that asked for it and whose body has
 * not arrived (best effort). */
void sl_conn_send_continue(struct sl_conn *c);
void sl_conn_sweep(struct sl_conn *c, uint64_t now);
void sl_conn_drain(struct sl_conn *c);
void sl_conn_close(struct sl_conn *c);
/* The drain's bound: orphans stop waiting for their backend (counted as
 * upstream errors unless a 200 head came). */
void sl_conn_orphans_cut(struct sl_worker *w);
/* The request was admitted (c->pool says where): forward it upstream. */
void sl_conn_forward(struct sl_conn *c);

/* access log */
void sl_log_access(struct sl_worker *w, struct sl_conn *c);
void sl_log_flush(struct sl_worker *w);

#endif
