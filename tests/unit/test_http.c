/* Unit tests for proxy/http_util.c and proxy/common.c. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <string.h>

#include "common.h"
#include "http_util.h"

static void test_hdr_kind(void **state) {
  (void)state;
  assert_int_equal(sl_http_hdr_kind("Connection", 10), SL_H_CONNECTION);
  assert_int_equal(sl_http_hdr_kind("KEEP-ALIVE", 10), SL_H_HOP);
  assert_int_equal(sl_http_hdr_kind("te", 2), SL_H_HOP);
  assert_int_equal(sl_http_hdr_kind("Transfer-Encoding", 17), SL_H_TRANSFER_ENCODING);
  assert_int_equal(sl_http_hdr_kind("content-length", 14), SL_H_CONTENT_LENGTH);
  assert_int_equal(sl_http_hdr_kind("X-Forwarded-For", 15), SL_H_X_FORWARDED_FOR);
  assert_int_equal(sl_http_hdr_kind("Proxy-Connection", 16), SL_H_HOP);
  assert_int_equal(sl_http_hdr_kind("x-acs-action", 12), SL_H_X_ACS_ACTION);
  assert_int_equal(sl_http_hdr_kind("Content-Typo", 12), SL_H_OTHER);
  assert_int_equal(sl_http_hdr_kind("Connectio", 9), SL_H_OTHER);
  assert_int_equal(sl_http_hdr_kind("", 0), SL_H_OTHER);
}

static void test_has_token(void **state) {
  (void)state;
  const char *v = "keep-alive, X-Custom ,\tUpgrade";
  assert_true(sl_http_has_token(v, strlen(v), "x-custom", 8));
  assert_true(sl_http_has_token(v, strlen(v), "upgrade", 7));
  assert_true(sl_http_has_token(v, strlen(v), "keep-alive", 10));
  assert_false(sl_http_has_token(v, strlen(v), "close", 5));
  assert_false(sl_http_has_token(v, strlen(v), "x-cust", 6));
  assert_false(sl_http_has_token("", 0, "close", 5));
  assert_true(sl_http_has_token(",,close,,", 9, "close", 5));
}

static void test_urldecode(void **state) {
  (void)state;
  char out[64];
  assert_int_equal(sl_http_urldecode("a%20b+c", 7, out, sizeof(out)), 5);
  assert_memory_equal(out, "a b c", 5);
  assert_int_equal(sl_http_urldecode("%e4%B8%AD", 9, out, sizeof(out)), 3);
  assert_memory_equal(out, "\xe4\xb8\xad", 3);
  assert_int_equal(sl_http_urldecode("%4", 2, out, sizeof(out)), -1);  /* truncated escape */
  assert_int_equal(sl_http_urldecode("%zz", 3, out, sizeof(out)), -1); /* not hex */
  assert_int_equal(sl_http_urldecode("%", 1, out, sizeof(out)), -1);
  assert_int_equal(sl_http_urldecode("abcdef", 6, out, 5), -1); /* does not fit: the bound holds */
  assert_int_equal(sl_http_urldecode("abcde", 5, out, 5), 5);
}

static void test_query_get(void **state) {
  (void)state;
  char out[64];
  const char *q = "Action=TextModeration&AccessKeyId=LTAI%2Bx&Empty=&Flag&Service=text%5Fbaseline";
  size_t n = strlen(q);
  assert_int_equal(sl_http_query_get(q, n, "Action", 6, out, sizeof(out)), 14);
  assert_memory_equal(out, "TextModeration", 14);
  assert_int_equal(sl_http_query_get(q, n, "AccessKeyId", 11, out, sizeof(out)), 6);
  assert_memory_equal(out, "LTAI+x", 6);
  assert_int_equal(sl_http_query_get(q, n, "Service", 7, out, sizeof(out)), 13);
  assert_memory_equal(out, "text_baseline", 13);
  assert_int_equal(sl_http_query_get(q, n, "Empty", 5, out, sizeof(out)), 0);
  assert_int_equal(sl_http_query_get(q, n, "Flag", 4, out, sizeof(out)), 0);
  assert_int_equal(sl_http_query_get(q, n, "Missing", 7, out, sizeof(out)), -1);
  assert_int_equal(sl_http_query_get(q, n, "Act", 3, out, sizeof(out)), -1); /* prefixes do not match */
  assert_int_equal(sl_http_query_get("A=%G0", 5, "A", 1, out, sizeof(out)), -2);
  assert_int_equal(sl_http_query_get("A=toolong", 9, "A", 1, out, 3), -2);
}

static void test_error_body(void **state) {
  (void)state;
  struct sl_buf b = {.max = 4096};
  assert_int_equal(sl_http_error(&b, 429, "Throttling.User", "Request was denied due to user flow control.",
                                 "ABC", "Retry-After: 1\r\n", 0),
                   0);
  b.data[b.len] = '\0'; /* cap > len: reserve doubled */
  const char *s = b.data;
  assert_non_null(strstr(s, "HTTP/1.1 429 Too Many Requests\r\n"));
  assert_non_null(strstr(s, "Retry-After: 1\r\n"));
  assert_null(strstr(s, "Connection: close"));
  const char *body = strstr(s, "\r\n\r\n") + 4;
  assert_string_equal(body,
                      "{\"RequestId\":\"ABC\",\"Code\":\"Throttling.User\",\"Message\":\"Request was denied due to user "
                      "flow control.\"}");
  char cl[64];
  snprintf(cl, sizeof(cl), "Content-Length: %zu\r\n", strlen(body));
  assert_non_null(strstr(s, cl));
  sl_buf_free(&b);
  /* At the bound the buffer refuses and stays as it was. */
  struct sl_buf small = {.max = 64};
  assert_int_equal(sl_http_error(&small, 400, "BadRequest", "x", "id", NULL, 1), -ENOBUFS);
  assert_int_equal(small.len, 0);
  sl_buf_free(&small);
}

static void test_request_id(void **state) {
  (void)state;
  char id[37];
  sl_http_request_id(id, 0x0123456789ABCDEFull, 0xFEDCBA9876543210ull);
  assert_string_equal(id, "01234567-89AB-CDEF-FEDC-BA9876543210");
}

static void test_buf_bound(void **state) {
  (void)state;
  struct sl_buf b = {.max = 10};
  assert_int_equal(sl_buf_append(&b, "12345", 5), 0);
  assert_int_equal(sl_buf_append(&b, "67890", 5), 0);
  assert_int_equal(sl_buf_append(&b, "x", 1), -ENOBUFS);
  assert_int_equal(b.len, 10);
  assert_memory_equal(b.data, "1234567890", 10);
  b.len = 0;
  sl_buf_shrink(&b, 4);
  assert_null(b.data);
  sl_buf_free(&b);
  char num[21];
  assert_int_equal(sl_u64toa(0, num), 1);
  assert_string_equal(num, "0");
  assert_int_equal(sl_u64toa(18446744073709551615ull, num), 20);
  assert_string_equal(num, "18446744073709551615");
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_hdr_kind),   cmocka_unit_test(test_has_token), cmocka_unit_test(test_urldecode),
      cmocka_unit_test(test_query_get),  cmocka_unit_test(test_error_body), cmocka_unit_test(test_request_id),
      cmocka_unit_test(test_buf_bound),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
