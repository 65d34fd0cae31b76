"""A fake OneBot v11 (Napcat) peer, to run the real MaiBot-Napcat-Adapter against the replier without QQ.

    python -m testsupport.fake_onebot ws://127.0.0.1:18097 18098

It connects to the adapter's `napcat_server` port as Napcat does, announces a lifecycle `connect`, then
sends group messages with integer ids: a text, and images of 20 KiB, 200 KiB, 1.2 MiB and 3 MiB that it
serves itself on 127.0.0.1:IMAGE_PORT (the adapter downloads them and sends them on as base64). It
answers the adapter's `get_group_info` and `send_group_msg` calls (a message id per post, which the
adapter echoes back to the core) and prints what the adapter posted. A manual tool (docs/ADAPTERS.md).
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import sys
import threading
import time

import websockets

SIZES = {"small.png": 20 * 1024, "mid.png": 200 * 1024, "big.png": 1_258_291, "huge.png": 3 * 1024 * 1024}
GROUP, USER, SELF = 5550001, 1234567, 10001


def _serve_images(port: int) -> None:
    files = {name: os.urandom(size) for name, size in SIZES.items()}

    class Images(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files.get(self.path.strip("/"), b"")
            self.send_response(200 if body else 404)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def _event(message_id: int, segments: list[dict]) -> str:
    return json.dumps(
        {
            "post_type": "message",
            "message_type": "group",
            "sub_type": "normal",
            "time": int(time.time()),
            "self_id": SELF,
            "message_id": message_id,
            "group_id": GROUP,
            "user_id": USER,
            "sender": {"user_id": USER, "nickname": "Alice", "card": ""},
            "message": segments,
            "raw_message": "",
        }
    )


async def run(adapter_url: str, image_port: int, pause: float = 2.0) -> list[dict]:
    """Drive the adapter; returns the calls it made to post messages (action, params, message id)."""
    _serve_images(image_port)
    posted: list[dict] = []
    async with websockets.connect(adapter_url, max_size=2**26) as ws:
        hello = {"post_type": "meta_event", "meta_event_type": "lifecycle", "sub_type": "connect", "self_id": SELF}
        await ws.send(json.dumps({**hello, "time": int(time.time())}))

        async def answer() -> None:
            async for raw in ws:
                request = json.loads(raw)
                action, data = request.get("action"), {}
                if action == "get_group_info":
                    data = {"group_id": request["params"]["group_id"], "group_name": "Test group"}
                elif action in ("send_group_msg", "send_private_msg"):
                    data = {"message_id": 900_000 + len(posted)}
                    posted.append({"action": action, "params": request["params"], "message_id": data["message_id"]})
                    print("posted", json.dumps(request["params"], ensure_ascii=False)[:200], flush=True)
                reply = {"status": "ok", "retcode": 0, "data": data, "echo": request.get("echo")}
                await ws.send(json.dumps(reply))

        answering = asyncio.create_task(answer())
        await asyncio.sleep(2 * pause)  # the adapter connects to the core meanwhile
        await ws.send(_event(111, [{"type": "text", "data": {"text": "hello bot"}}]))
        for n, name in enumerate(SIZES):
            await asyncio.sleep(pause)
            image = {"url": f"http://127.0.0.1:{image_port}/{name}", "sub_type": 0, "file": name}
            segments = [{"type": "text", "data": {"text": f"look {name}"}}, {"type": "image", "data": image}]
            await ws.send(_event(112 + n, segments))
        await asyncio.sleep(4 * pause)
        answering.cancel()
    return posted


if __name__ == "__main__":
    calls = asyncio.run(run(sys.argv[1], int(sys.argv[2])))
    print(f"{len(calls)} messages posted", flush=True)
