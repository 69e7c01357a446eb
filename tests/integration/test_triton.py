"""A real tritonserver (no mocks) hosting the DiffusionGemma Python backend, called with tritonclient."""

import queue
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from service.engine.api import Request
from service.engine.registry import create_engine
from service.sampler.params import GenerationParams
from service.triton.launcher import TritonServer
from service.triton.repository import MODEL_NAME, RepositorySettings, build_repository

SERVER_THREADS = 1
TYPES = {np.int32: "INT32", np.float32: "FP32", np.uint64: "UINT64", np.bool_: "BOOL", np.object_: "BYTES"}


@pytest.fixture(scope="module")
def server(small_ckpt, tmp_path_factory):
    repo = build_repository(tmp_path_factory.mktemp("repo"), RepositorySettings(
        checkpoint_dir=str(small_ckpt), threads=SERVER_THREADS, batch_invariant=1))  # batched == solo, bit for bit
    srv = TritonServer(repo, log_file=tmp_path_factory.mktemp("log") / "triton.log")
    srv.start(timeout=180, wait_model=MODEL_NAME)
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def engine(small_ckpt):
    return create_engine(checkpoint_dir=small_ckpt, batch_invariant=True)


def make_inputs(**values):
    out = []
    for name, v in values.items():
        arr = np.asarray(v)
        if arr.dtype.kind in "US":
            arr = np.array([x.encode() for x in arr.reshape(-1)], dtype=np.object_)
        elif arr.dtype == np.int64:
            arr = arr.astype(np.uint64 if name == "seed" else np.int32)
        elif arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        arr = arr.reshape(-1)
        i = grpcclient.InferInput(name, list(arr.shape), TYPES[arr.dtype.type])
        i.set_data_from_numpy(arr)
        out.append(i)
    return out


class StreamClient:
    """One gRPC stream; `run` sends a request and collects its responses until the final one."""

    def __init__(self, srv):
        self.client = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.ports.grpc}")
        self.q = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.q.put((result, error)))

    def send(self, **values):
        self.client.async_stream_infer(MODEL_NAME, make_inputs(**values), enable_empty_final_response=True)

    def collect(self, timeout=120.0):
        events = []
        while True:
            result, error = self.q.get(timeout=timeout)
            if error is not None:
                return events, error
            resp = result.get_response()
            if result.as_numpy("event") is not None:
                events.append({
                    "event": result.as_numpy("event")[0].decode(),
                    "ids": result.as_numpy("output_ids").tolist(),
                    "step": int(result.as_numpy("step")[0]),
                    "stats": result.as_numpy("stats")[0].decode(),
                })
            final = resp.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return events, None

    def run(self, **values):
        self.send(**values)
        return self.collect()

    def close(self, cancel=False):
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def final_of(events):
    assert events and events[-1]["event"] == "final", events
    return events[-1]


