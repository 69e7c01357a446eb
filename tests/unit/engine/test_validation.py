"""Bad input gets a typed error naming the field."""

import json
import shutil

import pytest

from service.engine.api import FinalEvent, Request
from service.engine.registry import create_engine
from service.errors import CheckpointError, InvalidArgument, Unavailable
from service.model.loading import load_model
from service.sampler.params import GenerationParams, Pins, request_params


@pytest.fixture(scope="module")
def engine(small_ckpt):
    return create_engine(checkpoint_dir=small_ckpt)


def run(engine, req):
    return list(engine.generate(req))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(prompt_ids=[]), "prompt_ids"),
        (dict(prompt_ids=[2, 10**6]), "prompt_ids"),
        (dict(prompt_ids=[2, -1]), "prompt_ids"),
        (dict(prompt_ids=[2], seed=-3), "seed"),
        (dict(prompt_ids=[2], params=GenerationParams(max_denoising_steps=0)), "max_denoising_steps"),
        (dict(prompt_ids=[2], params=GenerationParams(max_new_tokens=0)), "max_new_tokens"),
        (dict(prompt_ids=[2], params=GenerationParams(t_min=-0.1)), "t_min"),
        (dict(prompt_ids=[2], params=GenerationParams(t_max=-1.0)), "t_max"),
        (dict(prompt_ids=[2], params=GenerationParams(t_min=0.9, t_max=0.5)), "t_max"),
        (dict(prompt_ids=[2], params=GenerationParams(entropy_bound=-0.5)), "entropy_bound"),
        (dict(prompt_ids=[2], params=GenerationParams(confidence_threshold=-1.0)), "confidence_threshold"),
        (dict(prompt_ids=[2], params=GenerationParams(entropy_bound=float("nan"))), "entropy_bound"),
        # the documented ranges' upper ends (docs/api.md, "Parameters")
        (dict(prompt_ids=[2], params=GenerationParams(stability_threshold=49)), "stability_threshold"),
        (dict(prompt_ids=[2], params=GenerationParams(max_denoising_steps=4, stability_threshold=5)),
         "stability_threshold"),
        (dict(prompt_ids=[2], params=GenerationParams(stability_threshold=10**8)), "stability_threshold"),
        (dict(prompt_ids=[2], params=GenerationParams(t_max=1e-4, t_min=0.0)), "t_max"),
        (dict(prompt_ids=[2], params=GenerationParams(t_max=1e3)), "t_max"),
        (dict(prompt_ids=[2], params=GenerationParams(t_min=101.0, t_max=101.0)), "t_min"),
        (dict(prompt_ids=[2], params=GenerationParams(entropy_bound=1e300)), "entropy_bound"),
        (dict(prompt_ids=[2], params=GenerationParams(confidence_threshold=float("inf"))), "confidence_threshold"),
    ],
)
def test_invalid_requests_name_the_field(engine, kwargs, field):
    with pytest.raises(InvalidArgument) as e:
        run(engine, Request(**kwargs))
    assert e.value.field == field
    assert field in str(e.value)


def test_pins_longer_than_the_canvas(engine):
    n = engine.config.canvas_length + 1
    with pytest.raises(InvalidArgument) as e:
        run(engine, Request([2], pins=Pins.from_lists([3] * n)))
    assert e.value.field == "pin_ids"


def test_pin_ids_outside_vocab_and_mask_length(engine):
    with pytest.raises(InvalidArgument, match="pin_ids"):
        run(engine, Request([2], pins=Pins.from_lists([10**7])))
    with pytest.raises(InvalidArgument, match="pin_mask"):
        Pins.from_lists([3, 4], [True])


