"""Shared helpers for sluice's integration tests (Python 3 standard library only).

Every test that starts a process must stop it by its PID, also when the test
fails: register the stop with ``self.addCleanup`` right after the start, e.g.

    stub = harness.start_process([harness.bin_path("modstub"),
                                  "--listen", f"127.0.0.1:{port}"], port)
    self.addCleanup(harness.stop_process, stub)

What is here:
- ``bin_path(name)``: a binary under test, from $SLUICE_BIN.
- ``free_port()``: a loopback TCP port that is free right now.
- ``wait_port(port)``: wait until 127.0.0.1:port accepts connections.
- ``start_process(argv, port)`` / ``stop_process(proc)``: run a server and wait
  until it listens; stop it with SIGTERM, then SIGKILL after a bound.
- ``HttpConn``: a raw-socket HTTP/1.1 client. It sends arbitrary bytes, keeps
  the connection alive, pipelines, and parses responses framed by
  Content-Length, chunked encoding or the end of the connection.
- ``start_redis()``: a throw-away redis-server on a free loopback port.
- ``ClassOwner(cls)``: a class's addClassCleanup where a test's addCleanup
  is wanted, for a fixture its cases share (setUpClass).
- ``fnv1a64(data)``: the body hash that modstub's /echo reports.

Everything binds 127.0.0.1 only and every wait is bounded.
"""

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

HOST = "127.0.0.1"


def bin_path(name):
    """Path of the binary `name` under test ($SLUICE_BIN, else build/bin)."""
    base = os.environ.get("SLUICE_BIN")
    if not base:
        base = os.path.join(os.path.dirname(__file__), "..", "..", "build", "bin")
    return os.path.join(os.path.abspath(base), name)


def release_only(why, sanitizers=("address", "thread")):
    """Skips a test case (or class) on a tree built with one of `sanitizers`
    (SLUICE_SANITIZE, set by CTest): for cases whose C paths other cases
    already run under them, so that the suite keeps to its time budget.
    `why` names those cases; the skip says it."""
    import unittest
    san = os.environ.get("SLUICE_SANITIZE", "")
    return unittest.skipIf(any(x in san for x in sanitizers), f"not on the {san} tree: {why}")


class ClassOwner:
    """Stands for a test where a fixture is shared by the cases of a class
    (made in setUpClass): what wants a test's addCleanup (proxyenv's
    start_modstub and start_sluice, a Node of test_cluster_proxy) gets the
    class's addClassCleanup, run after its last case."""

    def __init__(self, cls):
        self.addCleanup = cls.addClassCleanup


# Ports handed out by any test process of this machine: one file each
# (O_EXCL), so that two test files run at once (ctest -j) are never told the
# same port. sluice and modstub listen with SO_REUSEPORT, and two processes
# of one user may both bind a port that way: the kernel then splits the
# connections between them (seen: a test's request answered by another
# test's sluice). Files older than an hour are a killed run's.
_PORTS_DIR = os.path.join(tempfile.gettempdir(), "sluice-test-ports")
_MINE = set()  # this process's: never handed twice


def _reserve(port):
    os.makedirs(_PORTS_DIR, exist_ok=True)
    path = os.path.join(_PORTS_DIR, str(port))
    if path in _MINE:
        return False
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        try:
            if time.time() - os.stat(path).st_mtime < 3600:
                return False
            os.utime(path)
        except FileNotFoundError:
            return False
    _MINE.add(path)
    return True


def _release_ports():
    for path in _MINE:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


atexit.register(_release_ports)


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on at the time of the
    call and that no test process, this one included, was handed before
    (_reserve): the kernel may give the same ephemeral port to two binds in
    a row (seen: a sluice told to listen and serve its admin on one port)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if _reserve(port):
            return port


def wait_port(port, timeout=10.0, proc=None, host=HOST):
    """Waits until host:port accepts a TCP connection.

    Raises RuntimeError when `proc` (a Popen) exits first, TimeoutError after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} "
                               f"before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing accepts on {host}:{port} after {timeout}s")
        time.sleep(0.02)


def start_process(argv, port=None, env=None, timeout=10.0, stdout=None, stderr=None):
    """Starts argv and, when `port` is given, waits until it accepts there.

    `env` entries are added to the current environment. Output goes to the
    test's own stdout/stderr unless other files are given. Returns the Popen;
    the caller stops it with stop_process (use addCleanup). If the process
    does not come up, it is stopped before the error is raised."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    proc = subprocess.Popen(argv, env=full_env, stdin=subprocess.DEVNULL,
                            stdout=stdout, stderr=stderr)
    if port is not None:
        try:
            wait_port(port, timeout=timeout, proc=proc)
        except BaseException:
            stop_process(proc)
            raise
    return proc


def stop_process(proc, timeout=10.0):
    """Stops `proc` by its PID: SIGTERM, then SIGKILL when it is still running
    after `timeout` seconds. Returns its exit status (negative: killed by that
    signal). Safe to call twice."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    return proc.returncode


def fnv1a64(data):
    """FNV-1a 64-bit hash of `data` (bytes) as 16 hex digits: the form of
    modstub's /echo field "body_fnv1a64"."""
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


class Response:
    """One parsed HTTP response.

    status (int), reason (str), version (e.g. "HTTP/1.1"), headers (list of
    (name, value) str pairs in order), body (bytes, de-chunked), framing
    ("length", "chunked", "close" or "none"), raw_head (bytes)."""

    def __init__(self, version, status, reason, headers, body, framing, raw_head):
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.framing = framing
        self.raw_head = raw_head

    def header(self, name, default=None):
        """The last value of header `name` (case-insensitive), or default."""
        name = name.lower()
        for k, v in reversed(self.headers):
            if k.lower() == name:
                return v
        return default

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return f"<Response {self.status} {self.framing} {len(self.body)} bytes>"


