"""sluice's metering against a real Redis Cluster (issue 14 part (b), SPEC 10):
3 masters and 3 replicas made by `redis-cli --cluster create
--cluster-replicas 1` on 127.0.0.1, sluice given `--redis cluster://...`
(the metering cases with admission off: every count is the
unauthenticated UID "-", whose keys carry the tag {-}; the directory case
with admission on and --global-limits off; the shared limits' case with
three instances and global limits on: one R for the fleet, the load
split and then moved to one instance).
Under a bounded load the slot of {-} is migrated to another master
(CLUSTER SETSLOT IMPORTING/MIGRATING + MIGRATE + SETSLOT NODE, as
`redis-cli --cluster reshard` does); after a SIGTERM usage == the 200s
modstub gave (exactly once), each batch in the stream once, the day's set
holds the UID. The master failover case: the slot's master SIGKILLed under
load, its replica (synced before the load) promoted, the same checks.
With 300 accounts (admission on): one script per master and batch (INFO
commandstats' EVAL calls per master), and the migration and failover cases
again, where a master's script meets the slot half moved or its master
gone: every account's usage == the 200s it got. Also with 300 accounts:
the slot's high-water mark migrated after its counts, a script's reply
lost (a TCP proxy announced as a master's port), and after each run the
keys counted (one mark per slot, no marker per slot and batch). A spool
of the version before the marks replayed, its old markers honoured. Every
process is stopped by its PID; every wait is bounded."""

import collections
import itertools
import json
import os
import shutil
import struct
import subprocess
import signal
import sys
import tempfile
import threading
import time
import unittest
import zlib

import harness
import tcpfault
from proxyenv import start_modstub, start_sluice
from test_metering import P, Load, Resp, Tally, _req, poll

def crc16(data):
    """CRC16-XMODEM, Redis Cluster's key hash."""
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1) & 0xFFFF
    return crc


def key_slot(key):
    s = key.find("{")
    if s >= 0:
        e = key.find("}", s + 1)
        if e > s + 1:
            key = key[s + 1:e]
    return crc16(key.encode()) % 16384


SLOT_DASH = key_slot("{-}")  # every count's UID with admission off


class Node:
    """A cluster-enabled redis-server; the cluster bus on a port of its own
    (the default, port + 10000, fails for ports above 55535)."""

    def __init__(self, test):
        self.r = harness.start_redis(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                      "--cluster-node-timeout", "1000", "--cluster-port", str(harness.free_port()),
                                      "--appendonly", "yes", "--appendfsync", "always",
                                      # a replica's first sync at once (Redis 7 waits 5 s for more
                                      # replicas): one never synced refuses to fail over
                                      # ("Disconnected from master for longer than allowed")
                                      "--repl-diskless-sync-delay", "0"])
        test.addCleanup(self.r.stop)
        self.port, self.addr = self.r.port, self.r.addr
        self.killed = False

    def cli(self, *args):
        return self.r.cli(*args)

    def node_id(self):
        return self.cli("CLUSTER", "MYID").strip()

    def kill(self):
        self.r.proc.send_signal(signal.SIGKILL)
        self.r.proc.wait(timeout=10)
        self.killed = True


def make_cluster(owner):
    """Six Nodes made into 3 masters with a synced replica each by `redis-cli
    --cluster create`; each node stopped by owner.addCleanup (a test, or a
    harness.ClassOwner for a class's shared cluster)."""
    nodes = [Node(owner) for _ in range(6)]
    subprocess.run(["redis-cli", "--cluster", "create", *[n.addr for n in nodes], "--cluster-replicas", "1",
                    "--cluster-yes"], check=True, capture_output=True, text=True, timeout=30)
    deadline = time.monotonic() + 20

    def waiting(what):
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.1)
    while not all("cluster_state:ok" in n.cli("CLUSTER", "INFO") and
                  "cluster_known_nodes:6" in n.cli("CLUSTER", "INFO") for n in nodes):
        waiting("the cluster did not come up")
    # the three replicas synced with their masters (a failover promotes only a synced one)
    while sum("role:slave" in i and "master_link_status:up" in i
              for i in (n.cli("INFO", "replication") for n in nodes)) != 3:
        waiting("the replicas did not sync")
    return nodes


