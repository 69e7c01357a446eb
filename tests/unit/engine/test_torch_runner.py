"""The torch runner's vocabulary tiles: fixed one-canvas tiles on a CPU and in batch-invariant mode, growing
tiles when asked (a GPU's throughput default), and admission's step_bytes against what a step really holds."""

import pytest
import torch

from benchmarks.step_memory import LiveBytes
from service.engine.api import Request
from service.engine.local import LocalEngine
from service.engine.registry import create_runner
from service.engine.scheduler import Limits
from service.engine.torch_runner import TorchRunner
from service.sampler.params import GenerationParams
from service.sampler.tiles import Vocab
from tests.checkpoints import build_reference, save_checkpoint


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory):
    """A tiny network with a wide vocabulary, so a step's memory is mostly its vocabulary tile."""
    model = build_reference("canvas", seed=1, vocab_size=1 << 14, hidden_size=16)
    return save_checkpoint(model, tmp_path_factory.mktemp("wide-v"))


def _recording(runner: TorchRunner) -> list[int]:
    """Rows of every unembedding tile the runner's steps run."""
    rows: list[int] = []
    logits = runner._vocab.logits

    def record(h: torch.Tensor) -> torch.Tensor:
        rows.append(h.shape[0])
        return logits(h)

    runner._vocab = Vocab(record, runner._vocab.soft_embedding)
    return rows


def _three_canvases(runner: TorchRunner, **params) -> LocalEngine:
    engine = LocalEngine("unused", runner, Limits(max_memory_bytes=1 << 40))
    for seed in range(3):
        engine.scheduler.submit(Request([2, 7, 8], GenerationParams(max_new_tokens=runner.config.canvas_length,
                                                                    max_denoising_steps=8, **params), seed=seed))
    engine.scheduler.step()  # admission, prefill and the first step
    return engine


def test_a_cpu_runner_keeps_fixed_one_canvas_tiles(small_ckpt):
    for kw in ({}, {"batch_invariant": True}, {"device": "meta", "dtype": "bfloat16"}):
        runner = create_runner("torch", checkpoint_dir=small_ckpt, **kw)
        assert runner.fixed_tile and runner.tile_rows == runner.config.canvas_length, kw
    assert create_runner("torch", checkpoint_dir=small_ckpt, tile_rows=40).tile_rows == 40


def test_a_growing_runner_tiles_the_steps_rows_without_padding(wide_ckpt):
    base = create_runner("torch", checkpoint_dir=wide_ckpt)
    length = base.config.canvas_length
    for tile, fixed, expected in ((length, True, [length] * 3), (2 * length, False, [2 * length, length]),
                                  (8 * length, False, [3 * length]), (2 * length, True, [2 * length] * 2)):
        runner = TorchRunner.from_model(base.config, base.model, tile_rows=tile, fixed_tile=fixed)
        engine = _three_canvases(runner)
        rows = _recording(runner)
        engine.scheduler.step()
        assert engine.scheduler.canvases_in_last_pass == 3 and rows == expected, (tile, fixed, rows)


@pytest.mark.parametrize("params", [{"sampler": "fast", "top_k": 5000}, {"sampler": "reference", "top_k": 16000}])
def test_step_bytes_bound_what_a_step_holds(wide_ckpt, params):
    base = create_runner("torch", checkpoint_dir=wide_ckpt)
    length = base.config.canvas_length
    for tile, fixed in ((length, True), (2 * length, False), (8 * length, False)):
        runner = TorchRunner.from_model(base.config, base.model, tile_rows=tile, fixed_tile=fixed)
        engine = _three_canvases(runner, **params)
        with LiveBytes() as live:
            engine.scheduler.step()
        assert engine.scheduler.canvases_in_last_pass == 3
        rows = tile if fixed else min(tile, 3 * length)
        assert 8 * rows * runner.config.vocab_size <= live.peak <= runner.step_bytes(3), (tile, fixed, live.peak)
