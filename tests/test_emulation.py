"""Link and device-speed emulation: the arithmetic against closed forms, then real sleeps with loose bounds."""

from __future__ import annotations

import math
import threading
import time

import pytest

from partita.errors import EmulationError
from partita.runtime.emulation import LinkShaper, SpeedEmulator, device_time

MB = 1_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_single_message_waits_serialisation_plus_latency_times_dilation():
    clock = FakeClock()
    link = LinkShaper(10 * MB, 0.005, dilation=4.0, clock=clock)

    delay = link.delay_for(2 * MB)

    assert delay == pytest.approx((2 * MB / (10 * MB) + 0.005) * 4.0)
    assert device_time(delay, 4.0) == pytest.approx(0.205)


def test_back_to_back_messages_serialise_on_bandwidth_but_overlap_latency():
    clock = FakeClock()
    link = LinkShaper(1 * MB, 0.050, clock=clock)

    delays = [link.delay_for(100_000) for _ in range(5)]

    # message i leaves after (i+1) * 0.1 s of serialisation plus one latency, not i latencies
    assert delays == pytest.approx([(i + 1) * 0.1 + 0.05 for i in range(5)])


def test_idle_link_recovers_and_burst_allows_a_free_message():
    clock = FakeClock()
    link = LinkShaper(1 * MB, 0.0, burst_bytes=50_000, clock=clock)

    first = link.delay_for(50_000)
    second = link.delay_for(50_000)
    clock.now += 10.0
    third = link.delay_for(50_000)

    assert first == 0.0
    assert second == pytest.approx(0.05)
    assert third == 0.0


def test_set_changes_bandwidth_and_latency_for_later_messages():
    clock = FakeClock()
    link = LinkShaper(1 * MB, 0.01, clock=clock)
    before = link.delay_for(100_000)
    clock.now += 1.0

    link.set(bandwidth=0.1 * MB, latency=0.02)
    after = link.delay_for(100_000)

    assert before == pytest.approx(0.11)
    assert after == pytest.approx(1.02)


def test_messages_never_overtake_when_latency_drops():
    clock = FakeClock()
    link = LinkShaper(math.inf, 1.0, clock=clock)
    slow = link.departure_at(10)
    link.set(latency=0.0)

    fast = link.departure_at(10)

    assert fast >= slow


def test_unlimited_bandwidth_and_zero_latency_mean_no_delay():
    link = LinkShaper(math.inf, 0.0, dilation=8.0)
    assert link.delay_for(10**9) == 0.0


def test_concurrent_reservations_add_up_to_the_total_serialisation_time():
    clock = FakeClock()
    link = LinkShaper(1 * MB, 0.0, clock=clock)
    results: list[float] = []
    lock = threading.Lock()

    def send_many() -> None:
        for _ in range(200):
            d = link.delay_for(1000)
            with lock:
                results.append(d)

    threads = [threading.Thread(target=send_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert max(results) == pytest.approx(800 * 1000 / MB)
    assert sorted(results) == pytest.approx([(i + 1) * 0.001 for i in range(800)])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bandwidth_bytes_per_s": 0, "latency_s": 0.0}, "bandwidth"),
        ({"bandwidth_bytes_per_s": 1.0, "latency_s": -1.0}, "latency"),
        ({"bandwidth_bytes_per_s": 1.0, "latency_s": 0.0, "dilation": 0.0}, "dilation"),
    ],
)
def test_link_shaper_refuses_impossible_settings(kwargs, match):
    with pytest.raises(EmulationError, match=match):
        LinkShaper(**kwargs)


def test_speed_emulator_waits_out_the_slower_device_time():
    slept: list[float] = []
    emu = SpeedEmulator(0.25, dilation=2.0, sleep=slept.append)

    result = emu.wait_after(0.010)

    assert slept == [pytest.approx(0.010 / 0.25 * 2.0 - 0.010)]
    assert result.device_s == pytest.approx(0.040)
    assert result.target_s == pytest.approx(0.040)
    assert result.shortfall_s == pytest.approx(0.0, abs=1e-12)
    assert emu.shortfalls == 0


def test_device_faster_than_host_is_reached_through_dilation():
    slept: list[float] = []
    emu = SpeedEmulator(4.0, dilation=8.0, sleep=slept.append)

    result = emu.wait_after(0.010)

    assert slept == [pytest.approx(0.010)]  # 0.010 / 4 * 8 = 0.020 real, 0.010 of it was compute
    assert result.device_s == pytest.approx(0.0025)


def test_host_too_slow_even_with_dilation_reports_the_shortfall():
    slept: list[float] = []
    emu = SpeedEmulator(4.0, dilation=2.0, sleep=slept.append)

    result = emu.wait_after(0.010)

    assert slept == []
    assert result.target_s == pytest.approx(0.0025)
    assert result.device_s == pytest.approx(0.005)
    assert result.shortfall_s == pytest.approx(0.0025)
    assert emu.shortfalls == 1 and emu.shortfall_s == pytest.approx(0.0025)


def test_speed_can_be_changed_while_running():
    slept: list[float] = []
    emu = SpeedEmulator(1.0, sleep=slept.append)
    emu.wait_after(0.01)

    emu.set(speed=0.2)
    emu.wait_after(0.01)

    assert slept == [pytest.approx(0.04)]
    with pytest.raises(EmulationError, match="speed"):
        emu.set(speed=0.0)


@pytest.mark.slow
def test_emulated_link_time_matches_its_target_in_real_time():
    dilation = 2.0
    link = LinkShaper(2 * MB, 0.020, dilation=dilation)
    start = time.monotonic()

    for _ in range(3):
        time.sleep(link.delay_for(100_000))  # sent one after the other by one sender
    elapsed_device_s = device_time(time.monotonic() - start, dilation)

    # each message waits its own 0.05 s serialisation + 0.02 s latency (the link idles meanwhile)
    target_s = 3 * (0.05 + 0.02)
    assert target_s <= elapsed_device_s < target_s + 0.15


@pytest.mark.slow
def test_emulated_compute_time_matches_its_target_in_real_time():
    emu = SpeedEmulator(0.5, dilation=2.0)
    start = time.monotonic()
    time.sleep(0.02)  # stands in for the real compute
    host_s = time.monotonic() - start

    result = emu.wait_after(host_s)
    elapsed_device_s = device_time(time.monotonic() - start, 2.0)

    assert result.target_s == pytest.approx(host_s / 0.5)
    assert result.target_s <= elapsed_device_s < result.target_s + 0.1
