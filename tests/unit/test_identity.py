"""Who may call what, and whose orders a caller may see."""

from __future__ import annotations

import pytest

from server.domain.errors import PermissionDenied, Unauthenticated
from server.domain.identity import Access, Principal, Role, authorize

pytestmark = pytest.mark.unit

CUSTOMER = Principal("alice", frozenset({Role.CUSTOMER}))
ADMIN = Principal("root", frozenset({Role.ADMIN}))
BOTH = Principal("ops", frozenset({Role.CUSTOMER, Role.ADMIN}))
NO_ROLE = Principal("ghost", frozenset())


def outcome(access: Access, principal: Principal | None) -> str:
    try:
        authorize(access, principal)
    except Unauthenticated:
        return "unauthenticated"
    except PermissionDenied:
        return "denied"
    return "ok"


@pytest.mark.parametrize("principal", [None, CUSTOMER, ADMIN, BOTH, NO_ROLE])
def test_public_calls_admit_anyone(principal: Principal | None) -> None:
    assert outcome(Access.PUBLIC, principal) == "ok"


@pytest.mark.parametrize("access", [Access.AUTHENTICATED, Access.CUSTOMER, Access.ADMIN])
def test_non_public_calls_need_a_token(access: Access) -> None:
    with pytest.raises(Unauthenticated) as raised:
        authorize(access, None)
    assert raised.value.reason == "MISSING_TOKEN"


@pytest.mark.parametrize("principal", [CUSTOMER, ADMIN, BOTH])
def test_authenticated_calls_admit_any_role(principal: Principal) -> None:
    assert outcome(Access.AUTHENTICATED, principal) == "ok"


def test_authenticated_calls_refuse_a_token_without_roles() -> None:
    with pytest.raises(PermissionDenied) as raised:
        authorize(Access.AUTHENTICATED, NO_ROLE)
    assert raised.value.required_role == Role.CUSTOMER


@pytest.mark.parametrize("principal", [CUSTOMER, BOTH])
def test_customer_calls_admit_customers(principal: Principal) -> None:
    assert outcome(Access.CUSTOMER, principal) == "ok"


@pytest.mark.parametrize("principal", [ADMIN, NO_ROLE])
def test_customer_calls_refuse_non_customers(principal: Principal) -> None:
    with pytest.raises(PermissionDenied) as raised:
        authorize(Access.CUSTOMER, principal)
    assert raised.value.required_role == Role.CUSTOMER
    assert "customer role" in raised.value.message


@pytest.mark.parametrize("principal", [ADMIN, BOTH])
def test_admin_calls_admit_admins(principal: Principal) -> None:
    assert outcome(Access.ADMIN, principal) == "ok"


@pytest.mark.parametrize("principal", [CUSTOMER, NO_ROLE])
def test_admin_calls_refuse_non_admins(principal: Principal) -> None:
    with pytest.raises(PermissionDenied) as raised:
        authorize(Access.ADMIN, principal)
    assert raised.value.required_role == Role.ADMIN
    assert "admin role" in raised.value.message


def test_every_access_level_has_a_rule() -> None:
    """A new Access member must be decided here too, not fall through to 'allowed'."""
    outcomes = {
        access: [outcome(access, principal) for principal in (None, NO_ROLE, CUSTOMER, ADMIN)]
        for access in Access
    }
    assert outcomes == {
        Access.PUBLIC: ["ok", "ok", "ok", "ok"],
        Access.AUTHENTICATED: ["unauthenticated", "denied", "ok", "ok"],
        Access.CUSTOMER: ["unauthenticated", "denied", "ok", "denied"],
        Access.ADMIN: ["unauthenticated", "denied", "denied", "ok"],
    }


def test_is_admin() -> None:
    assert ADMIN.is_admin
    assert BOTH.is_admin
    assert not CUSTOMER.is_admin
    assert not NO_ROLE.is_admin


def test_customer_sees_only_themself() -> None:
    assert CUSTOMER.may_see_customer("alice")
    assert not CUSTOMER.may_see_customer("bob")
    assert not CUSTOMER.may_see_customer("Alice")
    assert not CUSTOMER.may_see_customer("")


def test_admin_sees_every_customer() -> None:
    assert ADMIN.may_see_customer("alice")
    assert ADMIN.may_see_customer("bob")


def test_a_subject_without_roles_still_sees_its_own_data() -> None:
    assert NO_ROLE.may_see_customer("ghost")
    assert not NO_ROLE.may_see_customer("alice")


def test_roles_are_plain_strings_for_tokens_and_metadata() -> None:
    assert {role.value for role in Role} == {"customer", "admin"}
    assert Role("admin") is Role.ADMIN
    assert f"{Role.CUSTOMER}" == "customer"
