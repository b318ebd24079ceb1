"""envoy.yaml's limits as make run and the tests set them (EdgeLimits in devstack/envoy.py)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from devstack.envoy import ENVOY_TEMPLATE, EdgeLimits

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
