"""Our model and sampler against the reference DiffusionGemma in `transformers`."""

import pytest
import torch
from transformers.cache_utils import DynamicCache
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

from service.engine.api import FinalEvent, Request
from service.engine.registry import create_engine
from service.model.loading import load_model
from service.sampler.params import GenerationParams
from tests.checkpoints import EOS_IDS

RTOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def ref_cache(ref):
    return DynamicCache(config=ref.config.get_text_config(decoder=True))


def test_decoder_logits_after_prefill_and_commit(ref_and_ckpt):
    kind, ref, path = ref_and_ckpt
    cfg, ours = load_model(path)
    g = torch.Generator().manual_seed(1)
    v, length = cfg.vocab_size, cfg.canvas_length
    prompt = torch.randint(0, v, (1, 21), generator=g)  # longer than the 'sliding' window (8)
    canvas = torch.randint(0, v, (1, length), generator=g)
    sc_logits = 3 * torch.randn(1, length, v, generator=g)

    with torch.no_grad():
        rc = ref_cache(ref)
        r0 = ref(input_ids=prompt, cache=rc, decoder_input_ids=canvas).logits
        r1 = ref(cache=rc, decoder_input_ids=canvas, self_conditioning_logits=sc_logits).logits
        # commit pass: encoder over a committed canvas extends the cache
        committed = torch.randint(0, v, (1, length), generator=g)
        pos = torch.arange(21, 21 + length)[None]
        ref.model.encoder(input_ids=committed, cache=rc, position_ids=pos)
        r2 = ref(cache=rc, decoder_input_ids=canvas, self_conditioning_logits=sc_logits).logits

    oc = [ours.new_cache(4)]
    ours.encode(prompt, [21], oc)
    with torch.no_grad():
        o0 = ours.logits(ours.decode(canvas, None, oc))
        soft = ours.soft_embedding(torch.softmax(sc_logits, dim=-1, dtype=torch.float32))
        o1 = ours.logits(ours.decode(canvas, soft, oc))
        ours.encode(committed, [length], oc)
        o2 = ours.logits(ours.decode(canvas, soft, oc))
    assert torch.equal(o0, r0), kind  # bit for bit at batch 1
    assert rel_err(o0, r0) < RTOL, kind
    assert rel_err(o1, r1) < RTOL, kind
    assert rel_err(o2, r2) < RTOL, kind
    # the commit pass matters: logits after it differ from before
    assert rel_err(o2, o1) > 1e-3


