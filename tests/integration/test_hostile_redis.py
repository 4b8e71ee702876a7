"""Integration tests of sluice against hostile or broken Redis contents and
servers (issue 9, items 5, 8 and 11, the directory's side):

- a key of the wrong type (or with a bad value) affects only itself, is
  named in the log (once, not at every reload) and counted in /metrics, and
  never turns off suspension, at run time or at a fresh start;
- each account of a lookup batch succeeds or fails on its own: an unusable
  `ak:` key answers like an unknown AccessKeyId (403
  InvalidAccessKeyId.NotFound), an unusable package is left out;
- a server that accepts and never answers counts as down (sluice_redis_up 0,
  never-seen accounts 503 within the lookup timeout), whether it was silent
  from the start or stopped answering; one that speaks something else than
  Redis neither crashes sluice nor floods its log.

Every server a test starts binds 127.0.0.1; every process is stopped by PID
through addCleanup (harness.py, proxyenv.py)."""

import os
import re
import signal
import socket
import sys
import threading
import time
import unittest

import harness
from proxyenv import start_modstub
from test_admission import AdmissionCase, P, assert_error, call, one, poll

NOT_FOUND = "InvalidAccessKeyId.NotFound"
SUSPENDED = "Forbidden.AccountSuspended"


def log_lines(sl, pattern):
    """Lines of sluice's stderr that match the regex `pattern`."""
    return [ln for ln in sl.stderr().splitlines() if re.search(pattern, ln)]


class BadKeys(AdmissionCase):
    """Keys of the wrong type or with bad values next to good ones."""

    SEED = (("SET", P + "ak:AK2", "u2"),)

    def test_wrong_type_feature_key_does_not_stop_suspension(self):
        self.assertEqual(one(self.sl.port).status, 200)
        self.cli("HSET", P + "feature:image", "default_qps", "7")
        self.cli("SET", P + "feature:text", "200")  # a string where a hash is expected
        poll(lambda: log_lines(self.sl, r"key 'sluice:feature:text' cannot be used \(WRONGTYPE"), 3,
             "the bad key named in the log")
        m = self.sl.metrics()
        self.assertGreaterEqual(m.get("sluice_redis_bad_keys", 0), 1, m)
        self.assertGreaterEqual(m.get("sluice_redis_bad_keys_total", 0), 1, m)
        # the key stands alone: the others still apply, text falls back to its built-in default
        e = self.wait_explain(lambda e: e["default_qps"] == 7, 3, "image override", feature="image")
        self.assertTrue(e["default_overridden"])
        e = self.explain(feature="text")
        self.assertEqual(e["default_qps"], 100)
        self.assertEqual(one(self.sl.port).status, 200)
        # the suspension that the issue saw ignored
        with harness.HttpConn(self.sl.port) as c:
            t0 = time.monotonic()
            self.cli("SADD", P + "suspended", "u1")
            _, d = poll(lambda: call(c).status == 403, 1.0, "suspension applied next to a bad key", interval=0.002)
            print(f"\n  SADD suspended next to a bad key -> 403 in {d * 1000:.0f} ms", file=sys.stderr)
            assert_error(self, call(c), 403, SUSPENDED)
        self.assertEqual(one(self.sl.port, ak="AK2").status, 200)
        # every reload reads the bad key again: counted each time, named once
        before = self.metric("sluice_redis_bad_keys_total")
        for i in range(5):
            self.cli("SADD", P + "suspended", f"other{i}")
        poll(lambda: self.metric("sluice_redis_bad_keys_total") >= before + 3, 3, "bad reads counted")
        self.assertEqual(len(log_lines(self.sl, r"sluice:feature:text")), 1, self.sl.stderr()[-3000:])
        # repaired: said once, gauge back to 0, the override applies
        self.cli("DEL", P + "feature:text")
        self.cli("HSET", P + "feature:text", "default_qps", "3")
        self.wait_explain(lambda e: e["default_qps"] == 3, 3, "repaired override")
        poll(lambda: log_lines(self.sl, r"key 'sluice:feature:text' is usable again"), 3, "repair told")
        poll(lambda: self.metric("sluice_redis_bad_keys") == 0, 3, "gauge back to 0")

    def test_bad_values_named(self):
        self.cli("HSET", P + "feature:voice", "default_qps", "lots", "tier", "gold")
        poll(lambda: log_lines(self.sl, r"key 'sluice:feature:voice' cannot be used \(default_qps 'lots'"), 3,
             "bad default_qps named")
        e = self.explain(feature="voice")
        self.assertEqual(e["default_qps"], 100)

    def test_unreadable_suspended_set_keeps_the_last(self):
        self.cli("SADD", P + "suspended", "u1")
        poll(lambda: one(self.sl.port).status == 403, 3, "u1 suspended")
        # replace the set by a string in one step (a DEL would rightly lift the suspension)
        self.cli("SET", P + "tmp", "not-a-set")
        self.cli("RENAME", P + "tmp", P + "suspended")
        poll(lambda: log_lines(self.sl, r"key 'sluice:suspended' cannot be used .*the set read last stays in force"),
             3, "the unreadable set named")
        time.sleep(0.3)
        for _ in range(5):
            assert_error(self, one(self.sl.port), 403, SUSPENDED)
        self.assertEqual(one(self.sl.port, ak="AK2").status, 200)  # a never-seen account still loads
        # after a full resync too (the resync re-reads the set)
        r0 = self.metric("sluice_directory_resyncs_total")
        self.cli("PUBLISH", P + "changes", "everything")
        poll(lambda: self.metric("sluice_directory_resyncs_total") > r0, 3, "a resync")
        assert_error(self, one(self.sl.port), 403, SUSPENDED)