class ClusterCase(unittest.TestCase):
    """The helpers; the cases are ClusterProxyTest's (each on a cluster of
    its own) and SharedClusterTest's (one cluster for the class)."""

    def start_cluster(self):
        self.nodes = make_cluster(self)

    def master_of(self, slot):
        """The live node that serves slot as master (ROLE and CLUSTER SLOTS of a live node)."""
        live = [n for n in self.nodes if not n.killed]
        for line in live[0].cli("CLUSTER", "NODES").splitlines():
            f = line.split()
            if "master" not in f[2] or "fail" in f[2]:
                continue
            for rng in f[8:]:
                if rng.startswith("["):
                    continue
                lo, _, hi = rng.partition("-")
                if int(lo) <= slot <= int(hi or lo):
                    port = int(f[1].split("@")[0].rsplit(":", 1)[1])
                    return next((n for n in live if n.port == port), None)  # None: a dead master not failed yet
        return None

    def usage_total(self):
        """usage:<day>:{-} summed on the slot's master; the day's sets; the stream's batches."""
        m = self.master_of(SLOT_DASH)
        total = 0
        for k in m.cli("KEYS", P + "usage:*:{-}").split():
            flat = m.cli("HGETALL", k).split("\n")
            total += sum(int(v) for v in flat[1::2] if v)
        return total

    def stream_batches(self):
        key = P + "usage:stream"
        m = self.master_of(key_slot(key))
        out = m.cli("XRANGE", key, "-", "+").split("\n")
        return [out[i + 1] for i, v in enumerate(out[:-1]) if v == "batch"]

    def migrate_slot(self, slot, src, dst, last=None):
        """Moves slot from src to dst the way redis-cli --cluster reshard does;
        the keys for which last(name) holds move 0.5 s after the others."""
        sid, did = src.node_id(), dst.node_id()
        dst.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", sid)
        src.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", did)
        time.sleep(0.3)  # batches meet the slot half moved (ASK / TRYAGAIN)
        while True:
            keys = src.cli("CLUSTER", "GETKEYSINSLOT", str(slot), "100").split()
            now = [k for k in keys if not (last and last(k))]
            if not now and keys and last:  # batches meet the slot's keys half moved
                time.sleep(0.5)
                last = None
                continue
            if not now:
                break
            src.cli("MIGRATE", "127.0.0.1", str(dst.port), "", "0", "5000", "KEYS", *now)
        for n in self.nodes:
            if not n.killed and "master" in n.cli("ROLE").split("\n")[0]:
                n.cli("CLUSTER", "SETSLOT", str(slot), "NODE", did)

    def ccli(self, *args):
        """redis-cli on the cluster (-c: follows MOVED to the key's master)."""
        live = next(n for n in self.nodes if not n.killed)
        return subprocess.run(["redis-cli", "-c", "-h", "127.0.0.1", "-p", str(live.port), *args], check=True,
                              capture_output=True, text=True, timeout=10).stdout

    # ---- many accounts: one script per master and batch (issue 14) ----

    def owners(self):
        """slot -> the live master serving it, from one CLUSTER NODES."""
        live = [n for n in self.nodes if not n.killed]
        by_port = {n.port: n for n in live}
        out = {}
        for line in live[0].cli("CLUSTER", "NODES").splitlines():
            f = line.split()
            if "master" not in f[2] or "fail" in f[2]:
                continue
            node = by_port.get(int(f[1].split("@")[0].rsplit(":", 1)[1]))
            for rng in f[8:]:
                if not rng.startswith("["):
                    lo, _, hi = rng.partition("-")
                    out.update((s, node) for s in range(int(lo), int(hi or lo) + 1))
        return out

    def masters(self):
        return [n for n in self.nodes if not n.killed and "master" in n.cli("ROLE").split("\n")[0]]

    def seed_accounts(self, n):
        """ak:AKC<i> -> c<i> for i < n, each SET on its slot's master (one
        redis-cli per master, the commands on its stdin); text unlimited."""
        owners, by = self.owners(), collections.defaultdict(list)
        for i in range(n):
            k = f"{P}ak:AKC{i}"
            by[owners[key_slot(k)]].append(f"SET {k} c{i}")
        k = P + "feature:text"
        by[owners[key_slot(k)]].append(f"HSET {k} default_qps 1000000")
        for node, lines in by.items():
            out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(node.port)], input="\n".join(lines) + "\n",
                                 check=True, capture_output=True, text=True, timeout=30).stdout
            self.assertEqual(len(out.split()), len(lines), node.addr)
            self.assertLessEqual(set(out.split()), {"OK", "1"}, node.addr)

    def usage_by_uid(self):
        """usage:<day>:{<uid>} summed per UID over every live master."""
        got = collections.Counter()
        for m in self.masters():
            c = Resp(m.port)
            try:
                for k in c.cmd("KEYS", P + "usage:*:{*}"):
                    flat = c.cmd("HGETALL", k)
                    got[k[k.index("{") + 1:-1]] += sum(int(v) for v in flat[1::2])
            finally:
                c.close()
        return got

    def eval_calls(self, what="calls", cmd="eval"):
        """INFO commandstats' EVAL (or cmd's) calls (or rejected_calls:
        answered MOVED, ASK, TRYAGAIN...), per live master (by port)."""
        out = {}
        for m in self.masters():
            line = next((x for x in m.cli("INFO", "commandstats").splitlines() if x.startswith(f"cmdstat_{cmd}:")), "")
            fields = dict(f.split("=") for f in line.split(":", 1)[1].split(",")) if line else {}
            out[m.port] = int(fields.get(what, 0))
        return out

    def load_accounts(self, sl, n, stop, counts, lock):
        """Threads sending one call per account in turn until stop is set;
        counts[uid] += the 200s each account got."""
        def run(lo, hi):
            with harness.HttpConn(sl.port) as c:
                while not stop.is_set():
                    for i in range(lo, hi):
                        c.send(_req(ak=f"AKC{i}"))
                        if c.read_response().status == 200:
                            with lock:
                                counts[f"c{i}"] += 1
        ts = [threading.Thread(target=run, args=(k * n // 3, (k + 1) * n // 3), daemon=True) for k in range(3)]
        for t in ts:
            t.start()
        return ts

    def start_accounts(self, n, *args, before_sluice=None):
        """A cluster with n accounts, a modstub (3% errors) and a sluice with
        admission on (global limits off) that has looked every account up;
        before_sluice() runs once the accounts are in."""
        self.start_cluster()
        self.seed_accounts(n)
        if before_sluice:
            before_sluice()
        _, up = start_modstub(self, "--error-rate", "0.03", "--seed", "7", workers=2)
        url = "cluster://" + ",".join(n.addr for n in self.nodes[:2])
        sl = start_sluice(self, [up], "--redis", url, "--admission", "on", "--global-limits", "off",
                          "--resync-ms", "600000", *args, workers=2)
        poll(lambda: sl.metrics().get("sluice_directory_resyncs_total", 0) >= 1, 10, "first resync")
        counts = collections.Counter()
        with harness.HttpConn(sl.port) as c:  # each account looked up once (the directory's own EVALs)
            for i in range(n):
                c.send(_req(ak=f"AKC{i}"))
                resp = c.read_response()
                self.assertIn(resp.status, (200, 500), resp.body[:300])
                counts[f"c{i}"] += resp.status == 200
        return sl, up, counts

    def check_accounts(self, sl, up, counts, what):
        """After a SIGTERM: every account's usage equals the 200s it got and
        the backend's 200s; each batch once in the stream; every UID in the
        day's set."""
        self.assertEqual(sl.stop(timeout=30), 0, sl.stderr()[-2000:])
        backend = harness.http_request(up, "GET", "/stats").json()["by_status"].get("200", 0)
        got = self.usage_by_uid()
        self.assertEqual(sum(got.values()), backend, f"{what}: usage != backend 200s " + sl.stderr()[-2000:])
        self.assertEqual({u: v for u, v in got.items() if v}, {u: v for u, v in counts.items() if v}, what)
        batches = self.stream_batches()
        self.assertEqual(len(batches), len(set(batches)), "a batch twice in usage:stream")
        day = time.strftime("%Y%m%d", time.gmtime())
        members = set(self.master_of(key_slot(P + "usage:" + day)).cli("SMEMBERS", P + "usage:" + day).split())
        self.assertEqual(members, {u for u, v in counts.items() if v})
        for bad in ("Sanitizer", "runtime error:"):
            self.assertNotIn(bad, sl.stderr())
        self.check_marks(counts)
        return backend

    def each_key(self, pattern):
        """(connection to its master, key) for each key matching pattern,
        SCANned on every live master."""
        for m in self.masters():
            c = Resp(m.port)
            try:
                cursor = "0"
                while True:
                    cursor, keys = c.cmd("SCAN", cursor, "MATCH", pattern, "COUNT", "1000")
                    for k in keys:
                        yield c, k
                    if cursor == "0":
                        break
            finally:
                c.close()

    def scan_keys(self, pattern):
        """{key: (value, ttl)} of the keys matching pattern, on every live master."""
        return {k: (c.cmd("GET", k), c.cmd("TTL", k)) for c, k in self.each_key(pattern)}

    def check_marks(self, uids):
        """The exactly-once keys a run left (issue 14): no marker per slot
        and batch (meter:batch:<id>:{<uid>}), only the stream entry's, one per
        batch in the stream; one high-water mark per slot of uids, all of one
        instance epoch (one process), each in its slot (its tag first),
        holding a seq and expiring within 7 days."""
        stream_slot = key_slot(P + "usage:stream")
        tag = next(str(t) for t in itertools.count() if key_slot(str(t)) == stream_slot)
        markers = self.scan_keys(P + "meter:batch:*")
        self.assertEqual([k for k in markers if not k.endswith(":{%s}" % tag)], [], "a marker per slot")
        self.assertEqual(len(markers), len(set(self.stream_batches())))
        marks = self.scan_keys(P + "meter:hwm:*")
        self.assertEqual(len({k.split("}:", 1)[1] for k in marks}), 1, sorted(marks)[:5])
        slots = [key_slot(k) for k in marks]
        self.assertEqual(len(slots), len(set(slots)), "two marks in a slot")
        self.assertEqual(set(slots), {key_slot("{%s}" % u) for u in uids})
        for k, (v, ttl) in marks.items():
            self.assertTrue(k.startswith(P + "meter:hwm:{"), k)
            self.assertGreaterEqual(int(v), 1, k)
            self.assertTrue(0 < ttl <= 604800, (k, ttl))
        print(f"cluster marks: {len(marks)} high-water marks for {len(set(slots))} slots of {len(uids)} accounts, "
              f"{len(markers)} stream markers (one per batch), no marker per slot", file=sys.stderr)

    def many_accounts_under(self, migrate, kill, mark_last=False):
        """300 accounts loaded from 2 s before to 1.5 s after the slot's move
        (or its new master's promotion), a flush every 0.2 s; after 2 s the
        slot of c0 is migrated to another master (its master's scripts meet it
        half moved: those slots go one by one, following ASK and TRYAGAIN;
        with mark_last its high-water mark moves 0.5 s after its counts, so
        that a script finds the mark but not the counts), or c0's master is
        killed and its replica promoted: every count once."""
        n = 300
        sl, up, counts = self.start_accounts(n, "--flush-ms", "200", "--redis-timeout-ms", "1000")
        slot = key_slot("{c0}")
        src = self.master_of(slot)
        # another account on the same master: its master's scripts hold several slots
        self.assertTrue(any(self.master_of(key_slot("{c%d}" % i)) is src for i in range(1, n)))
        stop, lock = threading.Event(), threading.Lock()
        ts = self.load_accounts(sl, n, stop, counts, lock)
        time.sleep(2.0)
        if migrate:
            dst = next(m for m in self.masters() if m is not src)
            self.migrate_slot(slot, src, dst, (lambda k: k.startswith(P + "meter:hwm:")) if mark_last else None)
            self.assertIs(self.master_of(slot), dst)
        if kill:
            src.kill()
            poll(lambda: self.master_of(slot) not in (None, src) and
                 "cluster_state:ok" in self.master_of(slot).cli("CLUSTER", "INFO"), 20, "replica promoted")
        time.sleep(1.5)  # the load goes on to the slot's new master (7 flushes)
        self.assertTrue(all(t.is_alive() for t in ts), "a load thread ended")
        stop.set()
        for t in ts:
            t.join(10)
        retried = sl.metrics().get("sluice_meter_batches_retried_total", 0)
        rejected = self.eval_calls("rejected_calls")
        backend = self.check_accounts(sl, up, counts, "migration" if migrate else "failover")
        if migrate:  # the slot went one by one while half moved (a master's script never is refused)
            self.assertGreater(sum(rejected.values()), 0, "no EVAL met the slot half moved")
        print(f"cluster many accounts ({'migration' if migrate else 'failover'}): usage == 200s == {backend}, "
              f"{retried} batch(es) retried, EVALs refused per master {rejected}", file=sys.stderr)

    def run_load(self, migrate, kill):
        t0 = time.monotonic()
        self.start_cluster()
        _, up = start_modstub(self, "--error-rate", "0.03", "--seed", "5", workers=2)
        url = "cluster://" + ",".join(n.addr for n in self.nodes[:2])
        sl = start_sluice(self, [up], "--redis", url, "--admission", "off", "--flush-ms", "200",
                          "--redis-timeout-ms", "1000", workers=2)
        tally = Tally()
        # the slot's master and one other master
        src = self.master_of(SLOT_DASH)
        dst = next(n for n in self.nodes if n is not src and "master" in n.cli("ROLE").split("\n")[0])
        load = Load(sl.port, tally, threads=3, duration=10.0, per_thread=10**9).start(self)
        time.sleep(2.0)
        if migrate:
            self.migrate_slot(SLOT_DASH, src, dst)
            time.sleep(2.0)
            self.assertIs(self.master_of(SLOT_DASH), dst)
        victim = self.master_of(SLOT_DASH)
        if not kill:
            victim = None
        self.assertTrue(any(t.is_alive() for t in load.threads), "the load ended before the failover")
        if kill:
            victim.kill()
        # its replica takes over within a few node timeouts
        poll(lambda: self.master_of(SLOT_DASH) is not None and self.master_of(SLOT_DASH) is not victim and
             "cluster_state:ok" in self.master_of(SLOT_DASH).cli("CLUSTER", "INFO"), 20, "replica promoted")
        # the load goes on to the slot's new master for 1.5 s (7 flushes), not to its 10 s bound
        time.sleep(1.5)
        self.assertTrue(any(t.is_alive() for t in load.threads), "the load ended before the slot's new master had it")
        load.stop()
        self.assertTrue(load.join(), "load threads did not end")
        backend = harness.http_request(up, "GET", "/stats").json()["by_status"].get("200", 0)
        self.assertGreater(backend, 200, tally.summary())

        retried = sl.metrics().get("sluice_meter_batches_retried_total", 0)
        # SIGTERM: the final flush writes what the workers still hold
        self.assertEqual(sl.stop(timeout=30), 0, sl.stderr()[-2000:])
        got = self.usage_total()
        self.assertEqual(got, backend, f"usage {got} != backend 200s {backend}; {tally.summary()}\n" +
                         sl.stderr()[-3000:])
        batches = self.stream_batches()
        self.assertEqual(len(batches), len(set(batches)), "a batch twice in usage:stream")
        day = time.strftime("%Y%m%d", time.gmtime())
        members = self.master_of(key_slot(P + "usage:" + day)).cli("SMEMBERS", P + "usage:" + day).split()
        self.assertEqual(members, ["-"])
        for bad in ("Sanitizer", "runtime error:"):
            self.assertNotIn(bad, sl.stderr())
        print(f"cluster proxy test: usage {got} == 200s {backend}, {len(batches)} batches ({retried} retried), "
              f"{tally.summary()}, {time.monotonic() - t0:.1f} s; day set {members}", file=sys.stderr)


class ClusterProxyTest(ClusterCase):
    """The cases that change the cluster (a master killed, a slot migrated,
    a port announced): each makes a cluster of its own."""

    def test_directory(self):
        """Admission on a cluster: `ak:` on its slot, the account's packages on
        its UID's ({uid}-tagged keys), `suspended` and `feature:` on theirs;
        a plain redis-cli change applies within 1 s (keyspace notifications
        from each master; the resync is 10 min)."""
        from test_admission import call, assert_error
        self.start_cluster()
        now = int(time.time())
        self.ccli("SET", P + "ak:AK1", "u1")
        self.ccli("SET", P + "ak:AK2", "u2")
        self.ccli("HSET", P + "feature:text", "default_qps", "100000")
        self.ccli("HSET", P + "qpspkg:{u1}:pk1", "feature", "text", "region", "cn-shanghai", "qps", "5",
                  "starts_at", str(now - 10), "expires_at", str(now + 3600))
        self.ccli("SADD", P + "qpspkgs:{u1}", "pk1")
        self.assertNotEqual(key_slot(P + "ak:AK1"), key_slot(P + "qpspkgs:{u1}"))
        _, up = start_modstub(self)
        url = "cluster://" + ",".join(n.addr for n in self.nodes[:2])
        sl = start_sluice(self, [up], "--redis", url, "--admission", "on", "--global-limits", "off",
                          "--resync-ms", "600000", "--negative-ttl-ms", "60000", workers=2)

        def explain(uid):
            r = harness.http_request(sl.admin, "GET", f"/explain?uid={uid}&feature=text&region=cn-shanghai")
            self.assertEqual(r.status, 200, r.body)
            return json.loads(r.body.replace(b"\0", b"").decode())

        def measure(what, args, conn, want, **kw):
            t0 = time.monotonic()
            self.ccli(*args)
            poll(lambda: call(conn, **kw).status == want, 3, what + " " + sl.stderr()[-1500:])
            d = time.monotonic() - t0
            print(f"cluster directory: {what}: {d * 1000:.0f} ms", file=sys.stderr)
            self.assertLess(d, 1.0, what)

        with harness.HttpConn(sl.port) as c:
            poll(lambda: call(c).status == 200, 10, "AK1 admitted " + sl.stderr()[-1500:])
            assert_error(self, call(c, ak="AKNONE"), 403, "InvalidAccessKeyId.NotFound")
            e = explain("u1")
            self.assertEqual(e["default_qps"], 100000)
            self.assertEqual([p["id"] for p in e["packages"]], ["pk1"])
            measure("SADD suspended", ("SADD", P + "suspended", "u1"), c, 403)
            assert_error(self, call(c), 403, "Forbidden.AccountSuspended")
            self.assertEqual(call(c, ak="AK2").status, 200)
            measure("SREM suspended", ("SREM", P + "suspended", "u1"), c, 200)
            measure("SET ak:AKNEW (negatively cached)", ("SET", P + "ak:AKNONE", "u3"), c, 200, ak="AKNONE")
            measure("DEL ak:AK2", ("DEL", P + "ak:AK2"), c, 403, ak="AK2")
            # a package added on the UID's slot
            self.ccli("HSET", P + "qpspkg:{u1}:pk2", "feature", "text", "region", "cn-shanghai", "qps", "3",
                      "starts_at", str(now - 10), "expires_at", str(now + 3600))
            self.ccli("SADD", P + "qpspkgs:{u1}", "pk2")
            poll(lambda: sorted(p["id"] for p in explain("u1")["packages"]) == ["pk1", "pk2"], 1.0, "package pk2")
            # the master of `suspended` killed: once its replica is promoted, a
            # suspension written there applies within 1 s (a subscriber on the new master)
            slot = key_slot(P + "suspended")
            victim = self.master_of(slot)
            victim.kill()
            poll(lambda: self.master_of(slot) not in (None, victim) and
                 "cluster_state:ok" in self.master_of(slot).cli("CLUSTER", "INFO"), 20, "replica promoted")
            measure("SADD suspended after a failover", ("SADD", P + "suspended", "u1"), c, 403)
        self.assertEqual(sl.stop(timeout=30), 0, sl.stderr()[-2000:])
        for bad in ("Sanitizer", "runtime error:"):
            self.assertNotIn(bad, sl.stderr())

    def fault_on_c0_master(self, wanted, **fault):
        """300 accounts loaded, a flush every 0.2 s, with a TCP proxy
        (tcpfault, **fault) in front of c0's master, announced as that
        master's port (cluster-announce-port); the load runs until wanted(fp)
        and 1 s more. Returns (sluice's metrics, fp, usage == 200s) after
        the exact-count checks."""
        n = 300
        fp = None

        def proxy_c0_master():
            nonlocal fp
            src = self.master_of(key_slot("{c0}"))
            fp = tcpfault.FaultProxy(src.port, **fault)
            self.addCleanup(fp.close)
            src.cli("CONFIG", "SET", "cluster-announce-port", str(fp.port))
            poll(lambda: all(str(fp.port) in nd.cli("CLUSTER", "SLOTS").split() for nd in self.nodes), 10,
                 "the proxy's port announced")
            self.proxied = src

        sl, up, counts = self.start_accounts(n, "--flush-ms", "200", "--redis-timeout-ms", "1000",
                                             before_sluice=proxy_c0_master)
        stop, lock = threading.Event(), threading.Lock()
        ts = self.load_accounts(sl, n, stop, counts, lock)
        poll(lambda: wanted(fp), 10, "the fault")
        time.sleep(1.0)
        stop.set()
        for t in ts:
            t.join(10)
        poll(lambda: sl.metrics().get("sluice_meter_queue_batches", 1) == 0, 10, "the batches in Redis")
        m = sl.metrics()
        # the master's own port again, so that the checks find it by port
        self.proxied.cli("CONFIG", "SET", "cluster-announce-port", "0")
        poll(lambda: all(str(fp.port) not in nd.cli("CLUSTER", "NODES") for nd in self.nodes), 10,
             "the master's own port announced")
        return m, fp, self.check_accounts(sl, up, counts, "fault on c0's master")

    def test_lost_reply(self):
        """A master's script applied but its reply lost: the proxy forwards
        the first command naming a mark and closes the connection instead of
        relaying the reply. The batch goes again whole, every slot of it
        found applied by its mark (deduplicated), and every count is in
        once."""
        m, fp, backend = self.fault_on_c0_master(lambda fp: fp.dropped, marker=b"meter:hwm:")
        # the script ran and applied (a master's: an array with a 1; a slot's own part: 1) ...
        self.assertTrue(fp.dropped[0].startswith(b"*") and b"\r\n:1\r\n" in fp.dropped[0] or
                        fp.dropped[0].startswith(b":1"), fp.dropped)
        # ... and its batch went again (its SADD answers "applied" again: a cluster's batch is
        # seldom counted as deduplicated; the counts say whether the slots were)
        self.assertGreaterEqual(m.get("sluice_meter_batches_retried_total", 0), 1, m)
        print(f"cluster lost reply: dropped {fp.dropped[0][:24]!r}; retried "
              f"{m.get('sluice_meter_batches_retried_total')}, usage == 200s == {backend}", file=sys.stderr)

    @harness.release_only("its paths (a master's script finding its slots' marks) run under ASan in test_lost_reply")
    def test_late_copy(self):
        """A copy of a batch's script that Redis runs first, from another
        connection (as a connection sluice gave up on, whose bytes arrive
        late, would): the proxy runs the first script naming a mark on a
        connection of its own, then forwards sluice's. Sluice's finds every
        slot's mark at its seq and changes nothing: every count once (a
        first send that wrote its marks without reading them would count
        those slots twice here)."""
        m, fp, backend = self.fault_on_c0_master(lambda fp: fp.replayed, marker=b"meter:hwm:",
                                                 replay_from=b"$4\r\nEVAL\r\n")
        self.assertTrue(fp.replayed[0].startswith(b"*") and b"\r\n:1\r\n" in fp.replayed[0], fp.replayed)
        print(f"cluster late copy: the copy ran first ({fp.replayed[0][:24]!r}); usage == 200s == {backend}",
              file=sys.stderr)

    def test_many_accounts_mark_moved_last(self):
        self.many_accounts_under(migrate=True, kill=False, mark_last=True)

    def test_many_accounts_master_failover(self):
        self.many_accounts_under(migrate=False, kill=True)

    @harness.release_only("test_many_accounts_master_failover runs the same failover paths under ASan")
    def test_master_failover(self):
        self.run_load(migrate=False, kill=True)

    @harness.release_only("test_many_accounts_mark_moved_last runs the same migration paths (ASK, TRYAGAIN, the per-slot part) under ASan")
    def test_slot_migration(self):
        self.run_load(migrate=True, kill=False)


class SharedClusterTest(ClusterCase):
    """The cases that leave the cluster as they found it (no node killed, no
    slot moved, no port announced): one cluster for the class, every master
    FLUSHALLed (its replica follows) and its INFO stats reset before each
    case, so that no case sees another's keys or counts."""

    @classmethod
    def setUpClass(cls):
        cls.shared_nodes = make_cluster(harness.ClassOwner(cls))

    def start_cluster(self):
        self.nodes = self.shared_nodes
        for m in self.masters():
            m.cli("FLUSHALL")
            m.cli("CONFIG", "RESETSTAT")
        poll(lambda: all(n.cli("DBSIZE").strip() == "0" for n in self.nodes), 5, "every node empty")

    def test_resync_checks(self):
        """With every master's notifications on and its subscriptions
        confirmed, a resync interval checks each master (its notification
        flags and its own mark P dir:mark:{<tag>}) instead of rereading every
        account (which cost each instance ~25 us of Redis CPU per account
        every 30 s); what changes unnotified on one master is found at the
        next check: notifications turned off there (turned on again), or its
        data set flushed."""
        from test_admission import call
        self.start_cluster()
        self.ccli("SET", P + "ak:AK1", "u1")
        _, up = start_modstub(self)
        url = "cluster://" + ",".join(n.addr for n in self.nodes[:2])
        sl = start_sluice(self, [up], "--redis", url, "--admission", "on", "--global-limits", "off",
                          "--metering", "off", "--resync-ms", "200", "--negative-ttl-ms", "60000", workers=1)

        def counts():
            m = sl.metrics()
            return m.get("sluice_directory_resync_checks_total", 0), m.get("sluice_directory_resyncs_total", 0)
        with harness.HttpConn(sl.port) as c:
            poll(lambda: call(c).status == 200, 10, "AK1 admitted")
            poll(lambda: counts()[0] >= 1, 10, "a first check " + sl.stderr()[-1500:])
            checks0, full0 = counts()
            time.sleep(1.3)  # six or seven intervals
            checks1, full1 = counts()
            self.assertGreaterEqual(checks1 - checks0, 3)
            self.assertLessEqual(full1 - full0, 1)
            marks = [k for m in self.masters() for k in m.cli("KEYS", P + "dir:mark:*").split()]
            self.assertEqual(len(marks), 3, marks)  # one per master, on a slot of its own
            # notifications off on the master of `suspended`: the suspension is found by the check
            m = self.master_of(key_slot(P + "suspended"))
            m.cli("CONFIG", "SET", "notify-keyspace-events", "")
            self.ccli("SADD", P + "suspended", "u1")
            t0 = time.monotonic()
            poll(lambda: call(c).status == 403, 3, "suspension after notifications went off", interval=0.01)
            print(f"cluster resync checks: SADD suspended unnotified found in {time.monotonic() - t0:.2f} s",
                  file=sys.stderr)
            poll(lambda: "K" in m.cli("CONFIG", "GET", "notify-keyspace-events").split()[-1], 3,
                 "notifications on again")
            checks2 = counts()[0]
            poll(lambda: counts()[0] > checks2, 5, "checks again")
            self.ccli("SREM", P + "suspended", "u1")
            poll(lambda: call(c).status == 200, 1, "lifted by notification", interval=0.005)
            # the master of ak:AK1 flushed: nothing notified, its mark gone with its data
            self.master_of(key_slot(P + "ak:AK1")).cli("FLUSHALL")
            t0 = time.monotonic()
            poll(lambda: call(c).status == 403, 3, "AK1 gone after FLUSHALL", interval=0.01)
            print(f"cluster resync checks: FLUSHALL on one master found in {time.monotonic() - t0:.2f} s",
                  file=sys.stderr)
        self.assertEqual(sl.stop(), 0, sl.stderr()[-2000:])

    def test_lookups_grouped_per_master(self):
        """A resync of 4,200 accounts goes as one script per master and step
        (the `ak:` keys, then the UIDs' packages) for up to 100 accounts, not
        a GET and an EVAL per account (issue 14: that made a cluster's
        directory cost twice one server's), in parts of 4,096 accounts (the
        bound of a grouping); what it loads is right: a package on the UID's
        slot is in force, every account still admitted."""
        n = 4200
        self.start_cluster()
        self.seed_accounts(n)
        now = int(time.time())
        self.ccli("HSET", P + "qpspkg:{c7}:pk1", "feature", "text", "region", "cn-shanghai", "qps", "5",
                  "starts_at", str(now - 10), "expires_at", str(now + 3600))
        self.ccli("SADD", P + "qpspkgs:{c7}", "pk1")
        _, up = start_modstub(self, workers=2)
        url = "cluster://" + ",".join(nd.addr for nd in self.nodes[:2])
        sl = start_sluice(self, [up], "--redis", url, "--admission", "on", "--global-limits", "off",
                          "--metering", "off", "--resync-ms", "500", workers=2)
        poll(lambda: sl.metrics().get("sluice_directory_resyncs_total", 0) >= 1, 10, "first resync")

        def every_account_admitted():  # 10 connections side by side: first lookups come in groups too
            def run(lo, out):
                with harness.HttpConn(sl.port) as c:
                    for i in range(lo, n, 10):
                        c.send(_req(ak=f"AKC{i}"))
                        out.append(c.read_response().status)
            outs = [[] for _ in range(10)]
            ts = [threading.Thread(target=run, args=(k, outs[k]), daemon=True) for k in range(10)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(30)
            self.assertEqual(collections.Counter(x for o in outs for x in o), {200: n})
        every_account_admitted()
        poll(lambda: sl.metrics().get("sluice_directory_accounts", 0) >= n, 10, "every account known")
        r0 = sl.metrics().get("sluice_directory_resyncs_total", 0)
        for m in self.masters():
            m.cli("CONFIG", "RESETSTAT")

        def full_rereads(k, what):
            """k full rereads asked for (the intervals check instead, with
            every change notified)."""
            for _ in range(k):
                r = sl.metrics().get("sluice_directory_resyncs_total", 0)
                self.ccli("PUBLISH", P + "changes", "resync")
                poll(lambda: sl.metrics().get("sluice_directory_resyncs_total", 0) > r, 10, what)
        full_rereads(2, "two resyncs")
        evals = self.eval_calls(cmd="evalsha")  # the directory's scripts go by SHA-1
        resyncs = sl.metrics().get("sluice_directory_resyncs_total", 0) - r0 + 1  # (one may have been under way)
        owners = self.owners()  # per master: its share of the ak: keys, then of the UIDs, 100 to a script
        per_resync = sum(-(-sum(owners[key_slot(f"{P}ak:AKC{i}")] is m for i in range(n)) // 100) +
                         -(-sum(owners[key_slot(f"{{c{i}}}")] is m for i in range(n)) // 100)
                         for m in self.masters())
        per_resync += 2 * len(self.masters())  # the second part: one more script per master and step
        print(f"cluster lookups: {n} accounts, {resyncs:.0f} resync(s) counted: EVALs per master {evals} "
              f"(at most {per_resync} a resync; one per account and resync before)", file=sys.stderr)
        self.assertLessEqual(sum(evals.values()), per_resync * (resyncs + 1), evals)  # + one begun since
        r = harness.http_request(sl.admin, "GET", "/explain?uid=c7&feature=text&region=cn-shanghai")
        self.assertEqual([p["id"] for p in json.loads(r.body.replace(b"\0", b"").decode())["packages"]], ["pk1"])
        # c0's slot half migrated (no key moved): its missing packages set is
        # refused inside its master's script (ASK), so that UID goes on its
        # own, following ASK to the importing master; the others stay grouped
        slot = key_slot("{c0}")
        src = self.master_of(slot)
        dst = next(m for m in self.masters() if m is not src)
        self.addCleanup(lambda: [m.cli("CLUSTER", "SETSLOT", str(slot), "STABLE") for m in (src, dst)])
        dst.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", src.node_id())
        src.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", dst.node_id())
        dst.cli("CONFIG", "RESETSTAT")
        full_rereads(2, "two resyncs, half migrated")
        # (a reread's end is its suspended set's answer: a UID sent on its
        # own after its master's script can answer after it)
        poll(lambda: "cmdstat_asking:calls=" in dst.cli("INFO", "commandstats"), 5,
             "no lookup followed ASK to the importing master")
        every_account_admitted()
        self.assertEqual(sl.metrics().get("sluice_directory_lookup_failures_total", 0), 0)
        self.assertNotIn("account load", sl.stderr())
        self.assertEqual(sl.stop(), 0, sl.stderr()[-2000:])

    @harness.release_only("the fleet's C (cluster scripts included) runs under ASan in unit_fleet and fuzz_fleet_reply; the three instances' admission is what this case adds")
    def test_global_limits(self):
        """Shared limits on a cluster (SPEC 9 and 10): three instances with
        global limits on (the default), one account at R loaded on all three
        for ~5 s, then on one of them for ~5 s: the fleet admits one R each
        time (SPEC 9's bounds as test_global.py checks them). The key's hash is
        share:{<uid>}:<feature>:<region> on the UID's slot."""
        from test_global import AK, UID, FEATURE, REGION, R, LOW, HIGH, Loader, note
        self.start_cluster()
        self.ccli("SET", P + "ak:" + AK, UID)
        self.ccli("HSET", P + "feature:" + FEATURE, "default_qps", str(R))
        _, up = start_modstub(self)
        url = "cluster://" + ",".join(n.addr for n in self.nodes[:2])
        inst = [start_sluice(self, [up], "--redis", url, "--admission", "on", "--global-sync-ms", "100",
                             workers=1) for _ in range(3)]
        for sl in inst:
            poll(lambda: sl.metrics().get("sluice_global_instances") == 3 and
                 sl.metrics().get("sluice_global_limits_mode") == 1 and
                 sl.metrics().get("sluice_directory_resyncs_total", 0) >= 1, 10,
                 "three instances in shared mode " + sl.stderr()[-1500:])
        loaders = [Loader(f"i{i}", sl.port) for i, sl in enumerate(inst)]
        for ld in loaders:
            self.addCleanup(ld.stop)
        t0 = time.monotonic()
        for ld in loaders:
            ld.on.set()
        win_a = (t0 + 1.5, t0 + 6.5)  # after the idle buckets' burst and the first syncs
        time.sleep(win_a[1] - time.monotonic())
        # (b) all of the load on instance 0: its share follows within 1 s
        tm = time.monotonic()
        loaders[1].on.clear()
        loaders[2].on.clear()
        win_b = (tm + 1.0, tm + 6.0)
        time.sleep(win_b[1] - time.monotonic() + 0.3)
        loaders[0].on.clear()
        time.sleep(0.2)

        def window(what, w0, w1, reach):
            T = w1 - w0
            per = [ld.count(w0, w1) for ld in loaders]
            adm, sent = sum(a for a, _ in per), sum(s for _, s in per)
            note(f"cluster: {what}: T={T:.2f}s admitted {adm} of {sent} sent ({adm / T:.1f}/s, R={R}); bounds "
                 f"[{LOW * R * T:.0f}, {HIGH * R * T:.0f}]; per instance " + " ".join(f"{a}/{s}" for a, s in per))
            with self.subTest(what):
                self.assertGreaterEqual(sent, 2 * R * T, "the key must be overloaded")
                self.assertLessEqual(adm, HIGH * R * T)
                self.assertGreaterEqual(sum(per[i][0] for i in reach), LOW * R * T)

        for ld in loaders:
            self.assertEqual({s for _, _, s in ld.results} - {200, 429}, set(), ld.name)
            self.assertEqual(ld.errors, [], ld.name)
        window("(a) load split over 3 instances", *win_a, reach=(0, 1, 2))
        window("(b) load moved to 1 instance", *win_b, reach=(0,))
        for sl in inst:
            m = sl.metrics()
            self.assertEqual(m.get("sluice_global_limits_mode"), 1, sl.admin)
            self.assertGreaterEqual(m.get("sluice_global_coordinated_keys", 0), 1, sl.admin)
        # the key's hash, tagged, on the UID's slot: every instance registered
        hk = P + f"share:{{{UID}}}:{FEATURE}:{REGION}"
        self.assertEqual(key_slot(hk), key_slot("{" + UID + "}"))
        fields = self.master_of(key_slot(hk)).cli("HKEYS", hk).split()
        self.assertEqual(len([f for f in fields if not f.startswith("~")]), 3, fields)  # "~a", "~e": the key's own
        self.assertEqual(self.ccli("EXISTS", P + f"share:{UID}:{FEATURE}:{REGION}").strip(), "0")
        for ld in loaders:
            ld.stop()
        for sl in inst:
            self.assertEqual(sl.stop(timeout=30), 0, sl.stderr()[-2000:])
            for bad in ("Sanitizer", "runtime error:"):
                self.assertNotIn(bad, sl.stderr())
        # a clean stop leaves: no instance left in the zset
        self.assertEqual(self.ccli("ZCARD", P + "share:instances").strip(), "0")

    def test_replay_after_upgrade(self):
        """A spool left by the version before the marks, whose markers were
        per slot and batch (meter:batch:<id>:{<uid>}): batch 1 of u0..u19,
        batch 2 of u0..u19, batch 3 of u0 alone. That version applied batch 1
        on u0..u9's slots (their counts and markers) and batch 3 (u0), then
        stopped. This version replays all three: the slots with an old marker
        are skipped, on a master's script (batch 1) and on a slot's own part
        (batch 3), the others applied: every count once."""
        self.start_cluster()
        spool = tempfile.mkdtemp(prefix="sluice-spool-")
        self.addCleanup(shutil.rmtree, spool, True)
        day = int(time.strftime("%Y%m%d", time.gmtime()))
        stem = "old-instance:00000000000000aa"
        uids = [f"u{i}" for i in range(20)]
        batches = {1: [(u, 3 + i) for i, u in enumerate(uids)], 2: [(u, 100 + i) for i, u in enumerate(uids)],
                   3: [("u0", 1000)]}
        old = {1: uids[:10], 3: ["u0"]}  # the slots the old version applied

        def record(bid, keys):
            p = bytes([len(bid)]) + bid.encode() + struct.pack("<I", len(keys))
            for uid, count in keys:  # feature "-" (255), tier 0, ok, billable, no service; region r1
                p += struct.pack("<I", day) + bytes([255, 0, 0, len(uid), 2, 1, 0]) + uid.encode() + b"r1"
                p += struct.pack("<Q", count)
            return struct.pack("<IB3xII", 0x314D4C53, 4, len(p), zlib.crc32(p)) + p

        with open(os.path.join(spool, "meter.spool"), "wb") as f:
            for seq, keys in batches.items():
                f.write(record(f"{stem}:{seq}", keys))
        want = collections.Counter()
        for seq, keys in batches.items():
            for uid, count in keys:
                want[uid] += count
                if uid in old.get(seq, ()):
                    self.ccli("HINCRBY", f"{P}usage:{day}:{{{uid}}}", "-:-:r1", str(count))
                    self.ccli("SET", f"{P}meter:batch:{stem}:{seq}:{{{uid}}}", "1", "EX", "3600")
        # u0..u9 share masters with other uids: batch 1 goes in masters' scripts
        owners = self.owners()
        self.assertTrue(any(sum(owners[key_slot("{%s}" % u)] is mm for u in uids) > 1 for mm in self.masters()))
        _, up = start_modstub(self, workers=1)
        url = "cluster://" + ",".join(nd.addr for nd in self.nodes[:2])
        sl = start_sluice(self, [up], "--redis", url, "--admission", "off", "--flush-ms", "200",
                          "--spool-dir", spool)
        poll(lambda: sl.metrics().get("sluice_meter_queue_batches", 1) == 0, 20, "the replayed batches in Redis")
        m = sl.metrics()
        self.assertEqual(sl.stop(timeout=30), 0, sl.stderr()[-2000:])
        self.assertEqual(m.get("sluice_meter_batches_replayed_total"), 3, m)
        self.assertEqual(m.get("sluice_meter_batches_applied_total", 0) +
                         m.get("sluice_meter_batches_deduplicated_total", 0), 3, m)
        got = self.usage_by_uid()
        self.assertEqual(dict(got), dict(want), sl.stderr()[-2000:])
        marks = self.scan_keys(P + "meter:hwm:*")
        self.assertEqual({k.split("}:", 1)[1] for k in marks}, {stem})
        self.assertEqual(sorted(v for v, _ in marks.values()), ["2"] * len({key_slot("{%s}" % u) for u in uids}))
        markers = [k for k in self.scan_keys(P + "meter:batch:*") if ":{u" in k]
        self.assertEqual(len(markers), 11, markers)  # the old ones only
        print(f"cluster replay after upgrade: usage per uid == spool's counts, {len(marks)} marks, "
              f"old markers honoured", file=sys.stderr)

    def set_marks_ttl(self, ttl, drop):
        """Every high-water mark's TTL set to ttl, but the first `drop` found
        deleted. Returns ({mark: value} of those kept, [marks deleted])."""
        kept, gone = {}, []
        for c, k in self.each_key(P + "meter:hwm:*"):
            if len(gone) < drop:
                c.cmd("DEL", k)
                gone.append(k)
            else:
                c.cmd("EXPIRE", k, str(ttl))
                kept[k] = c.cmd("GET", k)
        return kept, gone

    @harness.release_only("a count of Redis's script calls; every other case sends the same scripts under ASan")
    def test_script_per_master(self):
        """300 accounts, a flush every 0.5 s: each master gets one script per
        batch for all of its accounts' slots (at most 2 EVALs per batch with
        the stream entry's), not one per slot (about 100 per batch here).
        Marks written again within the hour keep their TTL (KEEPTTL: set
        lower here, it stays); a mark that is gone comes back with 7 days."""
        n = 300
        sl, up, counts = self.start_accounts(n, "--flush-ms", "500")
        poll(lambda: sl.metrics().get("sluice_meter_batches_applied_total", 0) >= 1 and
             sl.metrics().get("sluice_meter_queue_batches", 1) == 0, 10, "the look-ups' counts in Redis")
        time.sleep(0.6)  # one more flush: nothing of the look-up phase left
        kept, gone = self.set_marks_ttl(100000, 3)
        self.assertGreater(len(kept), 100)
        for m in self.masters():
            m.cli("CONFIG", "RESETSTAT")
        b0 = sl.metrics().get("sluice_meter_batches_total", 0)
        stop, lock = threading.Event(), threading.Lock()
        ts = self.load_accounts(sl, n, stop, counts, lock)
        time.sleep(3.0)
        stop.set()
        for t in ts:
            t.join(10)
        poll(lambda: sl.metrics().get("sluice_meter_queue_batches", 1) == 0 and
             sl.metrics().get("sluice_meter_batches_total", 0) > b0, 10, "the load's batches in Redis")
        time.sleep(0.6)
        m = sl.metrics()
        batches = m.get("sluice_meter_batches_total", 0) - b0
        sends = batches + m.get("sluice_meter_batches_retried_total", 0)
        evals = self.eval_calls()
        print(f"cluster script per master: {batches} batches ({sends} sends), EVAL calls per master {evals}",
              file=sys.stderr)
        self.assertGreaterEqual(batches, 3)
        for port, calls in evals.items():
            self.assertLessEqual(calls, 2 * sends + 2, f"master {port}: EVALs {evals} for {batches} batches")
        marks = self.scan_keys(P + "meter:hwm:*")
        again = [k for k in kept if k in marks and marks[k][0] != kept[k]]
        self.assertGreater(len(again), len(kept) // 2, "marks written again by the load")
        self.assertEqual([k for k in again if not 0 < marks[k][1] <= 100000], [], "a mark's TTL renewed")
        back = [k for k in gone if k in marks]
        self.assertTrue(back, "no deleted mark written again")
        self.assertEqual([k for k in back if marks[k][1] < 604000], [], "a new mark without its 7 days")
        self.check_accounts(sl, up, counts, "script per master")


if __name__ == "__main__":
    unittest.main()
