"""Hostile input (issue 9): request smuggling, malformed framing, limit
bypasses and resource pins, each tried through the real binary. The witness
of every security fix is what reached the backend: RawBackend records each
request exactly as it arrived, and every test compares that with what sluice
answered.

Each class starts its own redis-server, raw backends and sluice on loopback;
every process is stopped by PID through addCleanup."""

import os
import re
import resource
import shutil
import socket
import subprocess
import threading
import time
import unittest

import harness
from proxyenv import start_modstub, start_sluice

P = "sluice:"
FORM = "application/x-www-form-urlencoded"
V1 = "/?Action=TextModeration&AccessKeyId=AK1"


class RawBackend:
    """A backend on 127.0.0.1 that keeps every request it is sent (head and
    body bytes, as received) and answers each with a small JSON 200."""

    def __init__(self, test):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.requests = []  # (head bytes, body bytes)
        self.lock = threading.Lock()
        self.stop = False
        self.conns = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()
        test.addCleanup(self.close)

    def close(self):
        self.stop = True
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass

    def _accept(self):
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                head, buf = buf.split(b"\r\n\r\n", 1)
                m = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
                n = int(m.group(1)) if m else 0
                while len(buf) < n:
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                body, buf = buf[:n], buf[n:]
                with self.lock:
                    self.requests.append((head, body))
                reply, close = self.answer(head)
                c.sendall(reply)
                if close:
                    c.close()
                    return
        except OSError:
            return

    def answer(self, head):
        """The bytes to send for a request with this head, and whether to
        close after them."""
        out = b'{"Code":200,"Data":{},"RequestId":"raw"}'
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(out), out)), False

    def got(self):
        with self.lock:
            return list(self.requests)


def poll(fn, timeout, what, interval=0.01):
    t0 = time.monotonic()
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not seen within {timeout} s (last: {v!r})")
        time.sleep(interval)


class HostileCase(unittest.TestCase):
    SLUICE_ARGS = ()
    WORKERS = 1

    def setUp(self):
        self.r = harness.start_redis()
        self.addCleanup(self.r.stop)
        for k, v in (("ak:AK1", "u1"), ("ak:AK2", "u2"), ("ak:AKS", "us")):
            self.r.cli("SET", P + k, v)
        self.r.cli("SADD", P + "suspended", "us")
        self.be = RawBackend(self)
        self.llm = RawBackend(self)
        self.sl = start_sluice(self, [self.be.port], *self.SLUICE_ARGS, redis=self.r, llm=[self.llm.port],
                               workers=self.WORKERS)
        self.addCleanup(self.check_log)
        poll(lambda: self.sl.metrics().get("sluice_directory_resyncs_total", 0) >= 1, 10, "first resync")

    def check_log(self):
        err = self.sl.stderr()
        self.assertFalse(re.search(r"Sanitizer|runtime error:", err), err[-4000:])

    def ok(self, path=V1, headers=None, body=b"", method=None):
        return harness.http_request(self.sl.port, method or ("POST" if body else "GET"), path, headers, body)

    def assert_refused(self, data, status=400, code=None):
        """`data` gets one answer with `status` (and Code), nothing more, and
        nothing reaches the backend. A malformed request (400 BadRequest,
        413, 431) also has its connection closed after the answer."""
        before = len(self.be.got())
        with harness.HttpConn(self.sl.port, timeout=5) as c:
            c.send(data)
            r = c.read_response()
            self.assertEqual(r.status, status, r.body)
            body = r.json()
            if code:
                self.assertEqual(body["Code"], code)
            if body["Code"] in ("BadRequest", "RequestTooLarge", "RequestHeaderTooLarge"):
                self.assertTrue(c.closed_by_peer(wait=3.0))
        time.sleep(0.05)
        self.assertEqual(self.be.got()[before:], [])
        return r


