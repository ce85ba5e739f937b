"""The loopback file server itself: what it says when a client goes away."""

from __future__ import annotations

import socket
import struct
import threading

from demo.loopback import FileServer


def test_a_client_that_resets_its_connection_leaves_no_traceback(tmp_path, capfd):
    """A killed download resets its kept-alive connection while the server waits for its next request: that is
    the client leaving, not an error of the server, and nothing is printed (socketserver prints a traceback)."""
    with FileServer(tmp_path) as server:
        server.put("file.bin", b"x" * 1000)
        before = set(threading.enumerate())
        client = socket.create_connection(server.httpd.server_address[:2])
        client.sendall(b"GET /file.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while not answer.endswith(b"x" * 1000):
            assert (received := client.recv(65536)), answer  # the server closing early is a failure, not a hang
            answer += received
        (connection,) = [thread for thread in set(threading.enumerate()) - before  # the server's thread for it
                         if thread.name.endswith("(process_request_thread)")]
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        client.close()
        connection.join(10)
        assert not connection.is_alive()
    assert capfd.readouterr().err == ""
