"""Integration tests of sluice's metering (SPEC section 6, issue 5): every
request ends in one outcome, counted into Redis exactly once, also across a
Redis restart, a Redis pause, a lost reply to a batch, a SIGTERM with
requests in flight and a restart that replays the spool; requests are
counted on the day they arrived (--time-offset-s puts "now" next to a
midnight).

The ground truth is what the client saw (its own tally of every answer, by
account, feature, region and outcome) and what the backend did (modstub's
GET /stats: the HTTP 200s it gave). Each test starts its own redis-server
(with an append-only file, so that a restart on the same port keeps what was
written), a modstub and sluice on 127.0.0.1, and stops every process by PID
through addCleanup. Every load is bounded in time and count; the measured
numbers are printed (stderr) and summed up at the end of the run."""

import collections
import datetime
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse

import harness
import tcpfault
from proxyenv import start_modstub, start_sluice

P = "sluice:"
FORM = "application/x-www-form-urlencoded"
SL_FLUSH_HOT_COUNT = 100  # proxy/metering/flusher.c: a key with this many counts goes at the next flush
NUMBERS = []  # lines printed again by tearDownModule


def note(line):
    NUMBERS.append(line)
    print(f"\n  {line}", file=sys.stderr, flush=True)


def tearDownModule():
    if NUMBERS:
        print("\nmetering numbers measured:", file=sys.stderr)
        for line in NUMBERS:
            print(f"  {line}", file=sys.stderr)


def poll(fn, timeout, what, interval=0.02):
    """Waits (at most `timeout` s) for fn() to be true; returns (its value,
    the seconds it took)."""
    start = time.monotonic()
    deadline, last = start + timeout, None
    while time.monotonic() <= deadline:
        last = fn()
        if last:
            return last, time.monotonic() - start
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


# ---- a minimal RESP client, to read back what metering wrote ----

class Resp:
    def __init__(self, port, timeout=10.0):
        self.sock = socket.create_connection((harness.HOST, port), timeout=timeout)
        self.f = self.sock.makefile("rb")

    def close(self):
        self.f.close()
        self.sock.close()

    def cmd(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(out))
        return self._read()

    def _read(self):
        line = self.f.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("redis closed the connection")
        t, rest = line[:1], line[1:-2]
        if t == b"+":
            return rest.decode()
        if t == b"-":
            raise RuntimeError(rest.decode())
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            return None if n < 0 else self.f.read(n + 2)[:-2].decode()
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise ValueError(f"bad RESP line {line!r}")


class Meter:
    """What metering wrote to Redis: usage and calls hashes as
    {(day, uid, field): n}, the usage:<day> sets, the stream entries and
    the ids of the meter:batch markers."""

    def __init__(self, port):
        c = Resp(port)
        try:
            keys, cursor = [], "0"
            while True:
                cursor, part = c.cmd("SCAN", cursor, "MATCH", P + "*", "COUNT", 1000)
                keys += part
                if cursor == "0":
                    break
            self.usage, self.calls, self.sets, self.markers = {}, {}, {}, set()
            for k in keys:
                rest = k[len(P):]
                parts = rest.split(":")
                if parts[0] in ("usage", "calls") and len(parts) == 3:
                    flat = c.cmd("HGETALL", k)
                    into = self.usage if parts[0] == "usage" else self.calls
                    for i in range(0, len(flat), 2):
                        into[(parts[1], parts[2], flat[i])] = int(flat[i + 1])
                elif parts[0] == "usage" and len(parts) == 2 and parts[1] != "stream":
                    self.sets[parts[1]] = set(c.cmd("SMEMBERS", k))
                elif rest.startswith("meter:batch:"):
                    self.markers.add(rest[len("meter:batch:"):])
            self.stream = []
            for _id, flat in c.cmd("XRANGE", P + "usage:stream", "-", "+"):
                e = dict(zip(flat[0::2], flat[1::2]))
                # one entry per batch: a line per key, "<day>:<uid>:<feature>:<region>:<tier>:<outcome> <count>"
                lines = e["deltas"].splitlines()
                assert int(e["keys"]) == len(lines), e
                for line in lines:
                    # "<key> <count>", and for a billed key " <services>" (comma-separated)
                    parts = line.split(" ")
                    services = parts.pop() if len(parts) > 2 and ":" not in parts[-1] and not parts[-1].isdigit() \
                        else None
                    count = parts.pop()
                    name = " ".join(parts)
                    day, rest = name[:8], name[9:]
                    uid, feature, region, tier, outcome = rest.rsplit(":", 4)
                    self.stream.append({"batch": e["batch"], "day": day, "uid": uid, "feature": feature,
                                        "region": region, "tier": tier, "outcome": outcome, "count": count,
                                        "services": services})
        finally:
            c.close()

    def usage_total(self):
        return sum(self.usage.values())

    def calls_by_outcome(self):
        out = collections.Counter()
        for (_d, _u, field), n in self.calls.items():
            out[field.rsplit(":", 1)[1]] += n
        return out

    def calls_by_key(self):
        """{(uid, 'feature:region:outcome'): n} summed over the days."""
        out = collections.Counter()
        for (_d, uid, field), n in self.calls.items():
            out[(uid, field)] += n
        return dict(out)


# ---- requests and a bounded load client ----

# kind -> (uid, feature, region, request bytes). uid/feature/region are what
# the calls:<day>:<uid> field must name for that request.
def _req(ak="AK1", action="TextModeration", service="chat_detection", host="modstub", headers=()):
    q = []
    if action is not None:
        q.append(("Action", action))
    if ak is not None:
        q.append(("AccessKeyId", ak))
    if service is not None:
        q.append(("Service", service))
    return harness.HttpConn.build("GET", "/?" + urllib.parse.urlencode(q), list(headers), host=host)


BJ = "green-cip.cn-beijing.aliyuncs.com"
KINDS = {
    "ok": ("u1", "text", "cn-shanghai", dict()),
    "bj": ("u1", "text", "cn-beijing", dict(host=BJ)),
    "err": ("u1", "text", "cn-shanghai", dict(headers=[("x-modstub-status", "500")])),
    "voice": ("u2", "voice", "cn-shanghai", dict(ak="AK2", action="VoiceModeration", service="audio_media_detection")),
    "unauth": ("-", "text", "cn-shanghai", dict(ak="AKNOSUCH")),
    "bad": ("-", "-", "-", dict(action=None)),
}
# per 20 requests: 10 text ok, 2 text in cn-beijing, 1 forced 500, 5 voice
# (account u2, throttled at 50 QPS), 1 unknown key, 1 without Action
MIX = ["ok", "voice", "ok", "bj", "ok", "voice", "ok", "err", "ok", "voice",
       "ok", "unauth", "ok", "voice", "bj", "ok", "bad", "voice", "ok", "ok"]


def build(kind, extra_headers=()):
    uid, feature, region, kw = KINDS[kind]
    kw = dict(kw)
    kw["headers"] = list(kw.get("headers", ())) + list(extra_headers)
    return _req(**kw)


def outcome_of(resp):
    """The outcome (SPEC section 6) that the answer tells of."""
    s = resp.status
    if s == 200:
        return "ok"
    if s == 429:
        return "throttled"
    code, msg = "", ""
    if resp.body[:1] == b"{":
        try:
            body = resp.json()
            code, msg = str(body.get("Code", "")), str(body.get("Message", ""))
        except ValueError:
            pass
    if s == 403:
        return "suspended" if code == "Forbidden.AccountSuspended" else "unauthenticated"
    if s == 400:
        return "bad_request"
    if s == 503 and code == "ServiceUnavailable" and "backend" not in msg:
        return "unavailable"
    return "upstream_error"


class Tally:
    """The client's own count of everything it sent and was answered."""

    def __init__(self):
        self.lock = threading.Lock()
        self.keys = collections.Counter()      # (uid, 'feature:region:outcome') -> n
        self.outcomes = collections.Counter()  # outcome -> n
        self.statuses = collections.Counter()  # HTTP status -> n
        self.sent = 0
        self.unanswered = 0
        self.inflight_at_mark = 0

    def add(self, kind, resp):
        uid, feature, region, _ = KINDS[kind]
        o = outcome_of(resp)
        with self.lock:
            self.keys[(uid, f"{feature}:{region}:{o}")] += 1
            self.outcomes[o] += 1
            self.statuses[resp.status] += 1
            self.sent += 1

    def answered(self):
        return sum(self.outcomes.values())

    def summary(self):
        return (f"sent {self.sent + self.unanswered}, answered {self.answered()}, unanswered {self.unanswered}, "
                f"outcomes {dict(sorted(self.outcomes.items()))}")


