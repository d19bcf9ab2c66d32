"""partita.runtime.figures: measured figures joined with the plan's, in device time."""

from __future__ import annotations

import pytest

from partita.runtime.figures import link_figures, quantile, stream_figures


def test_stream_figures_are_device_time_and_links_are_counted_by_their_receiver():
    figures = stream_figures([0.0, 0.2, 0.4], [0.3, 0.1, 0.2], k=2.0)  # host seconds, dilation 2
    assert figures["period_s"] == pytest.approx(0.1) and figures["throughput_rps"] == pytest.approx(10.0)
    assert figures["latency_p50_s"] == pytest.approx(0.1) and figures["latency_p95_s"] == pytest.approx(0.15)
    assert stream_figures([1.0], [], k=1.0) == {"throughput_rps": None, "period_s": None,
                                                "latency_p50_s": None, "latency_p95_s": None}
    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0 and quantile([], 0.5) is None
    predicted = [{"from": "client", "to": "a"}, {"from": "a", "to": "client", "to_source": True},
                 {"from": "a", "to": "b"}]
    workers = {"a": {"links_in": {"client": {"messages": 4, "mean_transfer_s": 0.02}}},
               "b": {"links_in": {"a": {"messages": 0, "mean_transfer_s": 0.0}}}}
    to_source = {"a": {"messages": 2, "mean_transfer_s": 0.04}}
    measured = [link["measured_transfer_s"] for link in link_figures(predicted, to_source, workers, k=2.0)]
    assert measured == [pytest.approx(0.01), pytest.approx(0.02), None]  # a link with no message has no figure
