"""Connection churn and held connections, as fast as plain sockets go.

    churn.py server PORT             accepts connections on 127.0.0.1:PORT and resets each at once
    churn.py hold-server PORT        accepts connections and keeps them open, silent
    churn.py hold PORT N             opens N connections to PORT and keeps them open, silent
    churn.py churn PORT RATE SECS    opens and resets up to RATE connections a second for SECS
                                     seconds, then prints `made=N failed=F` (F refused
                                     or reset while connecting) and `done`

Resets rather than FIN: no TIME_WAIT, so ephemeral ports never run out. Each prints `ready` once
listening, or once its connections are open or the churn has begun.
"""

import socket
import struct
import sys
import threading
import time

RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, zero timeout: close() sends RST


def say(*words):
    print(*words, flush=True)


def listener(port):
    sock = socket.create_server(("127.0.0.1", port), backlog=4096)
    return sock


def serve(port, keep):
    sock = listener(port)
    say("ready")
    held = []
    while True:
        conn, _ = sock.accept()
        if keep:
            held.append(conn)
        else:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
            conn.close()


def hold(port, n):
    held = []
    for _ in range(n):
        held.append(socket.create_connection(("127.0.0.1", port)))
    say("ready")
    threading.Event().wait()


def churn(port, rate, seconds):
    made = failed = 0
    start = time.monotonic()
    end = start + seconds
    say("ready")
    while (now := time.monotonic()) < end:
        # Pace by batches of a hundredth of a second.
        due = int((now - start) * rate)
        while made + failed < due:
            try:
                sock = socket.create_connection(("127.0.0.1", port))
            except OSError:  # the server reset a connection it had not accepted yet
                failed += 1
                continue
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
            sock.close()
            made += 1
        time.sleep(0.01)
    say(f"made={made} failed={failed}")
    say("done")
    threading.Event().wait()


def main():
    mode, port = sys.argv[1], int(sys.argv[2])
    if mode == "server":
        serve(port, keep=False)
    elif mode == "hold-server":
        serve(port, keep=True)
    elif mode == "hold":
        hold(port, int(sys.argv[3]))
    elif mode == "churn":
        churn(port, int(sys.argv[3]), float(sys.argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
