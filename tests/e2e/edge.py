"""Reading what a REST caller gets: a JSON google.rpc.Status, whoever made it."""

from __future__ import annotations

import httpx
from google.protobuf import json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2

from tests.e2e.statuses import details_of


def parse_status(response: httpx.Response) -> status_pb2.Status:
    """The body as a google.rpc.Status: JSON of that message and nothing else."""
    answer = f"{response.status_code} {response.headers} {response.text[:600]}"
    assert response.headers.get("content-type", "").startswith("application/json"), answer
    status = status_pb2.Status()
    json_format.Parse(response.text, status)  # unknown fields or detail types fail here
    assert status.code != code_pb2.OK, answer
    assert status.message, answer
    return status


def check_retry_later(
    response: httpx.Response, http_status: int, code: int, reason: str
) -> status_pb2.Status:
    """A refusal that asks to come back: `retry-after: 1`, ErrorInfo `reason`, RetryInfo 1 s."""
    assert response.status_code == http_status, response.text[:300]
    assert response.headers["retry-after"] == "1"
    status = parse_status(response)
    assert status.code == code
    infos = details_of(status, error_details_pb2.ErrorInfo)
    assert [info.reason for info in infos] == [reason]
    [retry] = details_of(status, error_details_pb2.RetryInfo)
    assert retry.retry_delay.seconds == 1
    return status
