"""REST callers read field violations in the JSON names they wrote (server/api/errors.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2, status_pb2

from server.api.errors import domain_error_status, json_field_path
from server.domain.errors import FieldViolation, InvalidArgument

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("proto", "json"),
    [
        ("request_id", "requestId"),
        ("items[0].product_id", "items[0].productId"),
        ("items[12].quantity", "items[12].quantity"),
        ("product.price.currency_code", "product.price.currencyCode"),
        ("update_mask.paths[1]", "updateMask.paths[1]"),
        ("(request)", "(request)"),
    ],
)
def test_json_field_path(proto: str, json: str) -> None:
    assert json_field_path(proto) == json


def test_every_field_of_the_api_has_the_json_name_we_compute() -> None:
    """json_field_path is protoc's default json_name; a proto setting its own would differ."""
    image = (ROOT / "generated" / "marketplace.binpb").read_bytes()
    messages = [
        message
        for file in descriptor_pb2.FileDescriptorSet.FromString(image).file
        if file.package.startswith("marketplace.")
        for message in file.message_type
    ]
    fields = []
    while messages:
        message = messages.pop()
        fields.extend(message.field)
        messages.extend(message.nested_type)
    assert len(fields) > 20
    for field in fields:
        assert field.json_name == json_field_path(field.name), field.name


def _bad_request(status: status_pb2.Status) -> error_details_pb2.BadRequest:
    for packed in status.details:
        if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            packed.Unpack(bad_request)
            return bad_request
    raise AssertionError("no BadRequest")


@pytest.mark.parametrize(
    ("json_names", "field", "message"),
    [
        (False, "items[0].product_id", "invalid request: items[0].product_id: must be a UUID"),
        (True, "items[0].productId", "invalid request: items[0].productId: must be a UUID"),
    ],
)
def test_violations_and_message_use_the_callers_names(
    json_names: bool, field: str, message: str
) -> None:
    error = InvalidArgument([FieldViolation("items[0].product_id", "must be a UUID")])
    grpc_status = domain_error_status(error, json_names=json_names)
    details = dict(grpc_status.trailing_metadata)["grpc-status-details-bin"]
    assert isinstance(details, bytes)
    proto = status_pb2.Status.FromString(details)
    assert [v.field for v in _bad_request(proto).field_violations] == [field]
    assert proto.message == grpc_status.details == message
