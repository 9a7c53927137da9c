"""Balanced homes for recurring prefixes (policies/homes.py, ``prefix_affinity``'s
``shared_homes``): routers that share nothing but see the same recurring
prefixes compute the same homes, and no endpoint is home to more of them than
its fair share or its cache holds, where the ring alone crowds some."""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

from policies import EndpointView, RequestView, build_policy
from policies.homes import BalancedHomes
from policies.prefix import PrefixAffinity
from policies.ring import HashRing

IDS = [f"e{i}" for i in range(4)]
RING = HashRing([(e, 1.0) for e in IDS])


def test_two_routers_seeing_the_same_prefixes_in_any_order_agree_on_balanced_homes() -> None:
    keys = [random.Random(k).getrandbits(64) for k in range(13)]
    a, b = BalancedHomes(window=1000, max_keys=100), BalancedHomes(window=1000, max_keys=100)
    shuffled = keys[::-1]
    random.Random(1).shuffle(shuffled)
    for k in keys + keys:
        a.touch(k)
    for k in shuffled + shuffled[::-1]:
        b.touch(k)
    homes = {k: a.home(k, RING, IDS) for k in keys}
    assert homes == {k: b.home(k, RING, IDS) for k in keys}
    assert max(Counter(homes.values()).values()) == math.ceil(13 / 4)
    # The ring alone crowds one endpoint (so the bound above did something).
    assert max(Counter(next(RING.walk(k)) for k in keys).values()) > math.ceil(13 / 4)
    # Up to what a cache holds, the ring's own placement stands.
    assert {k: a.home(k, RING, IDS, fit=13) for k in keys} == {k: next(RING.walk(k)) for k in keys}


def test_a_prefix_seen_once_or_not_for_a_window_has_no_home() -> None:
    homes = BalancedHomes(window=5, max_keys=100)
    homes.touch(1)
    assert homes.home(1, RING, IDS) is None  # seen once: no more than any prompt
    homes.touch(1)
    assert homes.home(1, RING, IDS) is not None
    for k in range(100, 105):
        homes.touch(k)
    assert homes.home(1, RING, IDS) is None  # 5 decisions without it


def policy(**params: Any) -> PrefixAffinity:
    p = build_policy("prefix_affinity", params, random.Random(0))
    assert isinstance(p, PrefixAffinity)
    return p


def chat(tenant: int) -> RequestView:
    system = f"Tenant {tenant}: you answer questions about product {tenant}. " * 25
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]
    return RequestView(model="m", endpoint="chat", body={"model": "m", "messages": messages})


class Fleet:
    """Four endpoints as one of two routers sees them: the engines finish two
    requests for each one this router sent (a share of a half, counted), and
    each cache holds ``capacity_tokens`` (1200: three tenants' prompts)."""

    def __init__(self, capacity_tokens: int) -> None:
        self.finished, self.completed = 0.0, 0
        self.capacity_tokens = capacity_tokens

    def views(self) -> list[EndpointView]:
        self.finished += 4
        self.completed += 2
        return [
            EndpointView(
                id=e,
                url=f"http://{e}",
                kind="vllm",
                running=0.0,
                waiting=0.0,
                in_flight_at_scrape=0,
                finished=self.finished,
                completed_at_scrape=self.completed,
                kv_capacity_tokens=self.capacity_tokens,
            )
            for e in IDS
        ]


def placements(
    shared_homes: bool, order: list[int], capacity_tokens: int = 1200
) -> dict[int, tuple[str, str]]:
    """Where one of two routers sends each tenant's third request, its index
    having forgotten the tenants (as a share-sized index does)."""
    p, fleet = policy(shared_homes=shared_homes), Fleet(capacity_tokens)
    for tenant in order + order:
        p.rank(chat(tenant), fleet.views())
    assert p.share == 0.5
    for e in IDS:
        p.index.forget(e)
    out = {}
    for tenant in order:
        d = p.rank(chat(tenant), fleet.views())
        out[tenant] = (d.ranked[0].id, d.reason)
        for e in IDS:
            p.index.forget(e)
    return out


def test_routers_sharing_the_traffic_place_recurring_tenants_at_balanced_homes() -> None:
    tenants = list(range(12))
    first = placements(True, tenants)
    second = placements(True, tenants[::-1])
    assert first == second  # the two routers agree, whatever order they saw
    reasons = {reason for _, reason in first.values()}
    assert reasons <= {"ring_owner", "balanced_home"} and "balanced_home" in reasons
    per_endpoint = Counter(e for e, _ in first.values())
    assert max(per_endpoint.values()) == 3  # 12 tenants over 4 endpoints
    # Without the homes the same routers agree too (ring owners), but crowd one.
    plain = placements(False, tenants)
    assert {reason for _, reason in plain.values()} == {"ring_owner"}
    assert max(Counter(e for e, _ in plain.values()).values()) > 3


def test_homes_stand_aside_when_the_tenants_would_not_fit_even_balanced() -> None:
    """Caches holding one tenant each and twelve tenants: balancing would only
    move prompts the caches evict anyway (on real vLLM it cost hit rate), so
    the routers keep the ring owners."""
    tenants = list(range(12))
    assert placements(True, tenants, capacity_tokens=640) == placements(
        False, tenants, capacity_tokens=640
    )
