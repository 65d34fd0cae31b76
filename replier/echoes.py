"""Adapters' `notify` messages, above all the echo MaiBot-Napcat-Adapter sends after each delivered reply.

An echo is not a chat message: it is never stored as one, answered, or shown to a model. It says that
our reply `mt-reply:...` was posted and which id the platform gave it; that id is stored with the reply
(`messages.platform_message_id`, read through the history API). The reply is found in the stream the
echo names (its group_info/user_info are our reply's, i.e. the chat's) under the connection's tenant
and agent: an echo can only touch a reply of its own key's agent. Other notifies (pokes, bans, ...)
are accepted and ignored. Nothing is sent back, so an adapter never logs an error for an echo.
"""

from __future__ import annotations

import logging

from isolation import fastpath
from isolation.context import IsolationContext
from replier.connections import Connection
from replier.faults import report
from replier.protocol import ECHO, REPLY_ID_PREFIX, Notice
from replier.stage import Stage
from replier.streams import stream_id

log = logging.getLogger("replier")


def record_echo(ctx: IsolationContext, reply_id: str, platform_message_id: str) -> bool:
    """Database job: store the platform's id of the reply `reply_id` in the stream `ctx` (T+A+C+P)."""
    return fastpath.ChatSession(ctx).set_platform_message_id(reply_id, platform_message_id)


class Echoes(Stage):
    async def accept(self, conn: Connection, notice: Notice) -> None:
        """Take a notice from `conn`: an echo's platform id is stored with its reply; nothing is answered."""
        self.metrics.notices.labels(notice.kind if notice.kind == ECHO else "other").inc()
        if notice.kind != ECHO:
            log.debug("ignored %s notice on connection %s", notice.kind, conn.connection_id)
            return
        reply_id, platform_id = notice.reply_id, notice.platform_message_id
        peer = notice.group_id or notice.user_id
        if not reply_id or not reply_id.startswith(REPLY_ID_PREFIX) or platform_id is None or peer is None:
            log.debug("echo on connection %s names no reply of ours; ignored", conn.connection_id)
            return
        kind = "group" if notice.group_id else "private"
        ctx = IsolationContext(
            conn.tenant_id,
            conn.agent_id,
            notice.platform,
            stream_id(conn.tenant_id, conn.agent_id, notice.platform, kind, peer),
        )
        try:
            stored = await self.store.run(record_echo, ctx, reply_id, platform_id)
        except Exception as exc:
            # An echo is informational: during a database outage it is dropped (one throttled line
            # for all of them, replier.faults), anything else is a bug worth a traceback.
            if report(exc, "adapter echo") is None:
                log.exception("storing the platform id of reply %r failed", reply_id)
            return
        if not stored:
            log.info(
                "echo for reply %r on connection %s: no such reply in that chat (platform %s)",
                reply_id[:100],
                conn.connection_id,
                notice.platform,
            )
