"""Verification: agreement counting, the never-a-pass 'not run' record, and one model at a time whose figures equal
those of both models run side by side (the tiny model and a bf16 copy of it, on the CPU)."""

import weakref

import pytest
import torch

from engine_build import placement
from engine_build import verify as V
from engine_build.calibration import heldout_prompts
from engine_build.quantize import cast_checkpoint
from service import DEFAULT_CHECKPOINT
from service.errors import CheckpointError

def test_sequence_agreement_counts_the_longer_output():
    assert V.sequence_agreement([[1, 2, 3, 4]], [[1, 9, 3, 4]]) == 0.75
    assert V.sequence_agreement([[1, 2]], [[1, 2, 5, 6]]) == 0.5
    assert V.sequence_agreement([[1], [2, 3]], [[1], [2, 3]]) == 1.0


def _failing_build_loader(monkeypatch):
    """The source loads for real; the build's loader refuses it."""
    import service.engine.registry as registry

    real = registry.create_engine

    def create_engine(backend, *, checkpoint_dir, **kw):
        if str(checkpoint_dir).endswith("build"):
            raise CheckpointError("hf_quant_config.json: quant_algo 'X' is not supported")
        return real(backend, checkpoint_dir=checkpoint_dir, **kw)

    monkeypatch.setattr(registry, "create_engine", create_engine)


def test_nvfp4_build_that_cannot_load_is_recorded_not_run_never_passed(monkeypatch, tmp_path):
    _failing_build_loader(monkeypatch)
    settings = V.VerifySettings(prompts=("a", "b"), seeds=(0,), max_denoising_steps=2, threads=1)
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "config.json").write_text((DEFAULT_CHECKPOINT / "config.json").read_text())
    result = V.verify(tmp_path / "build", DEFAULT_CHECKPOINT, "nvfp4", settings)
    assert result["status"] == "not_run" and result["passed"] is False and result["token_agreement"] is None
    assert result["threshold"] == V.THRESHOLDS["nvfp4"] and "quant_algo 'X'" in result["runtime"]


def test_fp8_build_that_cannot_load_fails(monkeypatch, tmp_path):
    _failing_build_loader(monkeypatch)
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "config.json").write_text((DEFAULT_CHECKPOINT / "config.json").read_text())
    with pytest.raises(CheckpointError, match="quant_algo"):
        V.verify(tmp_path / "build", DEFAULT_CHECKPOINT, "fp8",
                 V.VerifySettings(prompts=("a",), seeds=(0,), max_denoising_steps=2, threads=1))


def test_a_build_config_the_loader_refuses_fails_before_the_source_loads(monkeypatch, tmp_path):
    import service.engine.registry as registry

    monkeypatch.setattr(registry, "create_engine", lambda *a, **kw: pytest.fail("no model should load"))
    build = tmp_path / "build"
    build.mkdir()
    (build / "config.json").write_text((DEFAULT_CHECKPOINT / "config.json").read_text())
    (build / "hf_quant_config.json").write_text('{"quantization": {"quant_algo": "W4A16_AWQ"}}')
    result = V.verify(build, DEFAULT_CHECKPOINT, "nvfp4", V.VerifySettings(prompts=("a",)))
    assert result["status"] == "not_run" and "W4A16_AWQ" in result["runtime"]
    with pytest.raises(CheckpointError, match="W4A16_AWQ"):
        V.verify(build, DEFAULT_CHECKPOINT, "fp8", V.VerifySettings(prompts=("a",)))


# ---- one model at a time, figures as side by side -------------------------------------------------------------

SETTINGS = V.VerifySettings(prompts=heldout_prompts()[:2], threads=1)


@pytest.fixture(scope="module")
def bf16_copy(tmp_path_factory):
    """A build that is not a copy: the tiny model's weights rounded to bf16 (no ModelOpt needed)."""
    out = tmp_path_factory.mktemp("bf16") / "build"
    out.mkdir()
    cast_checkpoint(DEFAULT_CHECKPOINT, out, torch.bfloat16)
    return out


@torch.no_grad()
def _teacher_forced_side_by_side(ref, got, prompt, drafts, vocab, seed):
    """The teacher-forced comparison as verify ran it before it loaded one model at a time (both decoders in
    memory, pass by pass): the oracle the stored-logits figures must equal."""
    g = torch.Generator().manual_seed(seed)
    length = ref.cfg.canvas_length
    caches = {}
    for name, m in (("ref", ref), ("got", got)):
        caches[name] = [m.new_cache(len(prompt) + length)]
        m.encode(torch.tensor([prompt]), [len(prompt)], caches[name])
    n = len(drafts)
    inputs = [torch.randint(0, vocab, (length,), generator=g)]
    for k, d in enumerate(drafts[:-1], 1):
        base = torch.tensor(d[:length])
        noise = torch.rand(length, generator=g) < 1 - k / n
        inputs.append(torch.where(noise, torch.randint(0, vocab, (length,), generator=g), base))
    same = total = 0
    kls, probs = [], None
    for canvas in inputs:
        lr = ref.logits(ref.decode(canvas[None], None if probs is None else ref.soft_embedding(probs), caches["ref"]))
        lg = got.logits(got.decode(canvas[None], None if probs is None else got.soft_embedding(probs), caches["got"]))
        lp, lq = torch.log_softmax(lr, -1), torch.log_softmax(lg, -1)
        kls.append(float((lp.exp() * (lp - lq)).sum(-1).mean()))
        same += int((lr.argmax(-1) == lg.argmax(-1)).sum())
        total += lr.shape[1]
        probs = torch.softmax(lr, -1)
    return same, total, kls


