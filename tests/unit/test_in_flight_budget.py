"""The interceptor's budgets of calls and streams in flight (server/api/interceptor.py)."""

from __future__ import annotations

import pytest

from server.api.errors import InFlightLimit, in_flight_limit_status
from server.api.interceptor import InFlightBudget, peer_address
from server.domain.errors import ErrorReason

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:10.0.0.1:5000", "10.0.0.1"),
        ("ipv6:[::1]:5000", "[::1]"),
        ("ipv6:[2001:db8::7]:443", "[2001:db8::7]"),
        ("unix:/run/marketplace.sock", "unix:/run/marketplace.sock"),
    ],
)
def test_a_peer_is_its_address_without_the_port(peer: str, address: str) -> None:
    assert peer_address(peer) == address


def test_each_peer_has_its_share_and_all_together_the_total() -> None:
    budget = InFlightBudget(ErrorReason.TOO_MANY_STREAMS, total=3, per_peer=2)
    first = budget.take("ipv4:10.0.0.1:1")
    budget.take("ipv4:10.0.0.1:2")  # another connection of the same client
    with pytest.raises(InFlightLimit, match=r"the peer 10\.0\.0\.1 already has 2"):
        budget.take("ipv4:10.0.0.1:3")
    budget.take("ipv4:10.0.0.2:1")
    with pytest.raises(InFlightLimit, match="this server process already has 3"):
        budget.take("ipv4:10.0.0.3:1")
    first()
    budget.take("ipv4:10.0.0.3:1")


def test_without_a_share_per_peer_only_the_total_counts() -> None:
    budget = InFlightBudget(ErrorReason.TOO_MANY_CALLS, total=2)
    budget.take("ipv4:10.0.0.1:1")
    budget.take("ipv4:10.0.0.1:1")
    with pytest.raises(InFlightLimit) as refused:
        budget.take("ipv4:10.0.0.2:1")
    status = in_flight_limit_status(refused.value)
    assert status.code.name == "RESOURCE_EXHAUSTED"
    assert status.details.startswith("too many calls in flight")
