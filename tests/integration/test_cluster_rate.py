"""sluice-rate on a real Redis Cluster (issue 14 part (b), SPEC 8 and 10),
with the 3-master + 3-replica cluster of test_cluster_proxy.py: usage made
by real requests through sluice (`--redis cluster://...`, admission on,
--global-limits off), rated with `sluice-rate --day D --redis cluster://...`
(every per-account key {uid}-tagged, the global ones on their own slots);
the bill, the package drawn, the balance, the overdue account in
`P suspended` and rejected by the proxy within 1 s, a rerun that changes
nothing, and a top-up that lifts the suspension within 1 s.

The day: the current UTC date, rated in the zone UTC+23:59
(--tz-offset-min 1439), where it ended a minute after UTC midnight; the
packages are bought two days before. Every process is stopped by its PID."""

import subprocess
import sys
import time
import unittest

import harness
from proxyenv import start_modstub, start_sluice
import test_cluster_proxy as tcp  # the cluster's setup (not `from ... import`: its tests would run here too)
from test_metering import P, poll

TZ = "1439"


class ClusterRateTest(unittest.TestCase):
    start_cluster = tcp.ClusterProxyTest.start_cluster
    master_of = tcp.ClusterProxyTest.master_of
    ccli = tcp.ClusterProxyTest.ccli

    def rate(self, *args):
        url = "cluster://" + ",".join(n.addr for n in self.nodes[:2])
        return subprocess.run([harness.bin_path("sluice-rate"), *args, "--redis", url], capture_output=True,
                              text=True, timeout=60)

    def get(self, *args):
        return self.ccli(*args).strip()

    def test_rates_a_day(self):
        from test_admission import call
        # not within two minutes of UTC midnight: the day must not change under the test
        s = time.time() % 86400
        if s < 120 or s > 86400 - 120:
            time.sleep(240 - (s + 120) % 86400)
        self.start_cluster()
        now = int(time.time())
        day = time.strftime("%Y%m%d", time.gmtime())
        for ak, uid in (("AK1", "u1"), ("AK2", "u2")):
            self.ccli("SET", P + "ak:" + ak, uid)
        self.ccli("HSET", P + "feature:text", "default_qps", "100000")
        self.ccli("SET", P + "price:text", "1")                     # 1 per 1,000 calls
        self.ccli("HSET", P + "respkg:{u1}:p1", "quota", "10", "remaining", "10", "purchased_at", str(now - 2 * 86400))
        self.ccli("SADD", P + "respkgs:{u1}", "p1")
        self.ccli("SET", P + "balance:{u1}", "1000000")               # 1.000000
        _, up = start_modstub(self)
        url = "cluster://" + ",".join(n.addr for n in self.nodes[:2])
        sl = start_sluice(self, [up], "--redis", url, "--admission", "on", "--global-limits", "off",
                          "--flush-ms", "200", workers=2)
        with harness.HttpConn(sl.port) as c:
            poll(lambda: call(c).status == 200, 10, "AK1 admitted " + sl.stderr()[-1500:])
            for _ in range(29):
                self.assertEqual(call(c).status, 200)
            for _ in range(20):
                self.assertEqual(call(c, ak="AK2").status, 200)

            def calls(uid):
                flat = self.ccli("HGETALL", f"{P}usage:{day}:{{{uid}}}").split("\n")
                return sum(int(v) for v in flat[1::2] if v)
            poll(lambda: calls("u1") == 30 and calls("u2") == 20, 10, "usage flushed " + sl.stderr()[-1500:])
            self.assertEqual(sorted(self.ccli("SMEMBERS", f"{P}usage:{day}").split()), ["u1", "u2"])

            r = self.rate("--day", day, "--tz-offset-min", TZ)
            t_rated = time.monotonic()
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            out = sorted(r.stdout.splitlines())
            self.assertEqual(out, [
                "uid=u1 status=rated units_total=30 units_from_packages=10 payg_units=20 amount=0.020000 "
                "balance=0.980000",
                "uid=u2 status=rated units_total=20 units_from_packages=0 payg_units=20 amount=0.020000 "
                "balance=-0.020000 suspended=overdue"])
            # the overdue account: rejected by the proxy within 1 s of the rating
            poll(lambda: call(c, ak="AK2").status == 403, 3, "u2 rejected " + sl.stderr()[-1500:])
            d = time.monotonic() - t_rated
            print(f"cluster rating: u2 rejected {d * 1000:.0f} ms after sluice-rate exited", file=sys.stderr)
            self.assertLess(d, 1.0)
            self.assertEqual(call(c).status, 200)

            bill = dict(zip(*[iter(self.ccli("HGETALL", f"{P}bill:{day}:{{u1}}").split("\n"))] * 2))
            self.assertEqual((bill["units_total"], bill["units_from_packages"], bill["payg_units"], bill["amount"]),
                             ("30", "10", "20", "0.020000"))
            self.assertEqual(self.get("HGET", P + "respkg:{u1}:p1", "remaining"), "0")
            self.assertEqual(self.get("GET", P + "balance:{u1}"), "980000")
            self.assertEqual(self.get("GET", P + "balance:{u2}"), "-20000")
            self.assertEqual(self.ccli("SMEMBERS", P + "suspended").split(), ["u2"])
            self.assertEqual(self.get("HGET", P + "suspension:{u2}", "reason"), "overdue")
            alerts = self.ccli("XRANGE", P + "alerts", "-", "+").split("\n")
            self.assertEqual(alerts.count("quota_low"), 1)
            self.assertIn("p1", alerts)
            for uid in ("u1", "u2"):   # the outboxes applied
                self.assertEqual(self.get("XLEN", f"{P}outbox:{{{uid}}}"), "0")
            self.assertEqual(self.get("HGET", f"{P}rated:{day}", "at") != "", True)

            # again: nothing changes
            r = self.rate("--day", day, "--tz-offset-min", TZ)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(sorted(r.stdout.splitlines()), ["uid=u1 status=already_rated",
                                                             "uid=u2 status=already_rated"])
            self.assertEqual(self.get("GET", P + "balance:{u2}"), "-20000")
            self.assertEqual(self.ccli("XRANGE", P + "alerts", "-", "+").split("\n").count("quota_low"), 1)

            # a statement reads the account's keys
            r = self.rate("statement", "--uid", "u1", "--from", day, "--to", day, "--tz-offset-min", TZ)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("0.02", r.stdout)

            # the payment lifts the suspension, and the proxy admits u2 within 1 s
            r = self.rate("topup", "--uid", "u2", "--amount", "1", "--ref", "pay-1")
            t_paid = time.monotonic()
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(r.stdout.strip(), "uid=u2 status=ok amount=1.000000 balance=0.980000 suspension=lifted")
            poll(lambda: call(c, ak="AK2").status == 200, 3, "u2 admitted " + sl.stderr()[-1500:])
            d = time.monotonic() - t_paid
            print(f"cluster rating: u2 admitted {d * 1000:.0f} ms after the top-up", file=sys.stderr)
            self.assertLess(d, 1.0)
            self.assertEqual(self.ccli("SMEMBERS", P + "suspended").split(), [])
            self.assertEqual(self.get("EXISTS", P + "suspension:{u2}"), "0")
            r = self.rate("topup", "--uid", "u2", "--amount", "1", "--ref", "pay-1")
            self.assertEqual(r.stdout.strip(), "uid=u2 status=duplicate ref=pay-1 balance=0.980000")
            # --due finds a day's usage set on whichever master holds it
            # (SCAN on each): two old days, oldest first (then the day
            # rated above, rechecked: the calls made since it was rated
            # may have reached Redis, an adjustment)
            for old, uid in (("20240115", "u7"), ("20240301", "u8")):
                self.ccli("HSET", f"{P}usage:{old}:{{{uid}}}", "text:-:cn-shanghai", "1000")
                self.ccli("SADD", f"{P}usage:{old}", uid)
            r = self.rate("--due", "--tz-offset-min", TZ)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual([l.split()[0] for l in r.stdout.splitlines()][:2], ["day=20240115", "day=20240301"])
            self.assertTrue(all(l.startswith(("day=2024", f"day={day}")) for l in r.stdout.splitlines()), r.stdout)
            self.assertEqual(self.get("HGET", f"{P}bill:20240301:{{u8}}", "amount"), "1.000000")
        self.assertEqual(sl.stop(timeout=30), 0, sl.stderr()[-2000:])
        for bad in ("Sanitizer", "runtime error:"):
            self.assertNotIn(bad, sl.stderr())


if __name__ == "__main__":
    unittest.main()
