"""The front's interceptors on a real grpc.aio server with a stand-in servicer: error table, request ids,
auth, metrics."""

import asyncio
import logging
import sys

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb
from service.api.diffusiongemma.v1 import diffusiongemma_pb2_grpc as pb_grpc
from service.errors import InvalidArgument, Overloaded
from service.front.interceptors import (
    AuthInterceptor,
    ObservabilityInterceptor,
    RpcLimitInterceptor,
    current_request_metrics,
)
from service.telemetry.metrics import FrontMetrics


class Standin(pb_grpc.DiffusionGemmaServicer):
    async def Generate(self, request, context):
        if request.text == "bad":
            raise InvalidArgument("text", "is bad")
        if request.text == "busy":
            raise Overloaded("the server is at its limit; retry later")
        if request.text == "bug":
            raise RuntimeError("secret internals at /srv/app/model.py line 3")
        if request.text == "linger":  # works on past its client's deadline (a generation until the engine's next step)
            for _ in range(20):
                try:
                    await asyncio.sleep(0.05)
                except asyncio.CancelledError:
                    pass
        current_request_metrics().canvas(steps=3, tokens=5)
        return pb.GenerateResponse(request_id=request.request_id)

    async def GenerateStream(self, request, context):
        yield pb.GenerateStreamResponse(request_id=request.request_id, draft=pb.Draft(step=1))
        if request.text == "hold":  # holds its call open until the client cancels
            await asyncio.sleep(60)
        if request.text == "flood":  # more than flow control lets through to a client that stopped reading
            for _ in range(10_000):
                yield pb.GenerateStreamResponse(request_id="x" * 60_000, draft=pb.Draft(step=1))
        if request.text == "bug":
            raise KeyError("internal")
        yield pb.GenerateStreamResponse(request_id=request.request_id, final=pb.GenerateResponse())