class IncompleteResponse(Exception):
    """The connection ended before a whole response arrived; `.data` holds
    the bytes that did arrive (headers included)."""

    def __init__(self, msg, data):
        super().__init__(msg)
        self.data = data


class HttpConn:
    """A raw HTTP/1.1 client connection to host:port.

    Use send() for arbitrary bytes, request() to build and send one request,
    read_response() to parse the next response. Several requests may be sent
    before reading (pipelining); responses come back in order. Every read
    waits at most `timeout` seconds (socket.timeout otherwise)."""

    def __init__(self, port, host=HOST, timeout=10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.eof = False

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data):
        self.sock.sendall(data)

    @staticmethod
    def build(method="GET", path="/", headers=None, body=b"", version="HTTP/1.1",
              host="modstub"):
        """Bytes of one request. `headers` is a list of pairs or a dict; Host
        and Content-Length are added unless given (None as host: no Host)."""
        if isinstance(body, str):
            body = body.encode()
        pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        names = {k.lower() for k, _ in pairs}
        if host is not None and "host" not in names:
            pairs.insert(0, ("Host", host))
        if body and "content-length" not in names and "transfer-encoding" not in names:
            pairs.append(("Content-Length", str(len(body))))
        head = f"{method} {path} {version}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in pairs)
        return head.encode("latin-1") + b"\r\n" + body

    def request(self, method="GET", path="/", headers=None, body=b"", version="HTTP/1.1",
                read=True):
        """Sends one request; returns its Response when `read` (else None)."""
        self.send(self.build(method, path, headers, body, version))
        if read:
            return self.read_response(head=(method == "HEAD"))
        return None

    def _fill(self):
        """Reads more bytes into self.buf; returns False at EOF."""
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _line(self):
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise IncompleteResponse("connection closed in the head", self.buf)
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n:
            if not self._fill():
                raise IncompleteResponse(f"connection closed with {len(self.buf)} of "
                                         f"{n} body bytes", self.buf)
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_response(self, head=False):
        """Parses the next response. `head`: it answers a HEAD request (no
        body). Raises IncompleteResponse when the connection ends first."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise IncompleteResponse("connection closed before a full head", self.buf)
        raw_head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = raw_head.decode("latin-1").split("\r\n")
        version, status, *rest = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers.append((k.strip(), v.strip()))
        resp = Response(version, int(status), rest[0] if rest else "", headers, b"",
                        "none", raw_head)
        status = resp.status
        te = (resp.header("Transfer-Encoding") or "").lower()
        cl = resp.header("Content-Length")
        if head or status in (204, 304) or 100 <= status < 200:
            return resp
        if "chunked" in te:
            resp.framing = "chunked"
            body = b""
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line() != b"":  # trailers
                        pass
                    break
                body += self._exact(size)
                if self._exact(2) != b"\r\n":
                    raise ValueError("bad chunk end")
            resp.body = body
        elif cl is not None:
            resp.framing = "length"
            try:
                resp.body = self._exact(int(cl))
            except IncompleteResponse as e:
                raise IncompleteResponse(str(e), raw_head + b"\r\n\r\n" + e.data) from None
        else:
            resp.framing = "close"
            while self._fill():
                pass
            resp.body, self.buf = self.buf, b""
        return resp

    def read_responses(self, n, head=False):
        return [self.read_response(head=head) for _ in range(n)]

    def read_until_close(self):
        """All bytes until the peer closes (bounded by the socket timeout)."""
        while self._fill():
            pass
        data, self.buf = self.buf, b""
        return data

    def closed_by_peer(self, wait=2.0):
        """True when the peer closes the connection within `wait` seconds
        without sending anything more (data raises AssertionError)."""
        self.sock.settimeout(wait)
        try:
            more = self._fill()
        except socket.timeout:
            return False
        if more:
            raise AssertionError(f"unexpected bytes: {self.buf[:200]!r}")
        return True


def http_request(port, method="GET", path="/", headers=None, body=b"", timeout=10.0):
    """One request on a fresh connection; returns the Response."""
    with HttpConn(port, timeout=timeout) as c:
        return c.request(method, path, headers, body)


class Redis:
    """A redis-server started by start_redis(); stop() ends it and removes its
    directory."""

    def __init__(self, proc, port, tmpdir):
        self.proc = proc
        self.port = port
        self.tmpdir = tmpdir
        self.addr = f"{HOST}:{port}"

    def cli(self, *args):
        """Runs redis-cli against this server; returns its stdout (str)."""
        out = subprocess.run(["redis-cli", "-h", HOST, "-p", str(self.port), *args],
                             check=True, capture_output=True, text=True, timeout=10)
        return out.stdout

    def stop(self):
        stop_process(self.proc)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def start_redis(extra_args=(), timeout=10.0):
    """Starts redis-server on a free loopback port with its own temporary
    directory, no snapshots and no AOF. Returns a Redis; call .stop() (use
    addCleanup)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not found")
    tmpdir = tempfile.mkdtemp(prefix="sluice-redis-")
    port = free_port()
    argv = [exe, "--port", str(port), "--bind", HOST, "--dir", tmpdir,
            "--save", "", "--appendonly", "no", "--daemonize", "no", *extra_args]
    try:
        proc = start_process(argv, port, timeout=timeout, stdout=subprocess.DEVNULL)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    return Redis(proc, port, tmpdir)
