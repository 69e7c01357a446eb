"""The front's client of Triton: one KServe v2 `ModelStreamInfer` call per backend request (grpc.aio).

Cancelling the task that iterates `stream()` cancels the gRPC call, which Triton turns into
`response_sender.is_cancelled()` in the model: the engine frees the request's slot within one step.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc

from service.logprobs import Logprobs
from service.errors import DeadlineExceeded, DGemmaError, InvalidArgument, Unavailable
from service.request.errors import error_from_triton

# Triton datatype -> the InferTensorContents field that carries it.
_CONTENTS = {"INT32": "int_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "BOOL": "bool_contents", "BYTES": "bytes_contents"}


@dataclass(frozen=True)
class BackendEvent:
    """One decoded response of the model (see docs/api.md, "Outputs")."""

    kind: str  # draft | canvas | final
    ids: list[int]
    text: str
    canvas_index: int
    step: int
    stats: dict = field(default_factory=dict)
    finish_reason: str = ""
    # set by the request layer's Stopper (service/request/stopping.py) on a final event:
    tail: str = ""  # text that no canvas event released (held back as a possible stop sequence's start)
    stop_reason: str | int | None = None  # the stop sequence or stop token id that ended the variation
    completion_tokens: int | None = None  # ids returned after the cut, pad excluded (None: the engine's count)
    logprobs: Logprobs | None = None  # one entry per id in `ids`, when the request asked (canvas and final events)


@dataclass(frozen=True)
class Tensor:
    datatype: str  # INT32, UINT64, FP32, BOOL or BYTES
    values: Sequence


def _infer_request(model: str, request_id: str, inputs: dict[str, Tensor]) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, t in inputs.items():
        tensor = req.inputs.add(name=name, datatype=t.datatype, shape=[len(t.values)])
        values = [v.encode() if isinstance(v, str) else v for v in t.values]
        try:
            getattr(tensor.contents, _CONTENTS[t.datatype]).extend(values)
        except (TypeError, ValueError):  # a value its type cannot hold: the request layer's ranges missed it
            raise InvalidArgument(name, f"a value does not fit the backend's {t.datatype}") from None
    return req


def _decode(response: service_pb2.ModelInferResponse) -> BackendEvent:
    r = InferResult(response)

    def one(name: str):
        v = r.as_numpy(name)[0]
        return v.decode("utf-8", "replace") if isinstance(v, bytes) else v.item()

    stats = one("stats")
    return BackendEvent(
        kind=one("event"), ids=r.as_numpy("output_ids").astype(int).tolist(), text=one("text_output"),
        canvas_index=one("canvas_index"), step=one("step"), stats=json.loads(stats) if stats else {},
        finish_reason=one("finish_reason"), logprobs=_logprobs(r),
    )


def _logprobs(r: InferResult) -> Logprobs | None:
    """The response's log-probs (outputs only a request with `logprobs` gets)."""
    if r.get_output("logprobs") is None:
        return None
    return Logprobs(r.as_numpy("logprobs").tolist(), r.as_numpy("top_logprob_ids").astype(int).tolist(),
                    r.as_numpy("top_logprobs").tolist())


class TritonClient:
    def __init__(self, target: str, model: str) -> None:
        self.model = model
        self._connect(target)

    def _connect(self, target: str) -> None:
        self.target = target
        # Triton starts after the front and may restart: reconnect within a second, not gRPC's default backoff
        # (up to 120 s), so calls do not keep failing fast once it is back
        self._channel = grpc.aio.insecure_channel(target, options=[
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000)])
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    async def retarget(self, target: str) -> None:
        """Talk to Triton at `target` from now on (it restarted on another port)."""
        old = self._channel
        self._connect(target)
        await old.close()

    async def ready(self, timeout: float = 2.0) -> bool:
        """Triton is up and the model is loaded and ready."""
        try:
            server = await self._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout)
            model = await self._stub.ModelReady(service_pb2.ModelReadyRequest(name=self.model), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return server.ready and model.ready

    async def stream(
        self,
        inputs: dict[str, Tensor],
        *,
        request_id: str = "",
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        field_names: dict[str, str] | None = None,
    ) -> AsyncIterator[BackendEvent]:
        """Yield the model's events until the final one; backend errors are raised as domain errors.

        `timeout` (seconds left of the caller's deadline) also travels to the engine as `timeout_ms`, which
        drops the request at its next step once it passes."""
        if timeout is not None:
            inputs = {**inputs, "timeout_ms": Tensor("UINT64", [max(1, int(timeout * 1000))])}
        try:
            request = _infer_request(self.model, request_id, inputs)
        except InvalidArgument as e:
            raise e.renamed((field_names or {}).get(e.field, e.field)) from None

        async def requests():
            yield request  # then half-close: Triton still sends every response

        call = self._stub.ModelStreamInfer(requests(), timeout=timeout, metadata=tuple(metadata))
        try:
            async for response in call:
                if response.error_message:
                    raise error_from_triton(response.error_message, field_names)
                event = _decode(response.infer_response)
                yield event
                if event.kind == "final":
                    return
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded("deadline exceeded") from None
            raise Unavailable("the model server is unavailable") from None
        finally:
            call.cancel()  # no-op once the call is done; frees the backend slot otherwise
        raise DGemmaError("the model's stream ended without a final response")

    async def close(self) -> None:
        await self._channel.close()