def solo(engine, prompt, **params):
    """The in-process result, computed with the server's thread count: BLAS kernels round differently
    with another number of threads, and exact equality needs the same arithmetic."""
    seed = params.pop("seed", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(SERVER_THREADS)
    try:
        return list(engine.generate(Request(prompt, GenerationParams(**params), seed=seed)))[-1]
    finally:
        torch.set_num_threads(threads)


def test_stream_matches_in_process_engine(server, engine):
    c = StreamClient(server)
    try:
        events, err = c.run(input_ids=[2, 105, 10, 11], seed=7, max_new_tokens=40, max_denoising_steps=4)
        assert err is None
        expected = solo(engine, [2, 105, 10, 11], seed=7, max_new_tokens=40, max_denoising_steps=4)
        assert final_of(events)["ids"] == expected.token_ids
    finally:
        c.close()


def test_drafts_then_canvases_then_final(server):
    c = StreamClient(server)
    try:
        events, err = c.run(input_ids=[2, 9, 8], seed=3, max_new_tokens=32, max_denoising_steps=5,
                            return_drafts=True, confidence_threshold=0.0)
        assert err is None
        kinds = [e["event"] for e in events]
        assert kinds == ["draft"] * 5 + ["canvas"] + ["draft"] * 5 + ["canvas", "final"] or (
            kinds[:6] == ["draft"] * 5 + ["canvas"] and kinds[-2:] == ["canvas", "final"])  # EOS may end early
        assert [e["step"] for e in events[:5]] == [1, 2, 3, 4, 5]
    finally:
        c.close()


def test_concurrent_streams_are_batched_and_each_gets_its_solo_result(server, engine):
    # long enough (no early stop, many steps) that the three streams overlap in the engine
    reqs = [dict(input_ids=[2, 20 + i, 30 + i], seed=i, max_new_tokens=64, max_denoising_steps=30 + i,
                 confidence_threshold=0.0) for i in range(3)]
    clients = [StreamClient(server) for _ in reqs]
    results = [None] * len(reqs)

    def go(i):
        results[i] = clients[i].run(**reqs[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(reqs))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        shared = 0
        for r, (events, err) in zip(reqs, results):
            assert err is None
            final = final_of(events)
            prompt = r.pop("input_ids")
            assert final["ids"] == solo(engine, prompt, **r).token_ids
            shared += '"shared_decoder_passes": 0' not in final["stats"]
        assert shared >= 2  # at least two requests shared decoder passes
    finally:
        for c in clients:
            c.close()


def metric(srv, name):
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.ports.metrics}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{")]
    return values[0] if values else None


def test_cancel_stops_work_and_next_request_is_served(server):
    c = StreamClient(server)
    c.send(input_ids=[2, 5, 6], seed=1, max_new_tokens=2048, max_denoising_steps=200, return_drafts=True,
           confidence_threshold=0.0)
    result, err = c.q.get(timeout=60)  # the first draft
    assert err is None
    c.close(cancel=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and metric(server, "dgemma_live_canvases") != 0:
        time.sleep(0.05)
    assert metric(server, "dgemma_live_canvases") == 0
    c2 = StreamClient(server)
    try:
        events, err = c2.run(input_ids=[2, 3], seed=2, max_new_tokens=16, max_denoising_steps=2)
        assert err is None and final_of(events)
    finally:
        c2.close()


@pytest.mark.parametrize("inputs, field", [
    (dict(text_input="", max_new_tokens=8), "text_input"),
    (dict(text_input="hi", input_ids=[2, 3]), "text_input"),
    (dict(input_ids=[2, 10**6]), "input_ids"),
    (dict(input_ids=[2, 3], max_denoising_steps=0), "max_denoising_steps"),
    (dict(input_ids=[2, 3], pin_ids=list(range(3, 3 + 17))), "pin_ids"),
])
def test_bad_inputs_are_invalid_argument_naming_the_input(server, inputs, field):
    c = StreamClient(server)
    try:
        events, err = c.run(**inputs)
        assert err is not None and not events
        text = str(err)
        # a streamed error carries only its message; the model puts the code first
        assert text.startswith("INVALID_ARG: "), text
        assert field in text
        assert "Traceback" not in text and "/" not in text.split(field, 1)[1]
        events, err = c.run(input_ids=[2, 3], max_new_tokens=16, max_denoising_steps=2)
        assert err is None and final_of(events)  # still serving
    finally:
        c.close()


def test_custom_metrics_on_the_metrics_endpoint(server):
    c = StreamClient(server)
    try:
        c.run(input_ids=[2, 3], max_new_tokens=16, max_denoising_steps=2)
    finally:
        c.close()
    assert metric(server, "dgemma_canvases_total") >= 1
    assert metric(server, "dgemma_generated_tokens_total") >= 1
    assert metric(server, "dgemma_queue_depth") is not None
    assert metric(server, "dgemma_live_canvases") is not None


def test_not_ready_until_the_model_has_loaded(small_ckpt, tmp_path):
    repo = build_repository(tmp_path / "repo", RepositorySettings(checkpoint_dir=str(small_ckpt), threads=1))
    srv = TritonServer(repo, explicit_load=True, log_file=tmp_path / "triton.log").start(timeout=120)
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.ports.grpc}")
        assert client.is_server_live()
        assert not client.is_model_ready(MODEL_NAME)
        assert not srv.ready(MODEL_NAME)
        client.load_model(MODEL_NAME)
        assert client.is_model_ready(MODEL_NAME) and srv.ready(MODEL_NAME)
        client.close()
    finally:
        srv.stop()
