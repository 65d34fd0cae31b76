"""The egress policy's pure rules (isolation/egress.py): base URL shape, the operator's URLs, addresses."""

from __future__ import annotations

import ipaddress

import pytest

from isolation import egress
from isolation.egress import (
    EgressRefused,
    EgressSettings,
    address_category,
    check_address,
    check_agent_llm,
    check_base_url,
    normalise_base_url,
    operator_key_allowed,
)


def _policy(**values) -> EgressSettings:
    base = {"llm_base_url": "", "llm_operator_key_urls": "", "llm_allowed_hosts": "", "llm_allow_private": False}
    return EgressSettings(_env_file=None, **{**base, **values})


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        ("https://api.example.com/v1/", "https://api.example.com/v1"),
        ("HTTP://Example.COM:80/v1", "http://example.com/v1"),
        ("https://example.com:443", "https://example.com"),
        ("http://[::1]:8080/v1", "http://[::1]:8080/v1"),
        ("http://2130706433/", "http://127.0.0.1"),  # decimal IPv4 is normalised, then judged as 127.0.0.1
    ],
)
def test_usable_base_urls_are_normalised(url, normalised):
    assert check_base_url(url) == normalised


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/v1", "absolute http:// or https://"),
        ("not a url", "absolute http:// or https://"),
        ("http://user:pw@example.com/v1", "user info"),
        ("http://user@example.com/v1", "user info"),
        ("http://example.com/internal/admin?x=", "query"),
        ("http://example.com/v1?", "query"),
        ("http://example.com/v1#frag", "fragment"),
        ("http://example.com/v1#", "fragment"),
    ],
)
def test_unusable_base_urls_are_refused(url, message):
    with pytest.raises(EgressRefused, match=message):
        check_base_url(url)
    assert normalise_base_url(url) is None


def test_the_operator_key_goes_only_to_the_operators_urls():
    policy = _policy(
        llm_base_url="http://127.0.0.1:11434/v1/",
        llm_operator_key_urls=" https://API.openai.com/v1 , not a url,",
    )
    assert policy.operator_urls == {"http://127.0.0.1:11434/v1", "https://api.openai.com/v1"}
    assert operator_key_allowed("https://api.openai.com:443/v1/", policy=policy)
    assert operator_key_allowed("http://127.0.0.1:11434/v1", policy=policy)
    assert not operator_key_allowed("https://api.openai.com/v2", policy=policy)  # another path
    assert not operator_key_allowed("http://api.openai.com/v1", policy=policy)  # another scheme
    assert not operator_key_allowed("https://api.openai.com.evil.test/v1", policy=policy)
    assert not operator_key_allowed("https://api.openai.com/v1?x=", policy=policy)
    assert not operator_key_allowed(None, policy=policy)
    assert operator_key_allowed("http://replier-default/v1", policy=policy, also=["http://replier-default/v1/"])


@pytest.mark.parametrize(
    ("address", "category"),
    [
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),  # IPv4-mapped public address
        ("2002:808:808::", None),  # 6to4 carrying a public address
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),  # not `is_loopback` in Python 3.11
        ("2002:7f00:1::", "loopback"),  # 6to4 carrying 127.0.0.1
        ("169.254.169.254", "link-local"),
        ("::ffff:169.254.169.254", "link-local"),
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 carrying 169.254.169.254
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),  # carrier-grade NAT
        ("fd00::1", "private"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
    ],
)
def test_address_categories(address, category):
    assert address_category(ipaddress.ip_address(address)) == category


