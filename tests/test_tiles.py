"""Fused tiles: halo arithmetic (pure) and tile programs whose stitched outputs match the unsplit model.

The halo arithmetic is checked against a brute-force enumeration of the input positions a window
reads; tile programs against the captured model's own stages, bit for bit where the kernels sum in
the same order, within float tolerance where they do not (see docs/tiles.md).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from partita.errors import TileError
from partita.halo import Block, Layer, Window, block_regions, split_axis, tile_cost, tile_grid
from partita.model.capture import capture
from partita.model.split import split
from partita.model.tiles import fused_block, segment_blocks, stitch, tile_programs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------ halo arithmetic


def _brute_force_span(k, s, p, d, in_size, a, b):
    """The hull of the positions outputs [a, b) read, from the definition o*s - p + t*d: (the part inside the
    map, positions before it, positions after it)."""
    touched = {o * s - p + t * d for o in range(a, b) for t in range(k)}
    lo, hi = min(touched), max(touched) + 1
    return (max(lo, 0), min(hi, in_size)), max(0, -lo), max(0, hi - in_size)


def test_window_span_matches_brute_force_enumeration():
    for k, s, p, d in itertools.product((1, 2, 3, 5), (1, 2, 3), (0, 1, 2), (1, 2)):
        if p > (k - 1) * d:
            continue
        in_size = 13
        out_size = (in_size + 2 * p - d * (k - 1) - 1) // s + 1
        window = Window((k, k), (s, s), (p, p), (d, d))
        for a in range(out_size):
            for b in range(a + 1, out_size + 1):
                span, before, after = window.span(0, (a, b), in_size)
                want_span, want_before, want_after = _brute_force_span(k, s, p, d, in_size, a, b)
                assert (span, before, after) == (want_span, want_before, want_after), (k, s, p, d, a, b)


def test_split_axis_is_proportional_and_covers_the_axis():
    assert split_axis(10, [1, 1]) == [(0, 5), (5, 10)]
    assert split_axis(12, [3, 1]) == [(0, 9), (9, 12)]
    assert split_axis(3, [100, 1, 1]) == [(0, 1), (1, 2), (2, 3)]  # every part keeps a position
    with pytest.raises(TileError):
        split_axis(2, [1, 1, 1])


def test_block_regions_of_a_residual_block_take_the_hull_of_both_branches():
    # x -> conv3x3 p1 -> conv3x3 p1 -> add(x): the add needs x at the tile, the convs a 2-wide halo
    c = Window((3, 3), padding=(1, 1))
    block = Block((4, 8, 8), (
        Layer("c1", (-1,), (4, 8, 8), c, 1),
        Layer("c2", (0,), (4, 8, 8), c, 1),
        Layer("add", (1, -1), (4, 8, 8)),
    ))
    crop, regions = block_regions(block, ((4, 8), (0, 4)))
    assert crop == ((2, 8), (0, 6))
    assert regions == [((3, 8), (0, 5)), ((4, 8), (0, 4)), ((4, 8), (0, 4))]


def test_tile_cost_of_the_whole_map_is_the_untiled_cost_and_tiles_need_less_memory():
    c = Window((3, 3), padding=(1, 1))
    block = Block((3, 32, 32), (Layer("c1", (-1,), (16, 32, 32), c, 2 * 16 * 3 * 9),
                                Layer("c2", (0,), (16, 32, 32), c, 2 * 16 * 16 * 9)), batch=1, itemsize=4)
    whole = tile_cost(block, ((0, 32), (0, 32)))
    assert whole.flops == 32 * 32 * (2 * 16 * 3 * 9 + 2 * 16 * 16 * 9)
    assert whole.act_bytes == 2 * 16 * 32 * 32 * 4  # c1's output and c2's output live together
    tiles = [tile_cost(block, t) for t in tile_grid(32, 32, 2, 2)]
    assert max(t.act_bytes for t in tiles) < whole.act_bytes / 3
    assert sum(t.flops for t in tiles) > whole.flops  # overlapping halos are recomputed


# ---------------------------------------------------------------------------------- tile programs


def _bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    return bn


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), _bn(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), _bn(c)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


def _stack() -> nn.Module:
    """Every window shape the halo handles: strides, 5x5, dilation, ceil-mode max pooling, average pooling,
    a residual block; then a head that mixes positions."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), _bn(8), nn.ReLU(),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(8, 16, 5, stride=2, padding=2), nn.ReLU(),
        _Residual(16),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2), nn.AvgPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    ).eval()


