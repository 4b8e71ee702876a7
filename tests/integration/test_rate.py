"""Integration tests of sluice-rate (SPEC section 8): the daily rating job
against a real redis-server. Each test seeds usage, coefficients and
resource packages with redis-cli, runs the binary and checks the bills, the
packages' balances, the alerts stream and the stdout lines; reruns must
change nothing. Every redis-server is stopped by PID through addCleanup."""

import os
import re
import shutil
import subprocess
import tempfile
import time
import unittest

import harness

DAY = "20240501"
DAY_START = 1714521600  # 2024-05-01T00:00:00Z
FAR = 4102444800        # 2100-01-01
P = "sluice:"
STREAM_ID = re.compile(r"^\d+-\d+$")


def run_rate(*args, env=None, timeout=60):
    """Runs sluice-rate with args; returns the CompletedProcess (text)."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.run([harness.bin_path("sluice-rate"), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)


def lines(text):
    return [l for l in text.splitlines() if l]


class RateTest(unittest.TestCase):
    def setUp(self):
        self.redis = harness.start_redis()
        self.addCleanup(self.redis.stop)

    def cli(self, *args):
        return self.redis.cli(*args)

    def rate(self, *args, **kw):
        return run_rate("--redis", self.redis.addr, *args, **kw)

    def pkg(self, uid, pkgid, quota, remaining, purchased_at=0, expires_at=FAR):
        self.cli("HSET", f"{P}respkg:{uid}:{pkgid}", "quota", str(quota), "remaining", str(remaining),
                 "purchased_at", str(purchased_at), "expires_at", str(expires_at))
        self.cli("RPUSH", f"{P}respkgs:{uid}", pkgid)

    def usage(self, uid, *pairs, day=DAY, prefix=P):
        self.cli("SADD", f"{prefix}usage:{day}", uid)
        if pairs:
            self.cli("HSET", f"{prefix}usage:{day}:{uid}", *[str(x) for x in pairs])

    def hgetall(self, key):
        out = self.cli("HGETALL", key).splitlines()
        return dict(zip(out[0::2], out[1::2]))

    def remaining(self, uid, pkgid):
        return self.cli("HGET", f"{P}respkg:{uid}:{pkgid}", "remaining").strip()

    def alerts(self, key=P + "alerts"):
        """The alerts stream's entries as dicts of their fields."""
        out = self.cli("XRANGE", key, "-", "+").splitlines()
        # redis-cli prints, per entry, its id then field and value lines.
        entries, cur = [], None
        for line in out:
            if STREAM_ID.match(line) and (cur is None or len(cur) % 2 == 0):
                if cur is not None:
                    entries.append(dict(zip(cur[0::2], cur[1::2])))
                cur = []
            else:
                cur.append(line)
        if cur is not None:
            entries.append(dict(zip(cur[0::2], cur[1::2])))
        return entries

    def dump(self):
        """Every key with its type and full content."""
        out = {}
        for key in sorted(set(self.cli("--scan").split())):
            t = self.cli("TYPE", key).strip()
            if t == "hash":
                val = sorted(self.hgetall(key).items())
            elif t == "list":
                val = self.cli("LRANGE", key, "0", "-1").splitlines()
            elif t == "set":
                val = sorted(self.cli("SMEMBERS", key).splitlines())
            elif t == "stream":
                val = self.cli("XRANGE", key, "-", "+").splitlines()
            else:
                val = self.cli("GET", key)
            out[key] = (t, val)
        return out

    def seed_day(self):
        """Four accounts that cover drawing, pay-as-you-go and alerts."""
        # 1001: text on two regions and image_llm at 2.25 units a call.
        self.cli("SET", f"{P}coef:image_llm", "2.25")
        self.usage("1001", "text:cn-shanghai", 100, "text:cn-beijing", 20, "image_llm:cn-shanghai", 10)
        self.pkg("1001", "expired", 500, 500, 0, DAY_START)                  # ended as the day began
        self.pkg("1001", "a", 100, 50)                                       # emptied: alert
        self.cli("HSET", f"{P}respkg:1001:broken", "quota", "100", "remaining", "lots")
        self.cli("RPUSH", f"{P}respkgs:1001", "broken")                      # malformed
        self.cli("RPUSH", f"{P}respkgs:1001", "gone")                        # no hash
        self.pkg("1001", "b", 200, 200)                                      # 107.5 left: no alert
        self.pkg("1001", "future", 500, 500, DAY_START + 86400, FAR)         # bought after the day
        # 1002: no packages at all.
        self.usage("1002", "video:cn-shanghai", 5)
        # 1003: runs out of its package, falls under 10%, pays the rest.
        self.usage("1003", "text:cn-hangzhou", 50)
        self.pkg("1003", "p", 100, 20)
        # 1004: lands exactly on 10%: no alert.
        self.usage("1004", "text:cn-shanghai", 20)
        self.pkg("1004", "p", 100, 30)

    def test_rates_a_day(self):
        self.seed_day()
        r = self.rate("--day", DAY)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(lines(r.stdout), [
            "uid=1001 status=rated units_total=142.5 units_from_packages=142.5 payg_units=0",
            "uid=1002 status=rated units_total=5 units_from_packages=0 payg_units=5",
            "uid=1003 status=rated units_total=50 units_from_packages=20 payg_units=30",
            "uid=1004 status=rated units_total=20 units_from_packages=20 payg_units=0",
        ])
        self.assertIn("uid=1001: package broken skipped (malformed)", r.stderr)
        self.assertIn("uid=1001: package gone skipped (missing)", r.stderr)
        self.assertNotIn("package expired", r.stderr)

        bill = self.hgetall(f"{P}bill:{DAY}:1001")
        for k, v in {"units_total": "142.5", "units_from_packages": "142.5", "payg_units": "0",
                     "calls:text": "120", "calls:image_llm": "10", "units:image_llm": "22.5",
                     "coef:image_llm": "2.25", "coef:text": "1", "payg_calls:text": "0",
                     "payg_calls:image_llm": "0", "drawn:a": "50", "drawn:b": "92.5", "day": DAY}.items():
            self.assertEqual(bill.get(k), v, k)
        self.assertNotIn("drawn:expired", bill)
        self.assertAlmostEqual(int(bill["rated_at"]), time.time(), delta=60)
        # image_llm (22.5 units) draws before text in name order: a gives 50
        # to image_llm 22.5 + text 27.5, b gives the other 92.5 to text.
        self.assertEqual(bill["units_from_packages:image_llm"], "22.5")
        self.assertEqual(self.remaining("1001", "a"), "0")
        self.assertEqual(self.remaining("1001", "b"), "107.5")
        self.assertEqual(self.remaining("1001", "expired"), "500")
        self.assertEqual(self.remaining("1001", "future"), "500")
        self.assertEqual(self.remaining("1001", "broken"), "lots")

        bill = self.hgetall(f"{P}bill:{DAY}:1002")
        self.assertEqual((bill["payg_units"], bill["payg_calls:video"], bill["calls:video"]), ("5", "5", "5"))
        bill = self.hgetall(f"{P}bill:{DAY}:1003")
        self.assertEqual((bill["payg_units"], bill["payg_calls:text"]), ("30", "30"))
        self.assertEqual(self.remaining("1003", "p"), "0")
        self.assertEqual(self.remaining("1004", "p"), "10")

        self.assertEqual(self.alerts(), [
            {"type": "quota_low", "uid": "1001", "package": "a", "remaining": "0", "quota": "100", "day": DAY},
            {"type": "quota_low", "uid": "1003", "package": "p", "remaining": "0", "quota": "100", "day": DAY},
        ])

    def test_rerun_changes_nothing(self):
        self.seed_day()
        first = self.rate("--day", DAY)
        self.assertEqual(first.returncode, 0, first.stderr)
        before = self.dump()
        again = self.rate("--day", DAY)
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertEqual(lines(again.stdout), [f"uid={u} status=already_rated" for u in
                                               ("1001", "1002", "1003", "1004")])
        self.assertIn("already rated", again.stderr)
        self.assertEqual(self.dump(), before)

    def test_rerun_after_partial_run(self):
        """A previous run that crashed after billing 1003: the rerun rates
        only the others and leaves 1003's package alone."""
        self.seed_day()
        self.cli("HSET", f"{P}bill:{DAY}:1003", "units_total", "50", "rated_at", "1")
        r = self.rate("--day", DAY)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("uid=1003 status=already_rated", lines(r.stdout))
        self.assertEqual(sum("status=rated" in l for l in lines(r.stdout)), 3)
        self.assertEqual(self.remaining("1003", "p"), "20")
        self.assertEqual(self.hgetall(f"{P}bill:{DAY}:1003"), {"units_total": "50", "rated_at": "1"})
        self.assertEqual([a["uid"] for a in self.alerts()], ["1001"])

    def test_package_changed_between_compute_and_apply(self):
        """The apply script sees that a package's remaining is not what was
        read, answers retry, and the account is computed again from the new
        balance: nothing is drawn twice or from a stale balance."""
        self.usage("1001", "text:cn-shanghai", 30)
        self.pkg("1001", "a", 100, 50)
        hook = f"HSET {P}respkg:1001:a remaining 45"
        r = self.rate("--day", DAY, env={"SLUICE_RATE_TEST_BEFORE_APPLY": hook})
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("computing again", r.stderr)
        self.assertEqual(self.remaining("1001", "a"), "15")
        self.assertEqual(self.hgetall(f"{P}bill:{DAY}:1001")["drawn:a"], "30")

    def test_failed_account_does_not_stop_the_others(self):
        self.usage("1001", "text_llm:cn-shanghai", 10)
        self.cli("SET", f"{P}coef:text_llm", "-1")
        self.usage("1002", "image:cn-shanghai", 10)
        self.cli("SET", f"{P}coef:image", "abc")
        self.usage("1003", "video:cn-shanghai", "ten")
        self.usage("1004", "text:cn-shanghai", 4)
        self.cli("SET", f"{P}coef:text", "0.5")
        self.pkg("1001", "a", 100, 100)
        r = self.rate("--day", DAY)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertEqual(lines(r.stdout), [
            "uid=1001 status=failed", "uid=1002 status=failed", "uid=1003 status=failed",
            "uid=1004 status=rated units_total=2 units_from_packages=0 payg_units=2"])
        self.assertIn(f"uid=1001: not rated: {P}coef:text_llm = '-1' is negative", r.stderr)
        self.assertIn(f"uid=1002: not rated: {P}coef:image = 'abc' is not a decimal number", r.stderr)
        self.assertIn("uid=1003: not rated: usage field 'video:cn-shanghai' = 'ten'", r.stderr)
        self.assertEqual(self.hgetall(f"{P}bill:{DAY}:1004")["payg_calls:text"], "4")
        for uid in ("1001", "1002", "1003"):
            self.assertEqual(self.cli("EXISTS", f"{P}bill:{DAY}:{uid}").strip(), "0")
        self.assertEqual(self.remaining("1001", "a"), "100")
        # Fixed, a rerun rates the failed ones and leaves 1004 as it was.
        self.cli("SET", f"{P}coef:text_llm", "2")
        self.cli("DEL", f"{P}usage:{DAY}:1002", f"{P}usage:{DAY}:1003")
        bill = self.hgetall(f"{P}bill:{DAY}:1004")
        r = self.rate("--day", DAY)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.remaining("1001", "a"), "80")
        self.assertEqual(self.hgetall(f"{P}bill:{DAY}:1002")["units_total"], "0")
        self.assertEqual(self.hgetall(f"{P}bill:{DAY}:1004"), bill)

    def test_dry_run_writes_nothing(self):
        self.seed_day()
        before = self.dump()
        r = self.rate("--day", DAY, "--dry-run")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("uid=1003 status=dry_run units_total=50 units_from_packages=20 payg_units=30",
                      lines(r.stdout))
        self.assertEqual(self.dump(), before)

    def test_prefix_time_zone_and_unix_socket(self):
        sockdir = tempfile.mkdtemp(prefix="sluice-rate-")
        self.addCleanup(shutil.rmtree, sockdir, True)
        sock = os.path.join(sockdir, "redis.sock")
        redis = harness.start_redis(("--unixsocket", sock))
        self.addCleanup(redis.stop)
        pre = "x:"
        redis.cli("SADD", f"{pre}usage:{DAY}", "7")
        redis.cli("HSET", f"{pre}usage:{DAY}:7", "text:cn-shanghai", "10")
        # Bought 20:00 UTC on May 1st: after the UTC+8 day ended at 16:00 UTC.
        redis.cli("HSET", f"{pre}respkg:7:late", "quota", "100", "remaining", "100",
                  "purchased_at", str(DAY_START + 20 * 3600), "expires_at", str(FAR))
        redis.cli("RPUSH", f"{pre}respkgs:7", "late")
        r = run_rate("--day", DAY, "--redis", f"unix:{sock}", "--redis-prefix", pre, "--tz-offset-min", "480")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(lines(r.stdout), ["uid=7 status=rated units_total=10 units_from_packages=0 payg_units=10"])
        out = redis.cli("HGET", f"{pre}bill:{DAY}:7", "tz_offset_min").strip()
        self.assertEqual(out, "480")
        # In UTC the same package was valid on that day.
        redis.cli("DEL", f"{pre}bill:{DAY}:7")
        r = run_rate("--day", DAY, "--redis", f"unix:{sock}", "--redis-prefix", pre)
        self.assertIn("units_from_packages=10 payg_units=0", r.stdout)

    def test_day_not_ended(self):
        today = time.strftime("%Y%m%d", time.gmtime())
        self.usage("1001", "text:cn-shanghai", 3, day=today)
        r = self.rate("--day", today)
        self.assertEqual(r.returncode, 2)
        self.assertIn("has not ended yet", r.stderr)
        self.assertEqual(r.stdout, "")
        self.assertEqual(self.cli("EXISTS", f"{P}bill:{today}:1001").strip(), "0")
        r = self.rate("--day", today, "--force")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.hgetall(f"{P}bill:{today}:1001")["units_total"], "3")

    def test_bad_arguments(self):
        for args in (["--day", "2024-05-01"], ["--day", "20230229"], ["--day", "20241301"], [],
                     ["--day", DAY, "--bogus"], ["--day", DAY, "--tz-offset-min", "abc"],
                     ["--day", DAY, "--tz-offset-min", "1440"], ["--day"], ["--day", DAY, "--redis", "nowhere"]):
            with self.subTest(args=args):
                r = self.rate(*args)
                self.assertEqual(r.returncode, 2, r.stderr)
                self.assertIn("sluice-rate:", r.stderr)
                self.assertEqual(r.stdout, "")
        r = run_rate("--help")
        self.assertEqual(r.returncode, 0)
        self.assertIn("--day yyyymmdd", r.stdout)
        self.assertEqual(self.cli("DBSIZE").strip(), "0")

    def test_redis_down(self):
        port = harness.free_port()  # nothing listens there
        r = run_rate("--day", DAY, "--redis", f"127.0.0.1:{port}")
        self.assertEqual(r.returncode, 1)
        self.assertIn(f"cannot connect to Redis at 127.0.0.1:{port}", r.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
