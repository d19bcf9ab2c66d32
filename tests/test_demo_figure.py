"""The figure `partita demo` writes: read at a glance, and never ambiguous.

Built from a hand-made result of four plans (no cluster needed): one colour per device and never
one of the predicted/measured colours, whole-number segment ticks, a latency panel, and a value
on every bar, however small.
"""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from partita.commands.demo import _summary, figure  # noqa: E402


def plan_result(stages, predicted_rps, measured_rps, predicted_latency_s, measured_latency_s, requests=30):
    return {
        "stages": [{"devices": list(devices), "segments": [a, b]} for devices, a, b in stages],
        "requests": requests,
        "predicted": {"throughput_rps": predicted_rps, "latency_s": predicted_latency_s, "period_s": 1 / predicted_rps},
        "measured": {"throughput_rps": measured_rps, "latency_single_s": measured_latency_s,
                     "period_s": 1 / measured_rps},
        "outputs_match": True,
    }


RESULTS = {
    "single": plan_result([(("jetson",), 0, 18)], 508.6, 507.9, 0.0075, 0.0076, requests=40),
    "even": plan_result([(("laptop",), 0, 4), (("jetson",), 4, 7), (("pi-a",), 7, 11), (("pi-b",), 11, 14),
                         (("pi-c",), 14, 18)], 28.5, 28.4, 0.0973, 0.0991),
    "memory": plan_result([(("laptop",), 0, 4), (("jetson",), 4, 9), (("pi-a",), 9, 11), (("pi-b",), 11, 14),
                           (("pi-c",), 14, 18)], 28.5, 28.5, 0.0876, 0.0878),
    "optimal": plan_result([(("laptop",), 0, 9), (("jetson",), 9, 17), (("pi-a", "pi-b"), 17, 18)],
                           939.7, 933.4, 0.0104, 0.0107, requests=51),
}


@pytest.fixture(scope="module")
def panels():
    fig = figure(RESULTS, _summary(RESULTS), None, title="resnet50 on home-edge")
    yield fig.axes
    plt.close(fig)


def test_the_figure_has_plans_throughput_and_latency_panels(panels):
    assert [ax.get_title() for ax in panels] == ["plans: stages and their devices", "throughput (higher is better)",
                                                 "latency (lower is better)"]


def test_no_colour_means_two_things(panels):
    plans, throughput, latency = panels
    device_colours = {to_hex(bar.get_facecolor()) for bar in plans.patches}
    figure_colours = {to_hex(bar.get_facecolor()) for ax in (throughput, latency) for bar in ax.patches}
    assert len(device_colours) == 5  # one per device
    assert len(figure_colours) == 2 and not device_colours & figure_colours


def test_the_segment_axis_has_whole_number_ticks(panels):
    ticks = [t for t in panels[0].get_xticks() if 0 <= t <= 18]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_every_bar_carries_its_value_even_near_zero(panels):
    for ax in panels[1:]:
        labels = [t.get_text() for t in ax.texts]
        assert len(labels) == len(ax.patches) == 8
    throughput_labels = [t.get_text() for t in panels[1].texts]
    assert "28.5" in throughput_labels and "28.4" in throughput_labels  # the bars next to ~940 read too
