"""Integration tests of global limits (SPEC section 9, issue 11): several
sluice instances that share one Redis and prefix keep ONE QPS limit per
(UID, feature, region) between them.

One redis-server, one modstub and three sluice instances (one worker each,
each with its own spool directory) on loopback; the account AKG -> ug has
the feature `text` at R = 100 QPS. Load generators (a few keep-alive
connections per instance, each sending TextModeration calls back to back)
overload the key several times over; a call is counted as admitted when it
got HTTP 200, at the time it was sent. The cases:

- the load split over the three instances: the fleet admits one R;
- all of it moved to one instance: that instance alone reaches R;
- one instance killed with SIGKILL: the two left reach R between them;
- Redis stopped: every instance falls back to a bounded share (<= R), says
  so in its log and /metrics; Redis back on the same port: one limit again;
- --global-limits off: each instance keeps its own R;
- one instance with global limits on (the default): SPEC 4's accuracy.

Every process is stopped by PID through addCleanup; every load is bounded
in time. Measured numbers are printed (stderr) and summed up at the end."""

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import unittest

import harness
from proxyenv import start_modstub, start_sluice

P = "sluice:"
R = 100                       # QPS of (ug, text, cn-shanghai)
AK, UID = "AKG", "ug"
FEATURE, REGION = "text", "cn-shanghai"
CONNS = 3                     # keep-alive connections per loaded instance
# Calls per second per connection at most: 3 connections offer ~3.6 R to
# their instance, so the key stays overloaded (>= 2 R) also when all of the
# load is on one instance, while the whole test (9 connections, three
# sluices, Redis, modstub) leaves CPU to spare on a 2-core machine: without
# the cap the clients send ~13,000 calls/s and the timing of the syncs
# would then measure CPU starvation.
RATE_PER_CONN = 120
SYNC_MS = "100"
# SPEC 9: over 10 s the fleet admits at most (R*T + R) * 1.05 and, under
# steady overload, at least 0.93*R*T. The windows below leave out the first
# second of load (and its burst), so 1.15*R*T is the upper bound used.
LOW, HIGH = 0.93, 1.15
REQ = harness.HttpConn.build("GET", f"/?Action=TextModeration&AccessKeyId={AK}")
NUMBERS = []                  # lines printed again by tearDownModule


def note(line):
    NUMBERS.append(line)
    print(f"\n  {line}", file=sys.stderr, flush=True)


def tearDownModule():
    if NUMBERS:
        print("\nglobal limits, measured:", file=sys.stderr)
        for line in NUMBERS:
            print(f"  {line}", file=sys.stderr)


def poll(fn, timeout, what, interval=0.02):
    """Calls fn() until it returns a true value; returns (value, seconds).
    Fails after `timeout` seconds."""
    t0 = time.monotonic()
    while True:
        v = fn()
        if v:
            return v, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not seen within {timeout} s (last: {v!r})")
        time.sleep(interval)


def sleep_until(t):
    d = t - time.monotonic()
    if d > 0:
        time.sleep(d)


def restart_redis_same_port(r):
    """A new redis-server with the argv of r (same port, same directory: it
    loads the dump.rdb of a SAVE); it replaces r.proc, which r.stop() ends."""
    r.proc = harness.start_process(list(r.proc.args), r.port, stdout=subprocess.DEVNULL)


class Loader:
    """CONNS keep-alive connections to one sluice; while `on` is set each
    sends the hot key's call, waits for the answer, and sends the next (at
    most RATE_PER_CONN a second).
    results: (monotonic time sent, time answered, status); errors: (time,
    repr) of connection failures (expected only from a killed instance)."""

    def __init__(self, name, port, conns=CONNS):
        self.name, self.port = name, port
        self.on = threading.Event()
        self.done = threading.Event()
        self.results, self.errors = [], []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(conns)]
        for t in self.threads:
            t.start()

    def _run(self):
        conn = None
        while not self.done.is_set():
            if not self.on.wait(0.05):
                continue
            try:
                if conn is None:
                    conn = harness.HttpConn(self.port, timeout=5.0)
                t = time.monotonic()
                conn.send(REQ)
                st = conn.read_response().status
                t_recv = time.monotonic()
                self.results.append((t, t_recv, st))
                pause = t + 1.0 / RATE_PER_CONN - t_recv
                if pause > 0:
                    time.sleep(pause)
            except (OSError, harness.IncompleteResponse, ValueError) as e:
                self.errors.append((time.monotonic(), repr(e)))
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)
        if conn is not None:
            conn.close()

    def stop(self):
        self.done.set()
        for t in self.threads:
            t.join(10)

    def count(self, t0, t1):
        """(admitted, sent) among the calls sent in [t0, t1)."""
        sent = [s for t, _, s in list(self.results) if t0 <= t < t1]
        return sum(1 for s in sent if s == 200), len(sent)


