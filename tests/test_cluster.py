"""Cluster files: units, catalog, links, validation messages, derived clusters."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from partita.cluster import CATALOG, LINK_PRESETS, ClusterSpec, DeviceSpec, LinkSpec
from partita.errors import ClusterSpecError
from partita.units import parse_bandwidth, parse_compute, parse_latency, parse_memory

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "clusters"

ISSUE_EXAMPLE = """
source: client
devices:
  - {name: jetson, type: jetson-orin-nano}
  - {name: pi-a, flops_per_s: 1.35e10, memory_bytes: 4.0e9}
links:
  default: {bandwidth_bytes_per_s: 1.25e7, latency_s: 0.002}
  pairs:
    - {a: jetson, b: client, bandwidth_bytes_per_s: 1.25e8, latency_s: 0.0005}
"""


def write(tmp_path: Path, text: str, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_issue_example_loads_with_catalog_values_filled_in(tmp_path):
    spec = ClusterSpec.from_yaml(write(tmp_path, ISSUE_EXAMPLE))
    jetson = spec.device("jetson")
    assert jetson.flops_per_s == CATALOG["jetson-orin-nano"].flops_per_s
    assert jetson.memory_bytes == CATALOG["jetson-orin-nano"].memory_bytes
    assert jetson.type == "jetson-orin-nano"
    assert spec.device("pi-a") == DeviceSpec("pi-a", 1.35e10, 4.0e9)
    assert spec.source == "client"
    assert spec.names == ("jetson", "pi-a")


def test_links_are_symmetric_and_free_within_a_device(tmp_path):
    spec = ClusterSpec.from_yaml(write(tmp_path, ISSUE_EXAMPLE))
    assert spec.link("jetson", "client") == spec.link("client", "jetson") == LinkSpec(1.25e8, 0.0005)
    assert spec.link("pi-a", "jetson") == LinkSpec(1.25e7, 0.002)
    assert spec.link("pi-a", "pi-a") == LinkSpec(math.inf, 0.0)


def test_friendly_spellings_mean_base_si_units(tmp_path):
    text = """
source: pi
devices:
  - {name: pi, compute: 13.5GFLOPS, memory: 4GiB}
  - {name: nuc, compute: 1.2 TFLOP/s, memory: 16GB}
links:
  default: {bandwidth: 100Mbit/s, latency: 2ms}
  pairs:
    - {a: pi, b: nuc, bandwidth: 10MiB/s, latency: 500us}
"""
    spec = ClusterSpec.from_yaml(write(tmp_path, text))
    assert spec.device("pi").flops_per_s == 13.5e9
    assert spec.device("pi").memory_bytes == 4 * 2**30
    assert spec.device("nuc").flops_per_s == pytest.approx(1.2e12)
    assert spec.device("nuc").memory_bytes == 16e9
    assert spec.default_link == LinkSpec(12.5e6, 0.002)
    assert spec.link("nuc", "pi").bandwidth_bytes_per_s == 10 * 2**20
    assert spec.link("nuc", "pi").latency_s == pytest.approx(500e-6)


def test_link_presets_by_name_for_default_and_pairs(tmp_path):
    text = """
source: a
devices: [{name: a, type: raspberry-pi-4}, {name: b, type: raspberry-pi-5}]
links:
  default: wifi5
  pairs: [{a: a, b: b, preset: ethernet-1G}]
