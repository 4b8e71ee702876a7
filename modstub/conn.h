/* One accepted client connection: parsing, the queue of answers, writing.
 * Everything here runs on the owning worker's loop thread. */
#ifndef MODSTUB_CONN_H
#define MODSTUB_CONN_H

#include <stddef.h>
#include <stdint.h>

#include <llhttp.h>
#include <uv.h>

#include "buf.h"
#include "modstub.h"

#define MS_INBUF 16384               /* read buffer per connection */
#define MS_QMAX 64                   /* answers queued per connection */
#define MS_MAX_HEADERS 128
#define MS_MAX_URL 8192
#define MS_MAX_HEAD (64u << 10)      /* URL + header names and values */
#define MS_MAX_BODY (16u << 20)      /* request body, else 413 */
#define MS_ECHO_BODY (64u << 10)     /* body bytes kept for /echo and Service */
#define MS_OUT_HIGH (8u << 20)       /* queued answer bytes before reading stops */

/* Request headers that modstub looks at, found once per header. */
enum ms_hdr_kind {
  MS_H_ACTION,   /* x-acs-action */
  MS_H_REQID,    /* x-request-id */
  MS_H_CTYPE,    /* content-type */
  MS_H_STATUS,   /* x-modstub-status */
  MS_H_DELAY,    /* x-modstub-delay-ms */
  MS_H_CHUNKED,  /* x-modstub-chunked */
  MS_H_CLOSE,    /* x-modstub-close */
  MS_H_SIZE,     /* x-modstub-size */
  MS_H_HANGUP,   /* x-modstub-hangup */
  MS_H_PARTIAL,  /* x-modstub-partial */
  MS_H_EXPECT,   /* expect */
  MS_H_COUNT
};

/* A header of the request being parsed: offsets into conn->req. */
struct ms_hdr {
  uint32_t name_off, name_len;
  uint32_t val_off, val_len;
};

/* One queued answer; its bytes are out.p[off, off + len). */
struct ms_reply {
  size_t off, len;
  size_t send;          /* bytes to send: len, or fewer for x-modstub-partial */
  uint64_t due;         /* loop time (ms) before which it is held back */
  unsigned close : 1;   /* close the connection once it is sent */
  unsigned hangup : 1;  /* close the connection instead of sending it */
};

enum ms_conn_state {
  MS_CONN_OPEN,    /* reading and answering requests */
  MS_CONN_DRAIN,   /* an answer that closes is queued: parse nothing more */
  MS_CONN_LINGER,  /* all sent, write side shut: discard input until EOF */
  MS_CONN_CLOSED   /* uv_close called on both handles */
};

struct ms_conn {
  uv_tcp_t tcp;
  uv_timer_t timer;      /* delayed answers, then the linger bound */
  uv_write_t wreq;
  uv_shutdown_t sreq;
  struct ms_worker *w;
  llhttp_t parser;
  uint64_t id;           /* process-wide connection number, from 1 */
  uint64_t nreq;         /* requests seen on this connection */
  int open_handles;
  enum ms_conn_state state;
  unsigned eof : 1;      /* the client shut its write side */
  unsigned writing : 1;  /* a uv_write of out.p is in flight */
  unsigned reading : 1;

  /* The request being parsed. req holds the URL (at 0), header names and
   * values, then up to MS_ECHO_BODY body bytes (at body_off). */
  struct ms_buf req;
  uint32_t url_len;
  struct ms_hdr hdr[MS_MAX_HEADERS];
  unsigned nhdr;
  int hdr_open;          /* hdr[nhdr] is being filled */
  int known[MS_H_COUNT]; /* index in hdr, or -1 */
  uint64_t body_len;
  uint64_t body_hash;    /* FNV-1a 64 */
  size_t body_off;
  int req_error;         /* HTTP status for a request we refuse, or 0 */

  /* Answers, in request order. A uv_write never outlives a change of out:
   * nothing is appended while `writing` is set. */
  struct ms_buf out;
  struct ms_reply q[MS_QMAX];
  unsigned qhead, qlen;
  unsigned wbatch;       /* replies covered by the write in flight */

  size_t in_off, in_len; /* unparsed input is in[in_off, in_len) */
  char in[MS_INBUF];
};

/* Appends a reply slot to c's queue and returns it (zeroed, off set to the
 * current end of out). The caller appends the bytes to c->out and sets len.
 * The caller has checked that the queue is not full. */
struct ms_reply *ms_conn_push(struct ms_conn *c);

/* Builds and queues the answer to the request just parsed on c. */
void ms_reply_request(struct ms_conn *c);
/* Queues an error answer with `status` that closes c. */
void ms_reply_error(struct ms_conn *c, int status);

#endif
