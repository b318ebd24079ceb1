"""Developers explore the API with grpcurl through server reflection."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.stack import Stack

pytestmark = pytest.mark.e2e

GRPCURL = str(Path(sys.executable).parent / "grpcurl")


def test_grpcurl_lists_every_service(stack: Stack) -> None:
    listed = subprocess.run(
        [GRPCURL, "-plaintext", stack.grpc_target, "list"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    assert {
        "marketplace.catalog.v1.CatalogService",
        "marketplace.order.v1.OrderService",
        "marketplace.payment.v1.PaymentService",
        "grpc.health.v1.Health",
    } <= set(listed)


def test_grpcurl_describes_and_calls_through_reflection(stack: Stack) -> None:
    described = subprocess.run(
        [GRPCURL, "-plaintext", stack.grpc_target, "describe", "marketplace.order.v1.OrderService"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert "rpc CreateOrder" in described
    listed = subprocess.run(
        [
            GRPCURL,
            "-plaintext",
            "-d",
            '{"page_size": 1}',
            stack.grpc_target,
            "marketplace.catalog.v1.CatalogService/ListProducts",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listed.returncode == 0, listed.stderr


def test_health_reports_serving(stack: Stack) -> None:
    checked = subprocess.run(
        [GRPCURL, "-plaintext", stack.grpc_target, "grpc.health.v1.Health/Check"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert '"status": "SERVING"' in checked
