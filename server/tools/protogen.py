"""Regenerates ``generated/`` from ``protos/`` (``make proto``) or checks it is current.

Writes into a scratch directory first, so ``--check`` can compare byte for byte and a
failed run never leaves ``generated/`` half written. Besides the Python code and the
descriptor set, writes the Lua filter by which Envoy refuses unknown fields in REST bodies:
the schema of every REST body, from the protos' google.api.http rules, followed by the
walker in ``rest_unknown_fields.lua`` beside this module.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

PROTO_ROOT = Path("protos")
DESCRIPTOR_NAME = "marketplace.binpb"
# Envoy needs these in the descriptor set to render rich error details as JSON.
EXTRA_DESCRIPTOR_INPUTS = ("google/rpc/error_details.proto", "google/rpc/status.proto")
REST_CHECK_NAME = "rest_unknown_fields.lua"
REST_CHECK_WALKER = Path(__file__).with_name(REST_CHECK_NAME)
# Well-known types whose JSON is not an object of their fields: a scalar (no keys) or an
# object of free keys. Their keys are not checked, like a map's.
SPECIAL_JSON = frozenset(
    f"google.protobuf.{name}"
    for name in (
        *("Any", "Struct", "Value", "ListValue", "Timestamp", "Duration", "FieldMask"),
        *("DoubleValue", "FloatValue", "Int64Value", "UInt64Value", "Int32Value"),
        *("UInt32Value", "BoolValue", "StringValue", "BytesValue"),
    )
)
# A body the method takes as it comes (the provider's webhook): not JSON of ours to check.
HTTP_BODY = "google.api.HttpBody"
# The OpenAPI plugin (server/tools/openapi.py) also reads these, for their comments: the
# error body and its details, and Money.
OPENAPI_EXTRA_INPUTS = ("google/type/money.proto", *EXTRA_DESCRIPTOR_INPUTS)


def _googleapis_include() -> str:
    import google.api.annotations_pb2 as annotations

    return str(Path(annotations.__file__).resolve().parents[2])


def _well_known_include() -> str:
    return str(resources.files("grpc_tools") / "_proto")


def _plugin(name: str) -> str:
    return f"protoc-gen-{name}={Path(sys.executable).parent / f'protoc-gen-{name}'}"


def _protoc(args: list[str]) -> None:
    includes = [f"-I{PROTO_ROOT}", f"-I{_googleapis_include()}", f"-I{_well_known_include()}"]
    code = protoc.main(["protoc", *includes, *args])
    if code != 0:
        raise SystemExit(f"protoc failed ({code}) for {args}")


def generate(out: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    _protoc(
        [
            f"--plugin={_plugin('mypy')}",
            f"--plugin={_plugin('mypy_grpc')}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            *protos,
        ]
    )
    _protoc(
        [
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={out / DESCRIPTOR_NAME}",
            *protos,
            *EXTRA_DESCRIPTOR_INPUTS,
        ]
    )
    with tempfile.TemporaryDirectory() as plugin_dir:
        # protoc runs a plugin by path: a script that starts this interpreter on the module.
        plugin = Path(plugin_dir) / "protoc-gen-openapi"
        plugin.write_text(f"#!/bin/sh\nexec '{sys.executable}' -m server.tools.openapi\n")
        plugin.chmod(0o700)
        _protoc(
            [
                f"--plugin=protoc-gen-openapi={plugin}",
                f"--openapi_out={out}",
                *protos,
                *OPENAPI_EXTRA_INPUTS,
            ]
        )
    image = (out / DESCRIPTOR_NAME).read_bytes()
    (out / REST_CHECK_NAME).write_text(rest_unknown_fields_lua(image))
    # Regular packages (not namespace ones) so setuptools and mypy find them plainly.
    for package_dir in {p.parent for p in out.rglob("*_pb2.py")}:
        current = package_dir
        while current != out:
            (current / "__init__.py").touch()
            (current / "py.typed").touch()
            current = current.parent


def rest_unknown_fields_lua(image: bytes) -> str:
    """Envoy's Lua filter for REST bodies: every google.api.http rule whose body is a JSON
    object of a message (HTTP method, path pattern, that message), the fields of every
    message such a body can hold, then the walker that checks a body's keys against them."""
    files = descriptor_pb2.FileDescriptorSet.FromString(image).file
    messages = dict(m for file in files for m in messages_of(file.package, file))
    routes = sorted(
        (*route, f"{service.name}.{method.name}")
        for file in files
        for service in file.service
        for method in service.method
        for rule in http_rules(method)
        if (route := _body_route(rule, method.input_type.removeprefix("."), messages))
    )
    lines = [
        "-- Generated by server/tools/protogen.py (`make proto`) from the protos; do not edit.",
        "-- Envoy's Lua filter for REST bodies (envoy.yaml): the schema, then the walker.",
        "",
        "-- Every REST method whose body is a message: HTTP method, path pattern, the body's",
        "-- message, and where the body is in the request message (field paths start there).",
        "local ROUTES = {",
        *(
            f'  {{ "{verb}", "{pattern}", "{body}", "{prefix}" }},  -- {rpc}'
            for verb, pattern, body, prefix, rpc in routes
        ),
        "}",
        "",
        "-- The fields of every message a body can hold, by JSON and proto name: the message",
        "-- each is, or false when its keys are not checked (scalars, maps, Struct, Any...).",
        "local MESSAGES = {",
    ]
    for name in sorted(_reachable([route[2] for route in routes], messages)):
        lines.append(f'  ["{name}"] = {{')
        for field in messages[name].field:
            kind = _checked_message(field, messages)
            value = "false" if kind is None else f'"{kind}"'
            names = dict.fromkeys((field.json_name, field.name))
            lines.append("    " + " ".join(f'["{n}"] = {value},' for n in names))
        lines.append("  },")
    lines += ["}", "", REST_CHECK_WALKER.read_text()]
    return "\n".join(lines)


