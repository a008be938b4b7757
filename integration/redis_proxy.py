#!/usr/bin/env python3
"""A TCP proxy in front of a redis-server that can lose answers and move to another server.

    redis_proxy.py LISTEN_PORT TARGET_PORT CONTROL_DIR

CONTROL_DIR/cmd is read before each forwarded request:
  "drop N"      the answers to the next N requests that run a script or a MULTI/EXEC
                (commits) are thrown away and the client's connection is reset, after the
                server has run them: "applied, answer lost";
  "target PORT" forward new connections to PORT, and reset every open one (a failover
                behind a stable address);
CONTROL_DIR/dropped counts the answers thrown away. Only 127.0.0.1.
"""
import asyncio
import os
import sys

listen_port, target_port, ctl = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
state = {"target": target_port, "drop": 0, "dropped": 0, "conns": set(), "seen": ""}


def read_cmd():
    try:
        with open(os.path.join(ctl, "cmd")) as f:
            cmd = f.read().strip()
    except FileNotFoundError:
        return
    if cmd == state["seen"]:
        return
    state["seen"] = cmd
    parts = cmd.split()
    if len(parts) == 3 and parts[0] == "drop":  # drop N SERIAL
        state["drop"] = int(parts[1])
    elif len(parts) == 2 and parts[0] == "target":
        state["target"] = int(parts[1])
        for w in list(state["conns"]):
            w.close()


def note_dropped():
    state["dropped"] += 1
    with open(os.path.join(ctl, "dropped.tmp"), "w") as f:
        f.write(str(state["dropped"]))
    os.replace(os.path.join(ctl, "dropped.tmp"), os.path.join(ctl, "dropped"))


async def pump(reader, writer, stop):
    """Forward what `reader` reads to `writer` until either side goes, then close `writer`;
    `stop(data)`, asked first about each piece read, ends it early when true."""
    try:
        while data := await reader.read(65536):
            if stop(data):
                return
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def handle(cr, cw):
    read_cmd()
    try:
        sr, sw = await asyncio.open_connection("127.0.0.1", state["target"])
    except OSError:
        cw.close()
        return
    state["conns"].update([cw, sw])
    # A request whose answer is to be thrown away was sent: the client sends its next
    # request only once it has the whole answer to the last, so what the server sends now
    # is that answer.
    doomed = [False]

    def request(data):
        read_cmd()
        commit = b"EVAL" in data.upper() or b"EXEC" in data.upper()
        if commit and state["drop"] > 0:
            state["drop"] -= 1
            doomed[0] = True
        return False

    def answer(_):
        if doomed[0]:
            # The server ran it; its answer goes nowhere.
            note_dropped()
            cw.transport.abort()
            sw.close()
            return True
        return False

    await asyncio.gather(pump(cr, sw, request), pump(sr, cw, answer))
    state["conns"].discard(cw)
    state["conns"].discard(sw)


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


asyncio.run(main())