def one(port, kind, tally, extra_headers=()):
    with harness.HttpConn(port) as c:
        c.send(build(kind, extra_headers))
        resp = c.read_response()
    tally.add(kind, resp)
    return resp


class Load:
    """`threads` keep-alive connections sending MIX round-robin until
    `duration` seconds pass, `per_thread` requests are answered, or stop().
    A connection that fails is replaced; when no new one can be made (the
    proxy stopped listening) the thread ends."""

    def __init__(self, port, tally, threads=4, duration=3.0, per_thread=20000, extra_headers=(), timeout=10.0):
        self.port, self.tally = port, tally
        self.nthreads, self.duration, self.per_thread = threads, duration, per_thread
        self.timeout = timeout
        self.reqs = {k: build(k, extra_headers) for k in KINDS}
        self._stop = threading.Event()
        self.mark = None  # a time.monotonic(): answers to requests sent before it and answered after are counted
        self.threads = []
        self.connect_failures = 0
        self.elapsed = 0.0

    def start(self, test):
        self.t0 = time.monotonic()
        for i in range(self.nthreads):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)
        test.addCleanup(self.join)
        test.addCleanup(self.stop)
        return self

    def stop(self):
        self._stop.set()

    def join(self, timeout=None):
        limit = time.monotonic() + (timeout if timeout is not None else self.duration + 3 * self.timeout)
        for t in self.threads:
            t.join(max(0.0, limit - time.monotonic()))
        alive = sum(t.is_alive() for t in self.threads)
        self.elapsed = time.monotonic() - self.t0
        return alive == 0

    def run(self, test):
        self.start(test)
        ok = self.join()
        test.assertTrue(ok, "load threads did not end")
        return self

    def _run(self, idx):
        deadline = self.t0 + self.duration
        conn, i, n, unanswered, inflight = None, idx * 7, 0, 0, 0
        try:
            while not self._stop.is_set() and time.monotonic() < deadline and n < self.per_thread:
                if conn is None:
                    try:
                        conn = harness.HttpConn(self.port, timeout=self.timeout)
                    except OSError:
                        with self.tally.lock:
                            self.connect_failures += 1
                        break
                kind = MIX[i % len(MIX)]
                i += 1
                t_sent = time.monotonic()
                try:
                    conn.send(self.reqs[kind])
                    resp = conn.read_response()
                except (harness.IncompleteResponse, OSError):
                    unanswered += 1
                    conn.close()
                    conn = None
                    continue
                mark = self.mark
                if mark is not None and t_sent < mark <= time.monotonic():
                    inflight += 1
                n += 1
                self.tally.add(kind, resp)
                if (resp.header("Connection") or "").lower() == "close":
                    conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()
            with self.tally.lock:
                self.tally.unanswered += unanswered
                self.tally.inflight_at_mark += inflight


def restart_redis(r):
    """A new redis-server with r's argv (same port and directory: it loads
    the append-only file); put in r.proc so that r.stop() ends it."""
    r.proc = harness.start_process(list(r.proc.args), r.port, stdout=subprocess.DEVNULL)
    poll(lambda: _ping(r), 10, "redis loaded", interval=0.02)


def _ping(r):
    try:
        return r.cli("PING").strip() == "PONG"
    except subprocess.CalledProcessError:
        return False


def utc_day(secs):
    return datetime.datetime.fromtimestamp(secs, datetime.timezone.utc).strftime("%Y%m%d")


class MeteringCase(unittest.TestCase):
    """A redis-server (append-only, fsync always) seeded with two accounts
    (AK1 -> u1, AK2 -> u2), text at 100000 QPS and voice at 50 QPS (so u2
    is throttled under load), a modstub answering 500 to 3% of calls."""

    STUB_ARGS = ("--error-rate", "0.03", "--seed", "11")

    def setUp(self):
        self.r = harness.start_redis(("--appendonly", "yes", "--appendfsync", "always"))
        self.addCleanup(self.r.stop)
        for args in (("SET", P + "ak:AK1", "u1"), ("SET", P + "ak:AK2", "u2"),
                     ("HSET", P + "feature:text", "default_qps", "100000"),
                     ("HSET", P + "feature:voice", "default_qps", "50")):
            self.r.cli(*args)
        _, self.up = start_modstub(self, *self.STUB_ARGS, workers=2)
        self.tally = Tally()
        self.t_start = time.monotonic()

    def start(self, *args, redis=None):
        """A sluice (2 workers) in front of the stub; at the end of the test its
        exit status must be 0 and its stderr free of sanitizer reports."""
        sl = start_sluice(self, [self.up], *args, redis=redis or self.r, workers=2)
        self.addCleanup(shutil.rmtree, sl.tmpdir, True)
        self.addCleanup(self.stop_sluice, sl)
        # the first full resync (feature overrides) is done
        poll(lambda: sl.metrics().get("sluice_directory_resyncs_total", 0) >= 1, 10, "first resync")
        return sl

    def stop_sluice(self, sl):
        """SIGTERM (again harmless): exit status 0, no sanitizer report
        (except for an instance the test killed)."""
        if getattr(sl, "killed", False):
            return -9
        status = sl.stop(timeout=30)
        log = sl.stderr()
        for bad in ("Sanitizer", "runtime error:"):
            self.assertNotIn(bad, log, log[-4000:])
        self.assertEqual(status, 0, log[-2000:])
        return status

    def backend_200(self):
        r = harness.http_request(self.up, "GET", "/stats")
        return r.json()["by_status"].get("200", 0)

    def drained(self, sl, timeout=15):
        """Waits until every request this sluice answered is counted in a
        batch and every batch is in Redis. An empty queue alone is not
        enough: the last requests of a load may still sit in the workers'
        tables or the accumulator, and become a batch a flush later (CI read
        12 batches made, 11 applied after the queue had been empty)."""
        def done():
            m = sl.metrics()
            answered = sum(v for k, v in m.items() if k.startswith("sluice_requests_outcome_total{"))
            # counted >= answered: counts replayed from a spool at start are counted too
            return (m.get("sluice_meter_queue_batches") == 0 and m.get("sluice_meter_unflushed_requests") == 0
                    and m.get("sluice_meter_accumulated_requests") == 0 and m.get("sluice_meter_redis_up") == 1
                    and m.get("sluice_meter_counted_total", 0) >= answered)
        poll(done, timeout, "every answered request counted and the metering queue empty")

    def meter_metrics(self, sl):
        m = sl.metrics()
        return {k[len("sluice_meter_"):]: int(v) for k, v in m.items() if k.startswith("sluice_meter_")
                and not k.startswith("sluice_meter_flush_latency")}

    def check_outcome_metrics(self, sl):
        """sluice_requests_outcome_total summed per outcome equals the tally."""
        got = collections.Counter()
        for k, v in sl.metrics().items():
            m = re.match(r'sluice_requests_outcome_total\{outcome="([a-z_]+)"', k)
            if m:
                got[m.group(1)] += int(v)
        self.assertEqual({k: v for k, v in got.items() if v}, dict(self.tally.outcomes))

    def check_exact(self, what, strict=True):
        """Redis holds exactly what the client and the backend saw. strict:
        every request sent was answered (no request ended with no answer)."""
        meter = Meter(self.r.port)
        backend = self.backend_200()
        usage = meter.usage_total()
        calls = meter.calls_by_outcome()
        t = self.tally
        note(f"{what}: {t.summary()}; backend 200s {backend}, usage sum {usage}, calls {dict(sorted(calls.items()))}, "
             f"batches in Redis {len(meter.markers)}, stream entries {len(meter.stream)}")
        # billable: the backend's 200s, the client's 200s, the usage hashes
        self.assertEqual(usage, backend, "usage sum != backend 200s")
        self.assertEqual(calls["ok"], usage, "calls ok != usage")
        self.assertEqual(t.outcomes["ok"], backend, "client 200s != backend 200s")
        self.assertEqual(calls["throttled"], t.outcomes["throttled"], "throttled != 429s received")
        if strict:
            self.assertEqual(t.unanswered, 0)
            self.assertEqual(sum(calls.values()), t.answered(), "all outcomes != requests sent")
            self.assertEqual(meter.calls_by_key(), dict(t.keys))
        else:
            self.assertGreaterEqual(sum(calls.values()), t.answered())
            self.assertLessEqual(sum(calls.values()), t.answered() + t.unanswered)
        self.check_consistent(meter)
        return meter

    def seed_accounts(self, ak, uid, n):
        """n accounts: P ak:<ak>0.. -> <uid>0.., in one MSET."""
        args = []
        for i in range(n):
            args += [f"{P}ak:{ak}{i}", f"{uid}{i}"]
        self.r.cli("MSET", *args)

    def check_totals(self, what, outcomes):
        """Every count arrived once, by outcome (refused calls past their
        bound are counted under the fixed shape, so not by key); billable
        counts exactly, by key."""
        meter = Meter(self.r.port)
        backend = self.backend_200()
        calls = meter.calls_by_outcome()
        note(f"{what}: answered {dict(sorted(outcomes.items()))}; backend 200s {backend}, usage sum "
             f"{meter.usage_total()}, calls {dict(sorted(calls.items()))}, {len(meter.calls)} calls fields")
        self.assertEqual(meter.usage_total(), backend, "usage sum != backend 200s")
        self.assertEqual(outcomes["ok"], backend, "client 200s != backend 200s")
        self.assertEqual({k: v for k, v in calls.items() if v}, {k: v for k, v in outcomes.items() if v})
        self.check_consistent(meter)
        return meter


    def check_consistent(self, meter):
        """The hashes, the sets, the stream and the markers agree. (The load's
        calls name one Service each and are all billable Actions: usage
        summed over services is calls ok, per feature and region.)"""
        by_fr = collections.Counter()
        for (day, uid, field), n in meter.usage.items():
            feature, service, region = field.split(":")
            self.assertTrue(service, field)
            by_fr[(day, uid, f"{feature}:{region}")] += n
            self.assertIn(uid, meter.sets.get(day, set()), (day, uid))
        for (day, uid, fr), n in by_fr.items():
            self.assertEqual(meter.calls.get((day, uid, fr + ":ok")), n, (day, uid, fr))
        for (day, uid, field), n in meter.calls.items():
            if field.endswith(":ok"):
                self.assertEqual(by_fr.get((day, uid, field[:-3])), n, (day, uid, field))
        sums, seen = collections.Counter(), set()
        for e in meter.stream:
            key = (e["batch"], e["day"], e["uid"], e["feature"], e["region"], e["outcome"])
            self.assertNotIn(key, seen, "a key twice in one batch, or a batch applied twice")
            seen.add(key)
            sums[(e["day"], e["uid"], f'{e["feature"]}:{e["region"]}:{e["outcome"]}')] += int(e["count"])
        self.assertEqual(dict(sums), meter.calls, "stream deltas != calls hashes")
        self.assertEqual({e["batch"] for e in meter.stream}, meter.markers, "stream batches != batch markers")


