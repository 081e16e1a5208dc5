"""Holds many established TCP connections open, for `cargo xtask bench`.

    hold.py server HOST PORT COUNT      listens, accepts COUNT connections and keeps them
    hold.py client HOST PORT COUNT      opens COUNT connections to HOST:PORT and keeps them

Both print `ready` once COUNT connections are held, then sleep until killed. No byte is sent:
these are the sockets a busy host keeps open, as seen by the kernel. One process holds at most
about as many sockets as its RLIMIT_NOFILE allows, so larger counts are split over processes.
"""

import resource
import signal
import socket
import sys


def main():
    role, host, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if count + 16 > hard:
        raise SystemExit(f"{count} sockets do not fit RLIMIT_NOFILE {hard}")
    held = []
    if role == "server":
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(65535)
        print("listening", flush=True)
        while len(held) < count:
            held.append(listener.accept()[0])
        listener.close()
    else:
        for _ in range(count):
            held.append(socket.create_connection((host, port)))
    print("ready", flush=True)
    signal.pause()


if __name__ == "__main__":
    main()
