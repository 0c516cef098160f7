"""Backend-reported load: the ``endpoint-load-metrics`` header as ORCA's TEXT and JSON forms."""

from __future__ import annotations

import math

import pytest

from dispatcher._orca import LoadReport, parse_load_report


def test_text_with_either_separator_and_the_map_fields() -> None:
    report = parse_load_report(
        "TEXT cpu_utilization=0.3, rps_fractional:120,eps=2.5, "
        "named_metrics.queue=7, utilization.gpu=0.9"
    )
    assert report == LoadReport(
        cpu_utilization=0.3,
        rps_fractional=120.0,
        eps=2.5,
        named_metrics={"queue": 7.0},
        utilization={"gpu": 0.9},
    )
    assert report.load == 0.3
    mixed = parse_load_report("TEXT application_utilization=0.5,cpu_utilization=0.9")
    assert mixed is not None and mixed.load == 0.5


def test_json_with_nested_maps() -> None:
    report = parse_load_report('JSON {"cpu_utilization": 1.5, "named_metrics": {"q": 3}}')
    assert report is not None
    assert (report.cpu_utilization, dict(report.named_metrics)) == (1.5, {"q": 3.0})


@pytest.mark.parametrize(
    "value",
    [
        "BIN CgQIARAC",
        "cpu_utilization=0.3",
        "TEXT cpu_utilization",
        "TEXT cpu_utilization=nan",
        f"TEXT eps={math.inf}",
        "TEXT eps=-1",
        "TEXT made_up=1",
        "TEXT named_metrics.=1",
        "JSON [1, 2]",
        "JSON {not json}",
    ],
)
def test_what_cannot_be_read_is_none(value: str) -> None:
    assert parse_load_report(value) is None
