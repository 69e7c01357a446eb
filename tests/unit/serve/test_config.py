"""`dgemma serve` configuration from NIM_* variables and flags."""

from pathlib import Path

import pytest

from service import DEFAULT_CHECKPOINT
from service.errors import InvalidArgument
from service.serve.config import api_keys, serve_options, tls_config


def test_defaults_serve_the_embedded_model_on_8000():
    o = serve_options({})
    assert o.front.port == 8000 and o.front.host == "0.0.0.0" and o.metrics_port == 8002
    assert o.front.checkpoint == DEFAULT_CHECKPOINT and o.front.profile == "torch-fp32-cpu"
    assert o.front.api_keys == [] and o.front.tls is None and o.front.reflection is False
    assert o.repository.device == "cpu" and o.repository.instance_kind == "KIND_CPU"
    assert o.front.triton_target == f"127.0.0.1:{o.triton_ports.grpc}"
    assert o.front.http_port == 8080 and o.front.http_max_body_bytes == 1 << 20


def test_flags_override_environment(tmp_path):
    env = {"NIM_SERVER_PORT": "9000", "NIM_METRICS_PORT": "9001", "NIM_GRPC_REFLECTION": "true",
           "NIM_MAX_CONCURRENT_REQUESTS": "7", "NIM_SERVED_MODEL_NAME": "dg", "NIM_CACHE_PATH": str(tmp_path),
           "NIM_MAX_LIVE_CANVASES": "4", "NIM_MAX_QUEUED_REQUESTS": "3"}
    o = serve_options(env)
    assert (o.repository.max_live_canvases, o.repository.max_engine_queue) == (4, 3)
    assert (o.front.port, o.metrics_port, o.front.reflection, o.front.max_inflight) == (9000, 9001, True, 7)
    assert o.front.model_id == "dg" and o.cache_dir == tmp_path
    env.update(NIM_HTTP_PORT="9080", NIM_HTTP_MAX_BODY_BYTES="4096")
    assert (serve_options(env).front.http_port, serve_options(env).front.http_max_body_bytes) == (9080, 4096)
    o = serve_options(env, port=9100, metrics_port=9101, http_port=9180, reflection=False, profile="torch-bf16-any")
    assert (o.front.port, o.metrics_port, o.front.http_port, o.front.reflection) == (9100, 9101, 9180, False)
    assert o.repository.dtype == "bfloat16"


def test_front_limits_from_environment():
    d = serve_options({}).front
    assert (d.max_prompt_bytes, d.max_prompt_tokens, d.stream_buffer, d.max_concurrent_rpcs,
            d.grpc_max_message_bytes) == (128 << 10, 8192, 64, 256, 1 << 20)
    f = serve_options({"NIM_MAX_PROMPT_BYTES": "100", "NIM_MAX_PROMPT_TOKENS": "50", "NIM_STREAM_BUFFER": "3",
                       "NIM_MAX_CONCURRENT_RPCS": "9", "NIM_GRPC_MAX_MESSAGE_BYTES": "2048"}).front
    assert (f.max_prompt_bytes, f.max_prompt_tokens, f.stream_buffer, f.max_concurrent_rpcs,
            f.grpc_max_message_bytes) == (100, 50, 3, 9, 2048)


def test_http_body_timeout_tokenizer_threads_and_the_request_cap_reach_the_front():
    d = serve_options({}).front
    assert (d.http_body_timeout_s, d.tokenizer_threads, d.max_request_seconds) == (30.0, 4, 600.0)
    f = serve_options({"NIM_HTTP_BODY_TIMEOUT": "2.5", "NIM_TOKENIZER_THREADS": "2",
                       "NIM_MAX_REQUEST_SECONDS": "90"}).front
    assert (f.http_body_timeout_s, f.tokenizer_threads, f.max_request_seconds) == (2.5, 2, 90.0)


