"""Pure Triton translation code, the repository renderer, and model.py against a stub of pb_utils."""

import importlib.util
import json
import sys
import threading
import types

import numpy as np
import pytest

from service.engine.api import CanvasEvent, FinalEvent, Logprobs, Stats
from service.errors import Cancelled, CheckpointError, DeadlineExceeded, InvalidArgument, Overloaded, Unavailable
from service.request.errors import error_from_triton
from service.model.config import read_config
from service.triton.adapter import (
    LOGPROB_OUTPUTS,
    deadline_from_inputs,
    error_code,
    outputs_for_event,
    request_from_inputs,
    triton_status,
)
from service.triton.launcher import TritonServer, find_triton
from service.triton.repository import TEMPLATE_DIR, RepositorySettings, render_config


@pytest.fixture(scope="module")
def cfg(small_ckpt):
    return read_config(small_ckpt)


def ids(*v):
    return np.array(v, dtype=np.int32)


def test_request_from_inputs_defaults_and_overrides(cfg):
    req = request_from_inputs(
        {
            "input_ids": ids(2, 3, 4),
            "max_denoising_steps": ids(5),
            "entropy_bound": np.array([0.3], np.float32),
            "seed": np.array([9], np.uint64),
            "return_drafts": np.array([True]),
        },
        cfg,
        None,
    )
    assert req.prompt_ids == [2, 3, 4] and req.seed == 9 and req.return_drafts
    assert req.params.max_denoising_steps == 5 and abs(req.params.entropy_bound - 0.3) < 1e-6
    assert req.params.t_min == 0.4 and req.params.max_new_tokens == 256


def test_temperature_and_top_k_inputs(cfg):
    f32 = lambda v: np.array([v], np.float32)  # noqa: E731
    req = request_from_inputs({"input_ids": ids(2), "temperature": f32(0.5), "top_k": ids(40)}, cfg, None)
    assert req.params.temperature == 0.5 and req.params.top_k == 40 and req.params.schedule() == (0.2, 0.4)
    # an explicit schedule is taken as given: the temperature does not scale it; 0 stays greedy
    req = request_from_inputs({"input_ids": ids(2), "temperature": f32(0.5), "t_max": f32(0.6)}, cfg, None)
    assert req.params.temperature == 1.0 and req.params.schedule() == (0.4, np.float32(0.6))
    req = request_from_inputs({"input_ids": ids(2), "temperature": f32(0.0), "t_min": f32(0.1)}, cfg, None)
    assert req.params.greedy


@pytest.mark.parametrize(
    "inputs, field",
    [
        ({"text_input": np.array([b""], dtype=object)}, "text_input"),
        ({"input_ids": ids(2), "temperature": np.array([2.5], np.float32)}, "temperature"),
        ({"input_ids": ids(2), "temperature": np.array([2.5], np.float32), "t_min": np.array([0.1], np.float32)},
         "temperature"),
        ({"input_ids": ids(2), "top_k": ids(-1)}, "top_k"),
        ({"text_input": np.array([b"hi"], dtype=object), "input_ids": ids(2)}, "text_input"),
        ({}, "text_input"),
        ({"input_ids": ids(2, 10**6)}, "input_ids"),
        ({"input_ids": ids(2), "max_denoising_steps": ids(0)}, "max_denoising_steps"),
        ({"input_ids": ids(2), "t_min": np.array([-1.0], np.float32)}, "t_min"),
        ({"input_ids": ids(2), "pin_ids": ids(*range(17))}, "pin_ids"),
        ({"input_ids": ids(2), "pin_mask": np.array([True])}, "pin_mask"),
        ({"input_ids": ids(2), "max_new_tokens": ids(1, 2)}, "max_new_tokens"),
        ({"input_ids": ids(2), "bogus": ids(1)}, "bogus"),
    ],
)
def test_bad_inputs_name_the_input(cfg, inputs, field):
    with pytest.raises(InvalidArgument) as e:
        request_from_inputs(inputs, cfg, None)
    assert e.value.field == field


