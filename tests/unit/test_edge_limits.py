"""envoy.yaml's limits as make run and the tests set them (EdgeLimits in devstack/envoy.py),
and the details it gives gRPC callers it refuses."""

from __future__ import annotations

import base64
import dataclasses
import re

import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from devstack.envoy import ENVOY_TEMPLATE, EdgeLimits
from server.api.errors import ERROR_DOMAIN
from server.domain.errors import ErrorReason

pytestmark = pytest.mark.unit


def test_envoy_yaml_as_written_has_the_defaults() -> None:
    template = ENVOY_TEMPLATE.read_text()
    assert EdgeLimits().render(template) == template


def test_every_marked_line_takes_its_setting() -> None:
    defaults = dataclasses.asdict(EdgeLimits())
    odd = EdgeLimits(**{name: 100_000 + n for n, name in enumerate(defaults)})
    rendered = odd.render(ENVOY_TEMPLATE.read_text())
    for name, value in dataclasses.asdict(odd).items():
        marked = re.findall(rf"(\d+)\D*# {name.upper()}$", rendered, re.MULTILINE)
        assert marked, name
        assert set(marked) == {str(value)}, name


def test_the_environment_sets_what_it_names() -> None:
    limits = EdgeLimits.from_environment({"REST_MAX_BODY_BYTES": "2048", "PATH": "/bin"})
    assert limits == dataclasses.replace(EdgeLimits(), rest_max_body_bytes=2048)


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="REST_MAX_HEADERS_KB"):
        EdgeLimits(rest_max_headers_kb=0)


def test_the_details_envoy_gives_grpc_callers_match_their_message() -> None:
    """grpc-status-details-bin must decode to a Status whose message is the grpc-message
    Envoy sends (clients such as grpc_status.rpc_status refuse a mismatch)."""
    pairs = re.findall(
        r'key: grpc-status-details-bin\s+value: "([^"]+)"\s+'
        r'body_format_override:\s+text_format: "([^"]+)"',
        ENVOY_TEMPLATE.read_text(),
    )
    reasons = {}
    for encoded, message in pairs:
        status = status_pb2.Status.FromString(base64.b64decode(encoded))
        assert status.message == message
        info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(info)
        assert status.details[1].Unpack(retry)
        assert (info.domain, retry.retry_delay.seconds) == (ERROR_DOMAIN, 1)
        reasons[info.reason] = status.code
    assert reasons == {
        "RATE_LIMITED": code_pb2.RESOURCE_EXHAUSTED,
        "SERVICE_UNAVAILABLE": code_pb2.UNAVAILABLE,
    }


def test_every_reason_envoy_sends_is_catalogued() -> None:
    reasons = set(re.findall(r"reason: ([A-Z_]+)$", ENVOY_TEMPLATE.read_text(), re.MULTILINE))
    assert len(reasons) >= 9
    assert reasons <= {reason.value for reason in ErrorReason}
