#!/usr/bin/env python3
"""An HTTP/1.1 proxy in front of the S3 test server that fails a share of the requests.

    s3_fault_proxy.py LISTEN_PORT TARGET_PORT COUNTS_FILE [--fail SHARE] [--seed N]
                      [--control FILE]

Requests are forwarded byte for byte: request line, headers (the Host header too: SigV4
signs it, and the client signed the proxy's address, which the server checks the signature
against, not against its own port) and bodies, streamed in 64 KiB pieces so that 4 MiB PUTs
and GETs are never held whole. Client connections stay open across requests (keep-alive,
Content-Length or chunked framing), each with its own connection to the server.

A share of the requests (--fail, 0 to 1; random, seeded by --seed) fails instead, in one of
these ways, taking turns among those that fit the request's method:
  500           the body is read, then 500 InternalError (an S3 XML error) is the reply;
  503           the same with 503 SlowDown;
  drop_request  part of the request body is read (none if it has none), then the
                connection is closed: the server never sees the request;
  drop_reply    the server gets and carries out the request; its reply is thrown away and
                the connection closed: "done, answer lost";
  cut_reply     the reply's headers and half its body are passed on, then the connection
                is closed (GETs only; a reply without a body is dropped whole instead
                and counted as drop_reply).
--control FILE, when the file exists, holds a share that replaces --fail (read again when
it changes), so a test can turn faults on and off without restarting the proxy.
COUNTS_FILE gets one "NAME COUNT" line per kind (and "KIND.METHOD" per method), the faults
of all kinds ("injected", "injected.METHOD"), the requests seen ("requests",
"requests.METHOD") and the client connections ("connections"); it is rewritten after each
fault, on SIGUSR1 and on exit (SIGTERM, SIGINT). Listens on 127.0.0.1 only.
"""
import argparse
import os
import random
import signal
import socket
import socketserver
import sys
import threading

ap = argparse.ArgumentParser()
ap.add_argument("listen", type=int)
ap.add_argument("target", type=int)
ap.add_argument("counts")
ap.add_argument("--fail", type=float, default=0.0)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--control")
args = ap.parse_args()

PIECE = 64 << 10
lock = threading.Lock()
rng = random.Random(args.seed)
counts = {"connections": 0, "requests": 0, "injected": 0}
control = {"mtime": None, "share": args.fail}


def count(name, method):
    counts[name] = counts.get(name, 0) + 1
    counts[f"{name}.{method}"] = counts.get(f"{name}.{method}", 0) + 1


def write_counts():
    with lock:
        lines = "".join(f"{k} {v}\n" for k, v in sorted(counts.items()))
    tmp = f"{args.counts}.tmp{threading.get_ident()}"
    with open(tmp, "w") as f:
        f.write(lines)
    os.replace(tmp, args.counts)


def share():
    """The failure share now: --fail, or what the control file says."""
    if not args.control:
        return args.fail
    try:
        m = os.stat(args.control).st_mtime_ns
    except FileNotFoundError:
        return args.fail
    if m != control["mtime"]:
        try:
            with open(args.control) as f:
                control["share"] = float(f.read().strip() or args.fail)
            control["mtime"] = m
        except (OSError, ValueError):
            pass
    return control["share"]


# GETs may fail in every way; other requests' replies have no body to cut.
KINDS = {"GET": ["500", "503", "drop_request", "drop_reply", "cut_reply"]}
OTHER_KINDS = ["500", "503", "drop_request", "drop_reply"]
turn = {}


def decide(method):
    """The fault for this request, or None to forward it. Whether a request fails is
    random; the kinds take turns per method, so that a handful of faults of a method
    already holds each of its kinds."""
    with lock:
        count("requests", method)
        if rng.random() >= share():
            return None
        kinds = KINDS.get(method, OTHER_KINDS)
        t = turn.get(method, 0)
        turn[method] = t + 1
        return kinds[t % len(kinds)]


class Closed(Exception):
    """A peer went away, or the proxy dropped a connection on purpose."""


def read_head(r):
    """The start line and the header lines (raw, with their CRLF) of a message, or None at
    a clean end of the stream."""
    line = r.readline(65537)
    if not line:
        return None
    lines = []
    while True:
        h = r.readline(65537)
        if not h:
            raise Closed("end of stream in the headers")
        if h in (b"\r\n", b"\n"):
            return line, lines
        lines.append(h)


def header(lines, name):
    name = name.lower()
    for h in lines:
        k, _, v = h.partition(b":")
        if k.strip().lower().decode("latin-1") == name:
            return v.strip().decode("latin-1")
    return None


def framing(lines):
    """("chunked", None), ("length", N) or (None, None) when neither is given."""
    te = header(lines, "transfer-encoding")
    if te and "chunked" in te.lower():
        return "chunked", None
    cl = header(lines, "content-length")
    if cl is not None:
        return "length", int(cl)
    return None, None


def copy_exact(r, out, n):
    """Pass n bytes from reader r to socket out (None: read and drop them)."""
    while n > 0:
        b = r.read(min(n, PIECE))
        if not b:
            raise Closed("end of stream in a body")
        if out is not None:
            out.sendall(b)
        n -= len(b)


