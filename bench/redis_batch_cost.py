#!/usr/bin/env python3
"""Redis's CPU per metering key when a batch is applied by a Lua script
(what one server did before d7b455f) or by a MULTI/EXEC transaction (one
server and Sentinel since then), and on a Redis Cluster node (issue 14) by
the flusher's master_script (read from proxy/metering/flusher.c) or by a
transaction per slot (tried for a batch's first send and withdrawn: it
reads no mark; bench/README.md, issue 14's last look). To see where a
cluster's cost goes: cluster-script-ex renews every mark's TTL (as before
776c4ce), cluster-script-bare and cluster-multi-bare apply the counts with
no mark and no probe (their floors: nothing is exactly-once there).

A fresh redis-server on 127.0.0.1 (no persistence; for the cluster
variants cluster-enabled, every slot its own), keyspace notifications on as
sluice sets them and one subscriber with the directory's patterns; N
batches of K keys (a calls HINCRBY and a usage HINCRBY per key over 10,000
accounts, UIDs as hash tags on the cluster), then redis-server's
utime+stime per key, net of its idle floor. Usage:
bench/redis_batch_cost.py [--accounts-per-slot N]
                          [script|multi|cluster-script|cluster-multi ...]
(all, in turn, by default). Stdlib only; the server is stopped by its
PID.

By default each batch's keys are drawn at random from 10,000 accounts (a
batch touches ~2,300 slots, one key in most). --accounts-per-slot N does
what the flusher does with a flush of N * 16,384 accounts, each seen once:
keys in slot order (flusher.c, slot_order), so a batch is every account of
a run of consecutive slots, N keys per slot: how a slot's mark is shared
by its keys as accounts grow."""
import binascii
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time

SCRIPT = (  # the script one server used: marker, HINCRBYs, SADD, stream entry
    "if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', 604800) then return 0 end "
    "local n, b = tonumber(ARGV[1]), 2 "
    "for i = 1, n do "
    "  redis.call('HINCRBY', ARGV[b], ARGV[b + 1], ARGV[b + 2]) "
    "  redis.call('HINCRBY', ARGV[b + 3], ARGV[b + 4], ARGV[b + 2]) "
    "  b = b + 5 "
    "end "
    "redis.call('SADD', ARGV[b], unpack(ARGV, b + 1, b + n)) "
    "redis.call('XADD', 'sluice:usage:stream', 'MAXLEN', '~', '2000', '*', 'deltas', ARGV[b + n + 1]) "
    "return 1")
BATCHES, KEYS_PER_BATCH, ACCOUNTS = 20, 2500, 10000
FEATURES = ["text", "image", "voice", "video"]
VARIANTS = ("script", "multi", "cluster-script", "cluster-script-ex", "cluster-script-bare", "cluster-multi",
            "cluster-multi-bare")


def flusher_script(name):
    """A Lua script of the flusher's, from its C source (the text the
    flusher sends, not a copy that could drift)."""
    src = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "proxy", "metering",
                            "flusher.c")).read()
    body = re.search(r"static const char %s\[\] =\n(.*?);\n" % name, src, re.S).group(1)
    keys_h = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "proxy", "redis", "keys.h")).read()
    # a macro between the literals (SL_USAGE_STREAM_MAXLEN): its string
    body = re.sub(r"\b(SL_[A-Z_]+)\b", lambda m: re.search(r'#define %s (".*?")' % m.group(1), keys_h).group(1), body)
    return "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', body)).replace("\\n", "\n").replace("\\'", "'")


MASTER_SCRIPT = None  # set at start (flusher_script)
STREAM_SCRIPT = None
BARE_SCRIPT = None  # master_script without its probe and mark: what a script's HINCRBYs cost alone


def bare(script):
    """master_script with no MGET of probe and mark and no SET of the mark
    (nothing checked, nothing marked: not something to run for real)."""
    out = script.replace("local r = redis.pcall('MGET', ARGV[b + 1], ARGV[b]) ", "local r = {} ")
    out = out.replace("s <= (tonumber(r[2]) or 0)", "false")
    out = re.sub(r"if r\[2\] and .*? end ", "", out, count=1)
    if out.count("redis.call('HINCRBY'") != 2 or "MGET" in out or "'SET'" in out:
        sys.exit("redis_batch_cost: master_script changed; bare() no longer applies")
    return out


