"""Starting sluice and its backends for the proxy's integration tests.

Builds on harness.py: every process is stopped by PID through addCleanup."""

import atexit
import os
import shutil
import tempfile

import harness


def start_modstub(test, *args, workers=1):
    """A modstub on a free port; returns (proc, port)."""
    port = harness.free_port()
    proc = harness.start_process([harness.bin_path("modstub"), "--listen", f"127.0.0.1:{port}",
                                  "--workers", str(workers), *args], port)
    test.addCleanup(harness.stop_process, proc)
    return proc, port


class Sluice:
    """A running sluice: .port (client), .admin (admin port), .proc, .log
    (path of its stderr), .stop() (SIGTERM, returns the exit code)."""

    def __init__(self, proc, port, admin, log, tmpdir):
        self.proc, self.port, self.admin, self.log, self.tmpdir = proc, port, admin, log, tmpdir

    def stop(self, timeout=15.0):
        rc = harness.stop_process(self.proc, timeout=timeout)
        if rc != 0 and not getattr(self, "_told", False):
            # A crash or a sanitizer report: show it where the test log is read.
            self._told = True
            print(f"--- sluice exited with {rc}; its stderr ends:\n{self.stderr()[-6000:]}", flush=True)
        return rc

    def stderr(self):
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()

    def metrics(self):
        """The /metrics page parsed into {series: value}."""
        resp = harness.http_request(self.admin, "GET", "/metrics")
        out = {}
        for line in resp.body.decode().splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out


def start_sluice(test, upstreams, *args, workers=2, config=None, llm=(), redis=None, admission=None):
    """Starts sluice in front of `upstreams` (ports); `args` are more options;
    `config` is YAML text for -c; `redis` a harness.Redis (admission on) or
    None (admission off: a plain proxy, as the core's tests want). Returns a
    Sluice."""
    port, admin = harness.free_port(), harness.free_port()
    tmpdir = tempfile.mkdtemp(prefix="sluice-test-")
    # Removed when the test process ends: tests read logs during their cleanups.
    atexit.register(shutil.rmtree, tmpdir, True)
    argv = [harness.bin_path("sluice"), "--listen", f"127.0.0.1:{port}",
            "--admin", f"127.0.0.1:{admin}", "--workers", str(workers)]
    if config is not None:
        path = os.path.join(tmpdir, "sluice.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(config)
        argv += ["-c", path]
    for u in upstreams:
        argv += ["--upstream", f"127.0.0.1:{u}"]
    for u in llm:
        argv += ["--upstream-llm", f"127.0.0.1:{u}"]
    if redis is not None:
        argv += ["--redis", redis.addr]
    else:
        argv += ["--redis", f"127.0.0.1:{harness.free_port()}"]
    if admission is None:
        admission = "on" if redis is not None else "off"
    argv += ["--admission", admission]
    if not any(a == "--spool-dir" for a in args):
        argv += ["--spool-dir", os.path.join(tmpdir, "spool")]
    argv += list(args)
    log = os.path.join(tmpdir, "stderr.log")
    errf = open(log, "wb")
    test.addCleanup(errf.close)
    proc = harness.start_process(argv, port, stderr=errf)
    harness.wait_port(admin, proc=proc)
    s = Sluice(proc, port, admin, log, tmpdir)
    test.addCleanup(s.stop)
    return s