def copy_chunked(r, out):
    """Pass a chunked body, trailers included, as it is."""
    while True:
        size_line = r.readline(65537)
        if not size_line:
            raise Closed("end of stream in a chunked body")
        if out is not None:
            out.sendall(size_line)
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while True:
                t = r.readline(65537)
                if not t:
                    raise Closed("end of stream in trailers")
                if out is not None:
                    out.sendall(t)
                if t in (b"\r\n", b"\n"):
                    return
        copy_exact(r, out, size + 2)  # the data and its CRLF


def copy_body(r, out, kind, n):
    if kind == "chunked":
        copy_chunked(r, out)
    elif kind == "length":
        copy_exact(r, out, n)


def error_reply(status, code, message, head_only, close):
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>fault-proxy</RequestId></Error>"
    ).encode()
    reason = {500: "Internal Server Error", 503: "Service Unavailable"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        "x-amz-request-id: fault-proxy\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    ).encode()
    return head if head_only else head + body


def abort(sock):
    """Close with a reset, as a crashed server or a broken link would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()


class Handler(socketserver.BaseRequestHandler):
    def setup(self):
        self.upstream = None
        with lock:
            counts["connections"] += 1
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def server_conn(self):
        if self.upstream is None:
            s = socket.create_connection(("127.0.0.1", args.target))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.upstream = (s, s.makefile("rb", buffering=PIECE))
        return self.upstream

    def drop_upstream(self):
        if self.upstream is not None:
            self.upstream[1].close()
            self.upstream[0].close()
            self.upstream = None

    def handle(self):
        c = self.request
        cr = c.makefile("rb", buffering=PIECE)
        try:
            while self.one(c, cr):
                pass
        except (Closed, OSError, ValueError):
            pass
        finally:
            self.drop_upstream()
            cr.close()
            abort(c)

    def one(self, c, cr):
        """Handle one request; False when the client connection is to be closed."""
        got = read_head(cr)
        if got is None:
            return False
        start, lines = got
        method = start.split(b" ", 1)[0].decode("latin-1")
        body_kind, body_len = framing(lines)
        client_close = (header(lines, "connection") or "").lower() == "close"
        fault = decide(method)

        if fault in ("500", "503"):
            copy_body(cr, None, body_kind, body_len)
            if fault == "500":
                reply = error_reply(500, "InternalError",
                                    "We encountered an internal error. Please try again.",
                                    method == "HEAD", client_close)
            else:
                reply = error_reply(503, "SlowDown", "Please reduce your request rate.",
                                    method == "HEAD", client_close)
            c.sendall(reply)
            self.counted(fault, method)
            return not client_close
        if fault == "drop_request":
            # Part of the body (none of a request without one) and no more.
            if body_kind == "length" and body_len:
                copy_exact(cr, None, body_len // 2)
            elif body_kind == "chunked":
                cr.read1(PIECE)
            self.counted(fault, method)
            raise Closed("dropped the request")

        s, sr = self.server_conn()
        s.sendall(start + b"".join(lines) + b"\r\n")
        copy_body(cr, s, body_kind, body_len)
        while True:
            got = read_head(sr)
            if got is None:
                raise Closed("the server closed the connection")
            rstart, rlines = got
            status = int(rstart.split(b" ", 2)[1])
            if status >= 200 or status == 101:
                break
            c.sendall(rstart + b"".join(rlines) + b"\r\n")  # 100 Continue and the like
        if method == "HEAD" or status in (204, 304):
            rkind, rlen = None, 0
        else:
            rkind, rlen = framing(rlines)
            if rkind is None:
                rkind, rlen = "close", None
        server_close = (header(rlines, "connection") or "").lower() == "close"

        if fault == "cut_reply" and not (rkind == "length" and rlen and rlen > 1):
            fault = "drop_reply"  # nothing to cut: lose the whole reply instead
        if fault == "drop_reply":
            self.drop_upstream()
            self.counted(fault, method)
            raise Closed("dropped the reply")
        c.sendall(rstart + b"".join(rlines) + b"\r\n")
        if fault == "cut_reply":
            copy_exact(sr, c, rlen // 2)
            self.drop_upstream()
            self.counted(fault, method)
            raise Closed("cut the reply")
        if rkind == "close":
            while b := sr.read(PIECE):
                c.sendall(b)
            return False
        copy_body(sr, c, rkind, rlen)
        if server_close:
            self.drop_upstream()
        return not (client_close or server_close)

    def counted(self, fault, method):
        with lock:
            count(fault, method)
            count("injected", method)
        write_counts()


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def on_exit(_sig, _frame):
    write_counts()
    os._exit(0)


signal.signal(signal.SIGTERM, on_exit)
signal.signal(signal.SIGINT, on_exit)
signal.signal(signal.SIGUSR1, lambda _s, _f: write_counts())
with Server(("127.0.0.1", args.listen), Handler) as srv:
    write_counts()
    print(f"listening on 127.0.0.1:{args.listen}", file=sys.stderr, flush=True)
    srv.serve_forever()
