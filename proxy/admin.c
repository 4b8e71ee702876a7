#include "admin.h"

#include <stdarg.h>
#include <string.h>

#include "http.h"

struct admin_conn {
  uv_tcp_t tcp;
  uv_write_t wreq;
  struct sl_admin *admin;
  llhttp_t parser;
  char url[256];
  size_t url_len;
  char in[4096];
  struct sl_buf out;
  int done;
};

static llhttp_settings_t admin_settings;

static void admin_conn_free(uv_handle_t *h) {
  struct admin_conn *ac = sl_container_of(h, struct admin_conn, tcp);
  sl_buf_free(&ac->out);
  free(ac);
}

static void appendf(struct sl_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void appendf(struct sl_buf *b, const char *fmt, ...) {
  char tmp[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
  va_end(ap);
  if (n > 0) sl_buf_append(b, tmp, (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

#define LOAD(x) atomic_load_explicit(&(x), memory_order_relaxed)

static uint64_t sum(struct sl_admin *a, size_t off) {
  uint64_t s = 0;
  for (unsigned i = 0; i < a->nworkers; i++)
    s += atomic_load_explicit((_Atomic uint64_t *)((char *)&a->workers[i].stats + off), memory_order_relaxed);
  return s;
}
#define SUM(field) sum(a, offsetof(struct sl_stats, field))

void sl_admin_metrics(struct sl_admin *a, struct sl_buf *o) {
  static const char *classes[] = {"", "1xx", "2xx", "3xx", "4xx", "5xx"};
  appendf(o, "# HELP sluice_requests_total Requests answered to clients, by status class.\n"
             "# TYPE sluice_requests_total counter\n");
  for (int k = 1; k <= 5; k++)
    appendf(o, "sluice_requests_total{class=\"%s\"} %llu\n", classes[k],
            (unsigned long long)sum(a, offsetof(struct sl_stats, status_class) + (size_t)k * sizeof(uint64_t)));
  struct {
    const char *name, *type, *help;
    size_t off;
  } plain[] = {
      {"sluice_connections_open", "gauge", "Client connections open.", offsetof(struct sl_stats, conns_open)},
      {"sluice_connections_accepted_total", "counter", "Client connections accepted.",
       offsetof(struct sl_stats, conns_accepted)},
      {"sluice_connections_refused_total", "counter", "Client connections refused at max-conns.",
       offsetof(struct sl_stats, conns_refused)},
      {"sluice_upstream_connects_total", "counter", "Upstream connections opened.",
       offsetof(struct sl_stats, up_connects)},
      {"sluice_upstream_reused_total", "counter", "Requests sent on a kept-alive upstream connection.",
       offsetof(struct sl_stats, up_reused)},
      {"sluice_upstream_connect_errors_total", "counter", "Upstream connects that failed.",
       offsetof(struct sl_stats, up_connect_errors)},
      {"sluice_upstream_errors_total", "counter", "Upstream exchanges that broke (reset, bad response).",
       offsetof(struct sl_stats, up_errors)},
      {"sluice_upstream_timeouts_total", "counter", "Upstream connect or response timeouts.",
       offsetof(struct sl_stats, up_timeouts)},
      {"sluice_upstream_retries_total", "counter", "Requests retried on another upstream connection.",
       offsetof(struct sl_stats, up_retries)},
      {"sluice_upstream_ejections_total", "counter", "Upstream addresses ejected by passive health checks.",
       offsetof(struct sl_stats, up_ejections)},
  };
  for (size_t i = 0; i < SL_ARRAY_SIZE(plain); i++)
    appendf(o, "# HELP %s %s\n# TYPE %s %s\n%s %llu\n", plain[i].name, plain[i].help, plain[i].name, plain[i].type,
            plain[i].name, (unsigned long long)sum(a, plain[i].off));
  appendf(o, "# HELP sluice_upstream_latency_seconds Time from sending a request to its response head.\n"
             "# TYPE sluice_upstream_latency_seconds histogram\n");
  uint64_t cum = 0;
  for (int i = 0; i <= SL_LAT_BUCKETS; i++) {
    cum += sum(a, offsetof(struct sl_stats, lat_bucket) + (size_t)i * sizeof(uint64_t));
    if (i < SL_LAT_BUCKETS)
      appendf(o, "sluice_upstream_latency_seconds_bucket{le=\"%g\"} %llu\n", (double)sl_lat_bounds_us[i] / 1e6,
              (unsigned long long)cum);
    else
      appendf(o, "sluice_upstream_latency_seconds_bucket{le=\"+Inf\"} %llu\n", (unsigned long long)cum);
  }
  appendf(o, "sluice_upstream_latency_seconds_sum %.6f\nsluice_upstream_latency_seconds_count %llu\n",
          (double)SUM(lat_sum_us) / 1e6, (unsigned long long)SUM(lat_count));
  appendf(o, "# HELP sluice_workers Event-loop threads.\n# TYPE sluice_workers gauge\nsluice_workers %u\n",
          a->nworkers);
  appendf(o, "# HELP sluice_config_version Version of the configuration in force.\n"
             "# TYPE sluice_config_version gauge\nsluice_config_version %llu\n",
          (unsigned long long)atomic_load_explicit(a->config_version, memory_order_relaxed));
}

static void admin_written(uv_write_t *req, int status) {
  (void)status;
  struct admin_conn *ac = sl_container_of(req, struct admin_conn, wreq);
  sl__close((uv_handle_t *)&ac->tcp, admin_conn_free);
}

static void admin_respond(struct admin_conn *ac, int status, const char *ctype, struct sl_buf *body) {
  char head[256];
  int n = snprintf(head, sizeof(head),
                   "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n", status,
                   sl_http_reason(status), ctype, body->len);
  sl_buf_append(&ac->out, head, (size_t)n);
  sl_buf_append(&ac->out, body->data, body->len);
  uv_buf_t b = uv_buf_init(ac->out.data, (unsigned)ac->out.len);
  ac->done = 1;
  uv_read_stop((uv_stream_t *)&ac->tcp);
  if (uv_write(&ac->wreq, (uv_stream_t *)&ac->tcp, &b, 1, admin_written) != 0)
    sl__close((uv_handle_t *)&ac->tcp, admin_conn_free);
}

static int admin_on_url(llhttp_t *p, const char *at, size_t n) {
  struct admin_conn *ac = p->data;
  if (ac->url_len + n >= sizeof(ac->url)) return -1;
  memcpy(ac->url + ac->url_len, at, n);
  ac->url_len += n;
  ac->url[ac->url_len] = '\0';
  return 0;
}

static int admin_on_complete(llhttp_t *p) {
  struct admin_conn *ac = p->data;
  struct sl_buf body = {.max = 1u << 20};
  size_t path_len = strcspn(ac->url, "?");
  if (path_len == 8 && !memcmp(ac->url, "/healthz", 8)) {
    sl_buf_lit(&body, "ok\n");
    admin_respond(ac, 200, "text/plain", &body);
  } else if (path_len == 8 && !memcmp(ac->url, "/metrics", 8)) {
    sl_admin_metrics(ac->admin, &body);
    admin_respond(ac, 200, "text/plain; version=0.0.4", &body);
  } else {
    sl_buf_lit(&body, "{\"Code\":\"NotFound\",\"Message\":\"Try /healthz or /metrics.\"}");
    admin_respond(ac, 404, "application/json", &body);
  }
  sl_buf_free(&body);
  return HPE_PAUSED;
}

static void admin_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b) {
  (void)hint;
  struct admin_conn *ac = sl_container_of(h, struct admin_conn, tcp);
  *b = uv_buf_init(ac->in, sizeof(ac->in));
}

static void admin_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b) {
  struct admin_conn *ac = sl_container_of(s, struct admin_conn, tcp);
  if (ac->done) return;
  if (nread < 0) {
    sl__close((uv_handle_t *)&ac->tcp, admin_conn_free);
    return;
  }
  llhttp_errno_t e = llhttp_execute(&ac->parser, b->base, (size_t)nread);
  if (e != HPE_OK && e != HPE_PAUSED) {
    struct sl_buf body = {.max = 4096};
    sl_buf_lit(&body, "{\"Code\":\"BadRequest\",\"Message\":\"Malformed request.\"}");
    admin_respond(ac, 400, "application/json", &body);
    sl_buf_free(&body);
  }
}

static void admin_on_connection(uv_stream_t *s, int status) {
  struct sl_admin *a = sl_container_of(s, struct sl_admin, tcp);
  if (status < 0) return;
  struct admin_conn *ac = sl_calloc(1, sizeof(*ac));
  ac->admin = a;
  ac->out.max = 1u << 20;
  uv_tcp_init(s->loop, &ac->tcp);
  if (uv_accept(s, (uv_stream_t *)&ac->tcp) != 0) {
    uv_close((uv_handle_t *)&ac->tcp, admin_conn_free);
    return;
  }
  llhttp_init(&ac->parser, HTTP_REQUEST, &admin_settings);
  ac->parser.data = ac;
  uv_read_start((uv_stream_t *)&ac->tcp, admin_alloc, admin_read);
}

int sl_admin_start(struct sl_admin *a, uv_loop_t *loop, const struct sl_addr *addr) {
  llhttp_settings_init(&admin_settings);
  admin_settings.on_url = admin_on_url;
  admin_settings.on_message_complete = admin_on_complete;
  int r;
  uv_tcp_init(loop, &a->tcp);
  if ((r = uv_tcp_bind(&a->tcp, (const struct sockaddr *)&addr->sa, 0)) != 0) return r;
  return uv_listen((uv_stream_t *)&a->tcp, 128, admin_on_connection);
}

void sl_admin_stop(struct sl_admin *a) { sl__close((uv_handle_t *)&a->tcp, NULL); }
