"""Process lifecycle of `dgemma serve`: Triton supervision, SIGTERM drain, TLS and mutual TLS."""

from __future__ import annotations

import json
import os
import signal
import ssl
import threading

import grpc
import httpx
import pytest
import trustme
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb
from service.api.diffusiongemma.v1 import diffusiongemma_pb2_grpc as pb_grpc
from tests.e2e.conftest import Serve, triton_pid
from tests.e2e.test_operations import SHORT


def test_reflection_dead_triton_restarted_and_sigterm_drains_streams(tmp_path):
    srv = Serve(tmp_path, {"NIM_GRPC_REFLECTION": "1", "NIM_JSONL_LOGGING": "1"}, api_key=None)
    try:
        listed = next(reflection_pb2_grpc.ServerReflectionStub(srv.channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        assert "diffusiongemma.v1.DiffusionGemma" in {s.name for s in listed.list_services_response.service}
        pid = triton_pid(srv.proc.pid)
        assert pid is not None
        assert srv.metric("dgemma_front_backend_restarts_total") == 0
        os.kill(pid, signal.SIGKILL)
        srv.wait_health("NOT_SERVING", timeout=10)
        srv.wait_health("SERVING", timeout=120)  # restarted by the supervisor
        assert triton_pid(srv.proc.pid) not in (None, pid)
        assert srv.metric("dgemma_front_backend_restarts_total") == 1
        assert srv.stub().Generate(SHORT, timeout=60).choices

        # A stream in flight when SIGTERM arrives still finishes; then the process exits 0.
        req = pb.GenerateRequest(text="def ", max_new_tokens=64 * 3, return_drafts=True, options=pb.GenerationOptions(
            parameters=pb.DiffusionParameters(max_denoising_steps=60, confidence_threshold=0.0)))
        events, errors = [], []
        started = threading.Event()

        def consume():
            try:
                for ev in srv.stub().GenerateStream(req, timeout=120):
                    events.append(ev)
                    started.set()
            except grpc.RpcError as e:
                errors.append(e)
                started.set()

        t = threading.Thread(target=consume)
        t.start()
        assert started.wait(60) and not errors
        srv.proc.send_signal(signal.SIGTERM)
        srv.wait_health("NOT_SERVING", timeout=10)
        t.join(120)
        assert not errors, errors
        assert events[-1].HasField("final") and len(events[-1].final.choices[0].token_ids) == 64 * 3
        assert srv.proc.wait(60) == 0
        # NIM_JSONL_LOGGING: the front's log is JSON lines
        logs = [json.loads(line) for line in srv.log.read_text().splitlines() if line.startswith("{")]
        assert any(r["message"] == "health: SERVING" and r["level"] == "INFO" and r["ts"] for r in logs)
        assert any("restarting" in r["message"] and r["level"] == "ERROR" for r in logs)
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def test_mutual_tls(tmp_path, ca):
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_pem, key_pem, ca_pem = tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(server_pem)
    cert.private_key_pem.write_to_path(key_pem)
    ca.cert_pem.write_to_path(ca_pem)
    env = {"NIM_SSL_MODE": "MTLS", "NIM_SSL_CERT_PATH": str(server_pem), "NIM_SSL_KEY_PATH": str(key_pem),
           "NIM_SSL_CA_CERT_PATH": str(ca_pem)}

    client = ca.issue_cert("client@example.com")
    good = grpc.ssl_channel_credentials(ca.cert_pem.bytes(), client.private_key_pem.bytes(),
                                        client.cert_chain_pems[0].bytes())
    no_cert = grpc.ssl_channel_credentials(ca.cert_pem.bytes())

    srv = Serve(tmp_path, env, api_key=None, credentials=good)
    try:
        assert pb_grpc.DiffusionGemmaStub(srv.channel).ListModels(pb.ListModelsRequest(), timeout=10).models
        with grpc.secure_channel(srv.target, no_cert) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.DiffusionGemmaStub(ch).ListModels(pb.ListModelsRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake is refused
        with grpc.insecure_channel(srv.target) as ch:
            with pytest.raises(grpc.RpcError):
                pb_grpc.DiffusionGemmaStub(ch).ListModels(pb.ListModelsRequest(), timeout=10)
        # the HTTP port speaks HTTPS with the same settings: a client certificate is required
        with client.cert_chain_pems[0].tempfile() as cert_file, client.private_key_pem.tempfile() as key_file:
            with_cert = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
            with_cert.load_cert_chain(cert_file, key_file)
            with httpx.Client(verify=with_cert, timeout=10) as https:
                assert https.get(f"{srv.http_url}/v1/models").json()["data"][0]["id"] == "diffusiongemma"
        with httpx.Client(verify=ssl.create_default_context(cadata=ca.cert_pem.bytes().decode()), timeout=10) as c:
            with pytest.raises(httpx.TransportError):  # the handshake (or the first read) is refused
                c.get(f"{srv.http_url}/v1/models")
    finally:
        assert srv.stop() == 0
