"""envoy.yaml refuses a query parameter that names a field the URL path binds (the transcoder
would let the query's value override the path's); its list of names must cover every path
variable of the protos' google.api.http rules, in proto and JSON spelling."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _path_variables() -> set[str]:
    image = (ROOT / "generated" / "marketplace.binpb").read_bytes()
    variables = set()
    for file in descriptor_pb2.FileDescriptorSet.FromString(image).file:
        for service in file.service:
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                pattern = rule.WhichOneof("pattern")
                if pattern is not None and pattern != "custom":
                    variables.update(re.findall(r"\{([^}=]+)", getattr(rule, pattern)))
    return variables


def _json_name(path: str) -> str:
    return ".".join(re.sub(r"_([a-z])", lambda m: m[1].upper(), part) for part in path.split("."))


def _refusing_regex() -> re.Pattern[str]:
    [line] = [
        line for line in (ROOT / "envoy.yaml").read_text().splitlines() if "product\\\\.id" in line
    ]
    quoted = re.search(r'regex: "(.*)"\}', line)
    assert quoted is not None, line
    return re.compile(quoted[1].replace("\\\\", "\\"))


def test_the_protos_bind_the_names_we_expect() -> None:
    assert _path_variables() == {"id", "product.id", "order_id"}


@pytest.mark.parametrize("variable", sorted(_path_variables()))
def test_a_query_parameter_naming_a_path_variable_is_refused(variable: str) -> None:
    regex = _refusing_regex()
    for name in {variable, _json_name(variable)}:
        assert regex.fullmatch(f"/v1/products/p1?{name}=p2")
        assert regex.fullmatch(f"/v1/products/p1?updateMask=name&{name}=p2&x=1")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/products/p1",
        "/v1/products?pageSize=1&pageToken=abc",
        "/v1/products/p1?updateMask=name",
        "/v1/orders/o1/payments?pageToken=orderId",
        "/v1/products?uid=1",
    ],
)
def test_other_queries_pass(path: str) -> None:
    assert not _refusing_regex().fullmatch(path)