@pytest.fixture(scope="module")
def stack(one_torch_thread):
    x = torch.randn(1, 3, 45, 41)
    model = _stack()
    graph = capture(model, (x,))
    tileable = [b is not None for b in segment_blocks(graph)]
    end = tileable.index(False)  # the fused block: every segment before the head
    return graph, end, split(graph, [end - 1]), model


def test_the_head_that_mixes_positions_is_refused_with_a_clear_message(stack):
    graph, end, _, _ = stack
    with pytest.raises(TileError, match="adaptive_avg_pool2d.*mixes every position.*end the fused block before it"):
        fused_block(graph, 0, len(graph.segments))


@pytest.mark.parametrize("grid", [(2, 2), (3, 2), (1, 4)])
def test_stitched_tiles_are_bit_identical_to_the_unsplit_block(stack, grid):
    graph, end, stages, model = stack
    block = fused_block(graph, 0, end)
    tiles = tile_programs(graph, 0, end, tile_grid(block.out_shape[1], block.out_shape[2], *grid))
    for batch in (1, 3):
        x = torch.randn(batch, 3, 45, 41)
        stitched = stitch(tiles, [t.run(t.take(x)) for t in tiles])
        assert torch.equal(stitched, stages[0].run(x)[0])
        # and the whole model, the tiled block followed by the chain, equals the model
        with torch.no_grad():
            assert torch.equal(stages[1].run(stitched)[0], model(x))


def test_tiles_on_two_threads_are_bit_identical_too(stack):
    graph, end, stages, model = stack
    block = fused_block(graph, 0, end)
    tiles = tile_programs(graph, 0, end, tile_grid(block.out_shape[1], block.out_shape[2], 2, 2))
    x = torch.randn(2, 3, 45, 41)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(stitch(tiles, [t.run(t.take(x)) for t in tiles]), stages[0].run(x)[0])
    finally:
        torch.set_num_threads(before)


def test_tiles_of_a_tiny_map_are_close_but_not_bit_identical():
    # A 1x1 convolution over 2x2 and 2x3 tiles: im2col + a GEMM so small that BLAS sums in another order.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.MaxPool2d(8), nn.Conv2d(16, 8, 1)).eval()
    x = torch.randn(1, 3, 32, 40)
    graph = capture(model, (x,))
    block = fused_block(graph, 0, len(graph.segments))
    tiles = tile_programs(graph, 0, len(graph.segments), tile_grid(block.out_shape[1], block.out_shape[2], 2, 2))
    stitched = stitch(tiles, [t.run(t.take(x)) for t in tiles])
    with torch.no_grad():
        reference = model(x)
    assert not torch.equal(stitched, reference)
    torch.testing.assert_close(stitched, reference, rtol=1e-6, atol=1e-6)


def test_a_tile_program_is_a_stage_archive_that_round_trips(stack):
    graph, end, stages, model = stack
    from partita.model.stage import StageProgram

    block = fused_block(graph, 0, end)
    tile = tile_programs(graph, 0, end, tile_grid(block.out_shape[1], block.out_shape[2], 2, 2))[3]
    loaded = StageProgram.from_bytes(tile.program.to_bytes(), expected_sha256=tile.program.sha256)
    x = torch.randn(1, 3, 45, 41)
    assert torch.equal(loaded.run(tile.take(x))[0], tile.run(tile.take(x)))
