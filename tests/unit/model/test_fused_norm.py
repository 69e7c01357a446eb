"""The fused RMSNorm (torch.compile; used on CUDA only, unverified on a GPU): the compiled kernel gives the eager
norm's values, and a compile that fails falls back to the eager norm once, with one log line."""

import logging
import shutil

import pytest
import torch

from service.model import layers
from service.model.layers import FusedNorm, rms_norm_eager


def test_on_cuda_by_default_and_off_with_the_setting(monkeypatch):
    assert FusedNorm().devices == {"cuda"}
    monkeypatch.setenv("NIM_FUSED_NORM", "0")
    assert FusedNorm().devices == set()
    x = torch.randn(4, 8)
    assert torch.equal(layers.rms_norm(x, None, 1e-6), rms_norm_eager(x, None, 1e-6))  # a CPU tensor: eager


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile's CPU backend needs a C compiler")
@pytest.mark.parametrize("with_weight", [True, False])
def test_the_compiled_norm_matches_the_eager_one(with_weight):
    norm = FusedNorm()
    norm.devices = {"cpu"}  # what CUDA gets, compiled here by the CPU backend
    g = torch.Generator().manual_seed(0)
    for rows in (3, 64):  # dynamic shapes: one compile serves both
        x = torch.randn(rows, 48, generator=g).to(torch.bfloat16)
        w = torch.randn(48, generator=g) if with_weight else None
        torch.testing.assert_close(norm(x, w, 1e-6), rms_norm_eager(x, w, 1e-6), rtol=1e-2, atol=1e-2)
    assert not norm.failed


def test_a_failed_compile_falls_back_to_the_eager_norm_once(monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("no triton")

    monkeypatch.setattr(torch, "compile", broken)
    norm = FusedNorm()
    norm.devices = {"cpu"}
    x = torch.randn(5, 16)
    with caplog.at_level(logging.WARNING, logger="service.model.layers"):
        for _ in range(3):
            assert torch.equal(norm(x, None, 1e-6), rms_norm_eager(x, None, 1e-6))
    assert norm.failed and sum("fused RMSNorm" in r.message for r in caplog.records) == 1