class GlobalCase(unittest.TestCase):
    """Redis seeded with AKG -> ug and text at R, one modstub; start() adds
    sluice instances, each with a Loader."""

    def setUp(self):
        self.r = harness.start_redis()
        self.addCleanup(self.r.stop)
        self.seed()
        _, self.up = start_modstub(self)

    def seed(self):
        self.r.cli("SET", P + "ak:" + AK, UID)
        self.r.cli("HSET", P + "feature:" + FEATURE, "default_qps", str(R))

    def start(self, n, *args):
        """n instances sharing the Redis; returns ([Sluice], [Loader])."""
        inst = []
        for _ in range(n):
            holder = []
            self.addCleanup(self.check_exit, holder)
            sl = start_sluice(self, [self.up], *args, workers=1, redis=self.r)
            holder.append(sl)
            inst.append(sl)
        for sl in inst:
            # the first full resync (feature overrides) is done
            poll(lambda: sl.metrics().get("sluice_directory_resyncs_total", 0) >= 1, 10, "first resync")
        loaders = [Loader(f"i{i}", sl.port) for i, sl in enumerate(inst)]
        for ld in loaders:
            self.addCleanup(ld.stop)  # runs before the instances' stops
        return inst, loaders

    def check_exit(self, holder):
        """At the end (loaders stopped): exit status 0 and no sanitizer
        report, except for an instance this test killed."""
        sl = holder[0]
        if getattr(sl, "killed", False):
            return
        rc = sl.stop()
        err = sl.stderr()
        shutil.rmtree(sl.tmpdir, ignore_errors=True)
        self.assertFalse(re.search(r"Sanitizer|runtime error:|LeakSanitizer", err), err[-4000:])
        self.assertEqual(rc, 0, err[-2000:])

    @staticmethod
    def metric(sl, name):
        return sl.metrics().get(name)

    @staticmethod
    def explain(sl):
        r = harness.http_request(sl.admin, "GET", f"/explain?uid={UID}&feature={FEATURE}&region={REGION}")
        return json.loads(r.body.decode())

    def note_fleet(self, inst, when):
        """Notes each instance's view of the key and its fleet counters
        (what a failed window needs to be read)."""
        for i, sl in enumerate(inst):
            m = sl.metrics()
            g = self.explain(sl).get("global") or {}
            keep = ("mode", "registered", "instances", "share_ppm", "local_demand_qps", "fleet_demand_qps")
            counters = " ".join(f"{k[len('sluice_global_'):]}={m.get(k)}" for k in sorted(m)
                                if k.startswith("sluice_global_"))
            note(f"{when}: i{i} {json.dumps({k: g.get(k) for k in keep}, sort_keys=True)} {counters}")

    def wait_all(self, inst, name, value, timeout, what):
        """Polls /metrics of every instance until `name` == value; returns
        the seconds it took."""
        t0 = time.monotonic()
        for sl in inst:
            poll(lambda: self.metric(sl, name) == value, max(0.1, timeout - (time.monotonic() - t0)),
                 f"{what} ({name} == {value} on :{sl.admin})")
        return time.monotonic() - t0

    def check_statuses(self, loaders, killed=()):
        for ld in loaders:
            self.assertEqual({s for _, _, s in ld.results} - {200, 429}, set(), ld.name)
            if ld not in killed:
                self.assertEqual(ld.errors, [], ld.name)

    def window(self, what, loaders, t0, t1, low=LOW, high=HIGH, only=None):
        """Checks R*T bounds on the fleet's admitted calls sent in [t0, t1);
        `only`: the loaders whose sum must reach low*R*T (default: all)."""
        T = t1 - t0
        per = [ld.count(t0, t1) for ld in loaders]
        adm = sum(a for a, _ in per)
        sent = sum(s for _, s in per)
        detail = " ".join(f"{ld.name}={a}/{s}" for ld, (a, s) in zip(loaders, per))
        note(f"{what}: T={T:.2f}s admitted {adm} of {sent} sent ({adm / T:.1f}/s, R={R}); "
             f"bounds [{low * R * T:.0f}, {high * R * T:.0f}]; per instance admitted/sent {detail}")
        with self.subTest(what):
            self.assertGreaterEqual(sent, 2 * R * T, f"{what}: the key must be overloaded")
            self.assertLessEqual(adm, high * R * T, what)
            reach = adm if only is None else sum(ld.count(t0, t1)[0] for ld in only)
            self.assertGreaterEqual(reach, low * R * T, what)
        return adm