class UnderLoad(MeteringCase):

    def test_load_then_sigterm_exact(self):
        """4 connections for 3 s, then SIGTERM right away: the last second's
        counts go to Redis in the final flush."""
        sl = self.start()
        load = Load(sl.port, self.tally, threads=4, duration=3.0).run(self)
        self.check_outcome_metrics(sl)
        mm = self.meter_metrics(sl)
        self.assertEqual(mm["lost_total"], 0)
        t0 = time.monotonic()
        self.stop_sluice(sl)
        note(f"load: {self.tally.answered()} answers in {load.elapsed:.1f} s "
             f"({self.tally.answered() / load.elapsed:.0f}/s); SIGTERM to exit {time.monotonic() - t0:.2f} s")
        spool = os.path.join(sl.tmpdir, "spool", "meter.spool")
        self.assertEqual(stat.S_IMODE(os.stat(spool).st_mode), 0o600)
        self.assertGreater(self.tally.outcomes["throttled"], 0)
        self.assertGreater(self.tally.outcomes["upstream_error"], 0)
        self.check_exact("load + SIGTERM")

    def test_wrk_load_exact(self):
        """wrk (8 connections, 2 s) on one account and feature: usage equals
        the backend's 200s and the 2xx wrk counted."""
        wrk = shutil.which("wrk")
        if wrk is None:
            self.skipTest("wrk not installed")
        sl = self.start()
        url = f"http://127.0.0.1:{sl.port}/?Action=TextModeration&AccessKeyId=AK1&Service=chat_detection"
        out = subprocess.run([wrk, "-t2", "-c8", "-d2s", "--timeout", "5s", url], capture_output=True, text=True,
                             timeout=30)
        self.assertEqual(out.returncode, 0, out.stderr)
        m = re.search(r"(\d+) requests in", out.stdout)
        self.assertTrue(m, out.stdout)
        total = int(m.group(1))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout)
        non2xx = int(non2xx.group(1)) if non2xx else 0
        self.stop_sluice(sl)
        meter = Meter(self.r.port)
        backend = self.backend_200()
        calls = meter.calls_by_outcome()
        note(f"wrk: {total} requests ({non2xx} non-2xx); backend 200s {backend}; usage {meter.usage_total()}; "
             f"calls {dict(calls)}")
        self.assertEqual(meter.usage_total(), backend)
        # wrk drops the requests still open when its time is up; the backend may have answered them
        self.assertLessEqual(total - non2xx, backend)
        self.assertGreaterEqual(total - non2xx, backend - 8)
        # wrk may stop with requests unanswered when its time is up: they are counted all the same
        self.assertGreaterEqual(sum(calls.values()), total)
        self.assertLessEqual(sum(calls.values()), total + 8)
        self.check_consistent(meter)


