"""The refusal tables together (tests/e2e/refusals.py, one table per test_bad_input_*.py)."""

from __future__ import annotations

import pytest

from tests.e2e import (
    test_bad_input_auth_and_transport,
    test_bad_input_catalog,
    test_bad_input_orders,
    test_bad_input_payments,
)
from tests.e2e.refusals import BOTH

pytestmark = pytest.mark.e2e

TABLES = (
    test_bad_input_orders.CASES,
    test_bad_input_catalog.CASES,
    test_bad_input_payments.CASES,
    test_bad_input_auth_and_transport.CASES,
)


def test_there_are_enough_cases() -> None:
    cases = [case_ for table in TABLES for case_ in table.cases]
    names = [case_.name for case_ in cases]
    assert len(names) == len(set(names))
    assert sum(1 for case_ in cases if set(case_.transports) == set(BOTH)) >= 25
