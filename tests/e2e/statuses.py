"""Reading a refusal the same way whichever door it came through: a google.rpc.Status from
gRPC trailers or from Envoy's JSON body, and the HTTP status Envoy gives each gRPC code."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

# Make sure every detail type the server sends is known to json_format's Any resolution.
DETAIL_TYPES = (
    error_details_pb2.BadRequest,
    error_details_pb2.ErrorInfo,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.ResourceInfo,
    error_details_pb2.RetryInfo,
)

# Envoy's gRPC -> HTTP mapping (Grpc::Utility::grpcToHttpStatus), the one the transcoder uses.
HTTP_STATUS_OF: Mapping[int, int] = {
    code_pb2.OK: 200,
    code_pb2.CANCELLED: 499,
    code_pb2.UNKNOWN: 500,
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.DEADLINE_EXCEEDED: 504,
    code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409,
    code_pb2.PERMISSION_DENIED: 403,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.FAILED_PRECONDITION: 400,
    code_pb2.ABORTED: 409,
    code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNIMPLEMENTED: 501,
    code_pb2.INTERNAL: 500,
    code_pb2.UNAVAILABLE: 503,
    code_pb2.DATA_LOSS: 500,
    code_pb2.UNAUTHENTICATED: 401,
}

M = TypeVar("M", bound=Message)


def code_name(code: int) -> str:
    name: str = code_pb2.Code.Name(code)
    return name


def status_of_rpc_error(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The rich status in `grpc-status-details-bin`, or a bare one from code and message."""
    rich = rpc_status.from_call(error)  # works on AioRpcError: it has code/details/trailers
    if rich is not None:
        return rich
    code: int = error.code().value[0]
    return status_pb2.Status(code=code, message=error.details() or "")


def status_of_json(body: Mapping[str, Any]) -> status_pb2.Status:
    """Envoy's `convert_grpc_status` body: a google.rpc.Status in proto3 JSON."""
    status = status_pb2.Status()
    json_format.ParseDict(dict(body), status, ignore_unknown_fields=True)
    return status


def details_of(status: status_pb2.Status, message_type: type[M]) -> list[M]:
    found = []
    for packed in status.details:
        if packed.Is(message_type.DESCRIPTOR):
            message = message_type()
            packed.Unpack(message)
            found.append(message)
    return found


def detail_of(status: status_pb2.Status, message_type: type[M]) -> M:
    """The one detail of `message_type`; fails when there is none or more than one."""
    found = details_of(status, message_type)
    kinds = [packed.type_url for packed in status.details]
    assert len(found) == 1, f"expected one {message_type.DESCRIPTOR.full_name} in {kinds}"
    return found[0]