class RedisTrouble(MeteringCase):

    def test_redis_restart_during_load(self):
        """Redis stopped (by PID) 1.2 s into a 5 s load and started again on
        the same port 1.5 s later: known accounts keep flowing, the batches
        wait, and every count arrives after the restart."""
        sl = self.start("--flush-ms", "200", "--lookup-timeout-ms", "300")
        load = Load(sl.port, self.tally, threads=4, duration=5.0).start(self)
        time.sleep(1.2)
        harness.stop_process(self.r.proc)
        t_down = time.monotonic()
        poll(lambda: sl.metrics().get("sluice_meter_redis_up") == 0, 5, "flusher sees redis down")
        time.sleep(max(0.0, 1.5 - (time.monotonic() - t_down)))
        during = self.meter_metrics(sl)
        self.assertGreaterEqual(during["queue_batches"], 1, during)
        self.assertGreater(during["unflushed_requests"], 0, during)
        restart_redis(self.r)
        outage = time.monotonic() - t_down
        self.assertTrue(load.join(), "load threads did not end")
        _, d = poll(lambda: self.meter_metrics(sl)["queue_batches"] == 0, 15, "queue empty after restart")
        self.drained(sl)
        after = self.meter_metrics(sl)
        note(f"redis restart: outage {outage:.1f} s; during it {during['queue_batches']} batches / "
             f"{during['unflushed_requests']} requests waited (oldest {during['oldest_unflushed_seconds']} s); "
             f"after: retried {after['batches_retried_total']}, applied {after['batches_applied_total']}, "
             f"deduplicated {after['batches_deduplicated_total']}")
        self.check_outcome_metrics(sl)
        self.stop_sluice(sl)
        # the known accounts were never refused
        for (uid, field), n in self.tally.keys.items():
            if uid != "-":
                self.assertFalse(field.endswith(":unavailable"), (uid, field, n))
        self.check_exact("redis restart")

    def test_redis_paused(self):
        """CLIENT PAUSE 2500 ALL in the middle of a 4 s load, flush every
        300 ms: the batches wait and then all arrive, once."""
        sl = self.start("--flush-ms", "300")
        load = Load(sl.port, self.tally, threads=4, duration=4.0).start(self)
        time.sleep(1.0)
        self.r.cli("CLIENT", "PAUSE", "2500", "ALL")
        time.sleep(1.5)
        during = self.meter_metrics(sl)
        self.assertTrue(load.join(), "load threads did not end")
        self.drained(sl)
        after = self.meter_metrics(sl)
        note(f"redis paused 2.5 s: 1.5 s in, {during['queue_batches']} batches / {during['unflushed_requests']} "
             f"requests waited (oldest {during['oldest_unflushed_seconds']} s); after: applied "
             f"{after['batches_applied_total']}, retried {after['batches_retried_total']}")
        self.assertGreaterEqual(during["queue_batches"], 1, during)
        self.stop_sluice(sl)
        self.check_exact("redis paused")

    def test_lost_reply_is_resent_once(self):
        """A proxy between sluice and Redis forwards the flusher's first
        transaction (MULTI ... EXEC), then closes that connection instead of
        relaying EXEC's reply: sluice reconnects and sends the batch again
        with the same id, whose marker Redis has (deduplicated)."""
        fp = tcpfault.FaultProxy(self.r.port, marker=b"$4\r\nEXEC\r\n", pass_replies=(b"+OK\r\n", b"+QUEUED\r\n"))
        self.addCleanup(fp.close)
        sl = self.start("--flush-ms", "200", redis=fp)
        Load(sl.port, self.tally, threads=4, duration=2.5).run(self)
        poll(lambda: fp.dropped, 10, "a reply dropped")
        poll(lambda: self.meter_metrics(sl)["batches_deduplicated_total"] >= 1, 10, "a batch deduplicated")
        self.drained(sl)
        mm = self.meter_metrics(sl)
        note(f"lost reply: dropped {fp.dropped[0][:20]!r} on 1 of {fp.connections} connections to redis; "
             f"retried {mm['batches_retried_total']}, deduplicated {mm['batches_deduplicated_total']}, "
             f"applied {mm['batches_applied_total']}, made {mm['batches_total']}")
        self.assertTrue(fp.dropped[0].startswith(b"*"), fp.dropped[0][:40])  # EXEC's array: the batch was applied
        self.assertGreaterEqual(mm["batches_retried_total"], 1)
        self.assertEqual(mm["batches_deduplicated_total"], 1)
        self.assertEqual(mm["batches_applied_total"] + mm["batches_deduplicated_total"], mm["batches_total"])
        self.stop_sluice(sl)
        meter = self.check_exact("lost reply")
        # the batch whose reply was lost has its marker (applied once) though sluice counts it as deduplicated
        self.assertGreaterEqual(len(meter.markers), mm["batches_applied_total"] + mm["batches_deduplicated_total"])

    @harness.release_only("the flusher's own Redis logic, run under ASan", sanitizers=("thread",))
    def test_transaction_applied_elsewhere_first(self):
        """The race a lost connection leaves: a batch's transaction executes
        from another connection (the dropped one's EXEC, read by Redis late)
        between this one's GET of the marker and its EXEC. A proxy runs the
        flusher's first transaction on a connection of its own just before
        forwarding it: the flusher's EXEC must find its WATCHed marker
        changed (nil), read the marker again and take the batch as applied,
        so that its counts are in Redis once."""
        fp = tcpfault.FaultProxy(self.r.port, marker=b"$4\r\nEXEC\r\n", replay_from=b"*1\r\n$5\r\nMULTI\r\n")
        self.addCleanup(fp.close)
        sl = self.start("--flush-ms", "200", redis=fp)
        Load(sl.port, self.tally, threads=4, duration=2.0).run(self)
        poll(lambda: fp.replayed, 10, "a transaction run elsewhere first")
        self.drained(sl)
        mm = self.meter_metrics(sl)
        note(f"transaction run elsewhere first: its reply {fp.replayed[0][:30]!r}; applied "
             f"{mm['batches_applied_total']}, deduplicated {mm['batches_deduplicated_total']}, made {mm['batches_total']}")
        self.assertTrue(fp.replayed[0].startswith(b"*"), fp.replayed[0])  # EXEC ran there
        self.assertEqual(mm["batches_deduplicated_total"], 1)
        self.assertEqual(mm["batches_applied_total"] + mm["batches_deduplicated_total"], mm["batches_total"])
        self.stop_sluice(sl)
        self.check_exact("transaction applied elsewhere first")

    @harness.release_only("the flusher's own Redis logic, run under ASan", sanitizers=("thread",))
    def test_multi_refused_keeps_the_counts(self):
        """A server that refuses MULTI (renamed away here; an ACL does the
        same): no batch is applied, as one or command by command; the
        flusher says why and keeps the counts, which go once the server
        takes transactions again."""
        args = list(self.r.proc.args)
        harness.stop_process(self.r.proc)
        self.r.proc = harness.start_process(args + ["--rename-command", "MULTI", ""], self.r.port,
                                            stdout=subprocess.DEVNULL)
        poll(lambda: _ping(self.r), 10, "redis up without MULTI", interval=0.02)
        sl = self.start("--flush-ms", "200")
        Load(sl.port, self.tally, threads=2, duration=1.0).run(self)
        poll(lambda: "MULTI refused" in sl.stderr(), 10, "the flusher says MULTI is refused")
        mm = self.meter_metrics(sl)
        self.assertEqual(mm["batches_applied_total"], 0, mm)
        self.assertGreaterEqual(mm["batches_retried_total"], 1, mm)
        self.assertEqual(self.r.cli("KEYS", "*usage*").split(), [])  # not even the marker's SET ran alone
        self.assertEqual(self.r.cli("KEYS", "*meter:batch*").split(), [])
        harness.stop_process(self.r.proc)
        self.r.proc = harness.start_process(args, self.r.port, stdout=subprocess.DEVNULL)
        poll(lambda: _ping(self.r), 10, "redis up with MULTI", interval=0.02)
        self.drained(sl)
        self.stop_sluice(sl)
        self.check_exact("MULTI refused, then taken")

    def test_sigterm_just_after_redis_returns(self):
        """Redis away for 3 s (the flusher's reconnect backoff grows to 2 s),
        back, and sluice gets SIGTERM at once: Redis is reachable, so the
        final flush must put every count into Redis, not leave it in the
        spool."""
        sl = self.start("--flush-ms", "200")
        Load(sl.port, self.tally, threads=2, duration=0.5).run(self)
        self.drained(sl)
        harness.stop_process(self.r.proc)
        poll(lambda: sl.metrics().get("sluice_meter_redis_up") == 0, 5, "flusher sees redis down")
        Load(sl.port, self.tally, threads=2, duration=1.0).run(self)
        time.sleep(2.0)
        restart_redis(self.r)
        t0 = time.monotonic()
        self.stop_sluice(sl)
        said = [line for line in sl.stderr().splitlines() if "metering" in line and "redis" not in line]
        note(f"SIGTERM just after redis came back: exit in {time.monotonic() - t0:.2f} s; sluice said {said}")
        self.check_exact("SIGTERM after redis returns")


class Shutdown(MeteringCase):

    def test_sigterm_with_requests_in_flight(self):
        """8 connections whose calls take 300 ms at the backend; SIGTERM
        while they wait: the drain answers them, and their counts are in
        Redis after exit 0."""
        sl = self.start()
        load = Load(sl.port, self.tally, threads=8, duration=15.0,
                    extra_headers=[("x-modstub-delay-ms", "300")]).start(self)
        time.sleep(1.5)
        load.mark = time.monotonic()
        os.kill(sl.proc.pid, signal.SIGTERM)
        t0 = time.monotonic()
        rc = sl.proc.wait(30)
        exit_s = time.monotonic() - t0
        self.assertEqual(rc, 0, sl.stderr()[-2000:])
        self.assertTrue(load.join(15), "load threads did not end")
        note(f"SIGTERM in flight: {self.tally.inflight_at_mark} requests in flight answered after SIGTERM, "
             f"{self.tally.unanswered} unanswered, exit after {exit_s:.2f} s")
        self.assertGreaterEqual(self.tally.inflight_at_mark, 1)
        self.check_exact("SIGTERM in flight", strict=False)

    def test_spool_replay_after_restart(self):
        """Redis stopped; load; SIGTERM (exit 0, the counts stay in the
        spool); Redis back; sluice started again with the same --spool-dir
        and --instance-id replays the spool, and the totals are exact. A
        third start replays nothing."""
        spool = tempfile.mkdtemp(prefix="sluice-spool-")
        self.addCleanup(shutil.rmtree, spool, True)
        args = ("--spool-dir", spool, "--instance-id", "metering-test-1", "--flush-ms", "200")
        sl1 = self.start(*args)
        for kind in ("ok", "voice", "bj"):
            one(sl1.port, kind, self.tally)  # the accounts are known before Redis goes away
        self.drained(sl1)
        harness.stop_process(self.r.proc)
        poll(lambda: sl1.metrics().get("sluice_meter_redis_up") == 0, 5, "flusher sees redis down")
        Load(sl1.port, self.tally, threads=4, duration=2.0).run(self)
        before = self.meter_metrics(sl1)
        self.stop_sluice(sl1)
        err1 = sl1.stderr()
        path = os.path.join(spool, "meter.spool")
        size = os.stat(path).st_size
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertGreater(size, 0)
        self.assertIn("spool", err1)
        self.assertNotIn("METERING LOST", err1)
        restart_redis(self.r)
        sl2 = self.start(*args)
        m2 = self.meter_metrics(sl2)
        self.assertGreater(m2["batches_replayed_total"], 0, m2)
        self.drained(sl2)
        m2b = self.meter_metrics(sl2)
        self.stop_sluice(sl2)
        note(f"spool replay: {before['queue_batches']} batches / {before['unflushed_requests']} requests unflushed "
             f"at SIGTERM, spool {size} bytes; next start replayed {m2['batches_replayed_total']} batches, "
             f"applied {m2b['batches_applied_total']}, deduplicated {m2b['batches_deduplicated_total']}")
        self.assertEqual(m2b["batches_applied_total"] + m2b["batches_deduplicated_total"],
                         m2["batches_replayed_total"])
        self.check_exact("spool replay")
        sl3 = self.start(*args)
        m3 = self.meter_metrics(sl3)
        self.stop_sluice(sl3)
        self.assertEqual(m3["batches_replayed_total"], 0, m3)
        self.check_exact("third start")


