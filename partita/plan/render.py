"""Drawing a plan: the devices and links it uses, and a Gantt chart of the first requests.

matplotlib (Agg backend) is imported only when a plot is asked for, so planning never needs it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from partita.cluster import ClusterSpec
from partita.plan.types import Plan
from partita.units import format_quantity

__all__ = ["plot_plan"]


def plot_plan(plan: Plan, cluster: ClusterSpec, profile: Any, path: str | Path, *, requests: int | None = None
              ) -> None:
    """Write a PNG: left, the source and devices with the hops the plan uses; right, a Gantt chart.

    requests: how many requests the Gantt chart follows (None: enough to fill every replica twice, 6-24).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from partita.sim import trace

    fig, (ax_net, ax_gantt) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [1, 1.6]})
    colors = plt.get_cmap("tab10")
    _draw_network(ax_net, plan, cluster, colors)
    if requests is None:
        requests = max(6, min(24, 2 * max(stage.replicas for stage in plan.stages)))
    events = trace(plan, cluster, profile, requests=requests)
    rows: list[str] = []
    for event in events:
        label = f"{event.kind}: {event.server}"
        if label not in rows:
            rows.append(label)
    for event in events:
        y = rows.index(f"{event.kind}: {event.server}")
        width = (event.finish_s - event.start_s) * 1e3
        if width <= 0:
            continue
        ax_gantt.barh(y, width, left=event.start_s * 1e3, height=0.7, color=colors(event.request % 10),
                      edgecolor="black", linewidth=0.3)
    ax_gantt.set_yticks(range(len(rows)), rows, fontsize=8)
    ax_gantt.invert_yaxis()
    ax_gantt.set_xlabel("time (ms)")
    ax_gantt.set_title(f"first {requests} requests (colour = request); period {plan.period_s * 1e3:.2f} ms")
    fig.suptitle(f"{plan.model or 'model'}: {plan.planner} plan, {plan.throughput_rps:.3g} req/s, "
                 f"latency {plan.latency_s * 1e3:.1f} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw_network(ax, plan: Plan, cluster: ClusterSpec, colors) -> None:
    used = {name: k for k, stage in enumerate(plan.stages) for name in stage.devices}
    nodes = list(cluster.nodes)
    if len(nodes) > 40:  # a large cluster: draw only what the plan uses
        nodes = [cluster.source] + [n for n in plan.devices if n != cluster.source]
    position = {}
    for i, name in enumerate(nodes):
        angle = 2 * math.pi * i / len(nodes)
        position[name] = (math.cos(angle), math.sin(angle))
    groups = [(cluster.source,)] + [stage.devices for stage in plan.stages] + [(cluster.source,)]
    for a_group, b_group in zip(groups, groups[1:], strict=False):
        for a in a_group:
            for b in b_group:
                if a == b or a not in position or b not in position:
                    continue
                link = cluster.link(a, b)
                (x0, y0), (x1, y1) = position[a], position[b]
                ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                            arrowprops={"arrowstyle": "->", "color": "grey", "lw": 1.2})
                ax.text((x0 + x1) / 2, (y0 + y1) / 2, format_quantity(link.bandwidth_bytes_per_s, "B/s"),
                        fontsize=7, color="dimgrey", ha="center")
    for name, (x, y) in position.items():
        stage = used.get(name)
        color = "white" if stage is None else colors(stage % 10)
        edge = "black" if name == cluster.source else "grey"
        ax.scatter([x], [y], s=500, color=color, edgecolors=edge, zorder=3)
        label = name if stage is None else f"{name}\nstage {stage}"
        ax.text(x, y - 0.17, label, ha="center", va="top", fontsize=8)
    ax.set_title(f"devices and hops (source: {cluster.source})")
    ax.set_xlim(-1.4, 1.4)
    ax.set_ylim(-1.5, 1.4)
    ax.axis("off")
