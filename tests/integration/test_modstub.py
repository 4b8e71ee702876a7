"""Integration tests of modstub, the green-cip backend stand-in.

Run: SLUICE_BIN=build/bin python3 tests/integration/test_modstub.py
Every test starts its own modstub on a free 127.0.0.1 port and stops it by
PID, and checks that it exits 0 on SIGTERM (under ASan that also means no
leak was reported).
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

UUID_RE = re.compile(r"^[0-9A-F]{8}-[0-9A-F]{4}-4[0-9A-F]{3}-[89AB][0-9A-F]{3}-[0-9A-F]{12}$")
JSON_CT = "application/json;charset=utf-8"
fnv1a64 = harness.fnv1a64


class Stub:
    """A running modstub; stop() checks that SIGTERM ends it with status 0."""

    def __init__(self, test, *args):
        self.port = harness.free_port()
        self.proc = harness.start_process(
            [harness.bin_path("modstub"), "--listen", f"127.0.0.1:{self.port}", "--seed", "7",
             *args], self.port, stderr=subprocess.PIPE)
        test.addCleanup(self._cleanup)
        self.test = test

    def _cleanup(self):
        if self.proc.poll() is None:
            harness.stop_process(self.proc)
        self.proc.stderr.close()

    def stop(self):
        start = time.monotonic()
        rc = harness.stop_process(self.proc)
        err = self.proc.stderr.read().decode(errors="replace")
        self.test.assertEqual(rc, 0, f"modstub exit status {rc}; stderr:\n{err}")
        self.test.assertLess(time.monotonic() - start, 5.0)
        self.test.assertIn(f"modstub listening on 127.0.0.1:{self.port}", err)
        self.test.assertNotIn("ERROR", err)
        return err

    def conn(self, timeout=10.0):
        c = harness.HttpConn(self.port, timeout=timeout)
        self.test.addCleanup(c.close)
        return c

    def get(self, path="/", headers=None, method="GET", body=b""):
        with harness.HttpConn(self.port) as c:
            return c.request(method, path, headers, body)

    def stats(self):
        return self.get("/stats").json()


class ModstubTest(unittest.TestCase):
    def setUp(self):
        self.stub = Stub(self)

    def tearDown(self):
        # Stopping is part of every test: exit 0, promptly, clean under ASan.
        if self.stub.proc.poll() is None:
            self.stub.stop()

    def check_json(self, r, status=200):
        self.assertEqual(r.status, status, r.body[:300])
        self.assertEqual(r.header("Content-Type"), JSON_CT)
        body = r.json()
        self.assertEqual(r.header("x-acs-request-id"), body["RequestId"])
        return body

    # ---- Actions ----

    def test_text_moderation(self):
        body = self.check_json(self.stub.get("/?Action=TextModeration"))
        self.assertEqual(body["Code"], 200)
        self.assertEqual(body["Message"], "OK")
        self.assertEqual(body["Data"], {"labels": "", "reason": "", "descriptions": ""})
        self.assertRegex(body["RequestId"], UUID_RE)

    def test_text_moderation_plus(self):
        body = self.check_json(self.stub.get("/?Action=TextModerationPlus"))
        self.assertEqual(body["Code"], 200)
        self.assertEqual(body["Message"], "OK")
        self.assertEqual(body["Data"]["RiskLevel"], "none")
        self.assertEqual(body["Data"]["Result"], [{"Label": "nonLabel", "Confidence": 0}])

    def test_image_actions(self):
        for action in ("ImageModeration", "ImageBatchModeration", "ImageAsyncModeration",
                       "ImageQueueModeration"):
            body = self.check_json(self.stub.get(f"/?Action={action}&Service=baselineCheck"))
            self.assertEqual(body["Msg"], "OK")
            self.assertEqual(body["Code"], 200)
            self.assertEqual(body["Data"]["RiskLevel"], "none")
            self.assertEqual(body["Data"]["DataId"], "")
            self.assertEqual(body["Data"]["Result"], [{"Label": "nonLabel", "Confidence": 99.91}])

    def test_other_action_generic(self):
        for action in ("VideoModeration", "DescribeUploadToken"):
            body = self.check_json(self.stub.get(f"/?Action={action}"))
            self.assertEqual(body, {"Code": 200, "Message": "OK", "Data": {},
                                    "RequestId": body["RequestId"]})

    def test_action_header_and_query_precedence(self):
        body = self.check_json(self.stub.get("/", {"x-acs-action": "TextModeration"}))
        self.assertIn("labels", body["Data"])
        # The query parameter wins over the header.
        body = self.check_json(self.stub.get("/?Action=ImageModeration",
                                             {"x-acs-action": "TextModeration"}))
        self.assertEqual(body["Msg"], "OK")
        st = self.stub.stats()
        self.assertEqual(st["by_action"], {"TextModeration": 1, "ImageModeration": 1})

    def test_request_id_echoed(self):
        r = self.stub.get("/?Action=TextModeration", {"X-Request-Id": "proxy-id-42"})
        self.assertEqual(self.check_json(r)["RequestId"], "proxy-id-42")
        self.assertEqual(r.header("x-acs-request-id"), "proxy-id-42")
        # Generated ids differ.
        a = self.check_json(self.stub.get("/?Action=TextModeration"))["RequestId"]
        b = self.check_json(self.stub.get("/?Action=TextModeration"))["RequestId"]
        self.assertNotEqual(a, b)

    # ---- HTTP ----

    def test_keep_alive(self):
        c = self.stub.conn()
        ids = set()
        for i in range(5):
            r = c.request("POST", "/echo", body=f"n={i}")
            self.assertEqual(r.status, 200)
            self.assertIsNone(r.header("Connection"))
            e = r.json()
            self.assertEqual(e["conn_requests"], i + 1)
            ids.add(e["conn_id"])
        self.assertEqual(len(ids), 1)
        other = self.stub.get("/echo").json()
        self.assertNotEqual(other["conn_id"], ids.pop())

    def test_pipelining_in_order(self):
        c = self.stub.conn()
        reqs = b"".join(c.build("GET", f"/echo?i={i}", {"X-Request-Id": f"r{i}"})
                        for i in range(3))
        c.send(reqs)  # one write
        rs = c.read_responses(3)
        self.assertEqual([r.json()["url"] for r in rs], ["/echo?i=0", "/echo?i=1", "/echo?i=2"])
        self.assertEqual([r.header("x-acs-request-id") for r in rs], ["r0", "r1", "r2"])
        self.assertEqual([r.json()["conn_requests"] for r in rs], [1, 2, 3])

    def test_pipelining_with_delays_keeps_order(self):
        c = self.stub.conn()
        c.send(c.build("GET", "/echo?i=0", {"x-modstub-delay-ms": "300"}) +
               c.build("GET", "/echo?i=1") +
               c.build("GET", "/echo?i=2", {"x-modstub-delay-ms": "50"}))
        rs = c.read_responses(3)
        self.assertEqual([r.json()["url"] for r in rs], ["/echo?i=0", "/echo?i=1", "/echo?i=2"])

    def test_many_pipelined(self):
        # More than the per-connection queue (64) in one go.
        c = self.stub.conn()
        n = 200
        c.send(b"".join(c.build("GET", f"/?Action=TextModeration&i={i}",
                                {"X-Request-Id": str(i)}) for i in range(n)))
        rs = c.read_responses(n)
        self.assertEqual([r.json()["RequestId"] for r in rs], [str(i) for i in range(n)])

    def test_http10(self):
        c = self.stub.conn()
        r = c.request("GET", "/?Action=TextModeration", version="HTTP/1.0")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.header("Connection"), "close")
        self.assertTrue(c.closed_by_peer())
        # Keep-alive when asked.
        c = self.stub.conn()
        for _ in range(2):
            r = c.request("GET", "/echo", {"Connection": "keep-alive"}, version="HTTP/1.0")
            self.assertEqual(r.status, 200)
            self.assertEqual(r.header("Connection"), "keep-alive")
            self.assertEqual(r.json()["http_version"], "1.0")
        self.assertEqual(r.json()["conn_requests"], 2)

    def test_connection_close(self):
        c = self.stub.conn()
        c.send(c.build("GET", "/echo", {"Connection": "close"}) + c.build("GET", "/echo"))
        r = c.read_response()
        self.assertEqual(r.header("Connection"), "close")
        self.assertTrue(c.closed_by_peer())

    def test_chunked_request_body(self):
        c = self.stub.conn()
        body = b"Service=chat_detection&Content=" + b"a" * 1000
        chunked = b""
        for i in range(0, len(body), 300):
            part = body[i:i + 300]
            chunked += b"%x\r\n%s\r\n" % (len(part), part)
        chunked += b"0\r\n\r\n"
        c.send(c.build("POST", "/echo?Action=TextModeration",
                       [("Transfer-Encoding", "chunked"),
                        ("Content-Type", "application/x-www-form-urlencoded")]) + chunked)
        e = c.read_response().json()
        self.assertEqual(e["body_len"], len(body))
        self.assertEqual(e["body"], body.decode())
        self.assertEqual(e["body_fnv1a64"], fnv1a64(body))
        self.assertEqual(e["service"], "chat_detection")
        self.assertEqual(e["action"], "TextModeration")
        # The connection stays usable.
        self.assertEqual(c.request("GET", "/echo").json()["conn_requests"], 2)

    def test_expect_continue(self):
        c = self.stub.conn()
        c.send(c.build("POST", "/echo", {"Expect": "100-continue", "Content-Length": "5"}))
        interim = c.read_response()
        self.assertEqual(interim.status, 100)
        c.send(b"hello")
        self.assertEqual(c.read_response().json()["body"], "hello")

    def test_malformed_400(self):
        c = self.stub.conn()
        c.send(b"GARBAGE\r\n\r\n")
        r = c.read_response()
        self.assertEqual(self.check_json(r, 400)["Code"], 400)
        self.assertEqual(r.header("Connection"), "close")
        self.assertTrue(c.closed_by_peer())
        c = self.stub.conn()
        c.send(b"GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n")
        self.assertEqual(c.read_response().status, 400)
        # A good request before the bad one is still answered first.
        c = self.stub.conn()
        c.send(c.build("GET", "/echo") + b"GET /\x01 HTTP/1.1\r\n\r\n")
        self.assertEqual([r.status for r in c.read_responses(2)], [200, 400])

    def test_oversized_413(self):
        c = self.stub.conn()
        c.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (17 << 20))
        r = c.read_response()
        self.assertEqual(self.check_json(r, 413)["Code"], 413)
        self.assertTrue(c.closed_by_peer())
        # Chunked: the limit is found while reading the body.
        c = self.stub.conn()
        c.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b"z" * (1 << 20))
        got = None
        try:
            for _ in range(20):
                c.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        got = c.read_response()
        self.assertEqual(got.status, 413)

    def test_large_body_hash(self):
        body = os.urandom(100_000)
        e = self.stub.get("/echo", method="PUT", body=body).json()
        self.assertEqual(e["body_len"], len(body))
        self.assertEqual(e["body_fnv1a64"], fnv1a64(body))
        self.assertNotIn("body", e)  # over 64 KiB: not included
        e = self.stub.get("/echo", method="POST", body=b"\xff\x00ok").json()
        self.assertEqual(e["body"], "\u00ff\u0000ok")
        self.assertTrue(e["body_latin1"])

    def test_head(self):
        c = self.stub.conn()
        r = c.request("HEAD", "/?Action=TextModeration")
        self.assertEqual(r.status, 200)
        self.assertGreater(int(r.header("Content-Length")), 0)
        self.assertEqual(c.request("GET", "/echo").json()["method"], "GET")

    # ---- /echo ----

    def test_echo_fields(self):
        c = self.stub.conn()
        hdrs = [("X-B", "2"), ("x-a", "1"), ("X-Dup", "one"), ("X-Dup", "two"),
                ("Content-Type", "application/x-www-form-urlencoded")]
        body = "Service=baselineCheck&ServiceParameters=%7B%22content%22%3A%22hi%22%7D"
        r = c.request("POST", "/echo/sub?Action=ImageModeration&Service=fromquery", hdrs, body)
        e = self.check_json(r)
        self.assertEqual(e["method"], "POST")
        self.assertEqual(e["url"], "/echo/sub?Action=ImageModeration&Service=fromquery")
        self.assertEqual(e["http_version"], "1.1")
        self.assertEqual(e["headers"], [["Host", "modstub"], *[list(h) for h in hdrs],
                                        ["Content-Length", str(len(body))]])
        self.assertEqual(e["body_len"], len(body))
        self.assertEqual(e["body"], body)
        self.assertEqual(e["body_fnv1a64"], fnv1a64(body.encode()))
        self.assertEqual(e["conn_requests"], 1)
        self.assertIsInstance(e["conn_id"], int)
        self.assertEqual(e["action"], "ImageModeration")
        self.assertEqual(e["service"], "baselineCheck")  # the form body wins
        e = c.request("GET", "/echo?Service=q%20s").json()
        self.assertEqual(e["service"], "q s")
        self.assertNotIn("action", e)
        self.assertEqual(e["body_len"], 0)
        self.assertEqual(e["body"], "")

    # ---- knobs ----

    def test_knob_status(self):
        for status in (429, 500, 503, 403):
            r = self.stub.get("/?Action=TextModeration", {"x-modstub-status": str(status)})
            body = self.check_json(r, status)
            self.assertEqual(body["Code"], status)
            self.assertIn("Message", body)
        r = self.stub.get("/echo", {"x-modstub-status": "502"})
        self.assertEqual(r.status, 502)
        self.assertEqual(r.json()["method"], "GET")
        r = self.stub.get("/", {"x-modstub-status": "204"})
        self.assertEqual((r.status, r.body), (204, b""))

    def test_knob_delay(self):
        t = time.monotonic()
        r = self.stub.get("/?Action=TextModeration", {"x-modstub-delay-ms": "300"})
        self.assertEqual(r.status, 200)
        self.assertGreaterEqual(time.monotonic() - t, 0.29)

    def test_knob_chunked(self):
        c = self.stub.conn()
        r = c.request("GET", "/?Action=ImageModeration", {"x-modstub-chunked": "1"})
        self.assertEqual(r.framing, "chunked")
        self.assertEqual(r.json()["Msg"], "OK")
        self.assertGreaterEqual(r.raw_head.count(b"\r\n"), 3)
        # Several chunks on the wire.
        c2 = self.stub.conn()
        c2.send(c2.build("GET", "/?Action=TextModeration",
                         {"x-modstub-chunked": "1", "Connection": "close"}))
        raw = c2.read_until_close()
        wire = raw.split(b"\r\n\r\n", 1)[1]
        sizes = re.findall(rb"(?:^|\r\n)([0-9a-f]+)\r\n", wire)
        self.assertGreaterEqual(len([s for s in sizes if s != b"0"]), 3)
        # Keep-alive goes on after a chunked answer.
        self.assertEqual(c.request("GET", "/echo").json()["conn_requests"], 2)

    def test_knob_close(self):
        c = self.stub.conn()
        r = c.request("GET", "/?Action=TextModeration", {"x-modstub-close": "1"})
        self.assertEqual(r.framing, "close")
        self.assertIsNone(r.header("Content-Length"))
        self.assertEqual(r.json()["Code"], 200)
        self.assertTrue(c.eof)

    def test_knob_size(self):
        for size in (10, 500, 100_000, 3_000_000):
            c = self.stub.conn(timeout=20)
            r = c.request("GET", "/?Action=ImageModeration", {"x-modstub-size": str(size)})
            body = r.json()
            self.assertEqual(body["Msg"], "OK")
            if size >= 500:
                self.assertEqual(len(r.body), size)
            else:
                self.assertGreaterEqual(len(r.body), size)
            r = c.request("GET", "/?Action=TextModeration",
                          {"x-modstub-size": str(size), "x-modstub-chunked": "1"})
            self.assertEqual(r.framing, "chunked")
            r.json()
            if size >= 500:
                self.assertEqual(len(r.body), size)

    def test_knob_hangup(self):
        c = self.stub.conn()
        c.send(c.build("GET", "/?Action=TextModeration", {"x-modstub-hangup": "1"}))
        self.assertTrue(c.closed_by_peer())
        # Answers before it are delivered first.
        c = self.stub.conn()
        c.send(c.build("GET", "/echo") +
               c.build("GET", "/echo", {"x-modstub-hangup": "1"}) + c.build("GET", "/echo"))
        self.assertEqual(c.read_response().status, 200)
        self.assertRaises(harness.IncompleteResponse, c.read_response)
        self.assertEqual(self.stub.stats()["requests"], 1)

    def test_knob_partial(self):
        c = self.stub.conn()
        c.send(c.build("GET", "/?Action=ImageModeration", {"x-modstub-partial": "1"}))
        with self.assertRaises(harness.IncompleteResponse) as cm:
            c.read_response()
        data = cm.exception.data
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        self.assertEqual(len(body), length // 2)
        self.assertTrue(c.eof)

    # ---- /stats ----

    def test_stats_and_reset(self):
        st = self.stub.stats()
        self.assertEqual(st["requests"], 0)
        for _ in range(3):
            self.stub.get("/?Action=TextModeration")
        self.stub.get("/", {"x-acs-action": "ImageModeration", "x-modstub-status": "503"})
        self.stub.get("/echo")
        st = self.stub.stats()
        self.assertEqual(st["requests"], 5)
        self.assertEqual(st["by_status"], {"200": 4, "503": 1})
        self.assertEqual(st["by_action"], {"TextModeration": 3, "ImageModeration": 1})
        self.assertGreaterEqual(st["connections"], 6)
        r = self.stub.get("/stats/reset", method="POST")
        self.assertEqual(r.status, 200)
        st = self.stub.stats()
        self.assertEqual(st["requests"], 0)
        self.assertEqual(st["by_status"], {})
        self.assertEqual(st["by_action"], {})
        self.assertLessEqual(st["connections"], 1)

    def test_sigterm_with_open_connections(self):
        idle = self.stub.conn()
        half = self.stub.conn()
        half.send(b"POST /echo HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc")
        slow = self.stub.conn()
        slow.send(slow.build("GET", "/", {"x-modstub-delay-ms": "5000"}))
        big = self.stub.conn()
        big.send(big.build("GET", "/", {"x-modstub-size": "20000000"}))  # not read
        self.assertEqual(idle.request("GET", "/echo").status, 200)
        self.stub.stop()  # exit 0 within 5 s, no leak under ASan

    def test_signal_int(self):
        os.kill(self.stub.proc.pid, 2)
        self.assertEqual(self.stub.proc.wait(timeout=5), 0)
        self.stub.proc.stderr.read()


class OptionsTest(unittest.TestCase):
    def test_error_rate_all_and_none(self):
        stub = Stub(self, "--error-rate", "1")
        for _ in range(10):
            r = stub.get("/?Action=TextModeration")
            body = json.loads(r.body)
            self.assertEqual(r.status, 500)
            self.assertEqual((body["Code"], body["Message"]), (500, "InternalError"))
            self.assertIn("RequestId", body)
        self.assertEqual(stub.stats()["by_status"], {"500": 10})
        # /echo is never turned into an error.
        self.assertEqual(stub.get("/echo").status, 200)
        stub.stop()
        stub = Stub(self, "--error-rate", "0")
        self.assertEqual({stub.get("/?Action=TextModeration").status for _ in range(10)}, {200})
        stub.stop()

    def test_error_rate_fraction(self):
        stub = Stub(self, "--error-rate", "0.5")
        c = stub.conn()
        n = 400
        c.send(b"".join(c.build("GET", "/?Action=TextModeration") for _ in range(n)))
        bad = sum(r.status == 500 for r in c.read_responses(n))
        self.assertTrue(120 < bad < 280, bad)
        stub.stop()

    def test_latency(self):
        stub = Stub(self, "--latency-ms", "200", "--latency-jitter-ms", "100")
        t = time.monotonic()
        r = stub.get("/?Action=TextModeration")
        dt = time.monotonic() - t
        self.assertEqual(r.status, 200)
        self.assertTrue(0.19 <= dt < 2.0, dt)
        # /stats is not delayed.
        t = time.monotonic()
        stub.stats()
        self.assertLess(time.monotonic() - t, 0.15)
        stub.stop()

    def test_workers(self):
        stub = Stub(self, "--workers", "4")
        seen = set()
        for _ in range(40):
            seen.add(stub.get("/echo").json()["worker"])
        self.assertGreater(len(seen), 1)
        self.assertEqual(stub.stats()["requests"], 40)
        # Load: bounded in count and time, several connections at once.
        conns = [stub.conn() for _ in range(8)]
        deadline = time.monotonic() + 30
        for c in conns:
            c.send(b"".join(c.build("POST", "/?Action=TextModeration", body="x" * 100)
                            for _ in range(50)))
        for c in conns:
            self.assertEqual({r.status for r in c.read_responses(50)}, {200})
        self.assertLess(time.monotonic(), deadline)
        self.assertEqual(stub.stats()["requests"], 440)
        stub.stop()

    def test_bad_options(self):
        exe = harness.bin_path("modstub")
        for args in (["--workers", "0", "--listen", "127.0.0.1:1"],
                     ["--error-rate", "2", "--listen", "127.0.0.1:1"],
                     ["--listen", "nonsense"], []):
            p = subprocess.run([exe, *args], capture_output=True, timeout=10)
            self.assertNotEqual(p.returncode, 0, args)
            self.assertTrue(p.stderr)
        p = subprocess.run([exe, "--help"], capture_output=True, timeout=10)
        self.assertEqual(p.returncode, 0)
        self.assertIn(b"--listen", p.stdout)

    def test_port_in_use(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            port = s.getsockname()[1]
            p = subprocess.run([harness.bin_path("modstub"), "--listen", f"127.0.0.1:{port}"],
                               capture_output=True, timeout=10)
            self.assertNotEqual(p.returncode, 0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