def test_batch_of_different_prompt_lengths_matches_each_alone(ref_and_ckpt):
    kind, ref, path = ref_and_ckpt
    cfg, ours = load_model(path)
    g = torch.Generator().manual_seed(2)
    lens = [5, 19, 12]
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lens]
    canvases = torch.randint(0, cfg.vocab_size, (3, cfg.canvas_length), generator=g)
    padded = torch.zeros(3, max(lens), dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    caches = [ours.new_cache(8) for _ in lens]
    ours.encode(padded, lens, caches)
    with torch.no_grad():
        batched = ours.logits(ours.decode(canvases, None, caches))
        for i, p in enumerate(prompts):
            rc = ref_cache(ref)
            alone = ref(input_ids=p[None], cache=rc, decoder_input_ids=canvases[i : i + 1]).logits
            # BLAS results for a row can change in the last bits with the batch's row count, so this is
            # a tolerance, not bit equality (batch 1 is bit-exact, see above).
            assert rel_err(batched[i : i + 1], alone) < RTOL, (kind, i)


SETTINGS = [
    # plain runs over several canvases
    dict(max_new_tokens=60, max_denoising_steps=6),
    # early stopping: always confident, stable after no steps -> one step per canvas
    dict(max_new_tokens=70, max_denoising_steps=9, stability_threshold=0, confidence_threshold=100.0),
    # early stopping on stability: accept everything at low temperature
    dict(max_new_tokens=50, max_denoising_steps=12, entropy_bound=1e4, t_min=0.01, t_max=0.02,
         confidence_threshold=100.0),
    # other schedule and bound
    dict(max_new_tokens=40, max_denoising_steps=5, entropy_bound=0.7, t_min=0.2, t_max=1.3),
]


def reference_generate(ref, prompt: list[int], seed: int, eos: list[int], **kw) -> tuple[list[int], float]:
    """The reference's generate right after torch.manual_seed(seed); returns new ids and tokens/forward."""
    kw = dict(kw)
    if "entropy_bound" in kw:  # the reference takes the bound through its sampler config
        kw["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(kw.pop("entropy_bound")))
    torch.manual_seed(seed)
    out = ref.generate(torch.tensor([prompt]), eos_token_id=eos, pad_token_id=0, **kw)
    return out.sequences[0, len(prompt):].tolist(), float(out.tokens_per_forward[0])


@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_generate_token_for_token(ref_and_ckpt, setting):
    kind, ref, path = ref_and_ckpt
    engine = create_engine(checkpoint_dir=path)
    kw = SETTINGS[setting]
    prompt = [2, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    early = 0
    for seed in (0, 1, 2):
        expected, tpf = reference_generate(ref, prompt, seed, EOS_IDS, **kw)
        final = list(engine.generate(Request(prompt, GenerationParams(**kw, sampler="reference"), seed=seed)))[-1]
        assert isinstance(final, FinalEvent)
        assert final.token_ids == expected, (kind, kw, seed)
        assert final.stats.tokens_per_forward == pytest.approx(tpf, rel=1e-6)
        early += any(s < kw["max_denoising_steps"] for s in final.stats.steps_per_canvas)
    if kw.get("stability_threshold") == 0:
        assert early == 3, "this setting stops every canvas after its first step"


def test_eos_stops_and_pads_like_the_reference(ref_and_ckpt):
    kind, ref, path = ref_and_ckpt
    engine = create_engine(checkpoint_dir=path)
    # Many EOS ids make an EOS within a few canvases likely; find seeds where it happens.
    eos = list(range(1, 40))
    engine.eos_ids = tuple(eos)
    prompt = [2, 30, 31, 32]
    kw = dict(max_new_tokens=200, max_denoising_steps=3)
    hits = 0
    for seed in range(4):
        expected, _ = reference_generate(ref, prompt, seed, eos, **kw)
        final = list(engine.generate(Request(prompt, GenerationParams(**kw, sampler="reference"), seed=seed)))[-1]
        assert final.token_ids == expected
        hits += final.finish_reason == "eos"
    assert hits > 0


def test_eos_ids_come_from_generation_config_as_in_the_reference(ref_and_ckpt, tmp_path):
    """Without eos_token_id in generation_config.json, the reference's generate never stops at an EOS
    (config.json's id included); with it, both stop there."""
    import json
    import shutil

    from transformers import DiffusionGemmaForBlockDiffusion

    kind, ref, path = ref_and_ckpt
    if kind != "canvas":
        pytest.skip("one configuration is enough")
    d = tmp_path / "no-eos"
    shutil.copytree(path, d)
    gen = json.loads((d / "generation_config.json").read_text())
    del gen["eos_token_id"]
    (d / "generation_config.json").write_text(json.dumps(gen))
    ref_no_eos = DiffusionGemmaForBlockDiffusion.from_pretrained(d).eval()
    assert ref_no_eos.generation_config.eos_token_id is None
    engine = create_engine(checkpoint_dir=d)
    assert engine.eos_ids == ()
    text_eos = ref.config.get_text_config().eos_token_id  # config.json's id: no longer an EOS
    prompt, kw = [2, 30, 31, 32], dict(max_new_tokens=96, max_denoising_steps=2)
    seen = 0
    for seed in range(4):
        torch.manual_seed(seed)
        expected = ref_no_eos.generate(torch.tensor([prompt]), pad_token_id=0, **kw).sequences[0, len(prompt):].tolist()
        final = list(engine.generate(Request(prompt, GenerationParams(**kw, sampler="reference"), seed=seed)))[-1]
        assert final.token_ids == expected and final.finish_reason == "length"
        seen += expected.count(text_eos)
    assert seen > 0  # config.json's EOS id was generated, and generation went on past it
    assert create_engine(checkpoint_dir=path).eos_ids == tuple(EOS_IDS)

