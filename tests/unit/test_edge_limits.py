"""envoy.yaml's limits as make run and the tests set them (EdgeLimits in devstack/envoy.py),
the details it gives gRPC callers it refuses, and its check of REST bodies' fields (the Lua
filter `make proto` generates)."""

from __future__ import annotations

import base64
import dataclasses
import re

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from devstack.envoy import (
    DESCRIPTOR,
    ENVOY_TEMPLATE,
    REST_CHECK,
    EdgeLimits,
    render_envoy_config,
)
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


def _lua_routes() -> list[tuple[str, re.Pattern[str], str, str, str]]:
    """The generated filter's ROUTES: HTTP method, path pattern (as a Python regex), body
    message, the body's path in the request, and the RPC."""
    rows = re.findall(
        r'^  \{ "(\w+)", "([^"]+)", "([^"]+)", "([^"]*)" \},  -- (\S+)$',
        REST_CHECK.read_text(),
        re.MULTILINE,
    )
    return [
        (method, re.compile(re.sub(r"%(.)", lambda m: re.escape(m[1]), lua)), body, prefix, rpc)
        for method, lua, body, prefix, rpc in rows
    ]


def test_the_rest_body_check_has_every_method_that_takes_a_message_as_json() -> None:
    """Each google.api.http rule with a body, its path's variables filled in, matches exactly
    one route of the generated Lua, the rule's own; the webhook's (a google.api.HttpBody,
    not JSON of a message) none."""
    routes = _lua_routes()
    image = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR.read_bytes())
    expected = []
    for file in image.file:
        for service in file.service:
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                verb = rule.WhichOneof("pattern")
                if verb is None or not rule.body:
                    continue
                path = re.sub(
                    r"\{[^}]+\}", "00000000-0000-4000-8000-00000000abcd", getattr(rule, verb)
                )
                rpc = f"{service.name}.{method.name}"
                matched = [
                    (body, prefix, name)
                    for m, pattern, body, prefix, name in routes
                    if m == verb.upper() and pattern.fullmatch(path)
                ]
                if rpc == "PaymentService.HandleProviderWebhook":
                    assert matched == []
                    continue
                request = method.input_type.removeprefix(".")
                if rule.body == "*":
                    assert matched == [(request, "", rpc)]
                else:
                    assert [(prefix, name) for _, prefix, name in matched] == [(rule.body, rpc)]
                expected.append(rpc)
    assert sorted(expected) == sorted(rpc for *_, rpc in routes)
    assert len(expected) >= 7


def test_envoy_loads_the_generated_check_and_renders_its_absolute_path() -> None:
    template = ENVOY_TEMPLATE.read_text()
    assert '{filename: "generated/rest_unknown_fields.lua"}' in template
    rendered = render_envoy_config(
        http_port=1, grpc_port=2, admin_port=3, provider_proxy_port=4, localstripe_port=5
    )
    assert REST_CHECK.is_absolute()
    assert REST_CHECK.is_file()
    assert f'{{filename: "{REST_CHECK}"}}' in rendered


def test_the_unknown_field_reply_reads_what_the_lua_filter_sets() -> None:
    """The filter names the field in dynamic metadata; envoy.yaml's local reply for it must
    match and read the same namespace and key."""
    lua = REST_CHECK.read_text()
    [(namespace, key)] = re.findall(r'dynamicMetadata\(\):set\("([^"]+)", "([^"]+)"', lua)
    template = ENVOY_TEMPLATE.read_text()
    assert f"filter: {namespace}\n" in template
    assert f"path: [{{key: {key}}}]" in template
    assert template.count(f"%DYNAMIC_METADATA({namespace}:{key})%") == 3