class Fleet(GlobalCase):

    def test_split_moved_and_killed(self):
        inst, ld = self.start(3, "--global-sync-ms", SYNC_MS)
        with self.subTest("fleet formed"):
            d = self.wait_all(inst, "sluice_global_instances", 3, 10, "three instances see each other")
            note(f"fleet formed: every instance saw 3 instances {d * 1000:.0f} ms after the last start")

        # (a) the load split over the three. The window starts 1.5 s after
        # the load: until then each instance spends the burst its bucket
        # held while idle, and the shares move from the joining split to the
        # split of demand only after a few syncs (100 ms each) have carried
        # every instance's demand; the SPEC's steady bounds are about what
        # follows.
        t0 = time.monotonic()
        for x in ld:
            x.on.set()
        win_a = (t0 + 1.5, t0 + 11.5)
        sleep_until(win_a[1])
        with self.subTest("metrics after (a)"):
            for sl in inst:
                m = sl.metrics()
                self.assertEqual(m.get("sluice_global_limits_mode"), 1, sl.admin)
                self.assertEqual(m.get("sluice_global_instances"), 3, sl.admin)
                self.assertGreaterEqual(m.get("sluice_global_coordinated_keys", 0), 1, sl.admin)
                # a steady coordinated key is synced at least every 4 intervals (400 ms)
                # for over 11 s; the last sync answered lately
                self.assertGreaterEqual(m.get("sluice_global_syncs_total", 0), 25, sl.admin)
                self.assertTrue(0 <= m.get("sluice_global_sync_lag_seconds", -1) < 1.0, sl.admin)
                self.assertEqual(m.get("sluice_global_keys_full_total"), 0, sl.admin)
            note("metrics after (a): syncs_total " +
                 " ".join(f"{sl.metrics().get('sluice_global_syncs_total')}" for sl in inst))
        with self.subTest("explain after (a)"):
            gs = [self.explain(sl).get("global") for sl in inst]
            note("explain global after (a): " + " | ".join(json.dumps(g, sort_keys=True) for g in gs))
            for g in gs:
                self.assertIsInstance(g, dict)
                self.assertEqual(g["mode"], "shared")
                self.assertEqual(g["instances"], 3)
                self.assertIs(g["coordinated"], True)
            self.assertEqual(len({g["instance"] for g in gs}), 3, "three distinct instance ids")
            self.assertLessEqual(sum(g["share_qps"] for g in gs), HIGH * R)

        # (b) all of the load moved to instance 0; its share follows within 1 s
        tm = time.monotonic()
        ld[1].on.clear()
        ld[2].on.clear()
        win_b = (tm + 1.0, tm + 11.0)
        sleep_until(win_b[1])
        with self.subTest("explain after (b)"):
            g = self.explain(inst[0]).get("global")
            note(f"explain global of the loaded instance after (b): {json.dumps(g, sort_keys=True)}")
            self.assertIsInstance(g, dict)
            self.assertGreaterEqual(g["share_qps"], LOW * R)

        # (c) all three loaded again, then instance 2 killed (SIGKILL): the
        # share it held comes back to the other two within 3 s.
        ld[1].on.set()
        ld[2].on.set()
        time.sleep(1.5)
        inst[2].killed = True   # check_exit: no exit status to check
        inst[2]._told = True    # Sluice.stop: no dump of its stderr for the -9
        inst[2].proc.kill()
        tk = time.monotonic()
        inst[2].proc.wait(5)
        ld[2].on.clear()
        win_c = (tk + 3.0, tk + 6.0)
        sleep_until(win_c[1] + 0.3)
        with self.subTest("instances after (c)"):
            for sl in inst[:2]:
                self.assertEqual(self.metric(sl, "sluice_global_instances"), 2, sl.admin)
        for x in ld:
            x.on.clear()
        time.sleep(0.2)  # the answers to calls in flight

        self.check_statuses(ld, killed=(ld[2],))
        self.window("(a) load split over 3 instances", ld, *win_a)
        self.window("(b) load moved to 1 instance", ld, *win_b, only=[ld[0]])
        self.window("(c) 3 s..6 s after SIGKILL of 1 of 3", ld[:2], *win_c)
        # from the kill to 3 s after (for the notes)
        per = [x.count(tk, tk + 3.0)[0] for x in ld[:2]]
        note(f"(c) 0 s..3 s after the kill: the two left admitted {sum(per)} ({sum(per) / 3:.1f}/s)")


