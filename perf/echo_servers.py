"""Baseline servers for the replier benchmark, each run in its own process.

    python -m perf.echo_servers maim --port 18000   # maim_message's reference WebSocketServer, echoing
    python -m perf.echo_servers sio --port 18001    # bare python-socketio (ASGI, uvicorn), echoing

The maim echo answers every `sys_std` message with a `sys_std` "pong" (and the server's own acks);
the bare echo sends every event straight back. Both log at WARNING.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import time


def run_maim(host: str, port: int) -> None:
    import maim_message  # noqa: F401

    logging.getLogger("maim_message").setLevel(logging.WARNING)
    from maim_message.message import APIMessageBase, BaseMessageInfo, MessageDim, Seg
    from maim_message.server import WebSocketServer
    from maim_message.ws_config import ServerConfig

    quiet = logging.getLogger("maim-echo")
    quiet.setLevel(logging.WARNING)

    async def on_auth(metadata):
        return True

    async def extract_user(metadata):
        return metadata.get("api_key") or "anonymous"

    async def main() -> None:
        server: WebSocketServer | None = None

        async def on_message(message: APIMessageBase, metadata):
            reply = APIMessageBase(
                message_info=BaseMessageInfo(
                    platform=message.message_info.platform,
                    message_id=f"reply-{message.message_info.message_id}",
                    time=time.time(),
                ),
                message_segment=Seg("text", f"pong: {message.message_segment.data}"),
                message_dim=MessageDim(message.message_dim.api_key, message.message_dim.platform),
            )
            await server.send_message(reply)

        config = ServerConfig(
            host=host,
            port=port,
            path="/ws",
            on_auth=on_auth,
            on_auth_extract_user=extract_user,
            on_message=on_message,
            log_level="WARNING",
            enable_connection_log=False,
            enable_message_log=False,
            custom_logger=quiet,
        )
        server = WebSocketServer(config)
        # The reference server keeps no reference to its listener task, so a garbage-collection pass
        # can destroy it while it is still serving: hold every task it created.
        gc.disable()
        try:
            await server.start()
            keep = set(asyncio.all_tasks())
        finally:
            gc.enable()
        print(f"maim echo ready on {port} ({len(keep)} tasks held)", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def run_sio(host: str, port: int) -> None:
    import socketio
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    sio = socketio.AsyncServer(async_mode="asgi", async_handlers=False, logger=False, engineio_logger=False)

    @sio.on("message")
    async def echo(sid, data):
        await sio.emit("message", data, to=sid)

    async def health(request):
        return PlainTextResponse("ok")

    app = socketio.ASGIApp(sio, other_asgi_app=Starlette(routes=[Route("/health", health)]), socketio_path="ws")
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    print(f"sio echo ready on {port}", flush=True)
    uvicorn.run(app, host=host, port=port, loop=loop, http="httptools", ws="websockets-sansio", log_level="warning")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["maim", "sio"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if args.kind == "maim":
        run_maim(args.host, args.port)
    else:
        run_sio(args.host, args.port)


if __name__ == "__main__":
    main()
