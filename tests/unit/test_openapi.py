"""generated/openapi.json (written by `make proto` through server/tools/openapi.py) is a valid
OpenAPI document that says what the protos say: every google.api.http rule, bodies in
protobuf's JSON mapping, required and output-only fields, the bearer scheme and the errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from google.api import field_behavior_pb2
from google.protobuf import descriptor_pb2
from openapi_spec_validator import validate

from server.api.policy import ACCESS_POLICIES
from server.domain.identity import Access
from server.tools.protogen import http_rules, messages_of

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
Field = descriptor_pb2.FieldDescriptorProto
INT64 = {Field.TYPE_INT64, Field.TYPE_SINT64, Field.TYPE_SFIXED64}
UINT64 = {Field.TYPE_UINT64, Field.TYPE_FIXED64}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((ROOT / "generated" / "openapi.json").read_text())
    return loaded


@pytest.fixture(scope="module")
def files() -> list[descriptor_pb2.FileDescriptorProto]:
    image = (ROOT / "generated" / "marketplace.binpb").read_bytes()
    return list(descriptor_pb2.FileDescriptorSet.FromString(image).file)


def _resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """The schema a $ref (or an allOf of one, which carries a field's notes) points to."""
    while True:
        if "$ref" in schema:
            *_, kind, name = schema["$ref"].split("/")
            schema = document["components"][kind][name]
        elif len(schema.get("allOf", [])) == 1:
            schema = schema["allOf"][0]
        else:
            return schema


def _behaviors(field: Field) -> set[int]:
    return set(field.options.Extensions[field_behavior_pb2.field_behavior])


def test_the_document_is_valid_openapi(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"].startswith("3.")


def test_every_http_rule_of_every_service_is_an_operation(
    document: dict[str, Any], files: list[descriptor_pb2.FileDescriptorProto]
) -> None:
    # Path variables are written in JSON names in the document (`{orderId}`), in proto
    # field paths in the rules (`{order_id}`); the rest of the path must be the same.
    def shape(path: str) -> str:
        return re.sub(r"\{[^}]*\}", "{}", path)

    operations = {
        (shape(path), verb): operation
        for path, item in document["paths"].items()
        for verb, operation in item.items()
    }
    rules = []
    for file in files:
        for service in file.service:
            for method in service.method:
                for rule in http_rules(method):
                    kind = rule.WhichOneof("pattern")
                    if kind is not None:
                        rules.append((service.name, method.name, kind, getattr(rule, kind)))
    assert len(rules) >= 16  # the four REST services' routes
    for service, method, verb, template in rules:
        operation = operations.pop((shape(template), verb))
        assert operation["operationId"] == f"{service}_{method}"
        assert operation["tags"] == [service]
        assert operation["summary"]
    assert operations == {}, "operations without a rule"


def test_path_variables_are_required_parameters_in_json_names(document: dict[str, Any]) -> None:
    payments = document["paths"]["/v1/orders/{orderId}/payments"]
    for operation in payments.values():
        [order] = [p for p in operation["parameters"] if p["in"] == "path"]
        assert order == {**order, "name": "orderId", "required": True}
    update = document["paths"]["/v1/products/{product.id}"]["patch"]
    assert {(p["name"], p["in"]) for p in update["parameters"]} == {
        ("product.id", "path"),
        ("updateMask", "query"),
    }


def test_lists_take_page_size_and_token_from_the_query(document: dict[str, Any]) -> None:
    for path in ("/v1/products", "/v1/orders", "/v1/deadLetters"):
        parameters = {p["name"]: p for p in document["paths"][path]["get"]["parameters"]}
        assert parameters["pageSize"]["in"] == "query"
        assert parameters["pageSize"]["schema"] == {"type": "integer", "format": "int32"}
        assert parameters["pageToken"]["schema"] == {"type": "string"}


def test_create_orders_body_is_the_request_in_json_names(document: dict[str, Any]) -> None:
    operation = document["paths"]["/v1/orders"]["post"]
    body = _resolve(document, operation["requestBody"]["content"]["application/json"]["schema"])
    assert set(body["properties"]) == {"requestId", "items"}
    assert set(body["required"]) == {"requestId", "items"}
    items = body["properties"]["items"]
    assert items["type"] == "array"
    item = _resolve(document, items["items"])
    assert {"productId", "quantity"} <= set(item["properties"])
    assert set(item["required"]) == {"productId", "quantity"}
    assert item["properties"]["quantity"]["type"] == "integer"
    # What the server fills in is read-only, so it is no part of a request's example.
    assert item["properties"]["unitPrice"]["readOnly"] is True


def test_a_body_of_the_whole_request_leaves_out_what_the_path_gives(
    document: dict[str, Any],
) -> None:
    operation = document["paths"]["/v1/products/{id}:adjustStock"]["post"]
    body = _resolve(document, operation["requestBody"]["content"]["application/json"]["schema"])
    assert list(body["properties"]) == ["delta", "reason", "requestId"]
    assert body["properties"]["delta"]["type"] == "string"  # int64
    assert set(body["required"]) == {"delta", "requestId"}


def test_a_body_of_one_field_is_that_fields_message(document: dict[str, Any]) -> None:
    create = document["paths"]["/v1/products"]["post"]["requestBody"]
    assert create["required"] is True
    product = create["content"]["application/json"]["schema"]
    assert product == {"$ref": "#/components/schemas/marketplace.catalog.v1.Product"}
    # A partial update reads only the fields its mask names: the same fields, none required.
    update = document["paths"]["/v1/products/{product.id}"]["patch"]["requestBody"]
    partial = update["content"]["application/json"]["schema"]
    whole = _resolve(document, product)
    assert partial["properties"] == whole["properties"]
    assert "required" not in partial
    assert whole["required"]


def test_json_mapping_of_fields(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    product = schemas["marketplace.catalog.v1.Product"]["properties"]
    assert product["stock"]["type"] == "string"
    assert product["stock"]["format"] == "int64"
    assert product["createTime"]["format"] == "date-time"
    assert product["createTime"]["readOnly"] is True
    price = _resolve(document, product["price"])
    assert set(price["properties"]) == {"currencyCode", "units", "nanos"}
    assert price["properties"]["units"]["type"] == "string"
    source = _resolve(document, product["inventorySource"])
    assert source["type"] == "string"
    assert "INVENTORY_SOURCE_WAREHOUSE" in source["enum"]
    assert set(schemas["marketplace.catalog.v1.Product"]["required"]) == {"sku", "name", "price"}
    order = schemas["marketplace.order.v1.Order"]["properties"]
    assert order["status"]["readOnly"] is True
    assert _resolve(document, order["status"])["enum"][2] == "ORDER_STATUS_PAID"
    headers = schemas["marketplace.events.v1.DeadLetter"]["properties"]["headers"]
    assert headers["additionalProperties"] == {"type": "string"}  # a map


def test_every_message_schema_agrees_with_its_descriptor(
    document: dict[str, Any], files: list[descriptor_pb2.FileDescriptorProto]
) -> None:
    """Names, 64-bit integers, enums, required and output-only, for every component."""
    messages = dict(m for file in files for m in messages_of(file.package, file))
    enums = {f"{file.package}.{enum.name}": enum for file in files for enum in file.enum_type}
    checked = 0
    for name, schema in document["components"]["schemas"].items():
        if name in enums:
            assert schema["enum"] == [value.name for value in enums[name].value]
            continue
        fields = {field.json_name: field for field in messages[name].field}
        assert set(schema["properties"]) - {"@type"} == set(fields), name
        for json_name, field in fields.items():
            property_schema = schema["properties"][json_name]
            if field.label == Field.LABEL_REPEATED and "additionalProperties" not in (
                property_schema
            ):
                property_schema = property_schema["items"]
            if field.type in INT64 | UINT64:
                assert property_schema["type"] == "string", (name, json_name)
            if field.type == Field.TYPE_ENUM:
                assert _resolve(document, property_schema)["type"] == "string"
            behaviors = _behaviors(field)
            assert (json_name in schema.get("required", [])) == (
                field_behavior_pb2.REQUIRED in behaviors
            ), (name, json_name)
            if field_behavior_pb2.OUTPUT_ONLY in behaviors:
                assert schema["properties"][json_name]["readOnly"] is True, (name, json_name)
        checked += 1
    assert checked >= 20


def test_a_bearer_token_guards_all_but_the_public_methods(document: dict[str, Any]) -> None:
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        **document["components"]["securitySchemes"]["bearerAuth"],
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }
    assert document["security"] == [{"bearerAuth": []}]
    public = {
        method.rpartition(".")[2].replace("/", "_")
        for method, access in ACCESS_POLICIES.items()
        if access is Access.PUBLIC
    }
    anonymous = set()
    for item in document["paths"].values():
        for operation in item.values():
            if operation["security"] == []:
                anonymous.add(operation["operationId"])
            else:
                assert operation["security"] == [{"bearerAuth": []}]
    assert anonymous == {
        "CatalogService_ListProducts",
        "CatalogService_GetProduct",
        "PaymentService_HandleProviderWebhook",
    }
    assert anonymous <= public
    refund = document["paths"]["/v1/payments/{id}:refund"]["post"]
    assert "`admin` role" in refund["description"]


def test_every_error_is_a_google_rpc_status(document: dict[str, Any]) -> None:
    status_ref = "#/components/schemas/google.rpc.Status"
    for item in document["paths"].values():
        for operation in item.values():
            for code in ("4XX", "5XX"):
                response = _resolve(document, operation["responses"][code])
                assert response["content"]["application/json"]["schema"] == {"$ref": status_ref}
    status = document["components"]["schemas"]["google.rpc.Status"]
    assert list(status["properties"]) == ["code", "message", "details"]
    details = status["properties"]["details"]["items"]["anyOf"]
    kinds = {_resolve(document, d)["properties"]["@type"]["enum"][0] for d in details}
    assert {
        "type.googleapis.com/google.rpc.ErrorInfo",
        "type.googleapis.com/google.rpc.BadRequest",
        "type.googleapis.com/google.rpc.PreconditionFailure",
        "type.googleapis.com/google.rpc.RetryInfo",
    } <= kinds
