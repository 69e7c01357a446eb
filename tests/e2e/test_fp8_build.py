"""An FP8 build of the embedded tiny model, made on the CPU by `dgemma build` (engine_build), served by `dgemma serve`
through Triton and the gRPC and HTTP APIs, dequantized at load; its tokens against the unquantized model's."""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from engine_build.build import BuildOptions, build
from engine_build.calibration import CalibrationSettings
from service import DEFAULT_CHECKPOINT
from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb
from service.engine.api import Request
from service.engine.registry import create_engine
from service.model.build_manifest import read_build
from service.text.tokenizer import load_tokenizer
from tests.e2e.conftest import Serve

PROMPTS = ["def add(a, b):", "import os\n", "class Stack:", "for i in range(10):"]
STEPS, NEW_TOKENS = 8, 64
# Free-running generations diverge after one flipped token (bf16-rounded weights alone gave 0.77 on these prompts at
# the serving temperatures), so the 0.95 gate is the build's teacher-forced agreement (verify.json); the served
# free-running figure is measured here (2-core x86_64 VM: 0.75) and held above this floor.
MIN_FREE_RUNNING = 0.7


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(x == y for p, q in zip(a, b, strict=True) for x, y in zip(p, q))
    return same / sum(max(len(p), len(q)) for p, q in zip(a, b, strict=True))


def generate_in_process(checkpoint, prompts: list[list[int]]) -> list[list[int]]:
    engine = create_engine(checkpoint_dir=checkpoint, device="cpu", dtype="float32")
    params = dataclasses.replace(engine.default_params, max_new_tokens=NEW_TOKENS, max_denoising_steps=STEPS)
    return [list(engine.generate(Request(ids, params.validate(), seed=seed)))[-1].token_ids
            for seed, ids in enumerate(prompts)]


@pytest.fixture(scope="module")
def fp8_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "build"
    build(BuildOptions(DEFAULT_CHECKPOINT, "torch-fp8-hopper", out, verify_prompts=4, threads=1,
                       calibration_settings=CalibrationSettings(steps=4)))
    return out


def test_fp8_build_serves_dequantized_and_agrees_with_the_source(fp8_build, tmp_path):
    verified = read_build(fp8_build)["verification"]  # checked by `dgemma build` through the same loader
    assert verified["passed"] and verified["token_agreement"] >= 0.95
    tok = load_tokenizer(DEFAULT_CHECKPOINT)
    prompts = [tok.encode(p) for p in PROMPTS]
    srv = Serve(tmp_path, {"NIM_MODEL_PATH": str(fp8_build)})
    try:
        stub, md = srv.stub(), srv.metadata()
        (info,) = stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=30).models
        assert info.profile == "torch-fp8-hopper (dequantized on cpu)"
        models = httpx.get(srv.http_url + "/v1/models", headers=dict(md), timeout=30).json()["data"]
        assert models[0]["profile"] == info.profile
        served = []
        for seed, ids in enumerate(prompts):
            r = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), max_new_tokens=NEW_TOKENS,
                                                 options=pb.GenerationOptions(
                                                     parameters=pb.DiffusionParameters(max_denoising_steps=STEPS),
                                                     seed=seed)), metadata=md, timeout=120)
            served.append(list(r.choices[0].token_ids))
    finally:
        assert srv.stop() == 0
    # The server ran the build's weights: the same tokens as the build loaded in process (dequantized the same way).
    assert served == generate_in_process(fp8_build, prompts)
    source = generate_in_process(DEFAULT_CHECKPOINT, prompts)
    measured = agreement(served, source)
    print(f"FP8 build served vs unquantized, free-running: token agreement {measured:.4f} over "
          f"{sum(map(len, source))} tokens; verify.json: {verified['token_agreement']} teacher-forced, "
          f"KL {verified['mean_kl']:.2e}")
    assert served != source  # the quantization did change something
    assert measured >= MIN_FREE_RUNNING
