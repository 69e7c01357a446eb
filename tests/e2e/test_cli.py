"""The `dgemma` client subcommands against the running server, and reflection off by default."""

from __future__ import annotations

import json

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.cli import main

STEPS = ["--max-denoising-steps", "4"]


def run_cli(server, capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.setenv("DGEMMA_API_KEY", server.api_key)
    rc = main([*args, "--server", server.target])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generate_json_and_visual(server, capsys, monkeypatch):
    rc, out, _ = run_cli(server, capsys, monkeypatch, "generate", "def ", "--json", "--max-new-tokens", "16", *STEPS)
    doc = json.loads(out)
    # max_new_tokens is a hard cap: at most 16 tokens (fewer only when the model ends at an EOS)
    assert rc == 0 and 1 <= len(doc["token_ids"]) <= 16 and doc["finish_reason"] in ("eos", "length")
    rc, out, err = run_cli(server, capsys, monkeypatch, "generate", "def ", "--visual", "--max-new-tokens", "16",
                           *STEPS)
    assert rc == 0 and "[canvas 0 step   4]" in err and out.strip() != ""  # the canvas, step by step


def test_infill_template_models_tokenize(server, capsys, monkeypatch, tmp_path):
    rc, out, _ = run_cli(server, capsys, monkeypatch, "infill", "--prefix", "x = (", "--suffix", ")\n",
                         "--gap-tokens", "3", *STEPS)
    assert rc == 0 and out.startswith("x = (") and out.rstrip("\n").endswith(")")
    skeleton = tmp_path / "point.json"
    skeleton.write_text('{"x": {{x:number:1}}, "y": {{y:number:1}}}')
    rc, out, _ = run_cli(server, capsys, monkeypatch, "template", str(skeleton), *STEPS)
    assert rc == 0 and set(json.loads(out)) == {"x", "y"}
    rc, out, _ = run_cli(server, capsys, monkeypatch, "models")
    assert rc == 0 and "diffusiongemma" in out
    rc, out, _ = run_cli(server, capsys, monkeypatch, "tokenize", "def")
    assert rc == 0 and out.strip().split(",")[0] == "2"  # BOS first


def test_cli_errors_are_one_line_with_the_code(server, capsys, monkeypatch):
    rc, _, err = run_cli(server, capsys, monkeypatch, "infill", "--prefix", "a", "--suffix", "b", "--gap-tokens", "0")
    assert rc == 2 and err.startswith("dgemma: error: INVALID_ARGUMENT: gap_tokens") and "Traceback" not in err
    monkeypatch.setenv("DGEMMA_API_KEY", "wrong")
    rc = main(["models", "--server", server.target])
    assert rc == 2 and "UNAUTHENTICATED" in capsys.readouterr().err


def test_reflection_is_off_unless_enabled(server):
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    try:
        list(stub.ServerReflectionInfo(iter([request]), metadata=server.metadata(), timeout=10))
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNIMPLEMENTED
    else:
        raise AssertionError("reflection answered while disabled")