def messages_of(
    scope: str, parent: descriptor_pb2.FileDescriptorProto | descriptor_pb2.DescriptorProto
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:
    """Every message of a file or message, nested ones included, by full name."""
    children = (
        parent.message_type
        if isinstance(parent, descriptor_pb2.FileDescriptorProto)
        else parent.nested_type
    )
    for message in children:
        name = f"{scope}.{message.name}" if scope else message.name
        yield name, message
        yield from messages_of(name, message)


def http_rules(method: descriptor_pb2.MethodDescriptorProto) -> list[http_pb2.HttpRule]:
    http = method.options.Extensions[annotations_pb2.http]
    return [http, *http.additional_bindings]


def _body_route(
    rule: http_pb2.HttpRule, request: str, messages: dict[str, descriptor_pb2.DescriptorProto]
) -> tuple[str, str, str, str] | None:
    """(HTTP method, Lua pattern of the path, body message, the body's JSON path in the
    request) of a rule whose body is a JSON object of a message; None for any other."""
    kind = rule.WhichOneof("pattern")
    if kind is None or not rule.body:
        return None
    if kind == "custom":
        verb, template = rule.custom.kind, rule.custom.path
    else:
        verb, template = kind.upper(), getattr(rule, kind)
    if rule.body == "*":
        body, prefix = request, ""
    else:
        [field] = [f for f in messages[request].field if f.name == rule.body]
        found = _checked_message(field, messages)
        if found is None:
            return None
        body, prefix = found, field.json_name
    if body == HTTP_BODY:
        return None
    return verb, _lua_pattern(template), body, prefix


def _checked_message(
    field: descriptor_pb2.FieldDescriptorProto, messages: dict[str, descriptor_pb2.DescriptorProto]
) -> str | None:
    """The message whose keys a field's JSON object must have; None when they are free or
    the field is no object (a scalar, a map, a well-known type with its own JSON)."""
    if field.type != descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE:
        return None
    name = field.type_name.removeprefix(".")
    if name in SPECIAL_JSON or messages[name].options.map_entry:
        return None
    return name


def _reachable(roots: list[str], messages: dict[str, descriptor_pb2.DescriptorProto]) -> set[str]:
    seen: set[str] = set()
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name not in seen:
            seen.add(name)
            pending += filter(None, (_checked_message(f, messages) for f in messages[name].field))
    return seen


def _lua_pattern(template: str) -> str:
    """A Lua pattern matching the paths of a google.api.http path template: a variable or
    `*` is one segment (without a colon, which would start a custom verb), `**` several."""
    template = re.sub(r"\{[^}=]*\}", "*", template)
    template = re.sub(r"\{[^}=]*=([^}]*)\}", r"\1", template)
    path, colon, verb = template.rpartition(":")
    if not colon or "/" in verb:
        path, colon, verb = template, "", ""
    wildcards = {"*": "[^/:]+", "**": "[^:]+"}
    segments = [wildcards.get(s) or re.sub(r"(\W)", r"%\1", s) for s in path.split("/")]
    return "^" + "/".join(segments) + (re.sub(r"(\W)", r"%\1", colon + verb)) + "$"


def _differences(expected: Path, actual: Path) -> list[str]:
    expected_files = {p.relative_to(expected) for p in expected.rglob("*") if p.is_file()}
    actual_files = {
        p.relative_to(actual)
        for p in actual.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    problems = [f"missing: {p}" for p in sorted(expected_files - actual_files)]
    problems += [f"unexpected: {p}" for p in sorted(actual_files - expected_files)]
    for rel in sorted(expected_files & actual_files):
        if not filecmp.cmp(expected / rel, actual / rel, shallow=False):
            problems.append(f"stale: {rel}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target", type=Path)
    parser.add_argument("--check", action="store_true", help="fail if target is stale")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch)
        generate(fresh)
        if options.check:
            problems = _differences(fresh, options.target)
            if problems:
                print("generated/ is stale; run `make proto`:", *problems, sep="\n  ")
                return 1
            print("generated/ is up to date")
            return 0
        if options.target.exists():
            shutil.rmtree(options.target)
        shutil.copytree(fresh, options.target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
