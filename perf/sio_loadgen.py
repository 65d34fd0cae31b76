"""Load generator process: many maim_message API-Server clients speaking Engine.IO v4 / Socket.IO v5
directly over `websockets` (much cheaper per message than a full python-socketio client).

Protocol per connection: open `ws://HOST:PORT/ws/?EIO=4&transport=websocket` with the `x-apikey` and
`x-platform` headers, read the Engine.IO open packet, send `40` (namespace connect), wait for `40{..}`
(or `44{..}` = refused). Each chatting client then sends `42["message", <sys_std envelope>]`, waits
for a `sys_std` reply (acks are skipped; with --ack the reply is acked like maim's client does), and
sends the next. Pings (`2`) are answered (`3`). Idle clients only answer pings.

Driven by perf/bench_replier.py: prints READY once connected, waits for GO on stdin, prints one JSON
line with latencies and timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid

from websockets.asyncio.client import connect

_dumps = json.dumps
_loads = json.loads


class Refused(RuntimeError):
    pass


async def open_socket(url: str, headers: dict):
    ws = await connect(
        url, additional_headers=headers, compression=None, max_size=2**22, open_timeout=60, ping_interval=None
    )
    packet = await ws.recv()
    if not packet.startswith("0"):
        raise RuntimeError(f"unexpected open packet {packet[:60]!r}")
    await ws.send("40")
    while True:
        packet = await ws.recv()
        if packet.startswith("40"):
            return ws
        if packet.startswith("44"):
            await ws.close()
            raise Refused(packet[2:])
        if packet == "2":
            await ws.send("3")


def envelope(key: str, platform: str, user_id: str, n: int, text: str) -> str:
    now = time.time()
    payload = {
        "message_info": {
            "platform": platform,
            "message_id": f"{user_id}-{n}-{uuid.uuid4().hex[:8]}",
            "time": now,
            "sender_info": {"user_info": {"platform": platform, "user_id": user_id, "user_nickname": user_id}},
        },
        "message_segment": {"type": "text", "data": text},
        "message_dim": {"api_key": key, "platform": platform},
    }
    env = {
        "ver": 1,
        "msg_id": f"msg_{uuid.uuid4().hex[:16]}",
        "type": "sys_std",
        "meta": {"sender_user": key, "platform": platform, "timestamp": now},
        "payload": payload,
    }
    return '42["message",' + _dumps(env) + "]"


def ack_for(msg_id: str) -> str:
    now = time.time()
    env = {
        "ver": 1,
        "msg_id": uuid.uuid4().hex,
        "type": "sys_ack",
        "meta": {"acked_msg_id": msg_id, "timestamp": now},
        "payload": {"status": "received", "client_timestamp": now},
    }
    return '42["message",' + _dumps(env) + "]"


async def wait_reply(ws, mode: str, ack: bool) -> bool:
    """Read until the reply arrives; True when it is a reply, False for an error message."""
    while True:
        packet = await ws.recv()
        if packet == "2":
            await ws.send("3")
            continue
        if not packet.startswith("42"):
            continue
        if mode == "echo":
            return True
        data = _loads(packet[2:])[1]
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "sys_std":
            if ack and data.get("msg_id"):
                await ws.send(ack_for(data["msg_id"]))
            return True
        if kind and kind.startswith("custom_error"):
            return False


async def idle(ws, stop: asyncio.Event) -> None:
    try:
        while not stop.is_set():
            try:
                packet = await asyncio.wait_for(ws.recv(), 1.0)
            except TimeoutError:
                continue
            if packet == "2":
                await ws.send("3")
    except Exception:  # connection closed at the end
        return


async def main_async(args) -> dict:
    base = args.url.rstrip("/").replace("http://", "ws://", 1).replace("https://", "wss://", 1)
    url = base + f"/{args.path}/?EIO=4&transport=websocket"
    keys = args.keys.split(",")
    sockets = []
    errors = 0
    refused = 0
    sem = asyncio.Semaphore(100)

    async def open_one(i: int):
        nonlocal refused
        key = keys[i % len(keys)]
        async with sem:
            try:
                return await open_socket(url, {"x-apikey": key, "x-platform": args.platform})
            except Refused:
                refused += 1
                return None

    opened = await asyncio.gather(*(open_one(i) for i in range(args.clients + args.idle)))
    sockets = [ws for ws in opened if ws is not None]
    chatting = opened[: args.clients]
    idlers = [ws for ws in opened[args.clients :] if ws is not None]
    stop = asyncio.Event()
    idle_tasks = [asyncio.create_task(idle(ws, stop)) for ws in idlers]
    print(f"READY {len(sockets)} refused={refused}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    latencies: list[float] = []
    text = "x" * args.text_size

    async def chat(index: int, ws) -> None:
        nonlocal errors
        if ws is None:
            return
        key = keys[(args.offset + index) % len(keys)]
        user_id = f"bench-{args.offset + index}"
        for n in range(args.warmup):
            await ws.send(envelope(key, args.platform, user_id, -n - 1, text))
            await wait_reply(ws, args.mode, args.ack)
        for n in range(args.messages):
            started = time.perf_counter()
            await ws.send(envelope(key, args.platform, user_id, n, text))
            ok = await wait_reply(ws, args.mode, args.ack)
            latencies.append(time.perf_counter() - started)
            if not ok:
                errors += 1

    # Warm-up is excluded from timing: every client warms up, then the timed part starts together.
    warm = args.warmup
    args.warmup = 0
    if warm:
        saved = args.messages
        args.messages = warm
        await asyncio.gather(*(chat(i, ws) for i, ws in enumerate(chatting)))
        args.messages = saved
        latencies.clear()
    start_wall = time.time()
    start = time.perf_counter()
    try:
        await asyncio.gather(*(chat(i, ws) for i, ws in enumerate(chatting)))
    except Exception as exc:
        errors += 1
        print(f"chat failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start
    stop.set()
    await asyncio.gather(*idle_tasks, return_exceptions=True)
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return {
        "latencies": latencies,
        "start": start_wall,
        "elapsed": elapsed,
        "errors": errors,
        "refused": refused,
        "connected": len(sockets),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True, help="http://HOST:PORT")
    parser.add_argument("--path", default="ws")
    parser.add_argument("--keys", required=True, help="comma-separated api keys (round robin)")
    parser.add_argument("--platform", default="bench")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--idle", type=int, default=0)
    parser.add_argument("--messages", type=int, default=100, help="timed messages per chatting client")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--offset", type=int, default=0, help="first client index (distinct users per process)")
    parser.add_argument("--mode", choices=["maim", "echo"], default="maim")
    parser.add_argument("--ack", action="store_true", help="ack replies like maim's client")
    parser.add_argument("--text-size", type=int, default=32)
    args = parser.parse_args()
    try:
        import uvloop

        result = uvloop.run(main_async(args))
    except ImportError:
        result = asyncio.run(main_async(args))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
