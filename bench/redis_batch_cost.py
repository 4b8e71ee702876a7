#!/usr/bin/env python3
"""Redis's CPU per metering key when a batch is applied by a Lua script
(what one server did before d7b455f, and what a Redis Cluster does) or by
a MULTI/EXEC transaction (one server and Sentinel since then).

A fresh redis-server on 127.0.0.1 (no persistence), keyspace notifications
on as sluice sets them and one subscriber with the directory's patterns;
N batches of K keys (a calls HINCRBY and a usage HINCRBY per key over
10,000 accounts), then redis-server's utime+stime per key, net of its idle
floor. Usage: bench/redis_batch_cost.py [script|multi ...] (both, in turn,
by default). Stdlib only; the server is stopped by its PID."""
import os
import random
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


def run(variant):
    d = tempfile.mkdtemp(prefix="redis-batch-cost-")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", d], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                s = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                time.sleep(0.05)
        s.sendall(enc("CONFIG", "SET", "notify-keyspace-events", "Kg$shxe"))
        read_until(s, b"\r\n")
        sub = socket.create_connection(("127.0.0.1", port))
        for pat in ["ak:*", "suspended", "feature:*", "qpspkgs:*", "qpspkg:*"]:
            sub.sendall(enc("PSUBSCRIBE", "__keyspace@0__:sluice:" + pat))
        time.sleep(0.3)
        rd = random.Random(1)
        c0, t0 = cpu_ms(p.pid), time.monotonic()
        for bi in range(BATCHES):
            keys = [("u%d" % rd.randrange(ACCOUNTS), rd.choice(FEATURES), rd.randint(1, 9))
                    for _ in range(KEYS_PER_BATCH)]
            marker = "sluice:meter:batch:b%d" % bi
            deltas = "x" * (40 * KEYS_PER_BATCH)
            if variant == "script":
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
        print(f"{variant}: {n} keys, redis-server CPU {c1 - c0:.0f} ms (idle floor {floor:.0f} ms/s): "
              f"{net * 1000 / n:.2f} us per key")
    finally:
        p.kill()
        p.wait()
        subprocess.run(["rm", "-rf", d])


if __name__ == "__main__":
    for v in sys.argv[1:] or ["script", "multi"]:
        if v not in ("script", "multi"):
            sys.exit(f"unknown variant {v}: script or multi")
        run(v)