class Intervals(MeteringCase):
    """Two intervals (issue 12): counts are made durable in the spool every
    --spool-ms and go to Redis every --flush-ms. kill -9 loses at most about
    one spool interval; SIGTERM still flushes everything."""

    def test_kill9_loses_at_most_the_spool_interval(self):
        spool = tempfile.mkdtemp(prefix="sluice-spool-")
        self.addCleanup(shutil.rmtree, spool, True)
        base = ("--spool-dir", spool, "--instance-id", "metering-kill9")
        sl1 = self.start(*base, "--flush-ms", "60000", "--spool-ms", "250")
        load = Load(sl1.port, self.tally, threads=4, duration=10.0)
        t0 = time.monotonic()
        load.start(self)
        time.sleep(2.5)
        # nothing reached Redis yet (the first flush is 60 s away): all of it is journaled or in a worker
        m = self.meter_metrics(sl1)
        self.assertEqual(Meter(self.r.port).usage_total(), 0)
        self.assertGreater(m["accumulated_requests"], 0, m)
        sl1.proc.kill()  # under load
        el = time.monotonic() - t0
        sl1.proc.wait(10)
        sl1.killed = sl1._told = True  # (its stop at cleanup reads no log)
        load.stop()
        load.join(15)
        backend = self.backend_200()
        rate = backend / el
        sl2 = self.start(*base, "--flush-ms", "200")
        poll(lambda: self.meter_metrics(sl2)["accumulated_requests"] == 0, 10, "replayed counts flushed")
        self.drained(sl2)
        usage = Meter(self.r.port).usage_total()
        lost = backend - usage
        note(f"kill -9 with --spool-ms 250: backend 200s {backend} ({rate:.0f}/s), usage after replay {usage}, "
             f"lost {lost} = {lost / rate * 1000:.0f} ms of billable calls")
        self.assertGreaterEqual(lost, 0, "counted more than the backend answered")
        self.assertLessEqual(lost, rate * 0.5, "more than two spool intervals lost")
        self.assertIn("journaled count(s) from the spool", sl2.stderr())

    def test_long_flush_interval_sigterm_flushes_everything(self):
        sl = self.start("--flush-ms", "60000")
        Load(sl.port, self.tally, threads=4, duration=2.0).run(self)
        self.assertEqual(Meter(self.r.port).usage_total(), 0, "counts went before the flush interval")
        self.assertGreater(self.meter_metrics(sl)["accumulated_requests"], 0)
        self.stop_sluice(sl)
        self.check_exact("--flush-ms 60000 then SIGTERM")

    def test_quiet_keys_wait_and_survive_kill9(self):
        """--flush-quiet-ms: a key with 100 counts or more goes at the next
        flush, a quieter one waits up to --flush-quiet-ms (kept in the
        accumulator, its counts journaled again after each flush's batches);
        a kill -9 while they wait and a restart lose and double nothing."""
        n = 200
        self.seed_accounts("AKQ", "q", n)
        spool = tempfile.mkdtemp(prefix="sluice-spool-")
        self.addCleanup(shutil.rmtree, spool, True)
        base = ("--spool-dir", spool, "--instance-id", "metering-quiet")
        sl1 = self.start(*base, "--flush-ms", "300", "--spool-ms", "100", "--flush-quiet-ms", "6000")
        outcomes = collections.Counter()
        with harness.HttpConn(sl1.port) as c:
            for i in range(150):
                c.send(_req(ak="AK1"))
                outcomes[outcome_of(c.read_response())] += 1
            hot = outcomes["ok"]  # u1's ok key: at least 100 counts (its few errors are a quiet key)
            for i in range(n):
                c.send(_req(ak=f"AKQ{i}"))
                outcomes[outcome_of(c.read_response())] += 1

        def calls_of(prefix, outcome=""):
            return sum(v for (_d, uid, f), v in Meter(self.r.port).calls.items()
                       if uid.startswith(prefix) and f.endswith(outcome))
        self.assertGreaterEqual(hot, 100)
        # The hot key goes at a flush; if a flush cut its requests in two
        # with 100 or more before the cut, what came after is a quiet key of
        # its own and waits (it is in the kill -9's spool and the totals
        # below): so at least 100, not all of them, within a few flushes.
        poll(lambda: calls_of("u1", ":ok") >= SL_FLUSH_HOT_COUNT, 3, "the hot key's counts in Redis at a flush")
        time.sleep(1.5)  # five flushes more: the quiet keys kept and journaled again after each
        self.assertEqual(calls_of("q"), 0, "quiet keys went before --flush-quiet-ms")
        sl1.proc.kill()
        sl1.proc.wait(10)
        sl1.killed = sl1._told = True
        sl2 = self.start(*base, "--flush-ms", "200")
        poll(lambda: calls_of("q") == n, 5, "the quiet keys' counts, replayed from the spool")
        self.stop_sluice(sl2)
        self.check_totals("quiet keys, kill -9 while they waited", outcomes)


class ClientGone(MeteringCase):
    """SPEC 6: a backend's 200 is ok also when the client went away before
    or while it was relayed (the moderation was done). The client resets
    (RST) while waiting for a slow backend, or in the middle of a large
    body; each call is counted once, as the backend answered it."""

    def reset(self, conn):
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    def test_reset_while_waiting_and_while_relayed(self):
        sl = self.start("--flush-ms", "200")
        waits = 4
        for i in range(waits):  # the backend answers 200 after 300 ms; the client is gone after 50
            c = harness.HttpConn(sl.port)
            c.send(_req(headers=[("x-modstub-delay-ms", "300")]))
            time.sleep(0.05)
            self.reset(c)
        # one whose 500 comes after the client left: upstream_error, not billed
        c = harness.HttpConn(sl.port)
        c.send(_req(headers=[("x-modstub-delay-ms", "300"), ("x-modstub-status", "500")]))
        time.sleep(0.05)
        self.reset(c)
        # one reset after the head of a 4 MiB answer arrived
        c = harness.HttpConn(sl.port)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.send(_req(headers=[("x-modstub-size", str(4 << 20))]))
        got = c.sock.recv(100)
        self.assertTrue(got.startswith(b"HTTP/1.1 200"), got)
        self.reset(c)
        poll(lambda: sl.metrics().get("sluice_requests_orphaned_total", 0) >= waits + 1, 5, "orphans counted")
        poll(lambda: self.backend_200() == waits + 1, 5, "the backend answered them all")
        poll(lambda: Meter(self.r.port).usage_total() == waits + 1 and
             Meter(self.r.port).calls_by_outcome().get("upstream_error") == 1, 5, "the orphans' outcomes in Redis")
        m = Meter(self.r.port)
        calls = m.calls_by_outcome()
        note(f"client gone: backend 200s {self.backend_200()}, usage {m.usage_total()}, calls {dict(calls)}, "
             f"orphaned {sl.metrics().get('sluice_requests_orphaned_total')}")
        self.assertEqual(calls["ok"], waits + 1)
        self.assertEqual(calls["upstream_error"], 1)
        self.assertEqual(sl.metrics().get('sluice_requests_outcome_total{outcome="ok",feature="text",tier="baseline"}'),
                         waits + 1)
        # and the backend connection stays usable: a normal call afterwards
        with harness.HttpConn(sl.port) as c:
            c.send(_req())
            self.assertEqual(c.read_response().status, 200)
        self.stop_sluice(sl)
        self.assertEqual(Meter(self.r.port).usage_total(), waits + 2)

    def test_drain_cuts_orphans_at_its_bound(self):
        sl = self.start("--drain-timeout-ms", "300")
        c = harness.HttpConn(sl.port)
        c.send(_req(headers=[("x-modstub-delay-ms", "3000")]))
        time.sleep(0.1)
        self.reset(c)
        poll(lambda: sl.metrics().get("sluice_requests_orphaned_total", 0) == 1, 5, "orphan")
        t0 = time.monotonic()
        self.stop_sluice(sl)  # exit 0, no leak report
        self.assertLess(time.monotonic() - t0, 2.5)
        calls = Meter(self.r.port).calls_by_outcome()
        self.assertEqual(calls.get("upstream_error"), 1, calls)
        self.assertEqual(Meter(self.r.port).usage_total(), 0)


