"""A small TCP proxy on 127.0.0.1 for fault injection (Python 3 stdlib only).

    fp = tcpfault.FaultProxy(redis_port, marker=b"meter:batch")
    test.addCleanup(fp.close)
    ... point the program under test at 127.0.0.1:fp.port ...

Every accepted connection is relayed to 127.0.0.1:target_port by two
threads. While `cuts` is above zero, the first client-to-server chunk that
contains `marker` arms its connection (the marker may straddle two reads): the
command is forwarded in full, and when the server's next bytes (the reply to
that command) arrive they are dropped and both sides of that one connection
are closed. So the server has executed the command but the client never sees
the answer. With `pass_replies` (e.g. (b"+OK\r\n", b"+QUEUED\r\n")), an
armed connection still relays those replies first: the reply dropped is the
first other one (a transaction's EXEC, after the QUEUED answers of the
commands sent with it). With `replay_from` (e.g. MULTI as the client sends
it, or a command's name as a bulk string, `$4\r\nEVAL\r\n`, which
replays from that command's array header), an armed connection loses nothing: the client's bytes from the last
`replay_from` through the armed chunk are first sent on a connection of the
proxy's own and executed there (a transaction applied by someone else
first), then the chunk goes on as usual. Other connections are relayed
untouched. `dropped` lists the
replies that were swallowed (bytes), `connections` counts accepted ones.

Every thread polls a stop flag with short socket timeouts; close() ends them
all within a bounded time."""

import socket
import threading

HOST = "127.0.0.1"
POLL = 0.2


class _Pair:
    def __init__(self, client, server):
        self.client, self.server = client, server
        self.armed = False
        self.closed = False
        self.lock = threading.Lock()

    def close(self):
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for s in (self.client, self.server):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class FaultProxy:
    def __init__(self, target_port, marker=b"meter:batch", cuts=1, pass_replies=(), replay_from=None):
        self.target_port = target_port
        self.marker = marker
        self.pass_replies = tuple(pass_replies)
        self.replay_from = replay_from
        self.replayed = []  # the first bytes of each reply the replays got
        self.cuts = cuts
        self.dropped = []
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pairs = []
        self._threads = []
        self._ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._ls.bind((HOST, 0))
        self._ls.listen(64)
        self._ls.settimeout(POLL)
        self.port = self._ls.getsockname()[1]
        self.addr = f"{HOST}:{self.port}"
        t = threading.Thread(target=self._accept_loop, name="tcpfault-accept", daemon=True)
        t.start()
        self._threads.append(t)

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                client, _ = self._ls.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection((HOST, self.target_port), timeout=2)
            except OSError:
                client.close()  # the target is down: the client sees a closed connection
                continue
            for s in (client, server):
                s.settimeout(POLL)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, server)
            with self._lock:
                self.connections += 1
                self._pairs.append(pair)
                for fn, name in ((self._up, "up"), (self._down, "down")):
                    t = threading.Thread(target=fn, args=(pair,), name=f"tcpfault-{name}", daemon=True)
                    t.start()
                    self._threads.append(t)

    def _recv(self, pair, sock):
        """Bytes from sock, b'' at its end, None when stopping."""
        while not self._stop.is_set() and not pair.closed:
            try:
                return sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return b""
        return None

    def _replay(self, block):
        """Runs block on a connection of its own; keeps the start of its
        reply after the OK and QUEUED answers (EXEC's)."""
        got, n = b"", 0
        with socket.create_connection((HOST, self.target_port), timeout=5) as side:
            side.sendall(block)
            while True:
                more = side.recv(65536)
                if not more:
                    break
                got += more
                n, partial = self._passed(got, (b"+OK\r\n", b"+QUEUED\r\n"))
                if not partial and len(got) > n:
                    break  # the transaction's own reply has begun: it ran
        with self._lock:
            self.replayed.append(got[n:n + 200])

    def _up(self, pair):
        """client -> server, watching for the marker."""
        tail = b""
        since = b""  # with replay_from: the client's bytes since its last one
        while True:
            data = self._recv(pair, pair.client)
            if not data:
                pair.close()
                return
            window = tail + data
            tail = window[-len(self.marker):]
            if self.replay_from:
                since += data
                at = since.rfind(self.replay_from)
                if at > 0 and not self.replay_from.startswith(b"*"):
                    at = since.rfind(b"*", 0, at)  # a command's name: from its array's header
                if at > 0:
                    since = since[at:]
            if not pair.armed and self.marker in window:
                with self._lock:
                    arm = self.cuts > 0
                    if arm:
                        self.cuts -= 1
                        pair.armed = not self.replay_from  # set before the command can reach the server
                if arm and self.replay_from:
                    self._replay(since)
            try:
                pair.server.sendall(data)
            except OSError:
                pair.close()
                return

    def _passed(self, buf, replies=None):
        """(bytes of buf's leading replies (pass_replies), whether the rest
        may be the start of one)."""
        replies = self.pass_replies if replies is None else replies
        n = 0
        while True:
            hit = next((r for r in replies if buf.startswith(r, n)), None)
            if hit is None:
                rest = buf[n:]
                return n, any(r.startswith(rest) for r in replies)
            n += len(hit)

    def _down(self, pair):
        """server -> client; an armed connection loses the next reply (not
        one of pass_replies)."""
        held = b""
        while True:
            data = self._recv(pair, pair.server)
            if not data:
                pair.close()
                return
            if pair.armed:
                held += data
                n, more = self._passed(held)
                try:
                    pair.client.sendall(held[:n])
                except OSError:
                    pair.close()
                    return
                held = held[n:]
                if more:
                    continue
                with self._lock:
                    self.dropped.append(held)
                pair.close()
                return
            try:
                pair.client.sendall(data)
            except OSError:
                pair.close()
                return

    def close(self):
        self._stop.set()
        self._ls.close()
        with self._lock:
            pairs = list(self._pairs)
        for p in pairs:
            p.close()
        for t in list(self._threads):
            t.join(5)
