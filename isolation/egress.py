"""Where outbound LLM requests may go, and where the operator's LLM key may be sent.

Both backends read the same settings (environment or `.env`): the configurator refuses an agent's
`llm.base_url` that can never be used (wrong shape, a literal non-public IP, its own URL without its
own key) with a 422, and the replier checks again at use, because rows saved before these rules and DNS
answers that change after saving must not get past it. The replier's connect-time check lives in
`replier/llm/guard.py`; the rules it applies are the pure functions here.

* The operator's key (`LLM_API_KEY`) is only sent to the operator's own base URLs: `LLM_BASE_URL` and
  `LLM_OPERATOR_KEY_URLS`, compared after normalisation (`operator_key_allowed`).
* A base URL is `http(s)://host[:port][/path]`: no user info, no query, no fragment (`check_base_url`),
  so a tenant cannot smuggle credentials or a query into the request line.
* Every address a tenant's URL resolves to must be public (`check_address`) unless the operator allows
  the host or network (`LLM_ALLOWED_HOSTS`) or private networks in general (`LLM_ALLOW_PRIVATE`). The
  operator's own base URLs are trusted destinations and skip this check (Ollama on localhost is normal).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from urllib.parse import urlsplit

from pydantic import HttpUrl, TypeAdapter, ValidationError

from isolation.config import BaseServiceSettings

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_HTTP_URL = TypeAdapter(HttpUrl)
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # "this host on this network": Linux connects 0.0.0.0 locally
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: not public, not in is_private (3.11)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: the low 32 bits are an IPv4 address
# Categories LLM_ALLOW_PRIVATE opens. Loopback, link-local (cloud metadata at 169.254.169.254),
# multicast, unspecified and reserved addresses stay closed unless named in LLM_ALLOWED_HOSTS.
_PRIVATE_CATEGORIES = {"private"}


class EgressRefused(Exception):
    """An outbound LLM destination is not allowed; the message names the rule, never a key."""


class EgressSettings(BaseServiceSettings):
    """The shared settings plus the outbound LLM policy, read by the configurator (save time, through
    `get_egress_settings`) and the replier (use time: `ReplierSettings` extends this class)."""

    # The operator's default endpoint (the replier's default provider uses it): the operator's key may go there.
    llm_base_url: str = ""
    # More base URLs, comma separated, where the operator's key may also be sent (e.g. a second region).
    llm_operator_key_urls: str = ""
    # Hosts (exact names), IP addresses or CIDR networks, comma separated, that agents' URLs may reach
    # even though they are not public (e.g. "10.0.5.7,llm.internal,192.168.10.0/24").
    llm_allowed_hosts: str = ""
    # Allow agents' URLs to reach private networks (RFC 1918, fc00::/7, 100.64/10): an on-premises
    # install whose tenants are trusted. Loopback and link-local stay refused unless listed above.
    llm_allow_private: bool = False

    @cached_property
    def operator_urls(self) -> frozenset[str]:
        """The operator's base URLs, normalised (entries that are not valid base URLs are dropped)."""
        return frozenset(
            u for u in (normalise_base_url(x) for x in _split([self.llm_base_url, self.llm_operator_key_urls])) if u
        )

    @cached_property
    def allowed(self) -> AllowList:
        return AllowList.parse(_split([self.llm_allowed_hosts]))