@pytest.fixture(scope="module")
def side_by_side(bf16_copy):
    """verify.json's figures computed with the source and the build loaded together."""
    from service.engine.registry import create_engine

    kw = dict(device="cpu", dtype="float32", threads=1)
    ref_engine = create_engine("torch", checkpoint_dir=DEFAULT_CHECKPOINT, **kw)
    got_engine = create_engine("torch", checkpoint_dir=bf16_copy, **kw)
    prompts = [ref_engine.tokenizer.encode(p) for p in SETTINGS.prompts]
    ref, got = V._generate_all(ref_engine, prompts, SETTINGS), V._generate_all(got_engine, prompts, SETTINGS)
    same = total = 0
    kls = []
    for i, run in enumerate(ref):
        s, t, k = _teacher_forced_side_by_side(ref_engine.runner.model, got_engine.runner.model,
                                               prompts[i // len(SETTINGS.seeds)], run.drafts,
                                               ref_engine.config.vocab_size, i)
        same, total, kls = same + s, total + t, kls + k
    return {"token_agreement": round(same / total, 6), "mean_kl": sum(kls) / len(kls),
            "sequence_agreement": round(V.sequence_agreement([r.tokens for r in ref], [g.tokens for g in got]), 6),
            "steps_per_canvas": {"reference": V._mean([s for r in ref for s in r.steps]),
                                 "build": V._mean([s for g in got for s in g.steps])}}


def _one_model_at_a_time(monkeypatch, on_load=lambda checkpoint_dir: None) -> list:
    """Wrap the serving loader: fail when a model loads while another is still alive (weak references, no
    collection of our own: verify must have freed it). Returns the directories loaded, in order."""
    import service.engine.registry as registry

    real, alive, loaded = registry.create_engine, [], []

    def create_engine(backend, *, checkpoint_dir, **kw):
        held = [m() for m in alive if m() is not None]
        assert not held, f"{checkpoint_dir} loads while {len(held)} model(s) are still in memory"
        on_load(checkpoint_dir)
        engine = real(backend, checkpoint_dir=checkpoint_dir, **kw)
        alive.append(weakref.ref(engine.runner.model))
        loaded.append(checkpoint_dir)
        return engine

    monkeypatch.setattr(registry, "create_engine", create_engine)
    return loaded


@pytest.mark.parametrize("spill", [False, True], ids=["in-memory", "spilled"])
def test_one_model_at_a_time_with_the_side_by_side_figures(monkeypatch, tmp_path, bf16_copy, side_by_side, spill):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    spilled = []
    if spill:
        monkeypatch.setattr(V, "MEMORY_BUDGET", 0)
    loaded = _one_model_at_a_time(monkeypatch, lambda d: spilled.extend(scratch.glob("dgemma-verify-*/run-*.pt")))
    result = V.verify(bf16_copy, DEFAULT_CHECKPOINT, "bf16", V.VerifySettings(**{**SETTINGS.__dict__,
                                                                                "scratch": scratch}))
    assert loaded == [DEFAULT_CHECKPOINT, bf16_copy]
    assert {k: result[k] for k in side_by_side} == side_by_side  # exactly: the same floats
    assert 0.9 < result["token_agreement"] < 1 and result["mean_kl"] > 0  # not a copy
    assert result["runtime"] == "torch cpu float32 (bf16 weights)" and result["passed"]
    assert len(spilled) == (4 if spill else 0)  # one file per run (2 prompts x 2 seeds) when over the budget
    assert list(scratch.iterdir()) == []  # and removed


def test_a_large_source_verifies_in_bf16_on_the_cpu(monkeypatch, bf16_copy):
    """Above FLOAT32_MAX_PARAMS both models load in bfloat16 (one bf16 copy at a time): the bf16 copy of the
    source is then bit for bit the source."""
    monkeypatch.setattr(placement, "FLOAT32_MAX_PARAMS", 0)
    loaded = _one_model_at_a_time(monkeypatch)
    result = V.verify(bf16_copy, DEFAULT_CHECKPOINT, "bf16",
                      V.VerifySettings(prompts=SETTINGS.prompts[:1], seeds=(0,), max_denoising_steps=3, threads=1))
    assert len(loaded) == 2 and result["runtime"] == "torch cpu bfloat16 (bf16 weights)"
    assert result["token_agreement"] == 1.0 and result["mean_kl"] == 0.0 and result["sequence_agreement"] == 1.0