def test_range_ends_are_accepted(engine):
    """Each documented range's ends run (one short canvas each)."""
    for kw in (dict(stability_threshold=2), dict(stability_threshold=0), dict(t_min=0.0, t_max=1e-3),
               dict(t_min=100.0, t_max=100.0), dict(entropy_bound=1e6, confidence_threshold=1e6)):
        p = GenerationParams(max_new_tokens=4, max_denoising_steps=2, **kw)
        assert isinstance(run(engine, Request([2, 5], p))[-1], FinalEvent), kw


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_malformed_config(small_ckpt, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(small_ckpt, d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(d)


def test_other_architecture(small_ckpt, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(small_ckpt, d)
    raw = json.loads((d / "config.json").read_text())
    raw.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="llama"):
        load_model(d)


def test_missing_weights_and_shape_mismatch(small_ckpt, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(small_ckpt, d)
    for f in d.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(d)
    d2 = tmp_path / "ck2"
    shutil.copytree(small_ckpt, d2)
    raw = json.loads((d2 / "config.json").read_text())
    raw["text_config"]["hidden_size"] += 8
    (d2 / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(d2)


def test_unknown_and_unverified_backends(small_ckpt):
    with pytest.raises(InvalidArgument, match="backend"):
        create_engine("nope", checkpoint_dir=small_ckpt)
    with pytest.raises(Unavailable, match="tensorrt_llm"):
        create_engine("tensorrt_llm", checkpoint_dir=small_ckpt)


def test_generation_config_supplies_defaults(small_ckpt, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(small_ckpt, d)
    gen = json.loads((d / "generation_config.json").read_text())
    gen.update(max_denoising_steps=7, t_max=1.1, sampler_config={"entropy_bound": 0.4, "_cls_name": "x"})
    (d / "generation_config.json").write_text(json.dumps(gen))
    eng = create_engine(checkpoint_dir=d)
    assert (eng.default_params.max_denoising_steps, eng.default_params.t_max, eng.default_params.entropy_bound) == (
        7, 1.1, 0.4)
    assert eng.default_params.t_min == 0.4  # unset there: the reference's default
    gen["max_denoising_steps"] = 0
    (d / "generation_config.json").write_text(json.dumps(gen))
    with pytest.raises(CheckpointError, match="generation_config.json: max_denoising_steps"):
        create_engine(checkpoint_dir=d)


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=2.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(t_min=0.0, t_max=1e-3, temperature=0.5), "temperature"),  # scaled t_max below its minimum
    (dict(t_min=60.0, t_max=60.0, temperature=2.0), "temperature"),  # scaled t_max past its maximum
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2**30 + 1), "top_k"),
    (dict(top_k=1.0), "top_k"),
])
def test_temperature_and_top_k_ranges_name_the_field(kwargs, field):
    with pytest.raises(InvalidArgument) as e:
        GenerationParams(**kwargs).validate()
    assert e.value.field == field and field in str(e.value)


def test_temperature_and_top_k_range_ends_run(engine):
    for kw in (dict(temperature=0.0), dict(temperature=2.0), dict(temperature=0.5, t_min=0.0, t_max=2e-3),
               dict(top_k=1), dict(top_k=2**30)):
        p = GenerationParams(max_new_tokens=4, max_denoising_steps=2, **kw)
        assert isinstance(run(engine, Request([2, 5], p))[-1], FinalEvent), kw


def test_request_params_scale_only_the_models_own_schedule():
    d = GenerationParams(t_min=0.3, t_max=0.6)
    assert request_params(d, {"temperature": 0.5}).schedule() == (0.15, 0.3)
    assert request_params(d, {"temperature": 1.0}).schedule() == (0.3, 0.6)
    # a request that sets its own schedule gets it as given; 0 is still greedy
    assert request_params(d, {"temperature": 0.5, "t_min": 0.2}).schedule() == (0.2, 0.6)
    assert request_params(d, {"temperature": 0.5, "t_max": 0.9}).temperature == 1.0
    assert request_params(d, {"temperature": 0.0, "t_max": 0.9}).greedy
    with pytest.raises(InvalidArgument) as e:  # still range-checked
        request_params(d, {"temperature": 3.0, "t_min": 0.2})
    assert e.value.field == "temperature"
    greedy = GenerationParams(t_min=0.3, t_max=0.6, temperature=0.0)
    assert greedy.greedy and greedy.schedule() == (0.3, 0.6)  # entropies at the unscaled schedule


def test_generation_config_cannot_set_request_only_parameters(small_ckpt):
    from service.sampler.params import params_from_generation_config

    p = params_from_generation_config({"temperature": 0.0, "top_k": 5, "t_min": 0.3})
    assert p.t_min == 0.3 and p.temperature == 1.0 and p.top_k == 0
