"""The `dgemma` subcommands that talk to a server, against a fake in-process gRPC server."""

import io
import json

import pytest

from service import cli
from tests.unit.fake_dgemma import fake_server, free_address


@pytest.fixture(scope="module")
def served():
    with fake_server() as (target, servicer):
        yield target, servicer


@pytest.fixture
def server(served, monkeypatch):
    target, servicer = served
    servicer.calls.clear()
    for name in ("DGEMMA_SERVER", "DGEMMA_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    return target, servicer


def test_generate_on_server_json(server, capsys):
    target, servicer = server
    rc = cli.main(["generate", "hi", "--server", target, "--json", "--seed", "4", "--max-new-tokens", "16",
                   "--max-denoising-steps", "3", "--t-max", "0.7", "--sampler", "fast", "--api-key", "k"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"text": "hello 0", "token_ids": [7, 8, 1, 0], "finish_reason": "eos",
                   "stats": {"prompt_tokens": 3, "generated_tokens": 5, "decoder_passes": 4, "steps_per_canvas": [4],
                             "tokens_per_forward": 1.25, "shared_decoder_passes": 0}}
    name, request, metadata = servicer.calls[-1]
    assert name == "Generate" and request.text == "hi" and request.max_new_tokens == 16
    p = request.options.parameters
    assert request.options.seed == 4 and p.max_denoising_steps == 3 and abs(p.t_max - 0.7) < 1e-6
    assert p.sampler == 2 and not p.HasField("t_min") and metadata["authorization"] == "Bearer k"


def test_generate_server_from_env_prints_text(server, capsys, monkeypatch):
    target, servicer = server
    monkeypatch.setenv("DGEMMA_SERVER", target)
    monkeypatch.setenv("DGEMMA_API_KEY", "from-env")
    assert cli.main(["generate", "--prompt-ids", "2,105", "--num-variations", "2"]) == 0
    assert capsys.readouterr().out == "--- variation 0 ---\nhello 0\n--- variation 1 ---\nhello 1\n"
    _, request, metadata = servicer.calls[-1]
    assert list(request.token_ids.ids) == [2, 105] and request.options.num_variations == 2
    assert metadata["authorization"] == "Bearer from-env"


def test_generate_visual_streams_drafts(server, capsys):
    target, servicer = server
    assert cli.main(["generate", "hi", "--server", target, "--visual"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "hello 0\n"
    assert "[canvas 0 step   1] h?l?o" in captured.err and "[canvas 0 step   3] hello 0" in captured.err
    assert captured.err.endswith("\n")
    name, request, _ = servicer.calls[-1]
    assert name == "GenerateStream" and request.return_drafts


def test_infill(server, capsys):
    target, servicer = server
    assert cli.main(["infill", "--prefix", "def f(", "--suffix", "):", "--gap-tokens", "3", "--server", target]) == 0
    assert capsys.readouterr().out == "def f(XX):\n"
    assert servicer.calls[-1][1].gap_tokens == 3
    assert cli.main(["infill", "--prefix", "a", "--gap-tokens", "3", "--server", target, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["choices"][0]["infill"] == "XX" and out["choices"][0]["text"] == "aXX"


def test_template_from_file_and_stdin(server, capsys, tmp_path, monkeypatch):
    target, servicer = server
    skeleton = '{"age": {{age:number:2}}}'
    (tmp_path / "t.txt").write_text(skeleton)
    assert cli.main(["template", str(tmp_path / "t.txt"), "--instruction", "Bob is 42", "--server", target]) == 0
    assert capsys.readouterr().out == '{"age": 42}\n'
    request = servicer.calls[-1][1]
    assert request.skeleton == skeleton and request.instruction == "Bob is 42"
    monkeypatch.setattr("sys.stdin", io.StringIO(skeleton))
    assert cli.main(["template", "-", "--server", target, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["choices"][0]["named_values"] == {"age": "42"}
    assert servicer.calls[-1][1].skeleton == skeleton


def test_models_and_tokenize(server, capsys, monkeypatch):
    target, _ = server
    monkeypatch.setenv("DGEMMA_SERVER", target)
    assert cli.main(["models"]) == 0
    assert capsys.readouterr().out == "tiny\tcanvas_length=16\tvocab_size=512\tprofile=torch-fp32-cpu\n"
    assert cli.main(["tokenize", "ab"]) == 0
    assert capsys.readouterr().out == "2,97,98\n"
    assert cli.main(["tokenize", "ab", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"token_ids": [2, 97, 98], "tokens": ["<bos>", "a", "b"]}


def test_server_error_exits_2(server, capsys):
    target, _ = server
    assert cli.main(["generate", "fail", "--server", target]) == 2
    err = capsys.readouterr().err
    assert err == "dgemma: error: INVALID_ARGUMENT: max_new_tokens: must be in [1, 65536], got 0\n"


def test_unreachable_server_is_one_clear_line(server, capsys):
    address = free_address()
    assert cli.main(["models", "--server", address, "--timeout", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dgemma: error: UNAVAILABLE: cannot connect to the server at {address}")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_tls_flags_exit_2(server, capsys, tmp_path):
    target, _ = server
    assert cli.main(["models", "--server", target, "--tls-cert", str(tmp_path / "c.pem")]) == 2
    assert "--tls-key" in capsys.readouterr().err
    assert cli.main(["models", "--server", target, "--tls-ca", str(tmp_path / "missing.pem")]) == 2
    assert "cannot read" in capsys.readouterr().err
