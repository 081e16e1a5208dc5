"""Plain TCP and HTTP peers, for checking what observer must not report.

    tcp_peer.py echo-server PORT      line echo server on 127.0.0.1:PORT
    tcp_peer.py chat-client PORT      sends a line every 200 ms and reads the echo
    tcp_peer.py http-client PORT      one keep-alive HTTP GET, then holds the connection open
    tcp_peer.py hold-server PORT      accepts connections, reads them to the end, never closes them
    tcp_peer.py half-close PORT       connects, sends a line, then shuts down its sending side

Each prints `ready` once listening or once its first exchange is done.
"""

import http.client
import socket
import socketserver
import sys
import threading
import time


def say(word):
    print(word, flush=True)


class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)


def main():
    mode, port = sys.argv[1], int(sys.argv[2])
    if mode == "echo-server":
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        with socketserver.ThreadingTCPServer(("127.0.0.1", port), Echo) as server:
            threading.Timer(0.1, say, ["ready"]).start()
            server.serve_forever()
    elif mode == "chat-client":
        with socket.create_connection(("127.0.0.1", port)) as sock:
            reader = sock.makefile("rb")
            sock.sendall(b"hello\n")
            reader.readline()
            say("ready")
            while True:
                time.sleep(0.2)
                sock.sendall(b"hello\n")
                reader.readline()
    elif mode == "hold-server":
        listener = socket.create_server(("127.0.0.1", port))
        say("ready")
        held = []

        def drain(conn):
            while conn.recv(4096):
                pass

        while True:
            conn = listener.accept()[0]
            held.append(conn)
            threading.Thread(target=drain, args=(conn,), daemon=True).start()
    elif mode == "half-close":
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"bye\n")
        sock.shutdown(socket.SHUT_WR)
        say("ready")
        time.sleep(3600)
    elif mode == "http-client":
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.request("GET", "/", headers={"Connection": "keep-alive"})
        conn.getresponse().read()
        say("ready")
        while True:
            time.sleep(3600)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