def slot(uid):
    return binascii.crc_hqx(uid.encode(), 0) % 16384  # CRC16-XMODEM, Redis Cluster's


def enc(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def read_until(s, end):
    got = b""
    while not got.endswith(end):
        more = s.recv(1 << 20)
        if not more:
            raise RuntimeError("redis closed the connection")
        got += more
    return got


def cpu_ms(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cluster_batch(s, variant, keys, seq, deltas):
    """One batch as the flusher sends it to a cluster's master: its slots'
    keys by slot, each slot's counts with its mark, then the day's SADD and
    the stream entry (its own script)."""
    by_slot = {}
    for uid, f, n in keys:
        by_slot.setdefault(slot(uid), []).append((uid, f, n))
    out = []
    if variant.startswith("cluster-script"):
        a = [len(by_slot), seq]
        # the mark's TTL kept (''): renewed once an hour, or when it is new
        # (the script's); -ex: renewed at every write (before 776c4ce)
        renew = "1" if variant == "cluster-script-ex" else ""
        for ks in by_slot.values():
            t = ks[0][0]
            body = []
            for uid, f, n in ks:
                body += ["sluice:calls:20261201:{%s}" % uid, f + ":cn-shanghai:ok", n,
                         "sluice:usage:20261201:{%s}" % uid, 1, f + ":baselineCheck:cn-shanghai"]
            a += ["sluice:meter:hwm:{%s}:i1:e1" % t, "sluice:meter:probe:{%s}" % t, "", renew, len(ks), len(body)] + body
        out.append(enc("EVAL", BARE_SCRIPT if variant == "cluster-script-bare" else MASTER_SCRIPT, 0, *a))
    else:
        for ks in by_slot.values():
            out.append(enc("MULTI"))
            if variant != "cluster-multi-bare":
                out.append(enc("SET", "sluice:meter:hwm:{%s}:i1:e1" % ks[0][0], seq, "EX", 604800))
            for uid, f, n in ks:
                out.append(enc("HINCRBY", "sluice:calls:20261201:{%s}" % uid, f + ":cn-shanghai:ok", n))
                out.append(enc("HINCRBY", "sluice:usage:20261201:{%s}" % uid, f + ":baselineCheck:cn-shanghai", n))
            out.append(enc("EXEC"))
    out.append(enc("SADD", "sluice:usage:20261201", *sorted({k[0] for k in keys})))
    out.append(enc("EVAL", STREAM_SCRIPT, 2, "sluice:meter:batch:i1:e1:%d:{x}" % seq, "sluice:usage:stream",
                   "i1:e1:%d" % seq, len(keys), deltas))
    out.append(enc("PING"))
    s.sendall(b"".join(out))
    read_until(s, b"+PONG\r\n")


def slot_ordered_batches(rd, per_slot):
    """BATCHES batches of KEYS_PER_BATCH keys as the flusher makes them from
    a flush of per_slot * 16,384 accounts, one key each: in slot order, so
    each batch is every account of a run of slots (from a random start)."""
    by_slot = {}
    for i in range(per_slot * 16384):
        by_slot.setdefault(slot("u%d" % i), []).append("u%d" % i)
    out, s = [], rd.randrange(16384)
    for _ in range(BATCHES):
        keys = []
        while len(keys) < KEYS_PER_BATCH:
            keys += [(uid, rd.choice(FEATURES), rd.randint(1, 9)) for uid in by_slot.get(s, [])]
            s = (s + 1) % 16384
        out.append(keys[:KEYS_PER_BATCH])
    return out


def run(variant, per_slot=0):
    d = tempfile.mkdtemp(prefix="redis-batch-cost-")
    port = free_port()
    cluster = variant.startswith("cluster-")
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", d] +
                         # the bus port chosen: port + 10000 is over 65535 for a port above 55535
                         (["--cluster-enabled", "yes", "--cluster-config-file", d + "/nodes.conf",
                           "--cluster-port", str(free_port())] if cluster else []),
                         stdout=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                s = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                time.sleep(0.05)
        if cluster:  # one node serving every slot: what one master does for its slots
            s.sendall(enc("CLUSTER", "ADDSLOTSRANGE", 0, 16383))
            read_until(s, b"\r\n")
            while True:
                s.sendall(enc("CLUSTER", "INFO"))
                if b"cluster_state:ok" in read_until(s, b"\r\n\r\n"):
                    break
                time.sleep(0.1)
        s.sendall(enc("CONFIG", "SET", "notify-keyspace-events", "Kg$shxe"))
        read_until(s, b"\r\n")
        sub = socket.create_connection(("127.0.0.1", port))
        for pat in ["ak:*", "suspended", "feature:*", "qpspkgs:*", "qpspkg:*"]:
            sub.sendall(enc("PSUBSCRIBE", "__keyspace@0__:sluice:" + pat))
        time.sleep(0.3)
        rd = random.Random(1)
        batches = slot_ordered_batches(rd, per_slot) if per_slot else None
        c0, t0 = cpu_ms(p.pid), time.monotonic()
        groups = 0  # (batch, slot) pairs: a cluster's marks
        for bi in range(BATCHES):
            if batches:
                keys = batches[bi]
            else:
                keys = [("u%d" % rd.randrange(ACCOUNTS), rd.choice(FEATURES), rd.randint(1, 9))
                        for _ in range(KEYS_PER_BATCH)]
            groups += len({slot(k[0]) for k in keys})
            marker = "sluice:meter:batch:b%d" % bi
            deltas = "x" * (40 * KEYS_PER_BATCH)
            if cluster:
                cluster_batch(s, variant, keys, bi + 1, deltas)
            elif variant == "script":
                a = [len(keys)]
                for uid, f, n in keys:
                    a += ["sluice:calls:20261201:" + uid, f + ":cn-shanghai:ok", n,
                          "sluice:usage:20261201:" + uid, f + ":baselineCheck:cn-shanghai"]
                a += ["sluice:usage:20261201"] + [k[0] for k in keys] + [deltas]
                s.sendall(enc("EVAL", SCRIPT, 1, marker, *a))
                assert read_until(s, b"\r\n").startswith(b":1")
            else:
                s.sendall(enc("WATCH", marker) + enc("GET", marker))
                read_until(s, b"$-1\r\n")
                out = [enc("MULTI"), enc("SET", marker, 1, "EX", 604800)]
                for uid, f, n in keys:
                    out.append(enc("HINCRBY", "sluice:calls:20261201:" + uid, f + ":cn-shanghai:ok", n))
                    out.append(enc("HINCRBY", "sluice:usage:20261201:" + uid, f + ":baselineCheck:cn-shanghai", n))
                out.append(enc("SADD", "sluice:usage:20261201", *[k[0] for k in keys]))
                out.append(enc("XADD", "sluice:usage:stream", "MAXLEN", "~", 2000, "*", "deltas", deltas))
                out.append(enc("EXEC"))
                out.append(enc("PING"))
                s.sendall(b"".join(out))
                read_until(s, b"+PONG\r\n")
            time.sleep(0.02)
        time.sleep(0.3)
        c1, t1 = cpu_ms(p.pid), time.monotonic()
        time.sleep(1.0)
        floor = cpu_ms(p.pid) - c1  # ms over 1 s
        net = c1 - c0 - floor * (t1 - t0)
        n = BATCHES * KEYS_PER_BATCH
        where = f", {per_slot} accounts per slot, slot-ordered" if per_slot else ""
        print(f"{variant}{where}: {n} keys in {groups} slot groups, redis-server CPU {c1 - c0:.0f} ms (idle floor {floor:.0f} ms/s): "
              f"{net * 1000 / n:.2f} us per key")
    finally:
        p.kill()
        p.wait()
        subprocess.run(["rm", "-rf", d])


if __name__ == "__main__":
    MASTER_SCRIPT, STREAM_SCRIPT = flusher_script("master_script"), flusher_script("stream_script")
    BARE_SCRIPT = bare(MASTER_SCRIPT)
    args, per_slot = sys.argv[1:], 0
    if args[:1] == ["--accounts-per-slot"]:
        if len(args) < 2 or not args[1].isdigit() or not 1 <= int(args[1]) <= 64:
            sys.exit("--accounts-per-slot takes a number from 1 to 64")
        per_slot, args = int(args[1]), args[2:]
    for v in args or VARIANTS:
        if v not in VARIANTS:
            sys.exit(f"unknown variant {v}: one of {', '.join(VARIANTS)}")
        run(v, per_slot)