class BadKeysAtStart(AdmissionCase):
    """A fresh start with a wrong-type feature key: the suspended set is read
    all the same."""

    SEED = (("SET", P + "feature:text", "200"), ("SADD", P + "suspended", "u1"), ("SET", P + "ak:AK2", "u2"))

    def test_fresh_start_still_rejects_suspended(self):
        assert_error(self, one(self.sl.port), 403, SUSPENDED)
        self.assertEqual(one(self.sl.port, ak="AK2").status, 200)
        self.assertTrue(log_lines(self.sl, r"key 'sluice:feature:text' cannot be used"), self.sl.stderr())
        self.assertGreaterEqual(self.metric("sluice_redis_bad_keys"), 1)


class UnreadableSuspendedAtStart(AdmissionCase):
    """A fresh start where the suspended set itself cannot be read: no
    account is admitted (503) until it can, never "nobody is suspended"."""

    SEED = (("SET", P + "suspended", "u1"),)
    SLUICE_ARGS = ("--lookup-timeout-ms", "500")

    def test_no_admission_until_readable(self):
        for _ in range(3):
            assert_error(self, one(self.sl.port), 503, "ServiceUnavailable")
            time.sleep(0.2)
        self.assertTrue(log_lines(self.sl, r"key 'sluice:suspended' cannot be used .*no account is admitted"),
                        self.sl.stderr())
        self.cli("DEL", P + "suspended")
        self.cli("SADD", P + "suspended", "u9")
        poll(lambda: one(self.sl.port).status == 200, 5, "admitted once the set is readable", interval=0.1)


