"""model.py sends exactly one FINAL per request, whatever fails while a response is built or sent (issue 17,
finding 2), and honours `timeout_ms` and the server's caps (finding 4). Against a stub of pb_utils."""

from __future__ import annotations

import importlib.util
import json
import sys
import time

import numpy as np
import pytest

from service.triton.repository import TEMPLATE_DIR
from tests.unit.triton.test_adapter import FakeRequest, FakeSender, ids, make_stub

WAIT_S = 20
OUTPUTS = ["event", "output_ids", "text_output", "canvas_index", "step", "stats", "finish_reason"]


@pytest.fixture(scope="module")
def model(small_ckpt):
    saved = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = make_stub()
    spec = importlib.util.spec_from_file_location("dg_model_final", TEMPLATE_DIR / "1" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    m = mod.TritonPythonModel()
    params = {"checkpoint_dir": str(small_ckpt), "threads": "1", "max_new_tokens_limit": "64",
              "max_denoising_steps_limit": "500", "max_request_seconds": "60", "max_prompt_tokens": "16"}
    m.initialize({"model_config": json.dumps({
        "name": "diffusiongemma", "output": [{"name": n} for n in OUTPUTS],
        "parameters": {k: {"string_value": v} for k, v in params.items()}})})
    yield m
    m.finalize()
    if saved is None:
        sys.modules.pop("triton_python_backend_utils", None)
    else:
        sys.modules["triton_python_backend_utils"] = saved


class FlakySender(FakeSender):
    """Fails to send the responses that `fails(response, flags)` picks, as a broken connection would."""

    def __init__(self, fails):
        super().__init__()
        self.fails = fails

    def send(self, response=None, flags=0):
        if self.fails(response, flags):
            raise RuntimeError("injected send fault")
        super().send(response, flags)


def finals(sender) -> list:
    assert sender.done.wait(WAIT_S), "no FINAL was sent (the request would hang)"
    time.sleep(0.3)  # a second FINAL, or anything after the first, would show up here
    flagged = [r for r, flags in sender.sent if flags]
    assert len(flagged) == 1, sender.sent
    assert sender.sent[-1][0] is flagged[0], "a response came after the FINAL"
    return flagged


def good(**extra) -> FakeRequest:
    return FakeRequest(input_ids=ids(2, 3), max_new_tokens=ids(16), max_denoising_steps=ids(2), **extra)


def still_serves(model) -> None:
    req = good()
    model.execute([req])
    (final,) = finals(req.sender)
    assert final.error is None


def test_a_response_that_cannot_be_built_ends_with_one_final_error(model, monkeypatch):
    monkeypatch.setattr(model, "_detok", lambda ids: (_ for _ in ()).throw(ValueError("bad bytes")))
    req = good()
    model.execute([req])
    (final,) = finals(req.sender)
    assert final.error is not None and final.error.msg.startswith("UNAVAILABLE: ")
    monkeypatch.undo()
    still_serves(model)


def test_a_final_that_cannot_be_sent_is_replaced_by_a_final_error(model):
    req = good()
    req.sender = FlakySender(lambda response, flags: flags and response.error is None)
    model.execute([req])
    (final,) = finals(req.sender)
    assert final.error is not None
    still_serves(model)


def test_a_sender_that_always_fails_neither_raises_nor_stops_the_engine(model):
    req = good()
    req.sender = FlakySender(lambda response, flags: True)
    model.execute([req])  # nothing escapes, even the FINAL of a refused request
    bad = FakeRequest(input_ids=ids(2, 10**6))
    bad.sender = FlakySender(lambda response, flags: True)
    model.execute([bad])
    time.sleep(0.5)
    assert model.scheduler.live_canvases == 0
    still_serves(model)


def test_timeout_ms_drops_the_request_with_deadline_exceeded(model):
    req = FakeRequest(input_ids=ids(2, 3), max_new_tokens=ids(64), max_denoising_steps=ids(400),
                      timeout_ms=np.array([50], dtype=np.uint64))
    model.execute([req])
    (final,) = finals(req.sender)
    assert final.error is not None and final.error.msg.startswith("DEADLINE_EXCEEDED: ")
    assert final.error.code == "UNAVAILABLE"


@pytest.mark.parametrize("name, value", [("max_new_tokens", 65), ("max_denoising_steps", 501)])
def test_server_caps_refuse_naming_the_input(model, name, value):
    inputs = {"input_ids": ids(2, 3), "max_new_tokens": ids(16), "max_denoising_steps": ids(2), name: ids(value)}
    req = FakeRequest(**inputs)
    model.execute([req])
    (final,) = finals(req.sender)
    assert final.error.code == "INVALID_ARG" and final.error.msg.startswith(f"INVALID_ARG: {name}: ")


def test_the_prompt_limit_is_configurable_and_names_the_input(model):
    """Finding 5: max_prompt_tokens comes from the model's config (NIM_MAX_PROMPT_TOKENS), no longer fixed."""
    req = FakeRequest(input_ids=ids(*([2] * 17)), max_new_tokens=ids(16), max_denoising_steps=ids(2))
    model.execute([req])
    (final,) = finals(req.sender)
    assert final.error.msg.startswith("INVALID_ARG: input_ids: longer than the limit of 16 tokens")


def test_the_engine_heartbeat_advances_while_the_scheduler_runs(model):
    beat = model.metrics["dgemma_engine_heartbeat_seconds"]
    first = beat.value
    time.sleep(1.5)
    assert beat.value > first and time.time() - beat.value < 3


def test_the_heartbeat_stops_when_a_step_hangs(model, monkeypatch):
    """A step past `engine_step_timeout` stops the heartbeat (the supervisor then restarts Triton), though the
    scheduler's thread is alive. Its own heartbeat thread, so that the fixture's keeps running."""
    import threading

    from tests.unit.triton.test_adapter import make_stub

    metric = make_stub().MetricFamily("beat", "", 0).Metric({})
    monkeypatch.setattr(model, "step_timeout_s", 0.5)
    hung = {"busy": 0.0}
    monkeypatch.setattr(model.scheduler, "step_seconds", lambda: hung["busy"])
    beat = threading.Thread(target=model._heartbeat, args=(metric,), daemon=True)
    beat.start()
    time.sleep(0.3)
    assert beat.is_alive() and metric.value > 0
    hung["busy"] = 0.8
    beat.join(3)
    assert not beat.is_alive(), "the heartbeat went on through a hung step"
    assert model.scheduler.alive
