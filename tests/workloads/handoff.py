"""handoff: a server that reads each request on one thread and answers it from another.

    python3 handoff.py ROUNDS PAUSE_US WORK_US

Over a UNIX stream socket pair, in one process:
- thread "ho_client" sends each request in two parts: 16 bytes, then (after PAUSE_US) 16 more,
  then waits for the 8-byte answer;
- thread "ho_reader" reads each request as two recv() calls of 16 bytes (sock_recv_length fires
  twice on the server socket) and hands it to the writer through a queue;
- thread "ho_writer" works WORK_US (a sleep), then send()s the answer on the same socket.

So a request keyed by the server socket, from its first read to the answer's send, takes at least
PAUSE_US + WORK_US; one that restarts at each read, at least WORK_US. Kept by the thread, it
would begin on ho_reader and end on ho_writer, and never match. Prints nothing; exits 0.
"""

from __future__ import annotations

import ctypes
import queue
import socket
import sys
import threading
import time

PR_SET_NAME = 15


def name_thread(name: str) -> None:
    """Set the kernel's comm of the calling thread (Python does not)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NAME, name.encode(), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("peer closed")
        data += chunk
    return data


def main() -> int:
    if len(sys.argv) != 4:
        print("usage: handoff.py ROUNDS PAUSE_US WORK_US", file=sys.stderr)
        return 2
    rounds, pause, work = int(sys.argv[1]), int(sys.argv[2]) / 1e6, int(sys.argv[3]) / 1e6
    client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    handed: queue.Queue = queue.Queue()

    def reader() -> None:
        name_thread("ho_reader")
        for _ in range(rounds):
            handed.put(recv_exact(server, 16) + recv_exact(server, 16))

    def writer() -> None:
        name_thread("ho_writer")
        for _ in range(rounds):
            handed.get()
            time.sleep(work)
            server.send(b"answer!!")

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    name_thread("ho_client")
    for _ in range(rounds):
        client.send(b"request-part-one")
        time.sleep(pause)
        client.send(b"request-part-two")
        recv_exact(client, 8)
    for t in threads:
        t.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