class BadAccountsInABatch(AdmissionCase):
    """First requests for several AccessKeyIds at once share a lookup batch
    (sluice is stopped while they arrive, so the directory thread takes them
    in one go); bad accounts fail alone."""

    GOOD = ("GOOD1", "GOOD2", "GOOD3", "GOOD4", "GOOD5")
    BAD = ("BADTYPE", "LONGUID", "EMPTYUID")
    SEED = tuple(("SET", P + f"ak:{ak}", f"ug{i}") for i, ak in enumerate(GOOD)) + (
        ("HSET", P + "ak:BADTYPE", "uid", "u9"),       # a hash where a string is expected
        ("SET", P + "ak:LONGUID", "x" * 64),            # over 63 bytes
        ("SET", P + "ak:EMPTYUID", ""),
        # GOOD1's packages: one usable, one of the wrong type, one with a bad qps
        ("SADD", P + "qpspkgs:ug0", "ok", "wrongtype", "badqps"),
        ("HSET", P + "qpspkg:ug0:ok", "feature", "text", "region", "cn-shanghai", "qps", "5",
         "expires_at", "4102444800"),
        ("SET", P + "qpspkg:ug0:wrongtype", "5"),
        ("HSET", P + "qpspkg:ug0:badqps", "feature", "text", "region", "cn-shanghai", "qps", "five",
         "expires_at", "4102444800"),
        # GOOD2's package set is of the wrong type
        ("SET", P + "qpspkgs:ug1", "ok"),
    )

    def eval_calls(self):
        info = self.cli("INFO", "commandstats")
        m = re.search(r"cmdstat_eval:calls=(\d+)", info)
        return int(m.group(1)) if m else 0

    def test_each_account_on_its_own(self):
        aks = self.GOOD + self.BAD
        conns = [harness.HttpConn(self.sl.port) for _ in aks]
        for c in conns:
            self.addCleanup(c.close)
        evals0 = self.eval_calls()
        os.kill(self.sl.proc.pid, signal.SIGSTOP)
        try:
            for c, ak in zip(conns, aks):
                c.send(c.build("GET", f"/echo?Action=TextModeration&AccessKeyId={ak}"))
        finally:
            os.kill(self.sl.proc.pid, signal.SIGCONT)
        got = {ak: c.read_response() for c, ak in zip(conns, aks)}
        evals = self.eval_calls() - evals0
        print(f"\n  {len(aks)} first lookups answered by {evals} EVAL(s)", file=sys.stderr)
        self.assertLess(evals, len(aks), "the lookups did not share a batch")
        for ak in self.GOOD:
            self.assertEqual(got[ak].status, 200, (ak, got[ak].body))
        for ak in self.BAD:
            assert_error(self, got[ak], 403, NOT_FOUND)
        err = self.sl.stderr()
        self.assertRegex(err, r"key 'sluice:ak:BADTYPE' cannot be used \(WRONGTYPE.*unknown AccessKeyId")
        self.assertRegex(err, r"key 'sluice:ak:LONGUID' cannot be used \(its UID is 64 bytes")
        self.assertRegex(err, r"key 'sluice:ak:EMPTYUID' cannot be used \(its UID is empty")
        self.assertRegex(err, r"key 'sluice:qpspkg:ug0:wrongtype' cannot be used \(WRONGTYPE.*package is ignored")
        self.assertRegex(err, r"key 'sluice:qpspkg:ug0:badqps' cannot be used \(qps 'five'")
        self.assertRegex(err, r"key 'sluice:qpspkgs:ug1' cannot be used \(WRONGTYPE.*no package")
        # the usable package counts
        e = self.wait_explain(lambda e: e["account_cached"], 3, "ug0 cached", uid="ug0", strict=False)
        self.assertEqual(e["effective_qps"], 105, e)
        self.assertGreaterEqual(self.metric("sluice_redis_bad_keys"), 6)
        # asked again and again: answered from the negative cache, named once
        for _ in range(10):
            assert_error(self, one(self.sl.port, ak="BADTYPE"), 403, NOT_FOUND)
        self.assertEqual(len(log_lines(self.sl, r"sluice:ak:BADTYPE")), 1)


# ---- servers that are not (or no longer) a working Redis ----

class LoopbackServer:
    """A TCP server on 127.0.0.1 run by threads (stopped and joined by
    close()); a subclass handles each accepted connection in on_accept."""

    def __init__(self):
        self._stop = threading.Event()
        self._threads = []
        self._lock = threading.Lock()
        self._ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._ls.bind(("127.0.0.1", 0))
        self._ls.listen(64)
        self._ls.settimeout(0.2)
        self.port = self._ls.getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"
        self._spawn(self._accept)

    def _spawn(self, fn, *args):
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        with self._lock:
            self._threads.append(t)

    def _accept(self):
        while not self._stop.is_set():
            try:
                s, _ = self._ls.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.on_accept(s)

    def on_accept(self, s):
        raise NotImplementedError

    def close(self):
        self._stop.set()
        self._ls.close()
        for t in list(self._threads):
            t.join(5)


class FakeServer(LoopbackServer):
    """A TCP server on 127.0.0.1 that is not Redis. mode:
    'silent'  accepts and reads, never writes;
    'http'    answers the first bytes like an HTTP server, then closes;
    'junk'    answers every read with replies nobody asked for and malformed
              pub/sub messages (what made hiredis 0.14 assert);
    'pong'    answers the first command +PONG like Redis, then junk;
    'huge'    answers with array headers of 600 million elements (hiredis
              0.14 allocates 4.8 GB of element pointers for one at once).
    `connections` counts accepted connections."""

    JUNK = b"+OK\r\n*1\r\n$3\r\nfoo\r\n*0\r\n*3\r\n:1\r\n:2\r\n:3\r\n*3\r\n$11\r\nunsubscribe\r\n$1\r\nx\r\n$1\r\ny\r\n"

    def __init__(self, mode):
        self.mode = mode
        self.connections = 0
        super().__init__()

    def on_accept(self, s):
        s.settimeout(0.2)
        with self._lock:
            self.connections += 1
        self._spawn(self._serve, s)

    def _serve(self, s):
        first = True
        try:
            while not self._stop.is_set():
                try:
                    data = s.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    return
                if self.mode == "http":
                    s.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    return
                if self.mode == "junk":
                    s.sendall(self.JUNK)
                elif self.mode == "huge":
                    s.sendall(b"*600000000\r\n:1\r\n")
                elif self.mode == "pong":
                    s.sendall(b"+PONG\r\n" if first else self.JUNK)
                first = False
        except OSError:
            pass
        finally:
            s.close()