class Follow(GlobalCase):
    """A steady key is synced only when something changes (docs/limits.md,
    "Redis cost"), so when a third instance's load arrives, the two that
    hold the key (their demand unchanged) must learn it from its sync (a
    nudge) and give back: its share follows within 1 s."""

    def test_share_follows_new_load_within_1s(self):
        inst, ld = self.start(3, "--global-sync-ms", SYNC_MS)
        self.wait_all(inst, "sluice_global_instances", 3, 10, "three instances see each other")
        ld[1].on.set()
        ld[2].on.set()
        poll(lambda: self.explain(inst[0])["global"]["registered"] == 3, 5, "instance 0 registered (announced)")
        time.sleep(3.0)  # steady: instances 1 and 2 share R, instance 0 holds a floor
        before = [self.explain(sl)["global"]["share_ppm"] for sl in inst]
        ld[0].on.set()
        t0 = time.monotonic()
        g, secs = poll(lambda: (lambda g: g if g["share_ppm"] >= 0.9 * 1e6 / 3 else None)(
            self.explain(inst[0])["global"]), 3, "instance 0's share")
        win = (t0 + 1.0, t0 + 4.0)
        sleep_until(win[1] + 0.2)
        for x in ld:
            x.on.clear()
        time.sleep(0.2)
        after = [self.explain(sl)["global"]["share_ppm"] for sl in inst]
        note(f"follow: shares (ppm) before {before}, after {after}; instance 0 reached "
             f"{g['share_ppm']} ppm {secs * 1000:.0f} ms after its load started")
        self.check_statuses(ld)
        self.assertLessEqual(secs, 1.0, "the share follows within 1 s")
        self.window("follow: 1 s..4 s after a third instance's load started", ld, *win)


@harness.release_only("the sync script's nudge (Redis-side logic); Follow and Fleet run the fleet thread's C paths "
                      "under ASan and TSan")
