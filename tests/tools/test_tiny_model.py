"""The tiny-model recipe: its objective trains, and its export is a checkpoint both loaders read alike."""

import json
import signal

import torch
from transformers import DiffusionGemmaForBlockDiffusion
from transformers.cache_utils import DynamicCache

from service.model.config import parse_config
from service.model.loading import load_model
from service.model.network import DiffusionGemma
from tools.tiny_model.objective import corrupt, loss_step
from tools.tiny_model.train import export_checkpoint, hf_config, init_weights


def tiny_model():
    model = DiffusionGemma(parse_config(hf_config("float32")))
    init_weights(model, seed=0)
    return model


def test_objective_learns_a_fixed_batch():
    torch.manual_seed(0)
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 200, (4, 16), generator=g)
    clean = torch.randint(3, 200, (4, 64), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(12):
        loss, info = loss_step(model, prefix, clean, torch.Generator().manual_seed(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else info["loss"]
    assert info["loss"] < first - 0.5


def test_corruption_spans_keep_context_clean():
    clean = torch.arange(64).repeat(200, 1)
    noisy, mask = corrupt(clean, 2048, torch.Generator().manual_seed(0), span_fraction=1.0)
    for row in mask:  # one contiguous noised region per span example
        idx = torch.nonzero(row).flatten()
        if idx.numel():
            assert int(idx.max() - idx.min()) < 33
    assert torch.equal(noisy[~mask], clean[~mask])


def test_corruption_follows_the_canvas_device():
    """`--device cuda` corrupts a canvas on the GPU with the CPU generator; the meta device stands in here
    for any device other than the generator's (the draws used to stay on the CPU and fail there)."""
    clean = torch.randint(3, 200, (4, 64), device="meta")
    noisy, noised = corrupt(clean, 2048, torch.Generator().manual_seed(0), span_fraction=0.75)
    assert noisy.device == clean.device and noised.device == clean.device


def test_export_loads_in_ours_and_in_transformers_alike(tmp_path):
    model = tiny_model()
    export_checkpoint(model, '{"version": "1.0"}', tmp_path, {"steps": 0})
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["DiffusionGemmaForBlockDiffusion"]
    cfg, ours = load_model(tmp_path, dtype="float32")
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = torch.randint(3, 2048, (1, 20), generator=torch.Generator().manual_seed(0))
    canvas = torch.randint(3, 2048, (1, cfg.canvas_length), generator=torch.Generator().manual_seed(1))
    cache = [ours.new_cache(8)]
    ours.encode(prompt, [20], cache)
    with torch.no_grad():
        mine = ours.logits(ours.decode(canvas, None, cache))
        theirs = ref(input_ids=prompt, cache=DynamicCache(config=ref.config.get_text_config(decoder=True)),
                     decoder_input_ids=canvas).logits
    assert torch.equal(mine, theirs)


def test_tuned_sampler_defaults_are_merged_into_generation_config(tmp_path):
    from service.sampler.params import params_from_generation_config
    from tools.tiny_model.tune_sampler import write_defaults

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1], "pad_token_id": 0}))
    write_defaults(tmp_path, {"entropy_bound": 4.0, "t_max": 0.2, "t_min": 0.05})
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1] and gen["pad_token_id"] == 0
    p = params_from_generation_config(gen)
    assert (p.entropy_bound, p.t_max, p.t_min, p.max_denoising_steps) == (4.0, 0.2, 0.05, 48)
    export_checkpoint(tiny_model(), '{"model": {}}', tmp_path, {})  # a re-export keeps them
    assert params_from_generation_config(json.loads((tmp_path / "generation_config.json").read_text())) == p


def test_warm_restart_from_the_shipped_checkpoint_resumes_its_schedule(tmp_path):
    """`--init-from` the shipped model with `--warm-restart`: the learning rate warms up again from this
    run's first step, the state remembers where, and the export counts the shipped steps on."""
    from tools.tiny_model.train import DEFAULT_OUT

    start = json.loads((DEFAULT_OUT / "training_meta.json").read_text())["steps"]
    # main() sets its own thread count and SIGTERM handler; the rest of the suite keeps the defaults
    threads, on_term = torch.get_num_threads(), signal.getsignal(signal.SIGTERM)
    try:
        run_twice(tmp_path, start)
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGTERM, on_term)


def run_twice(tmp_path, start: int) -> None:
    from tools.tiny_model.train import DEFAULT_OUT, lr_at, main

    args = ["--init-from", str(DEFAULT_OUT), "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "o"),
            "--batch", "2", "--lr", "1e-3", "--warm-restart", "--threads", "1"]
    assert main([*args, "--steps", str(start + 2)]) == 0
    logged = [json.loads(line) for line in (tmp_path / "w" / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in logged] == [lr_at(0, 2, 1e-3), lr_at(1, 2, 1e-3)]  # 5e-6, 1e-5: warming up
    assert torch.load(tmp_path / "w" / "state.pt", weights_only=False)["lr_origin"] == start
    assert main([*args, "--steps", str(start + 3)]) == 0  # resumed from the state: same origin
    assert json.loads((tmp_path / "w" / "log.jsonl").read_text().splitlines()[-1])["lr"] == lr_at(2, 3, 1e-3)
    assert json.loads((tmp_path / "o" / "training_meta.json").read_text())["steps"] == start + 3
