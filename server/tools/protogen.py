"""Regenerates ``generated/`` from ``protos/`` (``make proto``) or checks it is current.

Writes into a scratch directory first, so ``--check`` can compare byte for byte and a
failed run never leaves ``generated/`` half written.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path("protos")
DESCRIPTOR_NAME = "marketplace.binpb"
# Envoy needs these in the descriptor set to render rich error details as JSON.
EXTRA_DESCRIPTOR_INPUTS = ("google/rpc/error_details.proto", "google/rpc/status.proto")


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
    # Regular packages (not namespace ones) so setuptools and mypy find them plainly.
    for package_dir in {p.parent for p in out.rglob("*_pb2.py")}:
        current = package_dir
        while current != out:
            (current / "__init__.py").touch()
            (current / "py.typed").touch()
            current = current.parent


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
