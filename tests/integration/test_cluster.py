"""Redis Cluster routing (issue 14, SPEC 10): a real 3-master cluster made by
`redis-cli --cluster create` on loopback, and cluster_router (a C program on
proxy/redis/cluster_client.h) driving it: MOVED before the map, the map from
CLUSTER SLOTS, a finished reshard (MOVED, map reloaded), a slot being
migrated (ASK; TRYAGAIN retried, then answered), the command's own errors,
and a stop with a command in flight. Every server is stopped by its PID."""

import subprocess
import sys
import time
import unittest

import harness


class ClusterRouterTest(unittest.TestCase):
    def start_cluster(self):
        nodes = []
        for _ in range(3):
            r = harness.start_redis(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                     "--cluster-node-timeout", "2000",
                                     # the bus port chosen, not port + 10000 (over 65535 for a
                                     # port above 55535: the server exits)
                                     "--cluster-port", str(harness.free_port())])
            self.addCleanup(r.stop)
            nodes.append(r)
        subprocess.run(["redis-cli", "--cluster", "create", *[n.addr for n in nodes], "--cluster-yes"],
                       check=True, capture_output=True, text=True, timeout=20)
        # every node says ok and knows the three masters' ranges
        deadline = time.monotonic() + 15
        while True:
            ready = all("cluster_state:ok" in n.cli("CLUSTER", "INFO") and
                        n.cli("CLUSTER", "SLOTS").count("\n") > 0 and
                        "cluster_known_nodes:3" in n.cli("CLUSTER", "INFO") for n in nodes)
            if ready:
                return nodes
            self.assertLess(time.monotonic(), deadline, "the cluster did not come up")
            time.sleep(0.1)

    def test_router(self):
        t0 = time.monotonic()
        nodes = self.start_cluster()
        out = subprocess.run([harness.bin_path("cluster_router"), *[str(n.port) for n in nodes]],
                             capture_output=True, text=True, timeout=60)
        sys.stdout.write(out.stdout)
        sys.stderr.write(out.stderr)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.count("ok:"), 6)
        print(f"cluster test: {time.monotonic() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    unittest.main()
