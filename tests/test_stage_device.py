"""Stages on a torch device: StageProgram.to and the worker's executor, which moves tensors to and fro.

On the CPU a moved stage is bit-identical; on an accelerator it is close (kernels differ, so
bit-identity across devices is not expected). The CUDA test runs only where torch sees a GPU.
"""

from __future__ import annotations

import queue
import time

import pytest
import torch
import zoo

from partita.model import flatten_inputs, split
from partita.runtime.executor import Done, Job, StageExecutor, resolve_device


@pytest.fixture(scope="module", params=["unet", "two_input_dict"])
def chain(request):
    """(stages of a zoo model split in three, its flat example inputs)."""
    _, inputs, graph = zoo.captured(request.param)
    n = len(graph.segments)
    return split(graph, [n // 3, 2 * n // 3]), tuple(flatten_inputs(*inputs))


def run_chain(stages, tensors):
    for stage in stages:
        tensors = stage.run(*tensors)
    return tensors


def run_in_executor(device: str, program, tensors) -> Done:
    """Load `program` as stage 0 of an executor on `device`, submit one job, and return its outcome."""
    done: queue.Queue[Done] = queue.Queue()
    executor = StageExecutor(torch.device(device), capacity_bytes=2**30, on_taken=lambda job: None, on_done=done.put)
    executor.load(0, program, memory_bytes=0.0, reference_host_s=None, owner="test")
    executor.start()
    try:
        executor.submit(Job(0, 1, 1, tuple(tensors), b"peer", 0.0))
        return done.get(timeout=60)
    finally:
        executor.stop()


def test_moving_a_stage_to_the_cpu_keeps_outputs_bit_identical(chain):
    stages, inputs = chain
    moved = [stage.to("cpu") for stage in stages]
    expected = run_chain(stages, inputs)
    got = run_chain(moved, inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_a_moved_stage_is_a_new_program_with_the_archive_checksum(chain):
    stages, _ = chain
    original = stages[1]
    moved = original.to("cpu")
    assert moved is not original
    assert moved.exported_program is not original.exported_program
    assert moved.sha256 == original.sha256 and moved.to_bytes() == original.to_bytes()
    assert (moved.index, moved.start, moved.end) == (original.index, original.start, original.end)
    assert moved.inputs == original.inputs and moved.outputs == original.outputs


def test_the_executor_on_the_cpu_returns_the_stage_outputs_unchanged(chain):
    stages, inputs = chain
    done = run_in_executor("cpu", stages[0], inputs)
    assert done.error is None
    expected = stages[0].run(*inputs)
    assert all(o.device.type == "cpu" for o in done.outputs)
    assert all(torch.equal(a, b) for a, b in zip(done.outputs, expected, strict=True))


def test_auto_device_picks_the_accelerator_torch_sees():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")
def test_a_stage_runs_on_cuda_and_returns_cpu_tensors_close_to_the_cpu_run(chain):
    stages, inputs = chain
    expected = stages[0].run(*inputs)
    moved = stages[0].to("cuda")
    on_device = moved.run(*(t.to("cuda") for t in inputs))
    assert all(o.device.type == "cuda" for o in on_device)
    done = run_in_executor("cuda", stages[0], inputs)  # the worker's path: in to the GPU, out to the CPU
    assert done.error is None
    assert all(o.device.type == "cpu" for o in done.outputs)
    for got, want in zip(done.outputs, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_an_emulated_device_is_never_faster_than_its_speed_allows():
    """The executor paces jobs as a FIFO device with a fixed service time: no credit carries over idle time.

    A job that overran its target (the host was slower than the emulated device) used to leave
    credit that the next job, arriving at an idle device, spent: it finished sooner than the device
    could. That is how replicated plans measured above r x one device.
    """
    from zoo import mlp

    from partita.model import capture

    model, x = mlp(), torch.randn(2, 64)
    stage = split(capture(model, (x,)), [])[0]
    target_s = 0.15
    done: queue.Queue[Done] = queue.Queue()
    executor = StageExecutor(torch.device("cpu"), capacity_bytes=2**30, on_taken=lambda job: None,
                             on_done=done.put, speed=1.0, dilation=1.0)
    executor.load(0, stage, memory_bytes=0.0, reference_host_s=target_s, owner="test")
    executor.start()
    try:
        executor.submit(Job(0, 1, 1, (torch.randn(400_000, 64),), b"peer", 0.0))  # overruns its 150 ms
        overran = done.get(timeout=60)
        assert overran.host_s > target_s  # the premise: the host could not keep up with this one
        time.sleep(0.1)  # the device sits idle
        submitted = time.perf_counter()
        executor.submit(Job(0, 2, 1, (x,), b"peer", 0.0))
        done.get(timeout=60)
        assert time.perf_counter() - submitted >= target_s
        started = time.perf_counter()
        for request in range(3, 8):  # five queued at once finish no sooner than five service times
            executor.submit(Job(0, request, 1, (x,), b"peer", 0.0))
        for _ in range(5):
            done.get(timeout=60)
        assert time.perf_counter() - started >= 5 * target_s
    finally:
        executor.stop()


def wait_idle(executor: StageExecutor) -> None:
    """Until the compute thread has finished its jobs (it counts one done just after handing it back)."""
    deadline = time.monotonic() + 10
    while executor.pending and time.monotonic() < deadline:
        time.sleep(0.001)


@pytest.mark.usefixtures("one_torch_thread")  # as workers run (many threads on a loaded host are slow)
def test_a_short_stage_runs_at_once_in_the_callers_thread_and_a_queued_or_emulated_one_does_not():
    """A stage known to be short runs in the I/O thread (no hand-off); the compute thread keeps what must wait."""
    import threading

    from zoo import mlp

    from partita.model import capture
    from partita.runtime.executor import INLINE_MAX_S

    model, x = mlp(), torch.randn(2, 64)
    stage = split(capture(model, (x,)), [])[0]
    done: queue.Queue[Done] = queue.Queue()
    release = threading.Event()

    def on_taken(job: Job) -> None:
        if job.request == 99:  # hold the compute thread, as a long job would
            release.wait(30)

    executor = StageExecutor(torch.device("cpu"), capacity_bytes=2**30, on_taken=on_taken, on_done=done.put)
    executor.load(0, stage, memory_bytes=0.0, reference_host_s=None, owner="test")
    executor.start()
    try:
        for request in range(2, 11):  # through the compute thread: the median of these runs is the estimate
            executor.submit(Job(0, request, 1, (x,), b"peer", 0.0))
        for _ in range(2, 11):
            done.get(timeout=60)
        assert executor.stage(0).recent_host_s < INLINE_MAX_S  # an mlp is short
        wait_idle(executor)
        assert executor.can_run_now(0) and not executor.can_run_now(7)  # stage 7 is not loaded
        now = executor.run_now(Job(0, 1, 1, (x,), b"peer", 0.0))
        with torch.no_grad():
            assert torch.equal(now.outputs[0], model(x)) and done.empty()  # no callbacks for a job run at once
        executor.submit(Job(0, 99, 1, (x,), b"peer", 0.0))
        assert not executor.can_run_now(0)  # one is queued or running: arrival order holds
        release.set()
        done.get(timeout=60)
        wait_idle(executor)
        assert executor.can_run_now(0)
        executor.set_speed(0.5)  # emulating a device half as fast: the wait belongs in the compute thread
        assert not executor.can_run_now(0)
        executor.set_speed(1.0)
        assert executor.can_run_now(0)
    finally:
        executor.stop()


def test_credits_come_back_half_a_window_at_a_time():
    from partita.runtime.flow import credits_at_once

    assert [credits_at_once(w) for w in (1, 2, 3, 4, 8)] == [1, 1, 1, 2, 4]