def test_check_address_refuses_non_public_addresses_unless_allowed():
    strict = _policy()
    check_address("8.8.8.8", "dns.google", policy=strict)
    with pytest.raises(EgressRefused, match=r"host llm\.test is not allowed \(loopback address\)") as err:
        check_address("127.0.0.1", "llm.test", policy=strict)
    assert "127.0.0.1" not in str(err.value)  # what an internal name resolves to is not told
    with pytest.raises(EgressRefused, match=r"10\.0\.0\.5 is not allowed \(private address\)"):
        check_address(ipaddress.ip_address("10.0.0.5"), policy=strict)

    allowed = _policy(llm_allowed_hosts="192.168.10.0/24, LLM.Internal., [::1], 127.0.0.1")
    check_address("192.168.10.7", "anything", policy=allowed)
    check_address("10.9.9.9", "llm.internal", policy=allowed)  # by name, whatever it resolves to
    check_address("::1", None, policy=allowed)
    check_address("::ffff:127.0.0.1", None, policy=allowed)  # the mapped form of an allowed address
    with pytest.raises(EgressRefused):
        check_address("192.168.11.7", "other", policy=allowed)

    private = _policy(llm_allow_private=True)
    check_address("10.0.0.5", policy=private)
    check_address("fd00::1", policy=private)
    for address in ("127.0.0.1", "169.254.169.254", "0.0.0.0", "224.0.0.1", "240.0.0.1"):
        with pytest.raises(EgressRefused):  # LLM_ALLOW_PRIVATE opens private networks only
            check_address(address, policy=private)


def test_agent_settings_checked_at_save_time():
    policy = _policy(llm_base_url="http://127.0.0.1:11434/v1")
    key_rule = "must bring its own llm.api_key"
    assert check_agent_llm(None, "openai", False, policy=policy) is None
    assert check_agent_llm("https://api.example.com/v1", "openai", True, policy=policy) is None
    assert check_agent_llm("https://api.example.com/v1", "openai", False, policy=policy)[0] == "api_key"
    assert key_rule in check_agent_llm("https://api.example.com/v1", "default", False, policy=policy)[1]
    assert check_agent_llm("https://api.example.com/v1", "offline", False, policy=policy) is None
    assert check_agent_llm("http://127.0.0.1:11434/v1/", "openai", False, policy=policy) is None  # operator's
    assert check_agent_llm("http://127.0.0.1:11435/v1", "openai", True, policy=policy)[0] == "base_url"
    assert check_agent_llm("http://localhost:8080/v1", "openai", True, policy=policy)[0] == "base_url"
    assert check_agent_llm("http://a.localhost/v1", "openai", True, policy=policy)[0] == "base_url"
    assert check_agent_llm("http://x/v1?q", "openai", True, policy=policy) == (
        "base_url",
        "llm.base_url must not contain a query (?...)",
    )
    # names are not resolved at save time: a public-looking name passes and is checked at connect time
    assert check_agent_llm("http://rebinding.example.test/v1", "openai", True, policy=policy) is None
    loopback_ok = _policy(llm_allowed_hosts="127.0.0.1,localhost")
    assert check_agent_llm("http://127.0.0.1:9/v1", "openai", True, policy=loopback_ok) is None
    assert check_agent_llm("http://localhost:9/v1", "openai", True, policy=loopback_ok) is None


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("LLM_BASE_URL", "https://llm.operator.test/v1")
    monkeypatch.setenv("LLM_OPERATOR_KEY_URLS", "https://eu.llm.operator.test/v1")
    monkeypatch.setenv("LLM_ALLOWED_HOSTS", "10.0.0.0/8")
    monkeypatch.setenv("LLM_ALLOW_PRIVATE", "true")
    egress.get_egress_settings.cache_clear()
    try:
        settings = egress.get_egress_settings()
        assert settings.operator_urls == {"https://llm.operator.test/v1", "https://eu.llm.operator.test/v1"}
        assert settings.allowed.networks == (ipaddress.ip_network("10.0.0.0/8"),)
        assert settings.llm_allow_private is True
        assert operator_key_allowed("https://eu.llm.operator.test/v1/")  # the default policy is this one
        check_address("172.16.0.1")
    finally:
        egress.get_egress_settings.cache_clear()