class Framing(HostileCase):
    def test_trailers_dropped_never_forwarded(self):
        # A chunked request with trailers, then a pipelined second request:
        # the trailers must not be forwarded nor point into the next request.
        first = (b"POST " + V1.encode() + b" HTTP/1.1\r\nHost: green-cip.cn-shanghai.aliyuncs.com\r\n"
                 b"Content-Type: " + FORM.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"9\r\nService=a\r\n0\r\nX-Trailer: t1\r\nX-Uid: victim\r\n\r\n")
        second = harness.HttpConn.build("GET", V1 + "&n=2", {"X-Second": "yes"})
        with harness.HttpConn(self.sl.port) as c:
            c.send(first + second)
            r1, r2 = c.read_response(), c.read_response()
        self.assertEqual((r1.status, r2.status), (200, 200))
        got = self.be.got()
        self.assertEqual(len(got), 2, got)
        (h1, b1), (h2, b2) = got
        self.assertEqual(b1, b"Service=a")
        self.assertNotIn(b"X-Trailer", h1 + h2)
        self.assertNotIn(b"victim", h1 + h2)
        self.assertTrue(h2.startswith(b"GET /?Action=TextModeration&AccessKeyId=AK1&n=2 HTTP/1.1\r\n"), h2)
        for h, _ in got:  # every forwarded head is well formed: one request line, CRLF lines
            self.assertEqual(h.count(b" HTTP/1.1\r\n"), 1, h)
            self.assertNotIn(b"\n\n", h)

    def test_trailers_count_against_the_head_bound(self):
        trailer = b"X-Pad: " + b"a" * 20000 + b"\r\n"
        data = (b"POST " + V1.encode() + b" HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"1\r\na\r\n0\r\n" + trailer + b"\r\n")
        self.assert_refused(data, 431, "RequestHeaderTooLarge")

    def test_head_ending_in_bare_lf(self):
        # llhttp 8.1 accepts "\r\n\n" as the end of the head.
        self.assert_refused(b"GET " + V1.encode() + b" HTTP/1.1\r\nHost: a\r\n\nGET /x HTTP/1.1\r\n\r\n")
        body = b"x" * 9000
        self.assert_refused(b"POST " + V1.encode() + b" HTTP/1.1\r\nHost: a\r\nContent-Length: 9000\r\n\n" + body)

    def test_request_line_ending_in_bare_lf(self):
        self.assert_refused(b"GET " + V1.encode() + b" HTTP/1.1\nHost: a\r\n\r\n")

    def test_obs_fold(self):
        before = self.sl.metrics()["sluice_requests_malformed_total"]
        self.assert_refused(b"GET " + V1.encode() + b" HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n")
        self.assertEqual(self.sl.metrics()["sluice_requests_malformed_total"], before + 1)
        self.assert_refused(b"GET " + V1.encode() + b" HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\tGET /smuggled HTTP/1.1\r\n\r\n")

    def test_header_names_must_be_tokens(self):
        self.assert_refused(b"GET " + V1.encode() + b" HTTP/1.1\r\nHost : a\r\n\r\n")
        self.assert_refused(b"GET " + V1.encode() + b" HTTP/1.1\r\nX A: b\r\n\r\n")
        self.assert_refused(b"GET " + V1.encode() + b" HTTP/1.1\r\n: b\r\n\r\n")  # llhttp 8.1 takes an empty name
        self.assert_refused(b"GET " + V1.encode() + b" HTTP/1.1\r\nHost: a\r\n: b\r\n\r\n")

    def test_protocols_other_than_http_1x(self):
        for proto in (b"ICE/1.0", b"RTSP/1.0", b"HTTP/2.0", b"HTTP/0.9"):
            with self.subTest(proto=proto):
                self.assert_refused(b"GET " + V1.encode() + b" " + proto + b"\r\nHost: a\r\n\r\n")
        self.assert_refused(b"GET " + V1.encode() + b"\r\n\r\n")  # HTTP/0.9 style
        self.assert_refused(b"SOURCE " + V1.encode() + b" ICE/1.0\r\nHost: a\r\n\r\n")

    def test_request_target_and_method(self):
        for target in (b"/?Action=TextModeration&AccessKeyId=AK1\tx", b"/?AccessKeyId=AK1#&AccessKeyId=AK2&Action=TextModeration",
                       b"/?Action=TextModeration\x01&AccessKeyId=AK1"):
            with self.subTest(target=target):
                self.assert_refused(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assert_refused(b"CONNECT green-cip.cn-shanghai.aliyuncs.com:443 HTTP/1.1\r\nHost: a\r\n\r\n")

    def test_transfer_codings_other_than_chunked(self):
        for te in (b"gzip, chunked", b"chunked, chunked", b"identity", b"x-chunked"):
            with self.subTest(te=te):
                self.assert_refused(b"POST " + V1.encode() + b" HTTP/1.1\r\nTransfer-Encoding: " + te +
                                    b"\r\n\r\n1\r\na\r\n0\r\n\r\n")
        with harness.HttpConn(self.sl.port) as c:  # "chunked" in any case, around spaces: fine
            c.send(b"POST " + V1.encode() + b" HTTP/1.1\r\nTransfer-Encoding:  Chunked \r\n\r\n1\r\na\r\n0\r\n\r\n")
            self.assertEqual(c.read_response().status, 200)

    def test_chunk_data_without_crlf(self):
        base = b"POST " + V1.encode() + b" HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        self.assert_refused(base + b"3\r\nabcXX0\r\n\r\n")
        self.assert_refused(base + b"3\r\nabc\n0\r\n\r\n")
        self.assert_refused(base + b"3\r\nabc\r\n0\r\n\n")  # the last line
        self.assert_refused(base + b"3\r\nabc\r\n0\r\nX-T: 1\r\n\n")

    def test_chunk_crlf_split_across_reads(self):
        # Valid framing whose CRLFs arrive in separate reads is accepted.
        head = b"POST " + V1.encode() + b" HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        parts = [head, b"3\r\nab", b"c\r", b"\n4\r\nwxyz\r", b"\n0\r\n\r", b"\n"]
        with harness.HttpConn(self.sl.port) as c:
            for p in parts:
                c.send(p)
                time.sleep(0.05)
            r = c.read_response()
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(self.be.got()[-1][1], b"abcwxyz")

    def test_chunked_head_exactly_at_the_bound(self):
        # A chunked request whose head is exactly --max-header-bytes (16384)
        # used to stall until 408: the read buffer had no room left.
        start = b"POST " + V1.encode() + b" HTTP/1.1\r\nTransfer-Encoding: chunked\r\nX-Pad: "
        pad = 16384 - len(start) - 4
        head = start + b"p" * pad + b"\r\n\r\n"
        self.assertEqual(len(head), 16384)
        t0 = time.monotonic()
        with harness.HttpConn(self.sl.port) as c:
            c.send(head + b"5\r\nhello\r\n0\r\n\r\n")
            r = c.read_response()
        self.assertEqual(r.status, 200, r.body)
        self.assertLess(time.monotonic() - t0, 5.0)  # the 408 would come after --header-timeout-ms (10 s)
        self.assertEqual(self.be.got()[-1][1], b"hello")

    def test_transfer_encoding_in_http10(self):
        # RFC 9112 6.1: faulty framing in HTTP/1.0 (an HTTP/1.0 hop in front
        # may not de-chunk it); refused as nginx does, even when chunked.
        for te in (b"chunked", b"Chunked"):
            with self.subTest(te=te):
                self.assert_refused(b"POST " + V1.encode() + b" HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: " + te +
                                    b"\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /?smuggled=1 HTTP/1.0\r\n\r\n",
                                    400, "BadRequest")

    def test_request_target_forms(self):
        # absolute-form: a backend reads the target's authority in place of
        # Host (RFC 9112 3.2.2), so the two must be the same host.
        for target, host in ((b"http://green-cip.cn-beijing.aliyuncs.com", b"green-cip.cn-shanghai.aliyuncs.com"),
                             (b"https://evil.example", b"green-cip.cn-shanghai.aliyuncs.com"),
                             (b"http://u@green-cip.cn-shanghai.aliyuncs.com", b"green-cip.cn-shanghai.aliyuncs.com"),
                             (b"http://", b""),
                             (b"ftp://a", b"a"),
                             (b"x/y", b"a")):
            with self.subTest(target=target):
                self.assert_refused(b"GET " + target + V1.encode() + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n",
                                    400, "BadRequest")
        # no Host to compare with, or one that is not forwarded
        self.assert_refused(b"GET http://a" + V1.encode() + b" HTTP/1.1\r\n\r\n", 400, "BadRequest")
        self.assert_refused(b"GET http://a" + V1.encode() + b" HTTP/1.1\r\nHost: a\r\nConnection: host\r\n\r\n",
                            400, "BadRequest")
        # "*" is for OPTIONS only
        self.assert_refused(b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400, "BadRequest")
        # the same host, in any case and with its port: served as sent
        target = b"HTTP://Green-Cip.cn-beijing.aliyuncs.com:80" + V1.encode()
        r = self.ok(target.decode(), {"Host": "green-cip.CN-BEIJING.aliyuncs.com:80"})
        self.assertEqual(r.status, 200, r.body)
        self.assertTrue(self.be.got()[-1][0].startswith(b"GET " + target + b" HTTP/1.1\r\n"))

    def test_host_values(self):
        # A Host that does not parse as host[:port] would name one region
        # here (the default) and maybe another to a backend: 400.
        for host in (b"green-cip.nowhere-9.aliyuncs.com,green-cip.cn-shanghai.aliyuncs.com",
                     b"green-cip.nowhere-9.aliyuncs.com x", b"u@green-cip.nowhere-9.aliyuncs.com",
                     b"green-cip.nowhere-9.aliyuncs.com/x", b"green-cip.nowhere-9.aliyuncs.com..",
                     b".green-cip.nowhere-9.aliyuncs.com", b"green-cip.nowhere-9.aliyuncs.com:44x", b":80",
                     b"[::1", b"a\\b", b"a;b", b"a%2eb"):
            with self.subTest(host=host):
                self.assert_refused(b"GET " + V1.encode() + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n",
                                    400, "BadRequest")
        for host in ("green-cip.cn-shanghai.aliyuncs.com.", "green-cip.cn-shanghai.aliyuncs.com.:443", "[::1]:8080",
                     "127.0.0.1", "my_host", ""):
            with self.subTest(host=host):
                self.assertEqual(self.ok(V1, {"Host": host}).status, 200)

    def test_duplicate_identity_headers(self):
        for name in ("Host", "Authorization", "x-acs-action", "Content-Type"):
            with self.subTest(name=name):
                self.assert_refused(b"GET " + V1.encode() + b" HTTP/1.1\r\n" + name.encode() + b": a\r\n" +
                                    name.encode() + b": b\r\n\r\n")


    def test_underscore_aliases_of_read_headers(self):
        # CGI, WSGI and PHP backends read x_acs_action as x-acs-action
        # (HTTP_X_ACS_ACTION): sluice classified text (baseline) by the
        # hyphen line and forwarded the alias naming TextModerationPlus (llm),
        # or a Content_Type, X_Forwarded_For... it did not read (200).
        path = "/?AccessKeyId=AK1"
        for hdrs in ([("x-acs-action", "TextModeration"), ("x_acs_action", "TextModerationPlus")],
                     [("X_Acs_Action", "TextModerationPlus")],
                     [("x-acs-action", "TextModeration"), ("Content_Type", FORM)],
                     [("x-acs-action", "TextModeration"), ("X_Forwarded_For", "10.0.0.1")],
                     [("x-acs-action", "TextModeration"), ("Transfer_Encoding", "chunked")]):
            with self.subTest(hdrs=hdrs):
                self.assert_refused(harness.HttpConn.build("GET", path, hdrs), 400, "BadRequest")
        # '_' elsewhere is fine
        r = self.ok(path, [("x-acs-action", "TextModeration"), ("X_Trace_Id", "1"), ("x_acs_actions", "2")])
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual((len(self.be.got()), len(self.llm.got())), (1, 0))


    def test_request_after_an_upgrade_request(self):
        # sluice never switches protocols (Upgrade is hop-by-hop): the bytes
        # after a request with "Connection: Upgrade" are the next request.
        # llhttp paused there as if they were another protocol, and sluice
        # answered that next request 400 and closed (curl --http2 to a
        # cleartext URL asks for h2c on its first request).
        build = harness.HttpConn.build
        for first in (build("GET", V1, [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"),
                                        ("HTTP2-Settings", "AAMAAABkAAQAoAAAAAIAAAAA")]),
                      build("POST", V1, [("Connection", "Upgrade"), ("Upgrade", "websocket"),
                                         ("Content-Type", FORM)], b"Service=a")):
            with self.subTest(first=first[:40]):
                n = len(self.be.got())
                with harness.HttpConn(self.sl.port) as c:
                    c.send(first)
                    self.assertEqual(c.read_response().status, 200)
                    time.sleep(0.05)  # the next request in a read of its own, then with the first's
                    c.send(build("GET", V1 + "&n=2"))
                    r2 = c.read_response()
                    c.send(first + build("GET", V1 + "&n=3"))
                    r3, r4 = c.read_response(), c.read_response()
                self.assertEqual((r2.status, r3.status, r4.status), (200, 200, 200), (r2.body, r4.body))
                got = self.be.got()[n:]
                self.assertEqual(len(got), 4, got)
                self.assertTrue(got[1][0].startswith(b"GET " + V1.encode() + b"&n=2 HTTP/1.1\r\n"))
                self.assertTrue(got[3][0].startswith(b"GET " + V1.encode() + b"&n=3 HTTP/1.1\r\n"))
                for h, _ in got:
                    self.assertNotIn(b"upgrade", h.lower())


class SmallStack(HostileCase):
    """sluice's threads on small stacks (the limit is inherited from the
    environment): a request loop that recursed once per pipelined answer
    overflowed here; a flat one does not care."""

    def setUp(self):
        old = resource.getrlimit(resource.RLIMIT_STACK)
        sanitized = os.environ.get("ASAN_OPTIONS") or os.environ.get("TSAN_OPTIONS")
        small = (2048 if sanitized else 256) * 1024
        resource.setrlimit(resource.RLIMIT_STACK, (small, old[1]))
        try:
            super().setUp()
        finally:
            resource.setrlimit(resource.RLIMIT_STACK, old)

    def test_pipelined_burst_answered_in_order(self):
        pipelined_burst(self)


def pipelined_burst(test, n=100000):
    """n pipelined requests that sluice answers itself (no Action: 400) in
    one write: every answer arrives, in order, and nothing reaches the
    backend."""
    one = b"GET /?n=%d HTTP/1.1\r\nHost: a\r\n\r\n"
    data = b"".join(one % i for i in range(n))
    got = []

    def reader(sock):
        buf = b""
        while len(got) < n:
            try:
                d = sock.recv(1 << 20)
            except OSError:
                return
            if not d:
                return
            buf += d
            while True:
                i = buf.find(b"\r\n\r\n")
                if i < 0:
                    break
                m = re.search(rb"Content-Length: (\d+)", buf[:i])
                end = i + 4 + int(m.group(1))
                if len(buf) < end:
                    break
                got.append((buf[:12], buf[i + 4:end]))
                buf = buf[end:]

    s = socket.create_connection(("127.0.0.1", test.sl.port), timeout=60)
    test.addCleanup(s.close)
    t = threading.Thread(target=reader, args=(s,))
    t.start()
    s.sendall(data)
    t.join(120)
    test.assertEqual(len(got), n)
    test.assertEqual({g[0] for g in got}, {b"HTTP/1.1 400"})
    test.assertIn(b"MissingAction", got[-1][1])
    test.assertEqual(test.be.got(), [])
    test.assertEqual(test.sl.proc.poll(), None)


class Identity(HostileCase):
    def test_conflicting_access_key_ids(self):
        for path, hdrs in (
            ("/?Action=TextModeration&AccessKeyId=AK1&AccessKeyId=AK2", {}),
            ("/?Action=TextModeration&AccessKeyId=&AccessKeyId=AK2", {}),
            ("/?Action=TextModeration&AccessKeyId=AK1&Access%4BeyId=AK2", {}),  # a name is read decoded
            ("/?Action=TextModeration",
             {"Authorization": "ACS3-HMAC-SHA256 Credential=AK1,SignedHeaders=host,Credential=AK2,Signature=00"}),
            ("/?Action=TextModeration&AccessKeyId=AK2",
             {"Authorization": "ACS3-HMAC-SHA256 Credential=AK1,SignedHeaders=host,Signature=00"}),
        ):
            with self.subTest(path=path):
                data = harness.HttpConn.build("GET", path, hdrs)
                self.assert_refused(data, 400, "InvalidParameter")
        # in the form body against the query
        body = b"Service=chat_detection&AccessKeyId=AK2"
        data = harness.HttpConn.build("POST", V1, {"Content-Type": FORM}, body)
        self.assert_refused(data, 400, "InvalidParameter")

    def test_conflicting_actions(self):
        data = harness.HttpConn.build("GET", V1, {"x-acs-action": "ImageModeration"})
        self.assert_refused(data, 400, "InvalidParameter")
        data = harness.HttpConn.build("GET", V1 + "&Action=ImageModeration")
        self.assert_refused(data, 400, "InvalidParameter")

    def test_agreeing_values_pass(self):
        hdrs = {"x-acs-action": "TextModeration",
                "Authorization": "ACS3-HMAC-SHA256 Credential=AK1,SignedHeaders=host,Signature=00"}
        self.assertEqual(self.ok(V1 + "&AccessKeyId=AK1", hdrs).status, 200)
        self.assertEqual(self.ok(V1 + "&AccessKeyId=A%4B1").status, 200)  # same value once decoded
        self.assertEqual(len(self.be.got()), 2)

    def test_parameter_names_in_any_case(self):
        # A backend that reads "accesskeyid" or "ACTION" as the parameter
        # must not see another value than the one classified.
        for path in ("/?Action=TextModeration&AccessKeyId=AK1&accesskeyid=AKS",
                     "/?Action=TextModeration&AccessKeyId=AK1&ACCESSKEYID=AKS",
                     "/?Action=TextModeration&AccessKeyId=AK1&action=TextModerationPlus",
                     "/?action=TextModerationPlus&AccessKeyId=AK1",  # against x-acs-action
                     "/?Action=ImageModeration&AccessKeyId=AK1&Service=baselineCheck&service=postImageCheckByVL",
                     "/?Action=TextModeration&AccessKeyId=AK1&accessKey%49d=AKS"):
            with self.subTest(path=path):
                data = harness.HttpConn.build("GET", path, {"x-acs-action": "TextModeration"})
                self.assert_refused(data, 400, "InvalidParameter")
        for body in (b"accessKeyId=AKS&Service=chat_detection",
                     b"Service=chat_detection&service=x"):
            with self.subTest(body=body):
                data = harness.HttpConn.build("POST", V1, {"Content-Type": FORM}, body)
                self.assert_refused(data, 400, "InvalidParameter")
        # the body's Service in another case against the query's
        data = harness.HttpConn.build("POST", "/?Action=ImageModeration&AccessKeyId=AK1&Service=baselineCheck",
                                      {"Content-Type": FORM}, b"SERVICE=postImageCheckByVL")
        self.assert_refused(data, 400, "InvalidParameter")
        # against the Credential
        data = harness.HttpConn.build("GET", "/?Action=TextModeration&accesskeyid=AKS",
                                      {"Authorization": "ACS3-HMAC-SHA256 Credential=AK1,Signature=00"})
        self.assert_refused(data, 400, "InvalidParameter")
        # alone, a name in another case names nothing (SPEC 3 names the parameters)
        r = self.ok("/?Action=TextModeration&accesskeyid=AK1")
        self.assertEqual((r.status, r.json()["Code"]), (403, "InvalidAccessKeyId.NotFound"))
        # the same value in another case is no conflict
        r = self.ok("/?Action=TextModeration&ACTION=TextModeration&accesskeyid=AK1&AccessKeyId=A%4B1")
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual((len(self.be.got()), len(self.llm.got())), (1, 0))

    def test_parameter_names_as_php_reads_them(self):
        # PHP skips leading spaces in a parameter name and ends it at a NUL:
        # "+AccessKeyId" and "AccessKeyId%00" are AccessKeyId there, and the
        # last one wins; sluice ignored them and classified AK1 (200).
        for path in ("/?Action=TextModeration&AccessKeyId=AK1&AccessKeyId%00=AKS",
                     "/?Action=TextModeration&AccessKeyId=AK1&+AccessKeyId=AKS",
                     "/?Action=TextModeration&AccessKeyId=AK1&%20%20accesskeyid%00x=AKS",
                     "/?Action=TextModeration&AccessKeyId=AK1&Action%00=TextModerationPlus"):
            with self.subTest(path=path):
                self.assert_refused(harness.HttpConn.build("GET", path), 400, "InvalidParameter")
        data = harness.HttpConn.build("POST", "/?Action=ImageModeration&AccessKeyId=AK1", {"Content-Type": FORM},
                                      b"Service=baselineCheck&+Service=postImageCheckByVL")
        self.assert_refused(data, 400, "InvalidParameter")
        # the same value so spelt is no conflict; alone it names nothing
        r = self.ok("/?Action=TextModeration&AccessKeyId=AK1&AccessKeyId%00=A%4B1&+Action=TextModeration")
        self.assertEqual(r.status, 200, r.body)
        r = self.ok("/?Action=TextModeration&AccessKeyId%00=AK1")
        self.assertEqual((r.status, r.json()["Code"]), (403, "InvalidAccessKeyId.NotFound"))
        self.assertEqual((len(self.be.got()), len(self.llm.got())), (1, 0))

    def test_pairs_after_a_semicolon(self):
        # Rack 2, Perl's CGI.pm and Python before 3.9.2 split parameters at
        # ';' too: "x=1;AccessKeyId=AKS" names AKS there (the last one winning
        # in Rack), while sluice read one parameter x and classified AK1 (200).
        for path in ("/?Action=TextModeration&AccessKeyId=AK1&x=1;AccessKeyId=AKS",
                     "/?Action=TextModeration&AccessKeyId=AK1&x=1;y=2;accesskeyid=AKS",
                     "/?AccessKeyId=AK1&Action=TextModeration;Action=TextModerationPlus"):
            with self.subTest(path=path):
                self.assert_refused(harness.HttpConn.build("GET", path), 400, "InvalidParameter")
        # in a form body, where a raw space after the separator is skipped too
        for body in (b"Service=baselineCheck&x=1; Service=postImageCheckByVL",
                     b"Service=baselineCheck& Service=postImageCheckByVL"):
            with self.subTest(body=body):
                data = harness.HttpConn.build("POST", "/?Action=ImageModeration&AccessKeyId=AK1",
                                              {"Content-Type": FORM}, body)
                self.assert_refused(data, 400, "InvalidParameter")
        # a ';' elsewhere changes nothing
        r = self.ok(V1 + "&x=1;y=2;AccessKeyId=AK1")
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual((len(self.be.got()), len(self.llm.got())), (1, 0))

    def test_every_acs3_algorithm_names_the_key(self):
        # V3 signatures also come as ACS3-HMAC-SM3 and ACS3-RSA-SHA256: their
        # Credential is the identity a backend authenticates.
        for scheme in ("ACS3-HMAC-SM3", "ACS3-RSA-SHA256", "acs3-hmac-sm3"):
            with self.subTest(scheme=scheme):
                auth = scheme + " Credential=AKS,SignedHeaders=host,Signature=00"
                data = harness.HttpConn.build("GET", V1, {"Authorization": auth})
                self.assert_refused(data, 400, "InvalidParameter")  # against the query's AK1
                data = harness.HttpConn.build("GET", "/?Action=TextModeration", {"Authorization": auth})
                self.assert_refused(data, 403, "Forbidden.AccountSuspended")
        r = self.ok("/?Action=TextModeration", {"Authorization": "ACS3-HMAC-SM3 Credential=AK1,Signature=00"})
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(len(self.be.got()), 1)

    def test_credential_with_whitespace_around_equals(self):
        # RFC 9110 11.2 allows whitespace around an auth-param's '=': a
        # backend reads "Credential = AKS" as the key AKS (suspended) while
        # sluice missed it and classified the query's AK1 (200, forwarded).
        for cred in ("Credential = AKS", "Credential =AKS", "Credential=\tAKS", "credential\t= AKS"):
            with self.subTest(cred=cred):
                auth = "ACS3-HMAC-SHA256 " + cred + ",SignedHeaders=host,Signature=00"
                self.assert_refused(harness.HttpConn.build("GET", V1, {"Authorization": auth}), 400,
                                    "InvalidParameter")
                data = harness.HttpConn.build("GET", "/?Action=TextModeration", {"Authorization": auth})
                self.assert_refused(data, 403, "Forbidden.AccountSuspended")
        r = self.ok(V1, {"Authorization": "ACS3-HMAC-SHA256 SignedHeaders = host, Credential = AK1, Signature=00"})
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(len(self.be.got()), 1)

    def test_ambiguous_form_content_type(self):
        # The form type in a Content-Type that is not exactly it: a backend
        # could read the body's Service (an llm one) where sluice would not.
        path = "/?Action=ImageModeration&AccessKeyId=AK1&Service=baselineCheck"
        body = b"Service=postImageCheckByVL"
        for ct in ("application/x-www-form-urlencodedX", "application/x-www-form-urlencoded, text/plain",
                   "text/plain, application/x-www-form-urlencoded", "application/X-WWW-FORM-URLENCODED2;charset=utf-8"):
            with self.subTest(ct=ct):
                data = harness.HttpConn.build("POST", path, {"Content-Type": ct}, body)
                self.assert_refused(data, 400, "InvalidParameter")
        # decided at the head too, before the body
        data = harness.HttpConn.build("POST", path, {"Content-Type": "application/x-www-form-urlencodedX",
                                                     "Content-Length": "100000"})
        self.assert_refused(data, 400, "InvalidParameter")
        for ct, pool in ((FORM + "; charset=UTF-8", "llm"), ("application/json", "be")):
            r = self.ok(path, {"Content-Type": ct}, body)
            self.assertEqual(r.status, 200, r.body)
        self.assertEqual((len(self.be.got()), len(self.llm.got())), (1, 1))

    def test_multipart_form_refused(self):
        # multipart/form-data fields are parameters to a backend (Go's
        # FormValue prefers them to the query's): sluice classified the
        # query's AK1 and forwarded a body whose AccessKeyId is AKS
        # (suspended), or whose Service is an llm one.
        path = "/?Action=ImageModeration&AccessKeyId=AK1&Service=baselineCheck"
        for name, value in (("AccessKeyId", "AKS"), ("Service", "postImageCheckByVL")):
            body = (b"--XX\r\nContent-Disposition: form-data; name=\"%s\"\r\n\r\n%s\r\n--XX--\r\n"
                    % (name.encode(), value.encode()))
            for ct in ("multipart/form-data; boundary=XX", "Multipart/Form-Data;boundary=XX"):
                with self.subTest(name=name, ct=ct):
                    data = harness.HttpConn.build("POST", path, {"Content-Type": ct}, body)
                    self.assert_refused(data, 400, "InvalidParameter")
        # decided at the head, before the body
        data = harness.HttpConn.build("POST", path, {"Content-Type": "multipart/form-data; boundary=XX",
                                                     "Content-Length": "100000"})
        self.assert_refused(data, 400, "InvalidParameter")
        self.assertEqual(self.llm.got(), [])

    def test_connection_listed_headers_do_not_classify(self):
        # Content-Type listed in Connection is not forwarded, so the form body
        # is not read for Service: the call is an image (baseline) call, as
        # the backend will see it, not image_llm.
        body = b"Service=postImageCheckByVL_global&ServiceParameters=%7B%7D"
        r = self.ok("/?Action=ImageModeration&AccessKeyId=AK1", {"Content-Type": FORM, "Connection": "Content-Type"},
                    body)
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(len(self.llm.got()), 0)
        head, _ = self.be.got()[-1]
        self.assertNotIn(b"content-type", head.lower())
        # Host listed in Connection: the region is the default one, not the Host's
        r = self.ok(V1, {"Host": "green-cip.made-up-9.aliyuncs.com", "Connection": "Host"})
        self.assertEqual(r.status, 200, r.body)

    def test_more_connection_headers_than_read_refused(self):
        # sluice reads 4 Connection lines; a 5th's token (x-acs-action) would
        # be forwarded as a header while hop-by-hop: refused, not half read
        conn = [("Connection", f"x-h{i}") for i in range(4)]
        r = self.ok(V1, conn)
        self.assertEqual(r.status, 200, r.body)
        data = harness.HttpConn.build("GET", "/?AccessKeyId=AK1", conn + [("Connection", "x-acs-action"),
                                                                        ("x-acs-action", "TextModeration")])
        self.assert_refused(data, 400, "BadRequest")

    def test_coded_form_body_refused(self):
        # A gzip-coded form body: sluice would read the query's Service (the
        # body's bytes are not its fields) while a backend that decodes it
        # reads the body's: ByVL (llm) against baseline. Refused at the head.
        import gzip
        body = gzip.compress(b"Service=postImageCheckByVL_global&ServiceParameters=%7B%7D")
        path = "/?Action=ImageModeration&AccessKeyId=AK1&Service=baselineCheck"
        for enc in ("gzip", " GZIP ", "deflate", "identity, gzip"):
            data = harness.HttpConn.build("POST", path, {"Content-Type": FORM, "Content-Encoding": enc}, body)
            self.assert_refused(data, 400, "InvalidParameter")
        # identity is no coding; a coded body that is not a form is not read anyway
        plain = b"Service=baselineCheck&ServiceParameters=%7B%7D"
        r = self.ok(path, {"Content-Type": FORM, "Content-Encoding": "identity"}, plain)
        self.assertEqual(r.status, 200, r.body)
        r = self.ok(path, {"Content-Type": "application/json", "Content-Encoding": "gzip"}, body)
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual((len(self.be.got()), len(self.llm.got())), (2, 0))

    def test_trailer_cannot_name_the_account(self):
        # --trusted-uid-header is off here; TrustedHeader checks it on.
        data = (b"POST /?Action=TextModeration HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"1\r\na\r\n0\r\nX-Uid: u1\r\n\r\n")
        self.assert_refused(data, 403, "InvalidAccessKeyId.NotFound")


class TrustedHeader(HostileCase):
    SLUICE_ARGS = ("--trusted-uid-header", "X-Uid")

    def test_trusted_header_underscore_alias(self):
        # X_Uid is X-Uid to a CGI/WSGI backend (HTTP_X_UID): given with the
        # header, sluice admitted u1 and forwarded the alias naming us
        # (suspended); given alone, it is not the header sluice trusts but a
        # backend would: refused either way.
        for hdrs in ([("X-Uid", "u1"), ("X_Uid", "us")], [("X_Uid", "us"), ("X-Uid", "u1")], [("x_uid", "u1")]):
            with self.subTest(hdrs=hdrs):
                data = harness.HttpConn.build("GET", "/?Action=TextModeration", hdrs)
                self.assert_refused(data, 400, "InvalidParameter")
        r = self.ok("/?Action=TextModeration", [("x-uid", "u1")])
        self.assertEqual(r.status, 200, r.body)

    def test_trailer_is_not_the_trusted_header(self):
        data = (b"POST /?Action=TextModeration HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"1\r\na\r\n0\r\nX-Uid: u1\r\n\r\n")
        self.assert_refused(data, 403, "InvalidAccessKeyId.NotFound")

    def test_trusted_header_twice(self):
        # A front end that adds its line after the client's: sluice and the
        # backend could each read another account.
        for pair in (("u1", "us"), ("us", "u1"), ("u1", "u1")):
            with self.subTest(pair=pair):
                data = harness.HttpConn.build("GET", "/?Action=TextModeration", [("X-Uid", pair[0]), ("x-uid", pair[1])])
                self.assert_refused(data, 400, "InvalidParameter")
                data = harness.HttpConn.build("POST", "/?Action=TextModeration",
                                              [("X-Uid", pair[0]), ("x-uid", pair[1]), ("Content-Length", "100000")])
                self.assert_refused(data, 400, "InvalidParameter")

    def test_connection_listed_trusted_header_is_ignored(self):
        data = harness.HttpConn.build("GET", "/?Action=TextModeration", {"X-Uid": "u1", "Connection": "X-Uid"})
        self.assert_refused(data, 403, "InvalidAccessKeyId.NotFound")
        # and the header itself works
        self.assertEqual(self.ok("/?Action=TextModeration", {"X-Uid": "u1"}).status, 200)


class Regions(HostileCase):
    def test_unknown_region_is_400_and_has_no_bucket(self):
        self.r.cli("HSET", P + "feature:text", "default_qps", "2")
        time.sleep(0.3)
        statuses = []
        for i in range(10):
            r = self.ok(V1, {"Host": f"green-cip.made-up-{i}.aliyuncs.com"})
            statuses.append(r.status)
            if r.status == 400:
                self.assertEqual(r.json()["Code"], "InvalidRegionId")
        self.assertEqual(statuses, [400] * 10)
        self.assertEqual(self.be.got(), [])
        # a known region in another spelling is fine
        self.assertEqual(self.ok(V1, {"Host": "GREEN-CIP-VPC.CN-Beijing.aliyuncs.com:443"}).status, 200)
        self.assertEqual(self.sl.stop(), 0)
        fields = []
        for key in self.r.cli("KEYS", P + "calls:*").split():
            fields += self.r.cli("HKEYS", key).split()
        self.assertFalse([f for f in fields if "made-up" in f], fields)
        self.assertIn("text:-:bad_request", fields)  # all ten in one field, region "-"

    def test_regions_option_checked(self):
        for args, ok in ((["--regions", "cn-shanghai,eu-west-9"], True),
                         (["--regions", "eu-west-9"], False),  # --region not in the list
                         (["--regions", "cn-shanghai,,x"], False),
                         (["--regions", "cn-shanghai,Bad_Name"], False)):
            with self.subTest(args=args):
                p = subprocess.run([harness.bin_path("sluice"), "-t", "--upstream", "127.0.0.1:1", *args],
                                   capture_output=True, text=True, timeout=10)
                self.assertEqual(p.returncode == 0, ok, p.stderr)
                if not ok:
                    self.assertIn("region", p.stderr)


class CustomRegions(HostileCase):
    SLUICE_ARGS = ("--regions", "cn-shanghai, eu-west-9")

    def test_listed_region_served_other_refused(self):
        self.assertEqual(self.ok(V1, {"Host": "green-cip.eu-west-9.aliyuncs.com"}).status, 200)
        r = self.ok(V1, {"Host": "green-cip.cn-beijing.aliyuncs.com"})
        self.assertEqual(r.status, 400)
        self.assertEqual(r.json()["Code"], "InvalidRegionId")


class EarlyAnswers(HostileCase):
    SLUICE_ARGS = ("--max-body-buffer-bytes", "1000000", "--max-body-bytes", "900000")

    def head_only(self, path, length=800000, headers=()):
        """Sends only the head of a request with a body; returns the answer
        read before any body byte was sent, and whether sluice then closed."""
        hdrs = [("Content-Type", FORM), ("Content-Length", str(length)), *headers]
        with harness.HttpConn(self.sl.port, timeout=5) as c:
            c.send(harness.HttpConn.build("POST", path, hdrs))
            r = c.read_response()
            return r, c.closed_by_peer(wait=4.0)

    def test_403_before_the_body(self):
        r, closed = self.head_only("/?Action=TextModeration")
        self.assertEqual((r.status, r.json()["Code"]), (403, "InvalidAccessKeyId.NotFound"))
        self.assertEqual(r.header("Connection"), "close")
        self.assertTrue(closed)
        # unknown key: once the directory knows it is unknown
        self.assertEqual(self.ok("/?Action=TextModeration&AccessKeyId=NOPE").status, 403)
        r, closed = self.head_only("/?Action=TextModeration&AccessKeyId=NOPE")
        self.assertEqual(r.status, 403)
        # suspended
        self.assertEqual(self.ok("/?Action=TextModeration&AccessKeyId=AKS").status, 403)
        r, closed = self.head_only("/?Action=TextModeration&AccessKeyId=AKS")
        self.assertEqual((r.status, r.json()["Code"]), (403, "Forbidden.AccountSuspended"))
        # conflicting identities and unknown regions: 400 before the body too
        r, _ = self.head_only(V1 + "&AccessKeyId=AK2")
        self.assertEqual(r.status, 400)
        r, _ = self.head_only(V1, headers=[("Host", "green-cip.nowhere-1.aliyuncs.com")])
        self.assertEqual(r.status, 400)
        self.assertEqual(self.be.got(), [])
        self.assertEqual(self.sl.metrics()["sluice_requests_answered_at_head_total"], 5)

    def test_early_answer_readable_while_body_is_sent(self):
        # The client sends its whole body anyway: the answer must not be
        # destroyed by a reset (sluice reads and drops the rest, then closes).
        body = b"Service=a&x=" + b"y" * 600000
        with harness.HttpConn(self.sl.port, timeout=10) as c:
            c.send(harness.HttpConn.build("POST", "/?Action=TextModeration", {"Content-Type": FORM}, body))
            r = c.read_response()
        self.assertEqual(r.status, 403)

    def test_body_budget_per_worker(self):
        # Known account, bodies buffered: 600,000 + 600,000 > 1,000,000.
        hdrs = {"Content-Type": FORM, "Content-Length": "600000"}
        a = harness.HttpConn(self.sl.port)
        self.addCleanup(a.close)
        a.send(harness.HttpConn.build("POST", V1, hdrs) + b"Service=a&x=" + b"y" * 1000)
        time.sleep(0.3)
        with harness.HttpConn(self.sl.port) as b:
            b.send(harness.HttpConn.build("POST", V1, hdrs))
            r = b.read_response()
        self.assertEqual((r.status, r.json()["Code"]), (503, "ServiceUnavailable"))
        self.assertEqual(r.header("Retry-After"), "1")
        self.assertEqual(self.sl.metrics()["sluice_body_budget_full_total"], 1)
        # the first one completes, and its bytes go back to the budget
        a.send(b"y" * (600000 - 12 - 1000))
        self.assertEqual(a.read_response().status, 200)
        body = b"Service=a&x=" + b"z" * (600000 - 12)
        self.assertEqual(self.ok(V1, {"Content-Type": FORM}, body).status, 200)
        self.assertEqual(len(self.be.got()), 2)


class Limits(HostileCase):
    def test_zero_qps_hints_a_minute(self):
        self.r.cli("HSET", P + "feature:text", "default_qps", "0")
        r = poll(lambda: (lambda x: x if x.status == 429 else None)(self.ok(V1)), 5, "429 at 0 QPS")
        self.assertEqual(r.header("Retry-After"), "60")
        self.assertEqual(r.header("x-ratelimit-user"), "TimeLeft:60000")
        self.assertEqual(self.be.got(), [])


class ScriptedBackend(RawBackend):
    """Answers GET /r/<name> with RESPONSES[name], as raw bytes; closes the
    connection after the ones named in CLOSE."""

    RESPONSES = {
        "ok": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "304cl": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
        "204cl": b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
        "interim_body": b"HTTP/1.1 150 Odd\r\nContent-Length: 5\r\n\r\nhello"
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "interim": b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "two_digits": b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nhi",
        "fold": b"HTTP/1.1 200 OK\r\nX-A: b\r\n Set-Cookie: evil=1\r\nContent-Length: 2\r\n\r\nok",
        "empty_name": b"HTTP/1.1 200 OK\r\n: x\r\nContent-Length: 2\r\n\r\nok",
        "eof_trailers": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
                        b"Transfer-Encoding: chunked\r\nX-T: 1",
    }
    CLOSE = {"eof_trailers"}

    def answer(self, head):
        name = head.split(b" ")[1].split(b"/r/")[-1].split(b"?")[0].decode()
        return self.RESPONSES[name], name in self.CLOSE


class BackendAnswers(unittest.TestCase):
    """What a broken or hostile backend sends is never relayed as something
    else: no body for 1xx/204/304, a malformed head is a 502."""

    def setUp(self):
        self.be = ScriptedBackend(self)
        self.sl = start_sluice(self, [self.be.port], "--response-timeout-ms", "3000", "--max-fails", "1000", workers=1)

    def get(self, c, name):
        return c.request("GET", "/r/" + name)

    def test_no_body_statuses(self):
        with harness.HttpConn(self.sl.port, timeout=5) as c:
            t0 = time.monotonic()
            r = self.get(c, "304cl")
            self.assertEqual((r.status, r.body), (304, b""))
            r = self.get(c, "204cl")
            self.assertEqual((r.status, r.body), (204, b""))
            self.assertEqual(self.get(c, "ok").body, b"ok")  # same client connection, in step
            self.assertLess(time.monotonic() - t0, 2.5)  # no wait for a body that never comes
        self.assertEqual(self.sl.metrics()["sluice_upstream_ejections_total"], 0)

    def test_interim_responses(self):
        with harness.HttpConn(self.sl.port, timeout=5) as c:
            r = self.get(c, "interim")
            self.assertEqual((r.status, r.body), (200, b"ok"))
        with harness.HttpConn(self.sl.port, timeout=5) as c:
            r = self.get(c, "interim_body")  # a 1xx has no body: "hello" is garbage, never relayed
            self.assertEqual(r.status, 502)
            self.assertNotIn(b"hello", r.raw_head + r.body)

    def test_malformed_heads_are_502(self):
        for name in ("two_digits", "fold", "empty_name"):
            with self.subTest(name=name), harness.HttpConn(self.sl.port, timeout=5) as c:
                r = self.get(c, name)
                self.assertEqual(r.status, 502, r.raw_head)
                self.assertNotIn(b"evil", r.raw_head)

    def test_close_inside_trailers_is_not_a_complete_response(self):
        with harness.HttpConn(self.sl.port, timeout=5) as c:
            c.send(harness.HttpConn.build("GET", "/r/eof_trailers"))
            with self.assertRaises(harness.IncompleteResponse):
                c.read_response()


class SendTimeout(unittest.TestCase):
    def test_client_that_stops_reading_is_closed(self):
        _, up = start_modstub(self)
        sl = start_sluice(self, [up], "--send-timeout-ms", "500", workers=1)
        s = socket.create_connection(("127.0.0.1", sl.port))
        self.addCleanup(s.close)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(harness.HttpConn.build("GET", "/?Action=TextModeration", {"x-modstub-size": str(64 << 20)}))
        # sluice holds the client and a backend connection while blocked on
        # the write; the send timeout frees both.
        poll(lambda: harness.http_request(up, "GET", "/stats").json()["requests"] >= 1, 10, "the call forwarded")
        self.assertEqual(sl.metrics()["sluice_connections_open"], 1)
        # without the send timeout it stays open for as long as the client lives
        poll(lambda: sl.metrics()["sluice_connections_open"] == 0, 10, "connection closed by the send timeout")
        self.assertEqual(sl.metrics()["sluice_send_timeouts_total"], 1)
        self.assertEqual(harness.http_request(sl.port, "GET", "/?Action=TextModeration").status, 200)


if __name__ == "__main__":
    unittest.main()