class Reclaim(GlobalCase):
    """A key nobody loads is split equally between the instances registered
    on it (docs/limits.md), until they release it after 5 s idle. Load that
    arrives meanwhile on one instance must get its share back from those
    idle holders within 1 s: its sync, short of its target, nudges them
    although they have no demand. (A Redis restart leaves the same state
    when the idle instances re-register before the loaded one.)"""

    def test_idle_holders_give_back_within_1s(self):
        inst, ld = self.start(2, "--global-sync-ms", SYNC_MS)
        self.wait_all(inst, "sluice_global_instances", 2, 10, "two instances see each other")
        for x in ld:
            x.on.set()
        poll(lambda: all(self.explain(sl)["global"]["registered"] == 2 for sl in inst), 5, "both registered")
        time.sleep(1.0)
        for x in ld:
            x.on.clear()
        # The load gone: the last instance to sync its falling demand holds
        # what nobody wants (half of R); the other may keep a floor.
        idle, secs = poll(lambda: (lambda gs: gs if all(g["local_demand_qps"] == 0 and g["coordinated"]
                                                         for g in gs) and max(g["share_ppm"] for g in gs) >= 400000
                                   else None)([self.explain(sl)["global"] for sl in inst]),
                          3, "the key idle on both, still coordinated, one holding half of it")
        i = min((0, 1), key=lambda j: idle[j]["share_ppm"])  # load the one that holds less
        note(f"reclaim: idle on both {secs * 1000:.0f} ms after the load stopped; shares (ppm) "
             f"{[g['share_ppm'] for g in idle]}; instance {i} loaded")
        ld[i].on.set()
        t0 = time.monotonic()
        try:
            g, secs = poll(lambda: (lambda g: g if g["share_ppm"] >= 900000 else None)(
                self.explain(inst[i])["global"]), 3, f"instance {i}'s share back from the idle holder")
        finally:
            ld[i].on.clear()
        note(f"reclaim: instance {i} reached {g['share_ppm']} ppm {secs * 1000:.0f} ms after its load started")
        self.assertLessEqual(secs, 1.0, "the share follows within 1 s")
        time.sleep(0.2)
        self.check_statuses(ld)


class Bell(GlobalCase):
    """With one server every instance subscribes to `P share:bell`, which a
    sync rings when it nudges, announces, or sees a session join or expire
    (docs/limits.md): an instance alone with a busy key heartbeats every
    500 ms instead of every interval (it used to poll for newcomers), and
    still sees a newcomer at once, from the bell."""

    def test_alone_quiet_and_newcomer_heard(self):
        inst, ld = self.start(1)
        a = inst[0]
        ld[0].on.set()
        poll(lambda: self.metric(a, "sluice_global_coordinated_keys") == 1, 5, "the key busy here")
        poll(lambda: self.metric(a, "sluice_global_bell_up") == 1, 5, "subscribed to the bell")
        s0, t0 = self.metric(a, "sluice_global_syncs_total"), time.monotonic()
        time.sleep(3.0)
        calls = self.metric(a, "sluice_global_syncs_total") - s0
        secs = time.monotonic() - t0
        # a heartbeat every 500 ms: about 6 (every interval, 100 ms: about 30)
        self.assertLessEqual(calls, 2 * secs + 3, f"alone with a busy key: {calls} calls in {secs:.1f} s")
        bells0 = self.metric(a, "sluice_global_bells_total")
        more, _ = self.start(1)  # returns after its first sync: its heartbeat rang
        t1 = time.monotonic()
        _, seen = poll(lambda: self.metric(a, "sluice_global_instances") == 2, 3, "the newcomer seen")
        note(f"bell: alone with a busy key {calls:.0f} calls in {secs:.1f} s; the newcomer seen "
             f"{seen * 1000:.0f} ms after its start returned; bells heard "
             f"{self.metric(a, 'sluice_global_bells_total') - bells0:.0f}")
        self.assertGreaterEqual(self.metric(a, "sluice_global_bells_total") - bells0, 1)
        self.assertLessEqual(seen, 1.0, "a newcomer is seen within 1 s (SPEC 9)")
        ld[0].on.clear()