@dataclass(frozen=True)
class AllowList:
    """LLM_ALLOWED_HOSTS parsed: host names (lower case, no trailing dot) and IP networks."""

    names: frozenset[str] = frozenset()
    networks: tuple[IpNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        names: set[str] = set()
        networks: list[IpNetwork] = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                names.add(_host_key(entry))
        return cls(frozenset(names), tuple(networks))

    def permits(self, ip: IpAddress, host: str | None) -> bool:
        if host is not None and _host_key(host) in self.names:
            return True
        candidates = {ip, _embedded_ipv4(ip) or ip}
        return any(a.version == n.version and a in n for a in candidates for n in self.networks)


@lru_cache(maxsize=1)
def get_egress_settings() -> EgressSettings:
    return EgressSettings()


def check_base_url(url: str) -> str:
    """`url` normalised (lower-case scheme and host, default port and trailing slash dropped) when it is
    a usable LLM base URL: http or https, a host, a path at most. EgressRefused says what is wrong.

    The provider appends `/chat/completions`, so a query or fragment would change which resource is
    called (`/admin?x=/chat/completions`), and user info would send credentials the operator never saw.
    """
    try:
        parsed = _HTTP_URL.validate_python(url)
    except ValidationError:
        raise EgressRefused("llm.base_url must be an absolute http:// or https:// URL") from None
    text = str(parsed)
    if parsed.scheme not in ("http", "https"):  # pragma: no cover - HttpUrl admits no other scheme
        raise EgressRefused("llm.base_url must use http or https")
    if not parsed.host:  # pragma: no cover - HttpUrl requires a host
        raise EgressRefused("llm.base_url must name a host")
    if parsed.username is not None or parsed.password is not None:
        raise EgressRefused("llm.base_url must not contain user info (user:password@); set llm.api_key instead")
    if parsed.query is not None or "?" in text:
        raise EgressRefused("llm.base_url must not contain a query (?...)")
    if parsed.fragment is not None or "#" in text:
        raise EgressRefused("llm.base_url must not contain a fragment (#...)")
    return text.rstrip("/")


@lru_cache(maxsize=4096)
def normalise_base_url(url: str | None) -> str | None:
    """`check_base_url(url)`, or None when the URL is empty or not a usable base URL (cached: the replier
    asks for every message of an agent with a model)."""
    if not url:
        return None
    try:
        return check_base_url(url)
    except EgressRefused:
        return None


def operator_key_allowed(
    base_url: str | None, *, policy: EgressSettings | None = None, also: Iterable[str] = ()
) -> bool:
    """Whether `base_url` is one of the operator's own endpoints (LLM_BASE_URL, LLM_OPERATOR_KEY_URLS and
    `also`, e.g. the replier's configured default), so the operator's key may be sent there."""
    normalised = normalise_base_url(base_url)
    if normalised is None:
        return False
    policy = policy or get_egress_settings()
    return normalised in policy.operator_urls or normalised in {normalise_base_url(u) for u in also}


def url_host(base_url: str) -> str:
    """The host of a URL that passed `check_base_url` (IPv6 without brackets, lower case)."""
    return urlsplit(base_url).hostname or ""


def literal_ip(host: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def address_category(ip: IpAddress) -> str | None:
    """Why `ip` is not a public unicast address ("loopback", "private", ...), or None when it is.

    IPv4-mapped (::ffff:a.b.c.d), 6to4 and NAT64 forms are judged by the IPv4 address they carry, since
    Python 3.11 does not (e.g. `::ffff:127.0.0.1` is not `is_loopback`).
    """
    inner = _embedded_ipv4(ip)
    if inner is not None:
        category = address_category(inner)
        if category is not None or ip.ipv4_mapped is not None:  # type: ignore[union-attr]
            return category
    if ip.is_unspecified or (ip.version == 4 and ip in _THIS_NETWORK):
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private or not ip.is_global or (ip.version == 4 and ip in _SHARED):
        return "private"
    if ip.version == 6 and ip.is_site_local:  # pragma: no cover - fec0::/10 is reserved in 3.11
        return "private"
    return None


def check_address(ip: IpAddress | str, host: str | None = None, *, policy: EgressSettings | None = None) -> None:
    """EgressRefused unless an agent's LLM request may connect to `ip` (resolved from `host`).

    Public unicast addresses pass; others pass only when LLM_ALLOWED_HOSTS names the host, the address
    or a network holding it, or (for private networks only) when LLM_ALLOW_PRIVATE is on.
    """
    address = ip if not isinstance(ip, str) else ipaddress.ip_address(ip)
    category = address_category(address)
    if category is None:
        return
    policy = policy or get_egress_settings()
    if policy.allowed.permits(address, host):
        return
    if category in _PRIVATE_CATEGORIES and policy.llm_allow_private:
        return
    name = host or str(address)
    # The category, not the address: a tenant must not learn what internal names resolve to.
    raise EgressRefused(f"llm.base_url host {name} is not allowed ({category} address)")


def check_agent_llm(
    base_url: str | None, provider: str, has_api_key: bool, *, policy: EgressSettings | None = None
) -> tuple[str, str] | None:
    """(field, message) when an agent's LLM settings must not be saved, else None. Save-time checks only:
    names are not resolved here (their answer may change; the replier checks every connection)."""
    if not base_url:
        return None
    policy = policy or get_egress_settings()
    try:
        normalised = check_base_url(base_url)
    except EgressRefused as exc:
        return "base_url", str(exc)
    if normalised in policy.operator_urls:
        return None  # the operator's own endpoint: trusted, and the operator's key may go there
    host = url_host(normalised)
    ip = literal_ip(host)
    try:
        if ip is not None:
            check_address(ip, None, policy=policy)
        elif _host_key(host) == "localhost" or _host_key(host).endswith(".localhost"):
            check_address(ipaddress.ip_address("127.0.0.1"), host, policy=policy)
    except EgressRefused as exc:
        return "base_url", str(exc)
    if provider != "offline" and not has_api_key:
        return (
            "api_key",
            "an agent with its own llm.base_url must bring its own llm.api_key: the operator's key is only "
            "sent to the operator's endpoint",
        )
    return None


def _embedded_ipv4(ip: IpAddress) -> ipaddress.IPv4Address | None:
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:  # type: ignore[union-attr]
        return ip.ipv4_mapped  # type: ignore[union-attr]
    if ip.sixtofour is not None:  # type: ignore[union-attr]
        return ip.sixtofour  # type: ignore[union-attr]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _host_key(host: str) -> str:
    return host.strip().strip("[]").lower().rstrip(".")


def _split(values: Iterable[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]
