"""Verification's pieces that need no build: agreement counting and the never-a-pass 'not run' record."""

import pytest

from engine_build import verify as V
from service.errors import CheckpointError


def test_sequence_agreement_counts_the_longer_output():
    assert V.sequence_agreement([[1, 2, 3, 4]], [[1, 9, 3, 4]]) == 0.75
    assert V.sequence_agreement([[1, 2]], [[1, 2, 5, 6]]) == 0.5
    assert V.sequence_agreement([[1], [2, 3]], [[1], [2, 3]]) == 1.0


def _failing_build_loader(monkeypatch):
    import service.engine.registry as registry

    def create_engine(backend, *, checkpoint_dir, **kw):
        if str(checkpoint_dir).endswith("build"):
            raise CheckpointError("hf_quant_config.json: quant_algo 'X' is not supported")
        return object()

    monkeypatch.setattr(registry, "create_engine", create_engine)


def test_nvfp4_build_that_cannot_load_is_recorded_not_run_never_passed(monkeypatch, tmp_path):
    _failing_build_loader(monkeypatch)
    settings = V.VerifySettings(prompts=("a", "b"))
    result = V.verify(tmp_path / "build", tmp_path / "src", "nvfp4", settings)
    assert result["status"] == "not_run" and result["passed"] is False and result["token_agreement"] is None
    assert result["threshold"] == V.THRESHOLDS["nvfp4"] and "quant_algo 'X'" in result["runtime"]


def test_fp8_build_that_cannot_load_fails(monkeypatch, tmp_path):
    _failing_build_loader(monkeypatch)
    with pytest.raises(CheckpointError, match="quant_algo"):
        V.verify(tmp_path / "build", tmp_path / "src", "fp8", V.VerifySettings(prompts=("a",)))