class Outage(GlobalCase):

    def test_redis_outage_and_return(self):
        inst, ld = self.start(3, "--global-sync-ms", SYNC_MS)
        with self.subTest("fleet formed"):
            self.wait_all(inst, "sluice_global_instances", 3, 10, "three instances see each other")
        t0 = time.monotonic()
        for x in ld:
            x.on.set()
        sleep_until(t0 + 2.0)
        # the restarted server loads this snapshot: the account and the
        # override are back at once (the global-limit keys in it have expired
        # by then); the keys are also written again after the restart.
        self.r.cli("SAVE")
        harness.stop_process(self.r.proc)
        ts = time.monotonic()
        with self.subTest("fallback reported"):
            d = self.wait_all(inst, "sluice_global_limits_mode", 2, 3.0, "fallback after Redis stopped")
            note(f"(d) fallback (mode 2) on every instance {d * 1000:.0f} ms after Redis stopped")
            for sl in inst:
                self.assertGreaterEqual(self.metric(sl, "sluice_global_fallbacks_total") or 0, 1, sl.admin)
                err = sl.stderr()
                self.assertTrue(any("global limits:" in line and "unreachable" in line
                                    for line in err.splitlines()), err[-2000:])
            g = self.explain(inst[0]).get("global")
            note(f"(d) explain global during the outage: {json.dumps(g, sort_keys=True)}")
            self.assertIsInstance(g, dict)
            self.assertEqual(g["mode"], "fallback")
        sleep_until(ts + 4.0)

        # Redis back on the same port; from now on only instance 0 is loaded
        # (instances 1 and 2 hold no demand, so instance 0 can reach R only
        # with their shares: one limit again)
        ld[1].on.clear()
        ld[2].on.clear()
        restart_redis_same_port(self.r)
        tr = time.monotonic()
        self.seed()
        with self.subTest("shared again"):
            d = self.wait_all(inst, "sluice_global_limits_mode", 1, 2.0, "shared mode after Redis returned")
            note(f"(d) shared mode (1) on every instance {d * 1000:.0f} ms after Redis restarted")
            self.wait_all(inst, "sluice_global_instances", 3, 2.0 - d, "three instances after Redis returned")
        win_d1 = (tr + 2.0, tr + 5.0)
        sleep_until(win_d1[1])
        self.note_fleet(inst, "(d) end of the 1-instance window")
        # and all three loaded again: the fleet keeps one R between them
        for x in ld:
            x.on.set()
        t2 = time.monotonic()
        win_d2 = (t2 + 1.5, t2 + 4.5)
        sleep_until(win_d2[1] + 0.2)
        for x in ld:
            x.on.clear()
        time.sleep(0.2)

        self.check_statuses(ld)
        T = tr - ts
        per = [x.count(ts, tr) for x in ld]
        note(f"(d) outage T={T:.2f}s: admitted per instance {[a for a, _ in per]} "
             f"(each <= R*T+R = {R * T + R:.0f}), fleet {sum(a for a, _ in per)} "
             f"({sum(a for a, _ in per) / T:.1f}/s)")
        with self.subTest("bounded share during the outage"):
            for x, (a, s) in zip(ld, per):
                self.assertGreaterEqual(s, 2 * R * T, f"{x.name}: the key must be overloaded")
                self.assertLessEqual(a, R * T + R, x.name)
        self.window("(d) 2 s..5 s after Redis returned, 1 instance loaded", ld, *win_d1, only=[ld[0]])
        self.window("(d) after Redis returned, 3 instances loaded", ld, *win_d2)


class Off(GlobalCase):
    """--global-limits off: each instance keeps its own limit (SPEC 9)."""

    def test_off_keeps_limits_per_instance(self):
        inst, ld = self.start(2, "--global-limits", "off")
        for sl in inst:
            self.assertEqual(self.metric(sl, "sluice_global_limits_mode"), 0, sl.admin)
        t0 = time.monotonic()
        for x in ld:
            x.on.set()
        win = (t0 + 1.0, t0 + 3.0)
        sleep_until(win[1] + 0.2)
        for x in ld:
            x.on.clear()
        time.sleep(0.2)
        self.check_statuses(ld)
        g = self.explain(inst[0]).get("global")
        note(f"off: explain global {json.dumps(g, sort_keys=True)}")
        self.assertIsInstance(g, dict)
        self.assertEqual(g["mode"], "off")
        # each instance alone reaches R: the fleet admits 2 R
        for x in ld:
            self.window(f"off: {x.name} of 2 instances", [x], *win)