class Billable(MeteringCase):
    """SPEC 3 and 6: usage is keyed <feature>:<service>:<region>; result
    queries, cancels and upload tokens are counted in calls, never in usage;
    a call naming several Services is billed once per (distinct) service."""

    def test_usage_by_service_and_billable_actions(self):
        sl = self.start("--flush-ms", "200")
        sent = [
            _req(action="VideoModeration", service="videoDetection"),
            *[_req(action="VideoModerationResult", service="videoDetection") for _ in range(4)],
            _req(action="VideoModerationCancel", service="videoDetection"),
            _req(action="DescribeUploadToken", service=None),
            _req(service="chat_detection"),
            _req(service="comment_detection,chat_detection"),
            _req(service="ad_compliance_detection,ad_compliance_detection,,"),
            _req(service=None),
            _req(service=" chat_detection ,  comment_detection, "),  # each item without its spaces
        ]
        with harness.HttpConn(sl.port) as c:
            for raw in sent:
                c.send(raw)
                self.assertEqual(c.read_response().status, 200)
        day = time.strftime("%Y%m%d", time.gmtime())
        want_usage = {"video:videoDetection:cn-shanghai": 1, "text:chat_detection:cn-shanghai": 3,
                      "text:comment_detection:cn-shanghai": 2, "text:ad_compliance_detection:cn-shanghai": 1,
                      "text:-:cn-shanghai": 1}
        poll(lambda: {f: n for (d, u, f), n in Meter(self.r.port).usage.items()} == want_usage, 5,
             "usage by service")
        m = Meter(self.r.port)
        self.assertEqual(m.calls.get((day, "u1", "video:cn-shanghai:ok")), 6)
        self.assertEqual(m.calls.get((day, "u1", "upload:cn-shanghai:ok")), 1)
        self.assertEqual(m.calls.get((day, "u1", "text:cn-shanghai:ok")), 5)
        self.assertEqual(m.sets.get(day), {"u1"})
        billed = [e for e in m.stream if e["services"]]
        note(f"billable: usage {want_usage}; stream lines billed {[(e['feature'], e['services']) for e in billed]}")
        self.assertEqual(sorted(e["services"] for e in billed if e["feature"] == "text"),
                         sorted(["-", "ad_compliance_detection", "chat_detection", "comment_detection,chat_detection",
                                 "chat_detection,comment_detection"]))


class BatchOrder(MeteringCase):
    """A flush cuts its keys into batches by account (the UID's hash slot),
    not in arrival order: Redis's per-batch work (a cluster's marks, the
    day's SADD) is then about once per account and flush."""

    def test_an_accounts_keys_share_a_batch(self):
        n = 1200  # x 2 regions: 2400 keys, 3 batches of at most 1000
        self.seed_accounts("AKB", "b", n)
        sl = self.start("--flush-ms", "60000", "--spool-ms", "200")
        with harness.HttpConn(sl.port) as c:
            for kind in ({}, {"host": BJ}):  # all accounts in one region, then all in the other
                for i in range(n):
                    c.send(_req(ak=f"AKB{i}", **kind))
                    self.assertIn(c.read_response().status, (200, 500))
        self.stop_sluice(sl)  # SIGTERM: the one flush
        batches_of = collections.defaultdict(set)
        meter = Meter(self.r.port)
        for e in meter.stream:
            if e["uid"].startswith("b"):
                batches_of[e["uid"]].add(e["batch"])
        nbatches = len({e["batch"] for e in meter.stream})
        split = sorted(u for u, b in batches_of.items() if len(b) > 1)
        note(f"batch order: {len(batches_of)} accounts x 2 keys in {nbatches} batches; {len(split)} accounts split "
             f"between two (in arrival order every account would be)")
        self.assertEqual(len(batches_of), n)
        self.assertGreaterEqual(nbatches, 3)
        self.assertLessEqual(len(split), nbatches - 1, split[:10])


class BackgroundThreads(MeteringCase):
    """--background-nice and --background-cpus: the flusher, directory and
    fleet threads run that much above the process's nice value, on those CPUs (kept off the
    workers' CPUs for their tail latency); the workers and the main thread
    stay as the process was started. Metering still lands."""

    def test_threads_take_their_nice_value_and_cpus(self):
        sl = self.start("--flush-ms", "200", "--background-nice", "7", "--background-cpus", "0")

        def named_threads():
            """{name: (nice, cpus)}, once every thread has named itself (a
            thread sets its name when it starts; until then it shows the
            process's, which hid a worker here once under ASan). Other
            threads with the process's name (ThreadSanitizer's own) may
            be there."""
            threads = {}
            for tid in os.listdir(f"/proc/{sl.proc.pid}/task"):
                with open(f"/proc/{sl.proc.pid}/task/{tid}/comm") as f:
                    name = f.read().strip()
                with open(f"/proc/{sl.proc.pid}/task/{tid}/stat") as f:
                    nice = int(f.read().rsplit(")", 1)[1].split()[16])
                with open(f"/proc/{sl.proc.pid}/task/{tid}/status") as f:
                    cpus = re.search(r"Cpus_allowed_list:\s*(\S+)", f.read()).group(1)
                threads.setdefault(name, (nice, cpus))
            return threads if {"sluice-w0", "sluice-w1", "sluice-flusher"} <= threads.keys() else None

        threads = poll(named_threads, 5, "every thread named", interval=0.02)[0]
        with open("/proc/self/status") as f:
            ours = re.search(r"Cpus_allowed_list:\s*(\S+)", f.read()).group(1)
        note(f"background threads: {sorted(threads.items())}")
        base = threads["sluice"][0]  # the process's nice (the suite may run under nice)
        for name in ("sluice-flusher", "sluice-dir", "sluice-fleet"):
            self.assertEqual(threads.get(name), (min(19, base + 7), "0"), name)
        for name in ("sluice-w0", "sluice-w1"):
            self.assertEqual(threads.get(name), (base, ours), name)
        with harness.HttpConn(sl.port) as c:
            for _ in range(20):
                c.send(_req())
                self.assertEqual(c.read_response().status, 200)
        day = time.strftime("%Y%m%d", time.gmtime())
        poll(lambda: Meter(self.r.port).calls.get((day, "u1", "text:cn-shanghai:ok")) == 20, 5, "20 calls counted")

    def test_bad_values_refused(self):
        for args, says in ((("--background-nice", "20"), "background-nice: '20' is not an integer in [0, 19]"),
                           (("--background-nice", "-1"), "background-nice"),
                           (("--background-cpus", "100000"), "background-cpus: '100000' is not a CPU list"),
                           (("--background-cpus", "0-"), "is not a CPU list"),
                           (("--background-cpus", "1-0"), "is not a CPU list"),
                           (("--background-cpus", "0,,1"), "is not a CPU list")):
            p = subprocess.run([harness.bin_path("sluice"), "--upstream", f"127.0.0.1:{self.up}", "-t", *args],
                               capture_output=True, text=True, timeout=10)
            self.assertEqual(p.returncode, 1, (args, p.stderr))
            self.assertIn(says, p.stderr, args)


class SpoolBound(MeteringCase):

    def test_small_spool_bound(self):
        """--spool-max-bytes 8192, a flush every 50 ms, Redis healthy: once
        every batch is acked the spool must not stay full (else the next
        outage finds no room). Then Redis goes away: the spool fills, the
        batches wait in memory, and all of them arrive once Redis is back."""
        sl = self.start("--spool-max-bytes", "8192", "--flush-ms", "50")
        Load(sl.port, self.tally, threads=4, duration=2.0).run(self)
        self.drained(sl)
        healthy = self.meter_metrics(sl)
        note(f"spool bound 8192, healthy redis: {healthy['batches_total']} batches; spool "
             f"{healthy['spool_bytes']} bytes, spool_full {healthy['spool_full']}")
        harness.stop_process(self.r.proc)
        poll(lambda: sl.metrics().get("sluice_meter_redis_up") == 0, 5, "flusher sees redis down")
        Load(sl.port, self.tally, threads=4, duration=1.5).run(self)
        down = self.meter_metrics(sl)
        restart_redis(self.r)
        self.drained(sl)
        back = self.meter_metrics(sl)
        self.stop_sluice(sl)
        note(f"spool bound 8192, redis back and every batch acked: spool {back['spool_bytes']} bytes, "
             f"spool_full {back['spool_full']}")
        note(f"spool bound 8192, redis down: {down['queue_batches']} batches wait, spool {down['spool_bytes']} "
             f"bytes, spool_full {down['spool_full']}")
        self.check_exact("small spool bound")
        self.assertEqual(down["spool_full"], 1, down)
        self.assertLessEqual(down["spool_bytes"], 8192, down)
        self.assertLessEqual(healthy["spool_bytes"], 8192, healthy)
        self.assertEqual(healthy["spool_full"], 0, f"spool full with every batch acked: {healthy}")
        self.assertEqual(back["spool_full"], 0, f"spool still full with every batch acked: {back}")


