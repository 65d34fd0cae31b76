"""Open connections per tenant across every replier of a deployment (REDIS_URL), so a tenant's
`connections` limit of N is N in total, not N per replier.

Each tenant has a Redis hash `<prefix>:connections:<tenant>` with one field per replier process
(`TenantLimiter.process_id`) holding that process's open connections of the tenant. A connect runs
one Lua script that sums the fields and adds one to this process's field only if the sum is below
the limit: atomic, so two connects on two repliers cannot both take the last place. A disconnect
takes one off (the field goes when it reaches 0).

A replier that dies without a goodbye (kill -9, a lost host) must not hold its tenants' places for
ever: each process keeps `<prefix>:replier-alive:<process_id>` alive (refreshed every
`ALIVE_REFRESH_SECONDS`, expiring after `ALIVE_TTL_SECONDS`), and the connect script drops the
fields of processes whose key is gone. So a dead replier's connections stop counting within
`ALIVE_TTL_SECONDS` (their clients reconnect to another replier meanwhile; a tenant at its limit may
be refused until then). The script reads those keys by a name it builds (fine on one Redis server,
which is what the deployment uses, not on Redis Cluster).

When Redis fails, the connect is checked against this process's own count instead (as without
REDIS_URL: availability first, one WARNING per outage) and not counted in Redis; Redis is tried again
at the next heartbeat or after `RETRY_SECONDS`, so a server that hangs does not add its timeout to
every connect. Whenever this
process's alive key was found missing (first start, an outage long enough for it to expire, a
restarted Redis), every field of this process is written again from its own counts, which puts
right whatever the outage left wrong.
"""

from __future__ import annotations

import logging
import time

import redis
import redis.asyncio as aioredis

log = logging.getLogger("replier")

ALIVE_REFRESH_SECONDS = 2.0
ALIVE_TTL_SECONDS = 10.0
RETRY_SECONDS = 1.0  # after a failure, connects use the local count this long before Redis is tried again

# KEYS[1]: the tenant's hash. ARGV: this process, the limit (0 = unlimited), the alive-key prefix.
# Returns 1 (counted) or 0 (at the limit: not counted).
_ADMIT = """
local fields = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #fields, 2 do
  local process = fields[i]
  if process ~= ARGV[1] and redis.call('EXISTS', ARGV[3] .. process) == 0 then
    redis.call('HDEL', KEYS[1], process)
  else
    total = total + tonumber(fields[i + 1])
  end
end
local limit = tonumber(ARGV[2])
if limit > 0 and total >= limit then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
return 1
"""

_RELEASE = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"""

_ERRORS = (redis.RedisError, OSError)


class SharedConnectionCounts:
    def __init__(self, client: aioredis.Redis, prefix: str, process_id: str) -> None:
        self._client = client
        self._prefix = prefix
        self.process_id = process_id
        self._alive_prefix = f"{prefix}:replier-alive:"
        self._admit = client.register_script(_ADMIT)
        self._release = client.register_script(_RELEASE)
        self._alive = False  # the alive key was set by this process (since the last failure)
        self._outage = False
        self._failed_at = -RETRY_SECONDS

    def key(self, tenant_id: str) -> str:
        return f"{self._prefix}:connections:{tenant_id}"

    def _failed(self, exc: BaseException) -> None:
        self._alive = False  # write everything again once Redis answers
        self._failed_at = time.monotonic()
        if not self._outage:
            self._outage = True
            log.warning(
                "connection limits: Redis failed (%s); each replier counts its own connections until it answers again",
                type(exc).__name__,
            )

    async def admit(self, tenant_id: str, limit: int, open_here: dict[str, int]) -> bool | None:
        """Count one more connection of the tenant if its total stays within `limit`: True (counted),
        False (at the limit), None (Redis failed: the caller checks its own count; nothing counted).
        `open_here`: this process's open connections per tenant (written again after a failure)."""
        if self._outage and time.monotonic() - self._failed_at < RETRY_SECONDS:
            return None  # an unreachable server must not add its timeout to every connect
        try:
            if not self._alive:
                await self.heartbeat(open_here)
                if not self._alive:
                    return None
            counted = await self._admit(keys=[self.key(tenant_id)], args=[self.process_id, limit, self._alive_prefix])
        except _ERRORS as exc:
            self._failed(exc)
            return None
        return bool(int(counted))

    async def release(self, tenant_id: str) -> None:
        """One connection closed (during an outage nothing is sent: the counts are written again after it)."""
        if self._outage:
            return
        try:
            await self._release(keys=[self.key(tenant_id)], args=[self.process_id])
        except _ERRORS as exc:
            self._failed(exc)  # the next heartbeat writes this process's counts again

    async def heartbeat(self, open_here: dict[str, int]) -> None:
        """Keep this process alive in Redis; when its alive key was missing (or Redis failed since the
        last call), write this process's counts again from `open_here` (its open connections per tenant)."""
        try:
            existed = await self._client.set(
                self._alive_prefix + self.process_id, 1, px=int(ALIVE_TTL_SECONDS * 1000), get=True
            )
            if existed is None or not self._alive:
                async with self._client.pipeline(transaction=False) as pipe:
                    for tenant_id, count in open_here.items():
                        if count > 0:
                            pipe.hset(self.key(tenant_id), self.process_id, count)
                    await pipe.execute()
        except _ERRORS as exc:
            self._failed(exc)
            return
        self._alive = True
        if self._outage:
            self._outage = False
            log.info("connection limits: Redis answers again; counting connections there")

    async def leave(self, open_here: dict[str, int]) -> None:
        """At shutdown: this process's connections no longer count anywhere."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for tenant_id in open_here:
                    pipe.hdel(self.key(tenant_id), self.process_id)
                pipe.delete(self._alive_prefix + self.process_id)
                await pipe.execute()
        except _ERRORS:
            return  # the alive key expires; the other repliers drop this process's fields then