@pytest.mark.parametrize("env, field", [
    ({"NIM_SERVER_PORT": "http"}, "NIM_SERVER_PORT"),
    ({"NIM_HTTP_PORT": "x"}, "NIM_HTTP_PORT"),
    ({"NIM_HTTP_MAX_BODY_BYTES": "10"}, "NIM_HTTP_MAX_BODY_BYTES"),
    ({"NIM_MAX_CONCURRENT_REQUESTS": "0"}, "NIM_MAX_CONCURRENT_REQUESTS"),
    ({"NIM_MAX_QUEUED_REQUESTS": "0"}, "NIM_MAX_QUEUED_REQUESTS"),
    ({"NIM_MAX_PROMPT_BYTES": "0"}, "NIM_MAX_PROMPT_BYTES"),
    ({"NIM_STREAM_BUFFER": "x"}, "NIM_STREAM_BUFFER"),
    ({"NIM_MAX_CONCURRENT_RPCS": "0"}, "NIM_MAX_CONCURRENT_RPCS"),
    ({"NIM_GRPC_MAX_MESSAGE_BYTES": "100"}, "NIM_GRPC_MAX_MESSAGE_BYTES"),
    ({"NIM_HTTP_BODY_TIMEOUT": "0"}, "NIM_HTTP_BODY_TIMEOUT"),
    ({"NIM_HTTP_BODY_TIMEOUT": "inf"}, "NIM_HTTP_BODY_TIMEOUT"),
    ({"NIM_TOKENIZER_THREADS": "0"}, "NIM_TOKENIZER_THREADS"),
    ({"NIM_MODEL_PROFILE": "torch-fp8-h100"}, "NIM_MODEL_PROFILE"),
    ({"NIM_MODEL_PROFILE": "onnx-float32-cpu"}, "NIM_MODEL_PROFILE"),
    ({"NIM_MODEL_PROFILE": "torch-fp8-hopper"}, "NIM_MODEL_PROFILE"),  # a raw checkpoint: build it first
    ({"NIM_MODEL_PATH": "/nonexistent"}, "checkpoint"),
    ({"NIM_SSL_MODE": "TLS"}, "NIM_SSL_CERT_PATH"),
    ({"NIM_SSL_MODE": "maybe"}, "NIM_SSL_MODE"),
    ({"NIM_SHUTDOWN_GRACE_PERIOD": "soon"}, "NIM_SHUTDOWN_GRACE_PERIOD"),
])
def test_bad_settings_name_the_variable(env, field):
    with pytest.raises(InvalidArgument) as e:
        serve_options(env)
    assert e.value.field == field


def test_api_keys_from_env_and_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# team keys\nk2\n\n  k3  \n")
    assert api_keys({"NIM_API_KEYS": "k1, ,k0", "NIM_API_KEYS_FILE": str(f)}) == ["k1", "k0", "k2", "k3"]
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(InvalidArgument, match="no key"):
        api_keys({"NIM_API_KEYS_FILE": str(tmp_path / "empty")})


