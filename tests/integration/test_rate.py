"""Integration tests of sluice-rate (SPEC section 8): the rating job and
the billing loop against a real redis-server. Each test seeds usage,
coefficients, prices, resource packages and balances with redis-cli, runs
the binary (--day, --due, topup, statement) and checks the bills, the
packages, the balances, suspensions, payments, the alerts stream and the
output; reruns must change nothing. Every redis-server is stopped by PID
through addCleanup."""

import csv
import io
import json
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
        """sluice-rate against this test's Redis; a subcommand stays first."""
        if args and args[0] in ("topup", "statement"):
            return run_rate(args[0], "--redis", self.redis.addr, *args[1:], **kw)
        return run_rate("--redis", self.redis.addr, *args, **kw)

    def pkg(self, uid, pkgid, quota, remaining, purchased_at=0, expires_at=FAR, kind="RPUSH"):
        fields = ["quota", str(quota), "remaining", str(remaining), "purchased_at", str(purchased_at)]
        if expires_at is not None:
            fields += ["expires_at", str(expires_at)]
        self.cli("HSET", f"{P}respkg:{uid}:{pkgid}", *fields)
        self.cli(kind, f"{P}respkgs:{uid}", pkgid)

    def balance(self, uid):
        return self.cli("GET", f"{P}balance:{uid}").strip()

    def suspended(self):
        return sorted(self.cli("SMEMBERS", f"{P}suspended").split())

    def exists(self, key):
        return self.cli("EXISTS", key).strip() == "1"

    def topup(self, uid, amount, *extra):
        return self.rate("topup", "--uid", uid, "--amount", amount, *extra)

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
        """Four accounts that cover services, coefficients, prices, drawing
        in purchase order, pay-as-you-go, alerts and an overdue balance."""
        self.cli("SET", f"{P}coef:baselineCheck", "2.5")      # per service
        self.cli("SET", f"{P}coef:image", "9")                # per feature: not used for baselineCheck
        self.cli("SET", f"{P}price:text", "1.5")              # per feature
        self.cli("SET", f"{P}price:chat_detection", "2")      # per service wins
        self.cli("SET", f"{P}price:baselineCheck", "0.8")
        self.cli("SET", f"{P}price:video", "3")
        # 1001: services, a metering field without service (feature:region),
        # packages listed newest first.
        self.usage("1001", "text:chat_detection:cn-shanghai", 100, "text:chat_detection:cn-beijing", 20,
                   "image:baselineCheck:cn-shanghai", 10, "text:cn-hangzhou", 5)
        self.pkg("1001", "expired", 500, 500, 0, DAY_START)                  # ended as the day began
        self.pkg("1001", "b", 200, 200, 1700000100)                          # bought second
        self.pkg("1001", "a", 100, 50, 1700000000)                           # bought first: emptied, alert
        self.pkg("1001", "future", 500, 500, DAY_START + 86400, FAR)         # bought after the day
        self.cli("SET", f"{P}balance:1001", "1000000")                       # 1.000000
        # 1002: no packages, pays video.
        self.usage("1002", "video:-:cn-shanghai", 5)
        self.cli("SET", f"{P}balance:1002", "-1")
        # 1003: runs out of its package, falls under 10%, pays the rest, goes overdue.
        self.usage("1003", "text:chat_detection:cn-hangzhou", 50)
        self.pkg("1003", "p", 100, 20, kind="SADD")
        # 1004: lands exactly on 10%: no alert; its threshold 50% would.
        self.usage("1004", "text:chat_detection:cn-shanghai", 20)
        self.pkg("1004", "p", 100, 30)

    def test_rates_a_day(self):
        self.seed_day()
        r = self.rate("--day", DAY)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(lines(r.stdout), [
            "uid=1001 status=rated units_total=150 units_from_packages=150 payg_units=0 amount=0.000000 "
            "balance=1.000000",
            "uid=1002 status=rated units_total=5 units_from_packages=0 payg_units=5 amount=0.015000 "
            "balance=-0.015001 suspended=overdue",
            "uid=1003 status=rated units_total=50 units_from_packages=20 payg_units=30 amount=0.060000 "
            "balance=-0.060000 suspended=overdue",
            "uid=1004 status=rated units_total=20 units_from_packages=20 payg_units=0 amount=0.000000 "
            "balance=0.000000",
        ])
        bill = self.hgetall(f"{P}bill:{DAY}:1001")
        for k, v in {"units_total": "150", "units_from_packages": "150", "payg_units": "0", "amount": "0.000000",
                     "calls:chat_detection": "120", "calls:baselineCheck": "10", "calls:text": "5",
                     "units:baselineCheck": "25", "coef:baselineCheck": "2.5", "coef:chat_detection": "1",
                     "coef:text": "1", "payg_calls:chat_detection": "0", "payg_calls:baselineCheck": "0",
                     "default_coef": "chat_detection,text", "drawn:a": "50", "drawn:b": "100",
                     "price:chat_detection": "2", "price:text": "1.5", "day": DAY,
                     "balance_after": "1.000000", "rev": "1"}.items():
            self.assertEqual(bill.get(k), v, k)
        self.assertNotIn("drawn:expired", bill)
        self.assertAlmostEqual(int(bill["rated_at"]), time.time(), delta=60)
        # In purchase order: a (bought first, listed last) gives its 50, then b.
        self.assertEqual(self.remaining("1001", "a"), "0")
        self.assertEqual(self.remaining("1001", "b"), "100")
        self.assertEqual(self.remaining("1001", "expired"), "500")
        self.assertEqual(self.remaining("1001", "future"), "500")
        self.assertEqual(self.balance("1001"), "1000000")

        bill = self.hgetall(f"{P}bill:{DAY}:1002")
        self.assertEqual((bill["payg_units"], bill["payg_calls:video"], bill["calls:video"], bill["amount"]),
                         ("5", "5", "5", "0.015000"))
        self.assertEqual(self.balance("1002"), "-15001")
        bill = self.hgetall(f"{P}bill:{DAY}:1003")
        self.assertEqual((bill["payg_units"], bill["payg_calls:chat_detection"], bill["amount:chat_detection"]),
                         ("30", "30", "0.060000"))
        self.assertEqual(self.remaining("1003", "p"), "0")
        self.assertEqual(self.remaining("1004", "p"), "10")
        self.assertEqual(self.balance("1003"), "-60000")
        self.assertEqual(self.balance("1004"), "0")
        # 1002 and 1003 are overdue: suspended, with the reason recorded.
        self.assertEqual(self.suspended(), ["1002", "1003"])
        susp = self.hgetall(f"{P}suspension:1003")
        self.assertEqual(susp["reason"], "overdue")
        self.assertAlmostEqual(int(susp["since"]), time.time(), delta=60)
        self.assertEqual(self.alerts(), [
            {"type": "quota_low", "uid": "1001", "package": "a", "remaining": "0", "quota": "100",
             "threshold_pct": "10", "day": DAY},
            {"type": "quota_low", "uid": "1003", "package": "p", "remaining": "0", "quota": "100",
             "threshold_pct": "10", "day": DAY},
        ])
        self.assertTrue(self.exists(f"{P}rated:{DAY}"))

    def test_purchase_order_not_list_order(self):
        """Issue 13: with late listed before early, 150 units leave early at
        0 and late at 50 (it was the reverse); a set holds no order at all."""
        for kind, uid in (("RPUSH", "1"), ("SADD", "2")):
            self.usage(uid, "text:chat:cn-shanghai", 150)
            self.pkg(uid, "late", 100, 100, 1700000100, kind=kind)
            self.pkg(uid, "early", 100, 100, 1700000000, kind=kind)
        r = self.rate("--day", DAY)
        self.assertEqual(r.returncode, 0, r.stderr)
        for uid in ("1", "2"):
            self.assertEqual((self.remaining(uid, "early"), self.remaining(uid, "late")), ("0", "50"))

    def test_default_validity_one_year(self):
        """Issue 13: a package without expires_at is valid 365 days from its
        purchase (it used to be skipped as malformed)."""
        self.cli("SET", f"{P}price:text", "1")
        self.usage("1", "text:-:cn-shanghai", 30)
        self.pkg("1", "recent", 10, 10, DAY_START - 364 * 86400, None)
        self.pkg("1", "old", 10, 10, DAY_START - 365 * 86400, None)   # expired as the day starts
        r = self.rate("--day", DAY)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual((self.remaining("1", "recent"), self.remaining("1", "old")), ("0", "10"))
        self.assertEqual(self.hgetall(f"{P}bill:{DAY}:1")["payg_units"], "20")
        self.assertFalse(self.hgetall(f"{P}respkg:1:recent").get("expires_at"))  # not written

    def test_coefficient_zero_is_free(self):
        """Issue 13: coefficient 0 gave payg_units 0 but payg_calls 7."""
        self.cli("SET", f"{P}coef:freebie", "0")
        self.usage("1", "text:freebie:cn-shanghai", 7)
        r = self.rate("--day", DAY)
        self.assertEqual(r.returncode, 0, r.stderr)
        bill = self.hgetall(f"{P}bill:{DAY}:1")
        self.assertEqual((bill["payg_units:freebie"], bill["payg_calls:freebie"], bill["amount"], bill["units_total"]),
                         ("0", "0", "0.000000", "0"))
        self.assertNotIn("default_coef", bill)
        self.assertEqual(self.suspended(), [])

    def test_rerun_changes_nothing(self):
        self.seed_day()
        first = self.rate("--day", DAY)
        self.assertEqual(first.returncode, 0, first.stderr)
        before = self.dump()
        for _ in range(2):
            again = self.rate("--day", DAY)
            self.assertEqual(again.returncode, 0, again.stderr)
            self.assertEqual(lines(again.stdout), [f"uid={u} status=already_rated" for u in
                                                   ("1001", "1002", "1003", "1004")])
            self.assertEqual(self.dump(), before)   # bills, packages, balances, suspensions, alerts

    def test_rerun_after_partial_run(self):
        """A previous run that billed 1003 (a bill of the first format,
        without rev): the rerun rates only the others and leaves 1003 alone."""
        self.seed_day()
        self.cli("HSET", f"{P}bill:{DAY}:1003", "units_total", "50", "rated_at", "1")
        r = self.rate("--day", DAY)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("uid=1003 status=already_rated", lines(r.stdout))
        self.assertEqual(self.remaining("1003", "p"), "20")
        self.assertFalse(self.exists(f"{P}balance:1003"))
        self.assertEqual(self.hgetall(f"{P}bill:{DAY}:1003"), {"units_total": "50", "rated_at": "1"})
        self.assertEqual([a["uid"] for a in self.alerts()], ["1001"])

    def test_package_changed_between_compute_and_apply(self):
        """The apply script sees that what it read changed (a package, the
        balance), answers retry, and the account is computed again."""
        self.cli("SET", f"{P}price:text", "1000")
        self.usage("1001", "text:-:cn-shanghai", 30)
        self.pkg("1001", "a", 100, 20)
        hook = f"HSET {P}respkg:1001:a remaining 15"
        r = self.rate("--day", DAY, env={"SLUICE_RATE_TEST_BEFORE_APPLY": hook})
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("computing again", r.stderr)
        self.assertEqual(self.remaining("1001", "a"), "0")
        self.assertEqual(self.hgetall(f"{P}bill:{DAY}:1001")["drawn:a"], "15")
        self.assertEqual(self.balance("1001"), "-15000000")   # 15 calls at 1000 per 1,000

    def test_balance_topup_race(self):
        """A top-up between read and apply: the bill is deducted from the
        new balance, not from the one read."""
        self.cli("SET", f"{P}price:text", "1000")
        self.usage("1002", "text:-:cn-shanghai", 1)
        r = self.rate("--day", DAY, env={"SLUICE_RATE_TEST_BEFORE_APPLY": f"INCRBY {P}balance:1002 5000000"})
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("computing again", r.stderr)
        self.assertEqual(self.balance("1002"), "4000000")
        self.assertEqual(self.suspended(), [])

    def test_malformed_input_fails_that_account_only(self):
        """Each malformed input fails its account with a clear message, and
        nothing is written for it; the others are rated; exit 1."""
        self.cli("SET", f"{P}price:text", "1")
        good_pkg = ["quota", "100", "remaining", "100", "purchased_at", "0", "expires_at", str(FAR)]
        cases = {
            "non_numeric": (["quota", "100", "remaining", "lots", "purchased_at", "0"],
                            "package p: remaining 'lots' is not a decimal number"),
            "over_quota": (["quota", "100", "remaining", "101", "purchased_at", "0"],
                           "package p: remaining 101 is more than its quota 100"),
            "bought_after_expiry": (["quota", "100", "remaining", "5", "purchased_at", "200", "expires_at", "100"],
                                    "package p: purchased_at 200 is after expires_at 100"),
            "negative": (["quota", "100", "remaining", "-5", "purchased_at", "0"],
                         "package p: remaining '-5' is negative"),
            "no_quota": (["remaining", "5", "purchased_at", "0"], "package p has no quota"),
            "missing": (None, "package p is listed but its hash does not exist"),
        }
        for uid, (fields, _) in cases.items():
            self.usage(uid, "text:-:cn-shanghai", 10)
            if fields:
                self.cli("HSET", f"{P}respkg:{uid}:p", *fields)
            self.cli("SADD", f"{P}respkgs:{uid}", "p")
            self.cli("SET", f"{P}balance:{uid}", "0")
        # Inputs other than packages.
        others = {
            "bad_usage": "usage field 'text:-:cn-shanghai' = 'ten' is not a count of calls",
            "bad_coef": f"{P}coef:weird = 'abc' is not a decimal number",
            "neg_coef": f"{P}coef:neg = '-1' is negative",
            "bad_price": f"{P}price:dear = '1.2.3' is not a decimal number",
            "no_price": "no price for nameless (feature nameless)",
            "bad_balance": f"{P}balance:bad_balance = '12.5' is not an integer of micro-units",
            "bad_alertpct": f"{P}alertpct:bad_alertpct = '101' is not a percentage from 0 to 100",
            "list_is_string": f"{P}respkgs:list_is_string is neither a set nor a list",
            "pkg_is_string": f"package p: {P}respkg:pkg_is_string:p is not a hash",
            "usage_is_string": f"{P}usage:<day>:<uid> is of the wrong type",
        }
        self.usage("bad_usage", "text:-:cn-shanghai", "ten")
        self.cli("SET", f"{P}coef:weird", "abc")
        self.usage("bad_coef", "x:weird:cn-shanghai", 1)
        self.cli("SET", f"{P}coef:neg", "-1")
        self.usage("neg_coef", "x:neg:cn-shanghai", 1)
        self.cli("SET", f"{P}price:dear", "1.2.3")
        self.usage("bad_price", "x:dear:cn-shanghai", 1)
        self.usage("no_price", "nameless:-:cn-shanghai", 1)
        self.usage("bad_balance", "text:-:cn-shanghai", 1)
        self.cli("SET", f"{P}balance:bad_balance", "12.5")
        self.usage("bad_alertpct", "text:-:cn-shanghai", 1)
        self.cli("SET", f"{P}alertpct:bad_alertpct", "101")
        self.usage("list_is_string", "text:-:cn-shanghai", 1)
        self.cli("SET", f"{P}respkgs:list_is_string", "p")
        self.usage("pkg_is_string", "text:-:cn-shanghai", 1)
        self.cli("SADD", f"{P}respkgs:pkg_is_string", "p")
        self.cli("SET", f"{P}respkg:pkg_is_string:p", "x")
        self.cli("SADD", f"{P}usage:{DAY}", "usage_is_string")
        self.cli("SET", f"{P}usage:{DAY}:usage_is_string", "x")
        self.usage("zgood", "text:-:cn-shanghai", 10)
        self.cli("HSET", f"{P}respkg:zgood:p", *good_pkg)
        self.cli("SADD", f"{P}respkgs:zgood", "p")
        before = self.dump()
        r = self.rate("--day", DAY)
        self.assertEqual(r.returncode, 1, r.stderr)
        out = lines(r.stdout)
        self.assertEqual(out[-1], "uid=zgood status=rated units_total=10 units_from_packages=10 payg_units=0 "
                                  "amount=0.000000 balance=0.000000")
        for uid, msg in list(((u, m) for u, (_, m) in cases.items())) + list(others.items()):
            with self.subTest(uid=uid):
                self.assertIn(f"uid={uid} status=failed", out)
                self.assertIn(f"sluice-rate: uid={uid}: not rated: {msg}", r.stderr)
                self.assertFalse(self.exists(f"{P}bill:{DAY}:{uid}"))
        after = self.dump()
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        self.assertEqual(changed, [f"{P}balance:zgood", f"{P}bill:{DAY}:zgood", f"{P}respkg:zgood:p"])
        self.assertFalse(self.exists(f"{P}rated:{DAY}"))   # not all rated: --due tries the day again

    def test_suspension_reason_kept(self):
        """An account already suspended by hand (reason fraud, or no reason
        recorded) that goes overdue keeps its suspension as it was."""
        self.cli("SET", f"{P}price:text", "1")
        for uid in ("fraud", "noreason"):
            self.usage(uid, "text:-:cn-shanghai", 1000)
            self.cli("SADD", f"{P}suspended", uid)
        self.cli("HSET", f"{P}suspension:fraud", "reason", "fraud", "since", "5")
        r = self.rate("--day", DAY)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.hgetall(f"{P}suspension:fraud"), {"reason": "fraud", "since": "5"})
        self.assertFalse(self.exists(f"{P}suspension:noreason"))
        for uid in ("fraud", "noreason"):
            t = self.topup(uid, "5")
            self.assertEqual(t.returncode, 0, t.stderr)
            self.assertIn("suspension=kept", t.stdout)
            self.assertIn("a payment does not lift that", t.stderr)
        self.assertEqual(self.suspended(), ["fraud", "noreason"])
        self.assertEqual(self.balance("fraud"), "4000000")

    def test_topup(self):
        self.cli("SET", f"{P}price:text", "1")
        self.usage("1", "text:-:cn-shanghai", 3000)           # 3.000000
        self.assertEqual(self.rate("--day", DAY).returncode, 0)
        self.assertEqual(self.suspended(), ["1"])
        # Not enough: still overdue.
        t = self.topup("1", "1.5")
        self.assertEqual(t.returncode, 0, t.stderr)
        self.assertEqual(lines(t.stdout), ["uid=1 status=ok amount=1.500000 balance=-1.500000 suspension=kept "
                                           "reason=overdue"])
        self.assertEqual(self.suspended(), ["1"])
        # Enough: lifted, the suspension hash gone.
        t = self.topup("1", "1.500000", "--ref", "pay-42")
        self.assertEqual(lines(t.stdout), ["uid=1 status=ok amount=1.500000 balance=0.000000 suspension=lifted"])
        self.assertEqual(self.suspended(), [])
        self.assertFalse(self.exists(f"{P}suspension:1"))
        # The same reference again changes nothing.
        before = self.dump()
        t = self.topup("1", "1.5", "--ref", "pay-42")
        self.assertEqual(t.returncode, 0, t.stderr)
        self.assertEqual(lines(t.stdout), ["uid=1 status=duplicate ref=pay-42 balance=0.000000"])
        self.assertEqual(self.dump(), before)
        # Not suspended: nothing to lift. A new account gets a balance.
        t = self.topup("2", "0.000001")
        self.assertEqual(lines(t.stdout), ["uid=2 status=ok amount=0.000001 balance=0.000001 suspension=none"])
        self.assertEqual(self.balance("2"), "1")
        out = self.cli("XRANGE", f"{P}payments:1", "-", "+").splitlines()
        self.assertEqual(out.count("amount"), 2)
        self.assertIn("pay-42", out)
        self.assertIn("lifted", out)
        # Refused: bad amounts and arguments (exit 2), a balance that is not
        # an integer (exit 1): nothing written.
        before = self.dump()
        for args in (["topup", "--uid", "1", "--amount", "0"], ["topup", "--uid", "1", "--amount", "-1"],
                     ["topup", "--uid", "1", "--amount", "abc"], ["topup", "--uid", "1", "--amount", "1.0000001"],
                     ["topup", "--amount", "1"], ["topup", "--uid", "1"], ["topup", "--uid", "1", "--amount", "1",
                                                                          "--bogus"]):
            with self.subTest(args=args):
                t = self.rate(*args)
                self.assertEqual(t.returncode, 2, t.stderr)
                self.assertIn("sluice-rate:", t.stderr)
        self.cli("SET", f"{P}balance:3", "1.5")
        self.cli("SADD", f"{P}suspended", "3")
        self.cli("HSET", f"{P}suspension:3", "reason", "overdue")
        before = self.dump()
        t = self.topup("3", "10")
        self.assertEqual(t.returncode, 1)
        self.assertIn("top-up not applied", t.stderr)
        self.assertEqual(self.dump(), before)
        self.cli("DEL", f"{P}balance:3")
        self.cli("SET", f"{P}payments:3", "x")
        t = self.topup("3", "10")
        self.assertEqual(t.returncode, 1)
        self.assertIn("is a string, not a stream", t.stderr)
        self.assertFalse(self.exists(f"{P}balance:3"))

    def test_late_usage_is_an_adjustment(self):
        """Issue 13: usage counted after the day was rated was dropped by
        the rerun. It is rated as an adjustment: once, idempotent."""
        self.cli("SET", f"{P}price:text", "10")
        self.usage("1", "text:-:cn-shanghai", 100)
        self.pkg("1", "p", 150, 150)
        self.cli("SET", f"{P}balance:1", "5000000")
        self.assertEqual(self.rate("--day", DAY).returncode, 0)
        # 80 more calls arrive late, some on a new field: 50 from p, 30 pay.
        self.cli("HINCRBY", f"{P}usage:{DAY}:1", "text:-:cn-shanghai", "60")
        self.cli("HSET", f"{P}usage:{DAY}:1", "text:-:cn-beijing", "20")
        r = self.rate("--day", DAY)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(lines(r.stdout), ["uid=1 status=adjusted units_total=80 units_from_packages=50 "
                                           "payg_units=30 amount=0.300000 balance=4.700000"])
        self.assertIn("80 calls arrived after 20240501 was rated", r.stderr)
        bill = self.hgetall(f"{P}bill:{DAY}:1")
        for k, v in {"units_total": "180", "units_from_packages": "150", "payg_units": "30", "amount": "0.300000",
                     "calls:text": "180", "drawn:p": "150", "rev": "2", "adjustments": "1",
                     "balance_after": "4.700000", "u:text:-:cn-shanghai": "160", "u:text:-:cn-beijing": "20"}.items():
            self.assertEqual(bill.get(k), v, k)
        self.assertEqual(self.remaining("1", "p"), "0")
        self.assertEqual(self.balance("1"), "4700000")
        self.assertEqual(self.alerts()[-1], {"type": "late_usage", "uid": "1", "day": DAY, "calls": "80",
                                             "units": "80", "amount": "0.300000"})
        before = self.dump()
        r = self.rate("--day", DAY)
        self.assertEqual(lines(r.stdout), ["uid=1 status=already_rated"])
        self.assertEqual(self.dump(), before)
        # Usage that goes down cannot be un-billed: reported, nothing written.
        self.cli("HSET", f"{P}usage:{DAY}:1", "text:-:cn-beijing", "5")
        r = self.rate("--day", DAY)
        self.assertEqual(r.returncode, 1)
        self.assertIn("went down from 20 billed to 5", r.stderr)
        self.assertEqual(self.dump(), {**before, f"{P}usage:{DAY}:1": self.dump()[f"{P}usage:{DAY}:1"]})

    def test_due_with_grace(self):
        now = int(time.time())
        self.cli("SET", f"{P}price:text", "1")
        today = time.strftime("%Y%m%d", time.gmtime(now))

        def day(k):
            return time.strftime("%Y%m%d", time.gmtime(now - k * 86400))

        for k in (0, 1, 2, 5, 40):
            self.usage("1", "text:-:cn-shanghai", 1000 * (k + 1), day=day(k))
        # Yesterday ended (now - midnight) seconds ago.
        ended_ago = now % 86400
        grace = ended_ago // 3600 + 1     # yesterday is not due yet with this grace
        r = self.rate("--due", "--grace-hours", str(grace))
        self.assertEqual(r.returncode, 0, r.stderr)
        rated = [l.split()[0] for l in lines(r.stdout)]
        # oldest first; every ended day with usage (SPEC 8), day 40 too
        self.assertEqual(rated, [f"day={day(40)}", f"day={day(5)}", f"day={day(2)}"])
        for k, want in ((0, False), (1, False), (2, True), (5, True), (40, True)):
            self.assertEqual(self.exists(f"{P}bill:{day(k)}:1"), want, k)
            self.assertEqual(self.exists(f"{P}rated:{day(k)}"), want, k)
        # Run again: nothing new. Grace 0: yesterday is due now, today never.
        r = self.rate("--due", "--grace-hours", str(grace))
        self.assertEqual(lines(r.stdout), [])
        r = self.rate("--due", "--grace-hours", "0")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual([l.split()[0] for l in lines(r.stdout)], [f"day={day(1)}"])
        self.assertFalse(self.exists(f"{P}bill:{today}:1"))
        # Late usage on a recently rated day: --due rates the adjustment.
        self.cli("HINCRBY", f"{P}usage:{day(2)}:1", "text:-:cn-shanghai", "7")
        r = self.rate("--due", "--grace-hours", "0")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(len(lines(r.stdout)), 1)
        self.assertIn(f"day={day(2)} uid=1 status=adjusted units_total=7", r.stdout)
        # --lookback-days bounds the look back (no SCAN): a day older than
        # it is not seen, a newer one is.
        for k in (50, 3):
            self.usage("1", "text:-:cn-shanghai", 5, day=day(k))
        r = self.rate("--due", "--lookback-days", "45")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual([l.split()[0] for l in lines(r.stdout)], [f"day={day(3)}"])
        self.assertFalse(self.exists(f"{P}bill:{day(50)}:1"))
        # A day older than a year: found by the default's SCAN (a key of the
        # usage sets' shape that is no day's set is passed over).
        self.cli("SET", f"{P}usage:2024011x", "not a day")
        self.usage("1", "text:-:cn-shanghai", 9, day="20240115")
        r = self.rate("--due")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual([l.split()[0] for l in lines(r.stdout)], [f"day=20240115", f"day={day(50)}"])
        for args in (["--due", "--grace-hours", "-1"], ["--due", "--grace-hours", "x"], ["--day", DAY, "--due"],
                     ["--day", DAY, "--grace-hours", "1"], ["--due", "--lookback-days", "99999"]):
            with self.subTest(args=args):
                r = self.rate(*args)
                self.assertEqual(r.returncode, 2, r.stderr)

    def test_statement(self):
        self.seed_day()
        self.assertEqual(self.rate("--day", DAY).returncode, 0)
        self.usage("1003", "text:chat_detection:cn-hangzhou", 4, day="20240502")   # not rated yet
        self.topup("1003", "0.06")
        r = self.rate("statement", "--uid", "1003", "--from", "20240501", "--to", "20240502")
        self.assertEqual(r.returncode, 0, r.stderr)
        st = json.loads(r.stdout)
        d1, d2 = st["days"]
        self.assertEqual((d1["day"], d1["rated"], d2["day"], d2["rated"]), ("20240501", True, "20240502", False))
        self.assertEqual(d1["services"]["chat_detection"], {
            "calls": 50, "units": "50", "units_from_packages": "20", "payg_units": "30", "payg_calls": "30",
            "amount": "0.060000"})
        self.assertEqual((d1["amount"], d1["balance_after_bill"], d1["payments"]), ("0.060000", "-0.060000",
                                                                                     "0.000000"))
        self.assertEqual(d2["services"], {"chat_detection": {"calls": 4}})
        self.assertEqual(st["total"]["services"]["chat_detection"]["calls"], 54)
        self.assertEqual(st["total"]["amount"], "0.060000")
        self.assertEqual(st["balance"], "0.000000")
        # The payment is on the day it was made.
        paid_day = time.strftime("%Y%m%d", time.gmtime())
        r = self.rate("statement", "--uid", "1003", "--from", paid_day, "--to", paid_day)
        self.assertEqual(json.loads(r.stdout)["days"][0]["payments"], "0.060000")
        r = self.rate("statement", "--uid", "1001", "--from", DAY, "--to", DAY, "--format", "csv")
        self.assertEqual(r.returncode, 0, r.stderr)
        rows = list(csv.DictReader(io.StringIO(r.stdout)))
        self.assertEqual([(x["day"], x["service"]) for x in rows], [
            (DAY, "baselineCheck"), (DAY, "chat_detection"), (DAY, "text"), (DAY, "*"),
            ("total", "baselineCheck"), ("total", "chat_detection"), ("total", "text"), ("total", "*")])
        self.assertEqual(rows[0], {"day": DAY, "service": "baselineCheck", "calls": "10", "units": "25",
                                   "units_from_packages": "25", "payg_units": "0", "payg_calls": "0",
                                   "amount": "0.000000", "payments": "", "balance": ""})
        self.assertEqual((rows[3]["units"], rows[3]["balance"]), ("150", "1.000000"))
        self.assertEqual(rows[-1]["balance"], "1.000000")
        for args in (["--uid", "1", "--from", "20240502", "--to", "20240501"],
                     ["--uid", "1", "--from", "20230101", "--to", "20240501"],
                     ["--uid", "1", "--from", "2024-05-01", "--to", "20240501"],
                     ["--uid", "1", "--from", DAY, "--to", DAY, "--format", "xml"], ["--from", DAY, "--to", DAY]):
            with self.subTest(args=args):
                r = self.rate("statement", *args)
                self.assertEqual(r.returncode, 2, r.stderr)

    def test_dry_run_writes_nothing(self):
        self.seed_day()
        before = self.dump()
        r = self.rate("--day", DAY, "--dry-run")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("uid=1003 status=dry_run units_total=50 units_from_packages=20 payg_units=30 "
                      "amount=0.060000 balance=-0.060000", lines(r.stdout))
        self.assertEqual(self.dump(), before)

    def test_prefix_time_zone_and_unix_socket(self):
        sockdir = tempfile.mkdtemp(prefix="sluice-rate-")
        self.addCleanup(shutil.rmtree, sockdir, True)
        sock = os.path.join(sockdir, "redis.sock")
        redis = harness.start_redis(("--unixsocket", sock))
        self.addCleanup(redis.stop)
        pre = "x:"
        redis.cli("SADD", f"{pre}usage:{DAY}", "7")
        redis.cli("HSET", f"{pre}usage:{DAY}:7", "text:-:cn-shanghai", "10")
        redis.cli("SET", f"{pre}price:text", "1")
        # Bought 20:00 UTC on May 1st: after the UTC+8 day ended at 16:00 UTC.
        redis.cli("HSET", f"{pre}respkg:7:late", "quota", "100", "remaining", "100",
                  "purchased_at", str(DAY_START + 20 * 3600), "expires_at", str(FAR))
        redis.cli("RPUSH", f"{pre}respkgs:7", "late")
        r = run_rate("--day", DAY, "--redis", f"unix:{sock}", "--redis-prefix", pre, "--tz-offset-min", "480")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("uid=7 status=rated units_total=10 units_from_packages=0 payg_units=10", r.stdout)
        self.assertEqual(redis.cli("HGET", f"{pre}bill:{DAY}:7", "tz_offset_min").strip(), "480")
        # In UTC the same package was valid on that day.
        redis.cli("DEL", f"{pre}bill:{DAY}:7")
        r = run_rate("--day", DAY, "--redis", f"unix:{sock}", "--redis-prefix", pre)
        self.assertIn("units_from_packages=10 payg_units=0", r.stdout)

    def test_day_not_ended(self):
        """Issue 13: --force sealed a day before it ended. A day that has not
        ended is refused, with or without --force."""
        today = time.strftime("%Y%m%d", time.gmtime())
        self.usage("1001", "text:-:cn-shanghai", 3, day=today)
        for args in ([], ["--force"]):
            r = self.rate("--day", today, *args)
            self.assertEqual(r.returncode, 2)
            self.assertIn("has not ended yet" if not args else "--force is not accepted", r.stderr)
            self.assertEqual(r.stdout, "")
        self.assertEqual(self.cli("DBSIZE").strip(), "2")

    def test_bad_arguments(self):
        for args in (["--day", "2024-05-01"], ["--day", "20230229"], ["--day", "20241301"], [],
                     ["--day", DAY, "--bogus"], ["--day", DAY, "--tz-offset-min", "abc"],
                     ["--day", DAY, "--tz-offset-min", "1440"], ["--day"], ["--day", DAY, "--redis", "nowhere"],
                     ["--due", "--day"], ["--bogus-sub"], ["statement"], ["topup"]):
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