def run(keys, body, extra=()):
    async def main():
        metrics = FrontMetrics()
        interceptors = [ObservabilityInterceptor(metrics)] + ([AuthInterceptor(keys)] if keys else []) + list(extra)
        server = grpc.aio.server(interceptors=interceptors)
        pb_grpc.add_DiffusionGemmaServicer_to_server(Standin(), server)
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        reflection.enable_server_reflection([reflection.SERVICE_NAME], server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                return await body(pb_grpc.DiffusionGemmaStub(ch), health_pb2_grpc.HealthStub(ch), metrics, ch)
        finally:
            await server.stop(None)

    return asyncio.run(main())


async def error_of(coro):
    try:
        await coro
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details()
    return None


async def slots_free(limiter: RpcLimitInterceptor, seconds: float) -> None:
    """Wait (at most `seconds`) until the limiter holds no slot."""
    for _ in range(int(seconds * 100)):
        if limiter.active == 0:
            return
        await asyncio.sleep(0.01)


def sample(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels)


def test_domain_errors_map_through_the_table_and_internal_errors_hide_internals():
    async def body(stub, _, metrics, ch):
        bad = await error_of(stub.Generate(pb.GenerateRequest(text="bad")))
        busy = await error_of(stub.Generate(pb.GenerateRequest(text="busy")))
        bug = await error_of(stub.Generate(pb.GenerateRequest(text="bug", request_id="r-42")))
        ok = await stub.Generate(pb.GenerateRequest(text="fine"))
        return bad, busy, bug, ok, metrics

    bad, busy, bug, ok, metrics = run(None, body)
    assert bad == (grpc.StatusCode.INVALID_ARGUMENT, "text: is bad")
    assert busy[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert bug == (grpc.StatusCode.INTERNAL, "internal error (request_id=r-42)")
    assert len(ok.request_id) == 32  # generated when the client sent none
    assert sample(metrics, "dgemma_front_requests_total", method="Generate", code="OK") == 1
    assert sample(metrics, "dgemma_front_requests_total", method="Generate", code="INTERNAL") == 1
    assert sample(metrics, "dgemma_front_requests_total", method="Generate", code="INVALID_ARGUMENT") == 1
    assert sample(metrics, "dgemma_front_generated_tokens_total", method="Generate") == 5
    assert sample(metrics, "dgemma_front_inflight_requests") == 0


def test_stream_error_after_events_is_internal_and_generic():
    async def body(stub, _, metrics, ch):
        events = []
        call = stub.GenerateStream(pb.GenerateRequest(text="bug", request_id="s-1"))
        try:
            async for ev in call:
                events.append(ev)
        except grpc.aio.AioRpcError as e:
            return events, e.code(), e.details()

    events, code, details = run(None, body)
    assert len(events) == 1 and code == grpc.StatusCode.INTERNAL and details == "internal error (request_id=s-1)"


@pytest.mark.parametrize("header, ok", [
    (None, False), ("Bearer wrong", False), ("Basic k1", False), ("Bearer k1", True), ("bearer k2", True),
])
def test_bearer_auth_and_open_health(header, ok):
    async def body(stub, health_stub, metrics, ch):
        md = (("authorization", header),) if header else ()
        unary = await error_of(stub.Generate(pb.GenerateRequest(text="fine"), metadata=md))
        stream = await error_of(stub.GenerateStream(pb.GenerateRequest(text="x"), metadata=md).read())
        checked = await health_stub.Check(health_pb2.HealthCheckRequest())
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        listing = await error_of(refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=md).read())
        return unary, stream, checked, listing, metrics

    unary, stream, checked, listing, metrics = run(["k1", "k2"], body)
    if ok:
        assert unary is None and stream is None and listing is None
    else:
        assert unary[0] == stream[0] == listing[0] == grpc.StatusCode.UNAUTHENTICATED
        # refused calls are counted too
        assert sample(metrics, "dgemma_front_requests_total", method="Generate", code="UNAUTHENTICATED") == 1
    assert checked.status == health_pb2.HealthCheckResponse.SERVING  # health never needs a token


def test_a_request_id_with_a_newline_is_refused_before_anything_logs_it(caplog):
    """The raw request_id is validated before the interceptor logs or traces it: a newline (a forged log line)
    gets INVALID_ARGUMENT naming request_id, and no log record holds it (before: logged as sent)."""
    forged = "r-1\n2026-01-01 INFO dgemma.front: forged line"

    async def body(stub, _, metrics, ch):
        unary = await error_of(stub.Generate(pb.GenerateRequest(text="bug", request_id=forged)))
        stream = await error_of(stub.GenerateStream(pb.GenerateRequest(text="x", request_id=forged)).read())
        trailing = await error_of(stub.Generate(pb.GenerateRequest(text="fine", request_id="r-2\n")))
        return unary, stream, trailing, metrics

    with caplog.at_level(logging.DEBUG):
        unary, stream, trailing, metrics = run(None, body)
    expected = (grpc.StatusCode.INVALID_ARGUMENT, "request_id: must be 1 to 128 printable ASCII characters without "
                                                  "spaces")
    assert unary == stream == trailing == expected
    assert caplog.records  # the refusals are logged, under a fresh id
    for r in caplog.records:
        assert "forged" not in r.getMessage() and "\n" not in str(getattr(r, "request_id", ""))
    assert sample(metrics, "dgemma_front_requests_total", method="Generate", code="INVALID_ARGUMENT") == 2


def test_the_rpc_limit_refuses_every_kind_of_call_but_health_and_frees_its_slots():
    """NIM_MAX_CONCURRENT_RPCS: with 2 calls held open, unary, streaming and reflection calls are refused
    (RESOURCE_EXHAUSTED, counted) while health still answers; cancelling the held calls frees the slots."""
    limiter = RpcLimitInterceptor(2)

    async def body(stub, health_stub, metrics, ch):
        held = [stub.GenerateStream(pb.GenerateRequest(text="hold")) for _ in range(2)]
        for call in held:
            await call.read()  # in the handler: its slot is taken
        active = limiter.active
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        refused = [await error_of(stub.Generate(pb.GenerateRequest(text="fine"))),
                   await error_of(stub.GenerateStream(pb.GenerateRequest(text="x")).read()),
                   await error_of(refl.ServerReflectionInfo(
                       iter([reflection_pb2.ServerReflectionRequest(list_services="")])).read())]
        checked = await health_stub.Check(health_pb2.HealthCheckRequest())
        for call in held:
            call.cancel()
        await slots_free(limiter, 5.0)
        after = await error_of(stub.Generate(pb.GenerateRequest(text="fine")))
        return active, refused, checked, limiter.active, after, metrics

    active, refused, checked, freed, after, metrics = run(None, body, [limiter])
    assert active == 2, (active, refused, freed, after)
    assert [r[0] for r in refused] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3, refused
    assert refused[0][1] == "too many concurrent calls (this server's limit is 2); retry later"
    assert checked.status == health_pb2.HealthCheckResponse.SERVING
    assert freed == 0 and after is None, (freed, after)
    assert sample(metrics, "dgemma_front_requests_total", method="Generate", code="RESOURCE_EXHAUSTED") == 1


def test_rpc_slots_come_back_when_clients_cancel_in_any_state():
    """A client that cancels while the server is blocked writing to it (flow control: the servicer's stream is
    parked at a yield, not awaiting anything of its own) frees its slot as surely as one cancelled mid-work; the
    soak found slots leaking there (refusals with only 64 clients under a limit of 256)."""
    limiter = RpcLimitInterceptor(4)

    async def body(stub, health_stub, metrics, ch):
        for _ in range(3):
            calls = [stub.GenerateStream(pb.GenerateRequest(text=t)) for t in ("flood", "flood", "hold", "hold")]
            for call in calls:
                await call.read()
            await asyncio.sleep(0.3)  # the floods fill the windows and block in their writes
            for call in calls:
                call.cancel()
            await slots_free(limiter, 5.0)
            if limiter.active:
                return limiter.active
        return await error_of(stub.Generate(pb.GenerateRequest(text="fine")))

    assert run(None, body, [limiter]) is None


def test_a_call_past_its_deadline_holds_its_slot_until_its_handler_ends_then_frees_it():
    """A handler that works on past its client's deadline (a generation until the engine's next step) keeps its
    slot, as gRPC's own cap counts its calls, and gives it back when it ends: the done callback, however the
    call ended."""
    limiter = RpcLimitInterceptor(2)

    async def body(stub, health_stub, metrics, ch):
        late = [await error_of(stub.Generate(pb.GenerateRequest(text="linger"), timeout=0.1)) for _ in range(2)]
        held = limiter.active
        await slots_free(limiter, 3.0)  # each handler lingers about 1 s
        return late, held, limiter.active, await error_of(stub.Generate(pb.GenerateRequest(text="fine")))

    late, held, active, after = run(None, body, [limiter])
    assert [code for code, _ in late] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2
    assert held >= 1 and active == 0 and after is None


def test_the_front_imports_without_torch():
    import subprocess

    code = "import sys, service.front.server, service.serve.supervisor; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
