"""Choosing OpenTelemetry exporters from the standard OTEL_* variables."""

from __future__ import annotations

import importlib.util

import pytest

from deadlift.errors import ConfigError
from deadlift.runtime.telemetry import _metric_exporter, _span_exporter


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_otlp_protocols_are_accepted_and_name_their_extra(
    monkeypatch: pytest.MonkeyPatch, protocol: str
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    module = {"grpc": "grpc", "http/protobuf": "http"}[protocol]
    installed = _installed(f"opentelemetry.exporter.otlp.proto.{module}")
    extra = {"grpc": "otlp-grpc", "http/protobuf": "otlp"}[protocol]
    for make in (_span_exporter, _metric_exporter):
        if installed:
            assert make("otlp") is not None
        else:
            with pytest.raises(ConfigError, match=rf"deadlift\[{extra}\]"):
                make("otlp")


def test_a_per_signal_protocol_wins_and_an_unknown_one_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")
    with pytest.raises(ConfigError, match="use http/protobuf or grpc"):
        _span_exporter("otlp")
    assert _span_exporter("none") is None
    with pytest.raises(ConfigError, match="use console, otlp or none"):
        _span_exporter("zipkin")