def test_error_table():
    assert error_code(InvalidArgument("x", "y")) == "INVALID_ARG"
    assert error_code(Overloaded("busy")) == "OVERLOADED"
    assert error_code(DeadlineExceeded("late")) == "DEADLINE_EXCEEDED"
    assert error_code(Unavailable("down")) == "UNAVAILABLE"
    assert error_code(Cancelled("c")) == "CANCELLED"
    assert error_code(CheckpointError("c")) == "INTERNAL"
    assert error_code(RuntimeError()) == "INTERNAL"
    # every code reads back as the error it came from (one table both ways)
    for err in (InvalidArgument("max_new_tokens", "too many"), Overloaded("busy"), DeadlineExceeded("late"),
                Unavailable("down"), Cancelled("c")):
        assert type(error_from_triton(f"{error_code(err)}: {err.message}")) is type(err)
    assert triton_status("OVERLOADED") == "UNAVAILABLE" and triton_status("INVALID_ARG") == "INVALID_ARG"


def test_timeout_ms_becomes_a_deadline(cfg):
    assert deadline_from_inputs({}, 100.0) is None
    assert deadline_from_inputs({"timeout_ms": np.array([0], dtype=np.uint64)}, 100.0) is None
    assert deadline_from_inputs({"timeout_ms": np.array([1500], dtype=np.uint64)}, 100.0) == 101.5
    with pytest.raises(InvalidArgument) as e:
        deadline_from_inputs({"timeout_ms": np.array([-1], dtype=np.int64)}, 100.0)
    assert e.value.field == "timeout_ms"
    # a known input of the model, not a request field
    request_from_inputs({"input_ids": ids(2, 3), "timeout_ms": np.array([10], dtype=np.uint64)}, cfg, None)


def test_outputs_for_events():
    out = outputs_for_event(CanvasEvent(0, [5, 6], 3), lambda t: "x" * len(t))
    assert out["event"][0] == b"canvas" and out["output_ids"].tolist() == [5, 6] and out["step"][0] == 3
    final = FinalEvent([5, 6], "eos", Stats(2, 2, 3, [3]))
    out = outputs_for_event(final, None)
    assert json.loads(out["stats"][0])["decoder_passes"] == 3 and out["finish_reason"][0] == b"eos"


def test_render_config(small_ckpt):
    text = render_config(RepositorySettings(checkpoint_dir=str(small_ckpt), instance_kind="KIND_GPU", max_queue_size=7))
    assert 'backend: "python"' in text and "decoupled: true" in text and "KIND_GPU" in text
    assert "max_queue_size: 7" in text and str(small_ckpt) in text and "${" not in text
    with pytest.raises(InvalidArgument, match="instance_kind"):
        render_config(RepositorySettings(checkpoint_dir="x", instance_kind="KIND_TPU"))


def test_launcher_names_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITONSERVER", str(tmp_path / "nope"))
    with pytest.raises(Unavailable, match="TRITONSERVER"):
        find_triton()
    with pytest.raises(Unavailable):
        TritonServer(tmp_path)


# ---- model.py with a stub triton_python_backend_utils -------------------------------------------


def make_stub():
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    class TritonError:
        INTERNAL, INVALID_ARG, UNAVAILABLE, CANCELLED = "INTERNAL", "INVALID_ARG", "UNAVAILABLE", "CANCELLED"

        def __init__(self, msg, code=None):
            self.msg, self.code = msg, code

        def message(self):
            return self.msg

    class Tensor:
        def __init__(self, name, arr):
            self.name, self.arr = name, arr

        def as_numpy(self):
            return self.arr

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.outputs, self.error = output_tensors or [], error

    class Metric:
        def __init__(self):
            self.value = 0

        def set(self, v):
            self.value = v

        def increment(self, v):
            self.value += v

    class MetricFamily:
        GAUGE, COUNTER = "gauge", "counter"

        def __init__(self, name, description, kind):
            self.name = name

        def Metric(self, labels):  # noqa: N802 (Triton's name)
            return Metric()

    pb.TritonError, pb.Tensor, pb.InferenceResponse, pb.MetricFamily = (
        TritonError,
        Tensor,
        InferenceResponse,
        MetricFamily,
    )
    pb.get_input_tensor_by_name = lambda req, name: req.inputs.get(name)
    return pb


class FakeSender:
    def __init__(self):
        self.sent, self.done = [], threading.Event()

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))
        if flags:
            self.done.set()

    def is_cancelled(self):
        return False