def test_mtls_needs_the_client_ca(tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("y")
    env = {"NIM_SSL_MODE": "tls", "NIM_SSL_CERT_PATH": str(cert), "NIM_SSL_KEY_PATH": str(key)}
    assert tls_config(env).client_ca is None
    with pytest.raises(InvalidArgument) as e:
        tls_config({**env, "NIM_SSL_MODE": "MTLS"})
    assert e.value.field == "NIM_SSL_CA_CERT_PATH"
    assert tls_config({**env, "NIM_SSL_MODE": "MTLS", "NIM_SSL_CA_CERT_PATH": str(cert)}).client_ca == Path(cert)


def test_engine_limits_travel_to_the_model_config(tmp_path):
    """Issue 17, finding 5 (and 4's caps): the prompt and memory limits and the request caps are NIM_*
    variables that reach the rendered config.pbtxt, which model.py reads into the scheduler's Limits."""
    from service.triton.repository import render_config

    env = {"NIM_CACHE_PATH": str(tmp_path), "NIM_MAX_PROMPT_TOKENS": "1000", "NIM_MAX_MEMORY_BYTES": str(3 << 30),
           "NIM_MAX_REQUEST_SECONDS": "12.5", "NIM_MAX_NEW_TOKENS_LIMIT": "2048",
           "NIM_MAX_DENOISING_STEPS_LIMIT": "128", "NIM_ENGINE_HEARTBEAT_TIMEOUT": "7", "NIM_ENGINE_STEP_TIMEOUT": "45"}
    o = serve_options(env)
    r = o.repository
    assert (r.max_prompt_tokens, r.max_memory_bytes, r.max_request_seconds) == (1000, 3 << 30, 12.5)
    assert (r.max_new_tokens_limit, r.max_denoising_steps_limit) == (2048, 128)
    assert o.engine_heartbeat_timeout_s == 7.0
    text = render_config(r)
    for key, value in [("max_prompt_tokens", "1000"), ("max_memory_bytes", str(3 << 30)),
                       ("max_request_seconds", "12.5"), ("max_new_tokens_limit", "2048"),
                       ("max_denoising_steps_limit", "128"), ("engine_step_timeout", "45.0")]:
        assert f'key: "{key}" value: {{ string_value: "{value}" }}' in text
    assert 'name: "timeout_ms" data_type: TYPE_UINT64' in text
    d = serve_options({"NIM_CACHE_PATH": str(tmp_path)}).repository
    assert (d.max_prompt_tokens, d.max_request_seconds, d.max_new_tokens_limit) == (8192, 600.0, 0)
    assert d.engine_step_timeout == 120.0


@pytest.mark.parametrize("name, value", [("NIM_MAX_PROMPT_TOKENS", "0"), ("NIM_MAX_REQUEST_SECONDS", "-1"),
                                         ("NIM_MAX_REQUEST_SECONDS", "nan"), ("NIM_MAX_NEW_TOKENS_LIMIT", "-5"),
                                         ("NIM_MAX_DENOISING_STEPS_LIMIT", "x"),
                                         ("NIM_ENGINE_HEARTBEAT_TIMEOUT", "1"), ("NIM_ENGINE_STEP_TIMEOUT", "-1"),
                                         ("NIM_ENGINE_STEP_TIMEOUT", "nan"), ("NIM_PREFIX_CACHE_BYTES", "-1"),
                                         ("NIM_PREFIX_CACHE_BYTES", "x"), ("NIM_PREFIX_CHUNK_TOKENS", "8"),
                                         ("NIM_PREFIX_CHUNK_TOKENS", "100")])
def test_bad_engine_limits_name_the_variable(tmp_path, name, value):
    with pytest.raises(InvalidArgument) as e:
        serve_options({"NIM_CACHE_PATH": str(tmp_path), name: value})
    assert e.value.field == name


def test_batch_invariant_mode_is_opt_in_and_reaches_the_model_config(tmp_path):
    """NIM_BATCH_INVARIANT: off by default (one expert GEMM for the whole batch); 1/true turns it on in
    config.pbtxt, which model.py hands to the runner (TorchRunner(batch_invariant=True))."""
    from service.triton.repository import render_config

    line = 'key: "batch_invariant" value: {{ string_value: "{}" }}'
    off = serve_options({"NIM_CACHE_PATH": str(tmp_path)}).repository
    assert off.batch_invariant == 0 and line.format(0) in render_config(off)
    for value in ("1", "true"):
        on = serve_options({"NIM_CACHE_PATH": str(tmp_path), "NIM_BATCH_INVARIANT": value}).repository
        assert on.batch_invariant == 1 and line.format(1) in render_config(on)


def test_prefix_cache_settings_reach_the_model_config(tmp_path):
    """NIM_PREFIX_CACHE_BYTES (unset: -1, the runner's default of a tenth of the KV pool; 0: off) and
    NIM_PREFIX_CHUNK_TOKENS reach config.pbtxt, which model.py hands to the runner."""
    from service.triton.repository import render_config

    line = 'key: "{}" value: {{ string_value: "{}" }}'
    d = render_config(serve_options({"NIM_CACHE_PATH": str(tmp_path)}).repository)
    assert line.format("prefix_cache_bytes", -1) in d and line.format("prefix_chunk_tokens", 256) in d
    r = serve_options({"NIM_CACHE_PATH": str(tmp_path), "NIM_PREFIX_CACHE_BYTES": "0",
                       "NIM_PREFIX_CHUNK_TOKENS": "512"}).repository
    text = render_config(r)
    assert line.format("prefix_cache_bytes", 0) in text and line.format("prefix_chunk_tokens", 512) in text


def test_runner_sets_the_mode_on_its_network(small_ckpt):
    from service.engine.torch_runner import TorchRunner

    assert not TorchRunner(small_ckpt).model.batch_invariant
    runner = TorchRunner(small_ckpt, batch_invariant=True)
    assert runner.model.batch_invariant and "batch-invariant" in runner.describe()