"""
    spec = ClusterSpec.from_yaml(write(tmp_path, text))
    assert spec.default_link == LINK_PRESETS["wifi5"]
    assert spec.link("b", "a") == LINK_PRESETS["ethernet-1G"]


def test_a_preset_can_be_partly_overridden():
    spec = ClusterSpec.from_dict({
        "source": "a", "devices": [{"name": "a", "type": "nvidia-t4"}],
        "links": {"default": {"preset": "lte", "latency": "80ms"}},
    })
    assert spec.default_link == LinkSpec(LINK_PRESETS["lte"].bandwidth_bytes_per_s, 0.08)


def test_catalog_has_eight_sourced_device_types_and_the_link_presets():
    assert len(CATALOG) >= 8
    for name, kind in CATALOG.items():
        assert kind.name == name
        assert kind.flops_per_s > 0 and kind.memory_bytes > 0
        assert kind.source_url.startswith("https://")
        assert kind.basis in ("measured", "peak")
    for wanted in ("raspberry-pi-3b", "raspberry-pi-4", "raspberry-pi-5", "jetson-nano", "jetson-orin-nano",
                   "nvidia-t4"):
        assert wanted in CATALOG
    for preset in ("wifi4", "wifi5", "ethernet-100M", "ethernet-1G", "lte"):
        assert LINK_PRESETS[preset].bandwidth_bytes_per_s > 0
    assert CATALOG["raspberry-pi-3b"].flops_per_s < CATALOG["raspberry-pi-4"].flops_per_s < CATALOG[
        "raspberry-pi-5"].flops_per_s < CATALOG["jetson-orin-nano"].flops_per_s
    assert LINK_PRESETS["wifi4"].bandwidth_bytes_per_s < LINK_PRESETS["ethernet-1G"].bandwidth_bytes_per_s


@pytest.mark.parametrize(("text", "field", "expected"), [
    ("source: c\ndevices: [{name: a, type: raspberry-pi-9}]\nlinks: {default: wifi5}",
     "devices[0].type", "expected one of"),
    ("source: c\ndevices: [{name: a, compute: 1GFLOPS, memory: 4 gigs}]\nlinks: {default: wifi5}",
     "devices[0].memory", "expected a memory size"),
    ("source: c\ndevices: [{name: a, memory: 1GiB}]\nlinks: {default: wifi5}",
     "devices[0]", "missing compute"),
    ("source: c\ndevices: [{name: a, type: nvidia-t4}]\nlinks: {default: wifi7}",
     "links.default.preset", "unknown link preset"),
    ("source: c\ndevices: [{name: a, type: nvidia-t4}]\nlinks: {default: {bandwidth: 1Mbit/s}}",
     "links.default", "missing latency"),
    ("source: c\ndevices: [{name: a, type: nvidia-t4}]\nlinks: {default: {bandwidth: fast, latency: 1ms}}",
     "links.default.bandwidth", "expected a bandwidth"),
    ("source: c\ndevices: [{name: a, type: nvidia-t4}]\nlinks: {default: wifi5, pairs: [{a: a, b: z, preset: lte}]}",
     "links.pairs[0].b", "unknown node 'z'"),
    ("source: c\ndevices: [{name: a, type: nvidia-t4, colour: red}]\nlinks: {default: wifi5}",
     "devices[0].colour", "unknown field"),
    ("devices: [{name: a, type: nvidia-t4}]\nlinks: {default: wifi5}", "source", "missing"),
    ("source: c\ndevices: [{name: a, type: nvidia-t4}, {name: a, type: nvidia-t4}]\nlinks: {default: wifi5}",
     "devices", "appears twice"),
    ("source: c\ndevices: [{name: a, type: nvidia-t4, memory: -1GB}]\nlinks: {default: wifi5}",
     "devices[0].memory", "> 0"),
    ("source: c\ndevices: []\nlinks: {default: wifi5}", "devices", "at least one device"),
])
def test_bad_files_name_the_file_the_field_and_what_was_expected(tmp_path, text, field, expected):
    path = write(tmp_path, text, "bad-cluster.yaml")
    with pytest.raises(ClusterSpecError) as info:
        ClusterSpec.from_yaml(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {field}")
    assert expected in message
    assert "\n" not in message


def test_unreadable_and_unparsable_files_say_so(tmp_path):
    with pytest.raises(ClusterSpecError, match="cannot read"):
        ClusterSpec.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ClusterSpecError, match="not valid YAML at line"):
        ClusterSpec.from_yaml(write(tmp_path, "source: [unclosed\n"))
    with pytest.raises(ClusterSpecError, match="expected a mapping"):
        ClusterSpec.from_yaml(write(tmp_path, "- just\n- a list\n"))


def test_to_dict_round_trips_and_yaml_too(tmp_path):
    spec = ClusterSpec.from_yaml(EXAMPLES / "home-edge.yaml")
    assert ClusterSpec.from_dict(spec.to_dict()) == spec
    spec.to_yaml(tmp_path / "out.yaml")
    assert ClusterSpec.from_yaml(tmp_path / "out.yaml") == spec
    assert hash(ClusterSpec.from_dict(spec.to_dict())) == hash(spec)


def test_derived_clusters_leave_the_original_unchanged():
    spec = ClusterSpec.from_yaml(EXAMPLES / "home-edge.yaml")
    slower = spec.replace_device("pi-a", flops_per_s=1e9)
    assert slower.device("pi-a").flops_per_s == 1e9
    assert spec.device("pi-a").flops_per_s == CATALOG["raspberry-pi-4"].flops_per_s
    smaller = spec.without("jetson")
    assert "jetson" not in smaller.names and "jetson" in spec.names
    assert all("jetson" not in pair for pair in smaller.pair_links)
    relinked = spec.with_link("pi-a", "pi-c", LinkSpec(1e3, 0.1))
    assert relinked.link("pi-c", "pi-a") == LinkSpec(1e3, 0.1)
    assert spec.link("pi-c", "pi-a") == spec.default_link
    with pytest.raises(ClusterSpecError, match="no device named 'nope'"):
        spec.device("nope")
    with pytest.raises(ClusterSpecError, match="rename"):
        spec.replace_device("pi-a", name="pi-z")


def test_spec_values_are_checked_when_built_in_code():
    with pytest.raises(ClusterSpecError, match="flops_per_s"):
        DeviceSpec("a", 0.0, 1e9)
    with pytest.raises(ClusterSpecError, match="latency_s"):
        LinkSpec(1e6, -1.0)
    with pytest.raises(ClusterSpecError, match="unknown node"):
        ClusterSpec((DeviceSpec("a", 1e9, 1e9),), "src", LinkSpec(1e6, 0.0),
                    {frozenset(("a", "ghost")): LinkSpec(1e6, 0.0)})


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_example_clusters_load(name):
    spec = ClusterSpec.from_yaml(EXAMPLES / name)
    assert spec.devices


def test_unit_parsers_accept_numbers_and_reject_nonsense():
    assert parse_bandwidth("1 Gbps") == 125e6
    assert parse_bandwidth("12.5MB/s") == 12.5e6
    assert parse_bandwidth(3) == 3.0
    assert parse_latency("1.5 s") == 1.5 and parse_latency(0) == 0.0
    assert parse_memory("1.35e10") == 1.35e10  # PyYAML leaves this spelling a string
    assert parse_compute("2 GFLOP/s") == 2e9
    for parser, bad in ((parse_bandwidth, "100 furlongs"), (parse_latency, "-2ms"), (parse_memory, True),
                        (parse_compute, float("inf"))):
        with pytest.raises(ValueError, match="expected"):
            parser(bad)
