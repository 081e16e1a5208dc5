"""Hand-written clients for the cases libraries never produce, for observer's tests.

    raw_ws.py split-handshake PORT   sends `G`, waits 300 ms, then the rest of an upgrade request
                                     with a cookie of 8100 bytes (common servers refuse header
                                     lines over 8 KiB) in three writes, the last one carrying the
                                     first masked text frame; reads the 101 and the echo
    raw_ws.py bound-client PORT LOCAL
                                     upgrades from local port LOCAL, then sends a text frame
                                     every 200 ms and reads the echoes
    raw_ws.py deaf-client PORT       upgrades, then never reads or writes again: a close frame
                                     gets no reply and TCP stays open from its side
    raw_ws.py fragmented-ping PORT   upgrades, sends a ping without its FIN bit (control frames
                                     must not be fragmented), then reads until the server closes
                                     TCP; prints `done`
    raw_ws.py tls PORT               starts a TLS handshake (Python's ssl module) and waits
    raw_ws.py h2 PORT                sends the HTTP/2 connection preface and waits

Prints `ready` once its bytes are out (after the echo for `split-handshake`).
"""

import os
import socket
import ssl
import sys
import time


def say(word):
    print(word, flush=True)


def masked_text(payload: bytes) -> bytes:
    key = os.urandom(4)
    return bytes([0x81, 0x80 | len(payload)]) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def split_handshake(port):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = (
        "GET /split HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Cookie: session={'c' * 8100}\r\n\r\n"
    ).encode()
    sock.sendall(request[:1])
    time.sleep(0.3)
    third = (len(request) - 1) // 3
    sock.sendall(request[1 : 1 + third])
    sock.sendall(request[1 + third : 1 + 2 * third])
    sock.sendall(request[1 + 2 * third :] + masked_text(b"first"))
    reply = b""
    while b"first" not in reply:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit(f"closed early: {reply[:200]!r}")
        reply += chunk
    say("ready")
    time.sleep(3600)


def upgraded(port, path):
    """A connection through the upgrade, having read nothing past the 101."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = sock.recv(1)  # one byte at a time: nothing past the 101 is read
        if not chunk:
            raise SystemExit(f"closed early: {reply!r}")
        reply += chunk
    if not reply.startswith(b"HTTP/1.1 101"):
        raise SystemExit(f"upgrade refused: {reply[:100]!r}")
    return sock


def deaf_client(port):
    sock = upgraded(port, "/deaf")  # held open: dropping it would close the connection
    say("ready")
    time.sleep(3600)
    sock.close()


def fragmented_ping(port):
    sock = upgraded(port, "/fragmented-ping")
    key = os.urandom(4)
    payload = b"ping"
    # Opcode 0x9 (ping) with FIN clear: 0x09 instead of 0x89.
    sock.sendall(bytes([0x09, 0x80 | len(payload)]) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload)))
    while sock.recv(4096):
        pass
    say("done")


def bound_client(port, local):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", local))
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += sock.recv(4096)
    if not reply.startswith(b"HTTP/1.1 101"):
        raise SystemExit(f"upgrade refused: {reply[:100]!r}")
    say("ready")
    sock.settimeout(0.2)
    while True:
        sock.sendall(masked_text(b"tick"))
        try:
            sock.recv(4096)
        except socket.timeout:
            pass
        time.sleep(0.2)


def tls(port):
    sock = socket.create_connection(("127.0.0.1", port))
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    tls_sock = context.wrap_socket(sock, do_handshake_on_connect=False)
    tls_sock.setblocking(False)
    try:
        tls_sock.do_handshake()
    except ssl.SSLWantReadError:
        pass  # The ClientHello is out; the server never answers.
    say("ready")
    time.sleep(3600)


def h2(port):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    say("ready")
    time.sleep(3600)


def main():
    mode, port = sys.argv[1], int(sys.argv[2])
    if mode == "bound-client":
        bound_client(port, int(sys.argv[3]))
        return
    modes = {
        "split-handshake": split_handshake,
        "deaf-client": deaf_client,
        "fragmented-ping": fragmented_ping,
        "tls": tls,
        "h2": h2,
    }
    modes[mode](port)


if __name__ == "__main__":
    main()