class Single(GlobalCase):
    """One instance, global limits on (the default): SPEC 4's accuracy, as
    test_admission's Accuracy.test_hot_key_accuracy measures it."""

    def test_single_instance_accuracy(self):
        (sl,), (ld,) = self.start(1)
        with self.subTest("alone in the fleet"):
            poll(lambda: self.metric(sl, "sluice_global_limits_mode") == 1, 5, "shared mode")
            self.assertEqual(self.metric(sl, "sluice_global_instances"), 1)
        ld.on.set()
        time.sleep(3.0)
        ld.on.clear()
        time.sleep(0.2)
        self.check_statuses([ld])
        allr = list(ld.results)
        self.assertTrue(allr)
        admitted = sum(1 for _, _, s in allr if s == 200)
        t_outer = max(x[1] for x in allr) - min(x[0] for x in allr)  # every decision lies in this window
        t_inner = max(x[0] for x in allr) - min(x[1] for x in allr)  # the window of steady overload
        note(f"single instance: {len(allr)} calls, {admitted} admitted, R={R}, T={t_outer:.3f}s "
             f"(inner {t_inner:.3f}s): bound [{0.99 * R * t_inner:.1f}, {R * t_outer + R:.1f}]")
        self.assertGreater(len(allr), 2 * admitted, "the key must be overloaded")
        self.assertLessEqual(admitted, R * t_outer + R)
        self.assertGreaterEqual(admitted, 0.99 * R * t_inner)


class Leave(GlobalCase):
    """A clean stop (SIGTERM) gives the instance's share back at once, not
    after --global-ttl-ms: the survivor's view of the fleet and its share
    change before the ttl could have expired anything."""

    def test_sigterm_gives_share_back_at_once(self):
        inst, ld = self.start(2, "--global-ttl-ms", "10000")
        ld[0].on.set()
        ld[1].on.set()
        poll(lambda: self.explain(inst[0])["global"]["registered"] == 2, 5, "both registered on the key")
        ld[1].on.clear()
        ld[1].stop()
        t0 = time.monotonic()
        self.assertEqual(inst[1].stop(), 0)
        stopped = time.monotonic() - t0
        _, secs = poll(lambda: self.metric(inst[0], "sluice_global_instances") == 1, 3, "one instance left")
        g, secs2 = poll(lambda: (lambda g: g if g["registered"] == 1 and g["share_ppm"] > 900000 else None)(
            self.explain(inst[0])["global"]), 3, "the whole share to the survivor")
        note(f"leave: SIGTERM took {stopped:.2f} s; survivor alone after {secs * 1000:.0f} ms, "
             f"its share {g['share_ppm']} ppm after {secs2 * 1000:.0f} ms (ttl 10 s)")
        ld[0].on.clear()


class KeysBound(GlobalCase):
    """--global-keys at its bound: a busy key that finds the table full is
    not coordinated, is counted, and keeps R/N on each instance (never more
    than its part of the limit)."""

    def test_table_full_key_keeps_r_over_n(self):
        self.r.cli("SET", P + "ak:AKH", "uh")
        inst, ld = self.start(2, "--global-keys", "1")
        ld[0].on.set()  # ug's key takes the one slot of instance 0
        poll(lambda: self.explain(inst[0])["global"]["coordinated"], 5, "ug coordinated")
        ld[0].on.clear()
        req = harness.HttpConn.build("GET", "/?Action=TextModeration&AccessKeyId=AKH")
        got = []
        with harness.HttpConn(inst[0].port) as c:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 2.0:
                c.send(req)
                got.append(c.read_response().status)
                time.sleep(0.002)
            el = time.monotonic() - t0
        self.assertGreaterEqual(self.metric(inst[0], "sluice_global_keys_full_total"), 1)
        r = harness.http_request(inst[0].admin, "GET", "/explain?uid=uh&feature=text&region=cn-shanghai")
        g = json.loads(r.body.decode())["global"]
        self.assertFalse(g["coordinated"], g)
        self.assertEqual(g["share_ppm"], 500000, g)
        ok = got.count(200)
        note(f"keys bound: uncoordinated key on 1 of 2 instances: {ok} of {len(got)} admitted in {el:.2f} s "
             f"(R/2 = {R // 2}/s, burst {R // 2})")
        self.assertGreater(len(got), 2 * ok)
        self.assertLessEqual(ok, R / 2 * el + R / 2 + 1)
        self.assertGreaterEqual(ok, 0.9 * R / 2 * el)


if __name__ == "__main__":
    unittest.main(verbosity=2)
