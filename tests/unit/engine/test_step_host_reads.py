"""A denoising step makes no data-dependent host read before its one stop-flag transfer (issue 24).

The step runs on the meta device (no data: any host read would raise there) under benchmarks/step_trace.py's
dispatch mode in strict mode, which fails on `.item()`, `.tolist()`, `bool()`/`int()` of a tensor, copies to the
CPU, `nonzero` and `torch.tensor(host values, device=...)` anywhere in the step except the scheduler's stop
flags. The batch mixes the settings a step must handle: fast and reference samplers, greedy, top_k, pins and
log-probs.
"""

import pytest
import torch

from benchmarks.gpu_real_shape import toy_config
from benchmarks.step_trace import HostRead, StepTrace, meta_model, steady_scheduler
from service.engine.api import Request
from service.sampler import ops
from service.sampler.params import GenerationParams, Pins


def _mixed_requests(length: int) -> list[Request]:
    prompt = [2, 7, 9, 11]
    base = dict(max_new_tokens=length, max_denoising_steps=8)
    return [
        Request(prompt, GenerationParams(**base), seed=1),
        Request(prompt, GenerationParams(**base, sampler="reference"), seed=2),
        Request(prompt, GenerationParams(**base, temperature=0.0), seed=3),
        Request(prompt, GenerationParams(**base, top_k=5), seed=4, logprobs=2),
        Request(prompt, GenerationParams(**base), seed=5, pins=Pins.from_lists([3, 4, 5], [True, False, True])),
    ]


@pytest.fixture(scope="module")
def meta():
    cfg = toy_config()
    return cfg, meta_model(cfg)


def _traced_step(cfg, model) -> StepTrace:
    requests = _mixed_requests(cfg.canvas_length)
    sched = steady_scheduler(cfg, model, len(requests), 4, requests)
    trace = StepTrace(list(model.parameters()), strict=True)
    with trace:
        assert sched.step()
    assert sched.canvases_in_last_pass == len(requests)
    return trace


def test_a_meta_step_reads_nothing_on_the_host_but_its_stop_flags(meta):
    trace = _traced_step(*meta)
    assert trace.host_syncs() == 0 and trace.stop_flag_transfers() == 1
    assert trace.ops > 0 and trace.weight_bytes > 0


def test_a_host_read_inside_the_step_fails_it(meta, monkeypatch):
    real = ops.accept_mask
    monkeypatch.setattr(ops, "accept_mask", lambda h, bound, pinned=None: real(h, float(bound.max()), pinned))
    with pytest.raises(HostRead, match="_local_scalar_dense"):
        _traced_step(*meta)


def test_a_host_built_tensor_inside_the_step_fails_it(meta, monkeypatch):
    real = ops.apply_pins
    monkeypatch.setattr(ops, "apply_pins", lambda c, ids, mask: real(c, ids, mask) + torch.tensor(0, device=c.device))
    with pytest.raises(HostRead, match="torch.tensor"):
        _traced_step(*meta)
