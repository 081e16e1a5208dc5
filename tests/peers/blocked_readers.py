"""Many threads each blocked in recv() on a connection of its own, for observer's tests.

    blocked_readers.py server PORT N    accepts N connections on 127.0.0.1:PORT, prints `ready`,
                                        then on SIGUSR1 sends 1000 bytes on every one
    blocked_readers.py clients PORT N   N threads each connect and block in recv() until 1000
                                        bytes came; prints `ready` once all are connected and
                                        `done` once all have their bytes

The recv() calls block for as long as the test waits before SIGUSR1: the case where probes on
the return of a call that blocks long lost other calls' returns.
"""

import signal
import socket
import sys
import threading

SIZE = 1000


def say(word):
    print(word, flush=True)


def server(port, n):
    listener = socket.create_server(("127.0.0.1", port), backlog=n)
    conns = [listener.accept()[0] for _ in range(n)]
    say("ready")
    signal.sigwait({signal.SIGUSR1})
    for conn in conns:
        conn.sendall(b"r" * SIZE)
    threading.Event().wait()


def clients(port, n):
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]

    def read(sock):
        got = 0
        while got < SIZE:
            chunk = sock.recv(SIZE)  # blocks until the server writes
            if not chunk:
                raise SystemExit("closed early")
            got += len(chunk)

    threads = [threading.Thread(target=read, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    say("ready")
    for t in threads:
        t.join()
    say("done")
    threading.Event().wait()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    mode, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    {"server": server, "clients": clients}[mode](port, n)
