"""Reading what a REST caller gets: a JSON google.rpc.Status, whoever made it."""

from __future__ import annotations

import httpx
from google.protobuf import json_format
from google.rpc import code_pb2, status_pb2


def parse_status(response: httpx.Response) -> status_pb2.Status:
    """The body as a google.rpc.Status: JSON of that message and nothing else."""
    answer = f"{response.status_code} {response.headers} {response.text[:600]}"
    assert response.headers.get("content-type", "").startswith("application/json"), answer
    status = status_pb2.Status()
    json_format.Parse(response.text, status)  # unknown fields or detail types fail here
    assert status.code != code_pb2.OK, answer
    assert status.message, answer
    return status