class Freezer(LoopbackServer):
    """A relay on 127.0.0.1 to a real Redis that can freeze: then it keeps
    every connection open and passes nothing either way (and so does a new
    connection), as a hung server or a silent network would."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.frozen = threading.Event()
        super().__init__()

    def on_accept(self, c):
        try:
            s = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
        except OSError:
            c.close()
            return
        for x in (c, s):
            x.settimeout(0.1)
        closed = threading.Event()
        self._spawn(self._pump, c, s, closed)
        self._spawn(self._pump, s, c, closed)

    def _pump(self, src, dst, closed):
        try:
            while not self._stop.is_set() and not closed.is_set():
                if self.frozen.is_set():
                    time.sleep(0.05)
                    continue
                try:
                    data = src.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            closed.set()
            for x in (src, dst):
                try:
                    x.close()
                except OSError:
                    pass


class SlowFirstConnect(unittest.TestCase):
    """A first lookup while the connection is still being made (Redis slow
    to answer the first PING) waits for it, within --lookup-timeout-ms,
    instead of being answered 503 at once."""

    def test_first_lookup_waits_for_the_connection(self):
        r = harness.start_redis()
        self.addCleanup(r.stop)
        r.cli("SET", P + "ak:AKW", "uw")
        _, up = start_modstub(self)
        from proxyenv import start_sluice
        r.cli("CLIENT", "PAUSE", "700", "ALL")  # sluice's first PING waits out the pause
        sl = start_sluice(self, [up], "--lookup-timeout-ms", "3000", redis=r, workers=1)
        t0 = time.monotonic()
        resp = one(sl.port, ak="AKW")
        self.assertEqual(resp.status, 200, resp.body)
        self.assertLess(time.monotonic() - t0, 3.0)
        self.assertEqual(sl.stop(), 0)


class SilentRedis(AdmissionCase):
    """A Redis that stops answering, and a server that never answered."""

    SEED = (("SET", P + "ak:AKNEW", "u7"),)

    def setUp(self):
        # AdmissionCase.setUp with sluice behind the relay
        self.r = harness.start_redis()
        self.addCleanup(self.r.stop)
        self.cli("SET", P + "ak:AK1", "u1")
        for args in self.SEED:
            self.cli(*args)
        self.fz = Freezer(self.r.port)
        self.addCleanup(self.fz.close)
        _, self.up = start_modstub(self)
        _, self.llm = start_modstub(self)

    def test_stops_answering(self):
        self.sl = self.start_sluice("--lookup-timeout-ms", "500", "--redis-timeout-ms", "1000", redis=self.fz)
        poll(lambda: self.metric("sluice_redis_up") == 1, 10, "up through the relay")
        poll(lambda: self.metric("sluice_directory_resyncs_total") >= 1, 10, "first resync")
        self.assertEqual(one(self.sl.port).status, 200)
        self.fz.frozen.set()
        t0 = time.monotonic()
        # nothing is asked: sluice's idle PING finds the silence
        _, d = poll(lambda: self.metric("sluice_redis_up") == 0, 8, "sluice_redis_up 0 once Redis is silent",
                    interval=0.05)
        print(f"\n  silent Redis -> sluice_redis_up 0 in {time.monotonic() - t0:.2f} s", file=sys.stderr)
        self.assertGreaterEqual(self.metric("sluice_redis_timeouts_total"), 1)
        # a never-seen account: 503 within the lookup timeout (and some margin)
        t0 = time.monotonic()
        r = one(self.sl.port, ak="AKNEW")
        el = time.monotonic() - t0
        assert_error(self, r, 503, "ServiceUnavailable")
        self.assertLess(el, 3.0)
        # the known account is served from what sluice knew
        self.assertEqual(one(self.sl.port).status, 200)
        # still silent on reconnects: stays down, said once, not once per attempt
        time.sleep(3)
        self.assertEqual(self.metric("sluice_redis_up"), 0)
        self.assertEqual(len(log_lines(self.sl, r"sluice: redis: .* is down: no reply within 1000 ms")), 1,
                         self.sl.stderr())
        self.fz.frozen.clear()
        poll(lambda: self.metric("sluice_redis_up") == 1, 10, "up again", interval=0.05)
        poll(lambda: one(self.sl.port, ak="AKNEW").status == 200, 5, "new account admitted again", interval=0.1)
        self.assertTrue(log_lines(self.sl, r"sluice: redis: .* is up again after"), self.sl.stderr())

    def test_never_answers(self):
        fake = FakeServer("silent")
        self.addCleanup(fake.close)
        self.sl = self.start_sluice("--lookup-timeout-ms", "500", "--redis-timeout-ms", "1000", redis=fake)
        t0 = time.monotonic()
        r = one(self.sl.port, ak="AKNEW")
        el = time.monotonic() - t0
        assert_error(self, r, 503, "ServiceUnavailable")
        self.assertLess(el, 3.0)
        time.sleep(3)
        self.assertEqual(self.metric("sluice_redis_up"), 0)
        self.assertGreaterEqual(self.metric("sluice_redis_timeouts_total"), 1)
        self.assertTrue(log_lines(self.sl, r"no answer to PING within 1000 ms"), self.sl.stderr())


class NotRedis(unittest.TestCase):
    """Servers that speak something else: sluice stays up (hiredis 0.14
    would assert on some of these), its log stays small, it exits 0.
    The four servers and their sluices run side by side, started by
    setUpClass, so that their WINDOW seconds pass once for all four; each
    case checks its own after at least WINDOW seconds."""

    WINDOW = 3.0
    MODES = ("http", "junk", "pong", "huge")

    @classmethod
    def setUpClass(cls):
        from proxyenv import start_sluice
        owner = harness.ClassOwner(cls)
        _, up = start_modstub(owner)
        cls.runs = {}
        for mode in cls.MODES:
            fake = FakeServer(mode)
            cls.addClassCleanup(fake.close)

            class R:
                addr = fake.addr
            sl = start_sluice(owner, [up], "--lookup-timeout-ms", "300", "--redis-timeout-ms", "500", redis=R,
                              workers=2)
            statuses = []
            for _ in range(3):
                resp = one(sl.port, ak="AK1")
                statuses.append((resp.status, resp.body))
            cls.runs[mode] = (fake, sl, statuses, time.monotonic())

    def run_against(self, mode):
        fake, sl, statuses, t0 = self.runs[mode]
        for status, body in statuses:
            self.assertEqual(status, 503, body)
        time.sleep(max(0.0, t0 + self.WINDOW - time.monotonic()))
        window = time.monotonic() - t0
        self.assertIsNone(sl.proc.poll(), sl.stderr()[-3000:])
        with open(f"/proc/{sl.proc.pid}/status") as f:  # nothing a peer says makes sluice allocate gigabytes
            rss_kb = int(next(ln for ln in f if ln.startswith("VmRSS:")).split()[1])
        self.assertLess(rss_kb, 1 << 20, f"{mode}: RSS {rss_kb} kB")
        err = sl.stderr()
        dir_lines = [ln for ln in err.splitlines() if ln.startswith("sluice: redis:")]
        print(f"\n  {mode}: {len(err.splitlines())} log lines in all ({len(dir_lines)} from the directory) over "
              f"{window:.1f} s, {fake.connections} connections accepted", file=sys.stderr)
        # the directory: the outage said once, then at most one line per 10 s;
        # a server that answers PING like Redis goes up and down: "connected",
        # what failed (each kind at most once per 10 s), down, up again
        self.assertLessEqual(len(dir_lines), 2 if mode != "pong" else 6, err)
        # everything sluice says (the flusher included) stays small: the issue
        # saw 438 lines in 25 s
        self.assertLessEqual(len(err.splitlines()), 40, err)
        if mode != "pong":
            self.assertEqual(sl.metrics().get("sluice_redis_up"), 0)
        rc = sl.stop()
        self.assertEqual(rc, 0, sl.stderr()[-3000:])
        self.assertNotRegex(sl.stderr(), r"Sanitizer|runtime error:|Assertion")

    def test_http_server(self):
        self.run_against("http")

    def test_junk_server(self):
        self.run_against("junk")

    def test_pong_then_junk(self):
        self.run_against("pong")

    def test_huge_array_headers(self):
        self.run_against("huge")


if __name__ == "__main__":
    unittest.main()