class FakeRequest:
    def __init__(self, **inputs):
        self.inputs = {k: sys.modules["triton_python_backend_utils"].Tensor(k, v) for k, v in inputs.items()}
        self.sender = FakeSender()

    def get_response_sender(self):
        return self.sender


def test_model_py_streams_events_and_errors(small_ckpt, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", make_stub())
    spec = importlib.util.spec_from_file_location("dg_model", TEMPLATE_DIR / "1" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.TritonPythonModel()
    outputs = ["event", "output_ids", "text_output", "canvas_index", "step", "stats", "finish_reason"]
    config = {
        "name": "diffusiongemma",
        "output": [{"name": n} for n in outputs],
        "parameters": {"checkpoint_dir": {"string_value": str(small_ckpt)}, "threads": {"string_value": "1"}},
    }
    model.initialize({"model_config": json.dumps(config)})
    try:
        good = FakeRequest(input_ids=ids(2, 3), max_new_tokens=ids(16), max_denoising_steps=ids(2))
        bad = FakeRequest(input_ids=ids(2, 10**6))
        assert model.execute([good, bad]) is None  # decoupled: returns at once
        assert bad.sender.done.is_set()
        ((resp, flags),) = bad.sender.sent
        assert flags == 1 and resp.error.code == "INVALID_ARG" and "input_ids" in resp.error.msg
        assert good.sender.done.wait(30)
        kinds = [r.outputs[0].arr[0] for r, _ in good.sender.sent]
        assert kinds == [b"canvas", b"final"] and good.sender.sent[-1][1] == 1
        assert model.m_canvases.value == 1
    finally:
        model.finalize()


def test_logprobs_input_and_outputs(cfg):
    req = request_from_inputs({"input_ids": ids(2, 3), "logprobs": ids(3)}, cfg, None)
    assert req.logprobs == 3
    assert request_from_inputs({"input_ids": ids(2, 3)}, cfg, None).logprobs is None
    with pytest.raises(InvalidArgument) as e:
        request_from_inputs({"input_ids": ids(2, 3), "logprobs": ids(21)}, cfg, None)
    assert e.value.field == "logprobs"
    lp = Logprobs([-0.5, -1.0], [[5, 7], [6, 1]], [[-0.5, -2.0], [-1.0, -1.5]])
    out = outputs_for_event(CanvasEvent(0, [5, 6], 3, logprobs=lp), None)
    assert out["logprobs"].dtype == np.float32 and out["logprobs"].tolist() == [-0.5, -1.0]
    assert out["top_logprob_ids"].tolist() == [[5, 7], [6, 1]] and out["top_logprobs"].shape == (2, 2)
    final = outputs_for_event(FinalEvent([5, 6], "eos", Stats(2, 2, 3, [3]), Logprobs([-0.5, -1.0], [[], []], [[], []])),
                              None)
    assert final["top_logprobs"].shape == (2, 0) and final["logprobs"].shape == (2,)
    assert not set(LOGPROB_OUTPUTS) & set(outputs_for_event(CanvasEvent(0, [5], 1), None))  # not asked: not sent


def test_score_inputs_make_a_score_request(cfg):
    from service.engine.scoring import DEFAULT_SAMPLES, ScoreRequest

    ids = lambda *v: np.array(v, dtype=np.int32)  # noqa: E731
    req = request_from_inputs({"input_ids": ids(2, 3), "score_ids": ids(4, 5), "logprobs": ids(2),
                               "seed": np.array([9], dtype=np.uint64)}, cfg, None)
    assert isinstance(req, ScoreRequest) and req.prompt_ids == [2, 3] and req.target_ids == [4, 5]
    assert req.samples == DEFAULT_SAMPLES and req.seed == 9 and req.top_logprobs == 2
    for inputs, field in [({"score_samples": ids(0)}, "score_samples"), ({"logprobs": ids(21)}, "logprobs"),
                          ({"max_new_tokens": ids(8)}, "max_new_tokens")]:
        with pytest.raises(InvalidArgument) as e:
            request_from_inputs({"input_ids": ids(2), "score_ids": ids(4), **inputs}, cfg, None)
        assert e.value.field == field
    with pytest.raises(InvalidArgument) as e:
        request_from_inputs({"input_ids": ids(2), "score_samples": ids(4)}, cfg, None)
    assert e.value.field == "score_samples"