def rss_kb(pid):
    """VmRSS of a process, in kB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class RejectedFlood:
    """`threads` connections sending refused requests, each one different:
    an unknown AccessKeyId in a made-up region (its own metering key if
    nothing bounded them) or a request without Action, until `duration`
    seconds pass. Tallies the outcomes the answers tell of."""

    def __init__(self, port, threads=4, duration=3.0):
        self.port, self.nthreads, self.duration = port, threads, duration
        self.outcomes = collections.Counter()
        self.statuses = collections.Counter()
        self.lock = threading.Lock()
        self.unanswered = 0

    def run(self, test):
        threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.nthreads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.duration + 30)
        test.assertFalse(any(t.is_alive() for t in threads), "flood threads did not end")
        return self

    def _run(self, idx):
        deadline = time.monotonic() + self.duration
        conn, i = None, 0
        out, st, lost = collections.Counter(), collections.Counter(), 0
        try:
            while time.monotonic() < deadline:
                if conn is None:
                    conn = harness.HttpConn(self.port, timeout=10)
                i += 1
                n = idx * 10_000_000 + i
                if i % 4:
                    req = _req(ak=f"AKFLOOD{n}", host=f"green-cip.zz-{n}.aliyuncs.com")
                else:
                    req = _req(ak=f"AKFLOOD{n}", action=None, host=f"green-cip.zz-{n}.aliyuncs.com")
                try:
                    conn.send(req)
                    resp = conn.read_response()
                except (harness.IncompleteResponse, OSError):
                    lost += 1
                    conn.close()
                    conn = None
                    continue
                out[outcome_of(resp)] += 1
                st[resp.status] += 1
                if (resp.header("Connection") or "").lower() == "close":
                    conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()
            with self.lock:
                self.outcomes.update(out)
                self.statuses.update(st)
                self.unanswered += lost


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts, reads and never answers (a
    Redis that hangs, or something that is no Redis). .addr for --redis;
    .connections counts the connections it accepted."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((harness.HOST, 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.addr = f"{harness.HOST}:{self.port}"
        self.connections = 0
        self.bytes = 0
        self.conns = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        while not self._stop.is_set():
            for key, _ in sel.select(0.1):
                if key.fileobj is self.sock:
                    try:
                        c, _ = self.sock.accept()
                    except OSError:
                        continue
                    c.setblocking(False)
                    self.connections += 1
                    self.conns.append(c)
                    sel.register(c, selectors.EVENT_READ)
                else:
                    try:
                        data = key.fileobj.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(key.fileobj)
                        key.fileobj.close()
                    self.bytes += len(data)
        sel.close()

    def close(self):
        self._stop.set()
        self.thread.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()


@harness.release_only("single-threaded paths at scale (bounds, timeouts), run under ASan; the threads' hand-offs are the other classes'",
                      sanitizers=("thread",))
class Bounds(MeteringCase):
    """Issue 9 item 7 and 11: metering stays bounded while Redis is away and
    finds a Redis that stops answering."""

    def test_rejected_flood_with_redis_down_stays_bounded(self):
        """Redis down, small bounds (--meter-keys 16, --meter-queue-batches
        4, a flush every 20 ms) and 4 s of refused requests that each name
        another made-up region and AccessKeyId: no abort, RSS and the spool
        stay small, the queue at its bound; once Redis is back every count
        arrives exactly once, under a bounded number of keys."""
        sl = self.start("--flush-ms", "20", "--meter-keys", "16", "--meter-queue-batches", "4",
                        "--lookup-timeout-ms", "50", "--negative-ttl-ms", "0")
        harness.stop_process(self.r.proc)
        poll(lambda: sl.metrics().get("sluice_meter_redis_up") == 0, 5, "flusher sees redis down")
        rss0 = rss_kb(sl.proc.pid)
        flood = RejectedFlood(sl.port, threads=4, duration=4.0).run(self)
        self.assertIsNone(sl.proc.poll(), "sluice died under the flood:\n" + sl.stderr()[-2000:])
        rss1 = rss_kb(sl.proc.pid)
        during = self.meter_metrics(sl)
        spool = os.stat(os.path.join(sl.tmpdir, "spool", "meter.spool")).st_size
        n = sum(flood.outcomes.values())
        note(f"refused flood, redis down, small bounds: {n} requests {dict(flood.statuses)} in 4 s; RSS "
             f"{rss0} -> {rss1} kB; spool {spool} bytes; queue {during['queue_batches']} batches / "
             f"{during['unflushed_requests']} requests")
        self.assertGreater(n, 1000)
        self.assertEqual(flood.outcomes["ok"], 0)
        self.assertLess(rss1 - rss0, 64 * 1024, "RSS grew by more than 64 MB")
        self.assertLess(spool, 1 << 20, "spool over 1 MB")
        self.assertLessEqual(during["queue_batches"], 4)
        self.assertNotIn("overflow", sl.stderr())
        restart_redis(self.r)
        self.drained(sl, timeout=20)
        self.stop_sluice(sl)
        meter = self.check_totals("refused flood", flood.outcomes)
        # SL_METER_REFUSED_PER_DAY (256) per worker under their own shape, then the fixed shape
        self.assertLessEqual(len(meter.calls), 2 * 256 + 8, "refused calls made a key each")

    def test_admitted_calls_refused_at_the_bound(self):
        """Redis down and small bounds (--meter-keys 16, --meter-queue-batches
        2, --flush-keys 1000, its least): 3,000 accounts, each called once, make more distinct billable
        keys than the queue, the flusher's accumulator and the rings hold.
        sluice does not abort: once metering is backed up admitted calls get
        503 (never forwarded, so never billable); after Redis returns every
        backend 200 is in usage exactly once."""
        n = 3000
        self.seed_accounts("AKM", "m", n)
        sl = self.start("--flush-ms", "20", "--meter-keys", "16", "--meter-queue-batches", "2", "--flush-keys", "1000")
        outcomes = collections.Counter()
        backed_up = collections.Counter()

        def call(lo, hi):
            with harness.HttpConn(sl.port) as c:
                for i in range(lo, hi):
                    c.send(_req(ak=f"AKM{i}"))
                    resp = c.read_response()
                    o = outcome_of(resp)
                    with lock:
                        outcomes[o] += 1
                        if o == "unavailable" and b"backed up" in resp.body:
                            backed_up[0] += 1

        lock = threading.Lock()

        def each_account():
            ts = [threading.Thread(target=call, args=(k * n // 4, (k + 1) * n // 4)) for k in range(4)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(60)

        each_account()  # every account known while Redis is up
        self.drained(sl)
        harness.stop_process(self.r.proc)
        poll(lambda: sl.metrics().get("sluice_meter_redis_up") == 0, 5, "flusher sees redis down")
        each_account()
        each_account()
        self.assertIsNone(sl.proc.poll(), "sluice died:\n" + sl.stderr()[-2000:])
        during = self.meter_metrics(sl)
        restart_redis(self.r)
        self.drained(sl, timeout=20)
        self.stop_sluice(sl)
        note(f"admitted calls at small bounds, redis down: {dict(outcomes)}, {backed_up[0]} answered 503 "
             f"'metering is backed up'; queue {during['queue_batches']} batches")
        self.assertEqual(sum(outcomes.values()), 3 * n)
        self.assertGreater(backed_up[0], 0, "metering never backed up")
        self.assertGreater(outcomes["ok"], n)
        self.assertLessEqual(during["queue_batches"], 2)
        self.check_totals("admitted calls at small bounds", outcomes)

    def test_full_interval_goes_to_redis_early(self):
        """--flush-keys bounds the keys one Redis interval gathers: 1,500
        accounts called once with --flush-keys 1000 and a 60 s interval: the
        first 1,000 keys go to Redis at once (the accumulator is full), the
        rest wait for the interval, and SIGTERM sends them."""
        n = 1500
        self.seed_accounts("AKF", "f", n)
        sl = self.start("--flush-ms", "60000", "--spool-ms", "200", "--flush-keys", "1000", "--meter-keys", "100")
        outcomes = collections.Counter()
        with harness.HttpConn(sl.port) as c:
            for i in range(n):
                c.send(_req(ak=f"AKF{i}"))
                outcomes[outcome_of(c.read_response())] += 1
        self.assertEqual(sum(outcomes.values()), n)

        def in_redis():
            return sum(Meter(self.r.port).calls_by_outcome().values())
        poll(lambda: in_redis() >= 1000, 5, "a full accumulator's keys in Redis")
        time.sleep(1)
        early = in_redis()
        self.assertLess(early, n, "every key went before the interval")
        self.stop_sluice(sl)
        note(f"--flush-keys 1000, 60 s interval: {early} of {n} calls (one key each) in Redis early, "
             f"the rest at SIGTERM")
        self.check_totals("full interval early", outcomes)

    def test_silent_redis_is_down(self):
        """--redis names a server that accepts and never answers: the
        flusher says so within the reply bound, never reports it up, tries
        again with backoff, and logs the state once (not per attempt)."""
        fake = SilentServer()
        self.addCleanup(fake.close)
        t0 = time.monotonic()
        sl = start_sluice(self, [self.up], "--redis-timeout-ms", "300", "--flush-ms", "100",
                          redis=fake, admission="off", workers=2)
        self.addCleanup(shutil.rmtree, sl.tmpdir, True)
        _, took = poll(lambda: "metering: redis down: no" in sl.stderr(), 10, "silent redis found")
        detect = time.monotonic() - t0
        for _ in range(20):  # counts wait in the queue meanwhile
            with harness.HttpConn(sl.port) as c:
                c.send(build("ok"))
                self.assertEqual(c.read_response().status, 200)
        ups = set()
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            ups.add(sl.metrics().get("sluice_meter_redis_up"))
            time.sleep(0.1)
        lines = [ln for ln in sl.stderr().splitlines() if "metering: redis" in ln]
        mm = self.meter_metrics(sl)
        note(f"silent redis: found after {detect:.2f} s (--redis-timeout-ms 300); {fake.connections} connections "
             f"in {time.monotonic() - t0:.1f} s; {len(lines)} log line(s): {lines[:2]}")
        self.assertEqual(ups, {0}, "the flusher reported a silent server up")
        self.assertLess(detect, 5.0)
        self.assertGreaterEqual(fake.connections, 2, "no reconnect")
        self.assertLessEqual(len(lines), 2, lines)
        self.assertGreaterEqual(mm["queue_batches"], 1, mm)
        status = sl.stop(timeout=30)
        self.assertEqual(status, 0, sl.stderr()[-2000:])

    def test_reply_timeout_then_exact(self):
        """A Redis that stops answering for 2 s (CLIENT PAUSE) under load
        with --redis-timeout-ms 300: the flusher takes it as down within
        the bound, reconnects, sends the batch again with the same id, says
        so in three lines at most, and the totals are exact."""
        sl = self.start("--flush-ms", "100", "--redis-timeout-ms", "300")
        load = Load(sl.port, self.tally, threads=4, duration=4.0).start(self)
        time.sleep(1.0)
        self.r.cli("CLIENT", "PAUSE", "2000", "ALL")
        t0 = time.monotonic()
        _, took = poll(lambda: sl.metrics().get("sluice_meter_redis_up") == 0, 2.0, "paused redis found", 0.01)
        self.assertTrue(load.join(), "load threads did not end")
        self.drained(sl)
        mm = self.meter_metrics(sl)
        self.stop_sluice(sl)
        lines = [ln for ln in sl.stderr().splitlines() if "metering: redis" in ln]
        note(f"redis paused 2 s, --redis-timeout-ms 300: down after {took:.2f} s; retried "
             f"{mm['batches_retried_total']}, deduplicated {mm['batches_deduplicated_total']}, applied "
             f"{mm['batches_applied_total']}; log {lines}")
        self.assertLessEqual(len(lines), 3, lines)
        self.assertTrue(any("up again" in ln for ln in lines), lines)
        self.assertEqual(mm["batches_applied_total"] + mm["batches_deduplicated_total"], mm["batches_total"])
        self.check_exact("reply timeout")


class Days(MeteringCase):
    STUB_ARGS = ()

    def test_midnight_arrival_day(self):
        """Now (shifted by --time-offset-s) is 4 s before a UTC midnight.
        Requests that arrive before it (also one whose head is completed and
        one whose answer comes after midnight) count on the old day; those
        that arrive after it (also on a connection kept from before) on the
        new one."""
        now = time.time()
        midnight = (int(now) // 86400 + 1) * 86400 + 86400 * 10  # a midnight ten days ahead
        offset = midnight - int(now) - 4
        sl = self.start("--time-offset-s", str(offset), "--flush-ms", "200")
        shifted = lambda: time.time() + offset  # noqa: E731
        old, new = utc_day(midnight - 1), utc_day(midnight)
        self.assertLess(shifted(), midnight - 1.5, "sluice took too long to start")
        a = harness.HttpConn(sl.port)
        self.addCleanup(a.close)
        for kind in ("ok", "ok", "ok", "err", "voice"):
            a.send(build(kind))
            self.tally.add(kind, a.read_response())
        # a head cut in two around midnight, and a slow answer across it
        b = harness.HttpConn(sl.port)
        self.addCleanup(b.close)
        c = harness.HttpConn(sl.port)
        self.addCleanup(c.close)
        half = build("ok")
        b.send(half[:20])
        c.send(build("ok", [("x-modstub-delay-ms", "1500")]))
        t_before = shifted()
        self.assertLess(t_before, midnight - 0.3, "the before-midnight part came too late")
        time.sleep(max(0.0, midnight + 0.3 - shifted()))
        b.send(half[20:])
        self.tally.add("ok", b.read_response())
        self.tally.add("ok", c.read_response())
        for kind in ("ok", "ok", "voice"):  # connection `a`, open since before midnight
            a.send(build(kind))
            self.tally.add(kind, a.read_response())
        for kind in ("bj", "bj", "unauth", "bad"):
            one(sl.port, kind, self.tally)
        self.drained(sl)
        self.stop_sluice(sl)
        meter = self.check_exact("midnight")
        note(f"midnight: before (shifted {t_before - midnight:+.2f} s) -> {old}, after -> {new}; "
             f"usage {sorted(meter.usage.items())}")
        self.assertEqual(self.tally.statuses[200], 11)
        self.assertEqual(meter.usage, {(old, "u1", "text:chat_detection:cn-shanghai"): 5,
                                       (new, "u1", "text:chat_detection:cn-shanghai"): 2,
                                       (new, "u1", "text:chat_detection:cn-beijing"): 2,
                                       (old, "u2", "voice:audio_media_detection:cn-shanghai"): 1,
                                       (new, "u2", "voice:audio_media_detection:cn-shanghai"): 1})
        self.assertEqual(meter.calls[(old, "u1", "text:cn-shanghai:upstream_error")], 1)
        self.assertEqual(meter.calls[(new, "-", "text:cn-shanghai:unauthenticated")], 1)
        self.assertEqual(meter.calls[(new, "-", "-:-:bad_request")], 1)
        self.assertEqual(meter.sets, {old: {"u1", "u2"}, new: {"u1", "u2"}})

    def test_billing_time_zone(self):
        """--billing-tz-offset-min moves the day boundary: 20:00 UTC is the
        next day at UTC+8, 02:00 UTC the day before at UTC-5."""
        now = time.time()
        midnight = (int(now) // 86400 + 1) * 86400 + 86400 * 20
        cases = [(480, midnight - 4 * 3600, utc_day(midnight)),           # 20:00 UTC, 04:00 at UTC+8
                 (-300, midnight + 2 * 3600, utc_day(midnight - 1)),     # 02:00 UTC, 21:00 the day before
                 (0, midnight - 4 * 3600, utc_day(midnight - 1))]
        for tz, at, want in cases:
            sl = self.start("--billing-tz-offset-min", str(tz), "--time-offset-s", str(at - int(time.time())))
            one(sl.port, "ok", self.tally)
            self.stop_sluice(sl)
            meter = Meter(self.r.port)
            self.assertEqual(meter.usage.get((want, "u1", "text:chat_detection:cn-shanghai")), 1, (tz, want, meter.usage))
            self.r.cli("FLUSHDB")
            for args in (("SET", P + "ak:AK1", "u1"), ("SET", P + "ak:AK2", "u2")):
                self.r.cli(*args)
        note("billing tz: +480 at 20:00 UTC -> next day, -300 at 02:00 UTC -> day before, 0 -> UTC day")


if __name__ == "__main__":
    unittest.main(verbosity=2)
