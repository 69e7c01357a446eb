"""Python SDK for the DiffusionGemma gRPC API: `Client` (blocking) and `AsyncClient` (grpc.aio).

    with Client("127.0.0.1:8000", api_key="...") as c:
        print(c.generate("Write a haiku", max_denoising_steps=32, seed=1).choices[0].text)

Keywords mirror the proto (diffusiongemma.v1); a keyword left None stays unset, so the server's default
applies. Every failed call raises `ClientError` with the gRPC status code and the server's message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any, TypedDict, Unpack

import grpc
import grpc.aio
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb
from service.api.diffusiongemma.v1 import diffusiongemma_pb2_grpc as pb_grpc

# DiffusionParameters' numeric fields (the proto is the client's only source: it ships without the server)
DIFFUSION_PARAMS = tuple(f.name for f in pb.DiffusionParameters.DESCRIPTOR.fields if f.name != "sampler")

DEFAULT_TARGET = "127.0.0.1:8000"

__all__ = ["AsyncClient", "Client", "ClientError", "GenerationKwargs", "build_request", "DEFAULT_TARGET"]


class ClientError(Exception):
    """A call failed: `code` is the gRPC status code, `message` the server's (or gRPC's) message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def _client_error(e: grpc.RpcError) -> ClientError:
    """The one conversion from grpc.RpcError (sync or aio) to ClientError."""
    code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
    details = e.details() if callable(getattr(e, "details", None)) else str(e)
    return ClientError(code or grpc.StatusCode.UNKNOWN, details or "")


class GenerationKwargs(TypedDict, total=False):
    """Keywords every generating call takes (GenerationOptions, DiffusionParameters, model, request_id)."""

    max_denoising_steps: int
    entropy_bound: float
    t_min: float
    t_max: float
    stability_threshold: int
    confidence_threshold: float
    temperature: float  # scales the schedule, 0 to 2; 0 greedy (docs/api.md)
    top_k: int
    sampler: str  # "reference" or "fast"
    seed: int
    num_variations: int
    request_id: str
    model: str


# ---------------------------------------------------------------------------------------------------
# Requests from keywords (shared by both clients)

_REQUESTS: dict[str, type[Message]] = {
    "Generate": pb.GenerateRequest,
    "GenerateStream": pb.GenerateRequest,
    "Infill": pb.InfillRequest,
    "Edit": pb.EditRequest,
    "Template": pb.TemplateRequest,
    "Tokenize": pb.TokenizeRequest,
    "ListModels": pb.ListModelsRequest,
    "Score": pb.ScoreRequest,
}
_SAMPLERS = {"reference": pb.SAMPLER_REFERENCE, "fast": pb.SAMPLER_FAST}
_HOLE_TYPES = {"text": pb.HOLE_TYPE_TEXT, "string": pb.HOLE_TYPE_STRING, "number": pb.HOLE_TYPE_NUMBER}


def _enum(table: dict[str, int], name: str, value: str | int) -> int:
    if isinstance(value, int):
        return value
    try:
        return table[value]
    except KeyError:
        raise ValueError(f"{name}: must be one of {', '.join(table)}, got {value!r}") from None


def _chat(turns: Iterable[tuple[str, str] | pb.ChatMessage]) -> pb.Chat:
    messages = [t if isinstance(t, pb.ChatMessage) else pb.ChatMessage(role=t[0], content=t[1]) for t in turns]
    return pb.Chat(messages=messages)


def _span(s: Sequence[int] | pb.Span) -> pb.Span:
    if isinstance(s, pb.Span):
        return s
    if len(s) not in (2, 3):
        raise ValueError(f"spans: expected (start, end) or (start, end, length_tokens), got {s!r}")
    return pb.Span(start=s[0], end=s[1], length_tokens=s[2] if len(s) == 3 else 0)


def _part(p: str | tuple[str, str, int] | pb.Hole | pb.TemplatePart) -> pb.TemplatePart:
    """A literal string, a hole (name, type, length_tokens) or pb.Hole, or a ready TemplatePart."""
    if isinstance(p, pb.TemplatePart):
        return p
    if isinstance(p, str):
        return pb.TemplatePart(literal=p)
    if isinstance(p, pb.Hole):
        return pb.TemplatePart(hole=p)
    name, kind, length = p
    return pb.TemplatePart(hole=pb.Hole(name=name, type=_enum(_HOLE_TYPES, "parts", kind), length_tokens=length))


def _score_kwargs(context: str | Sequence[int], continuation: str | Sequence[int], **kw: Any) -> dict[str, Any]:
    """Score's keywords: each of context and continuation as text (`*_text`) or token ids (`*_ids`)."""
    for name, value in (("context", context), ("continuation", continuation)):
        kw[f"{name}_text" if isinstance(value, str) else f"{name}_ids"] = value
    return kw


def _set_options(options: pb.GenerationOptions, kw: dict[str, Any]) -> None:
    """Moves the option keywords out of `kw` into `options` (left unset when none is given)."""
    for name in DIFFUSION_PARAMS:
        if name in kw:
            setattr(options.parameters, name, kw.pop(name))
    if "sampler" in kw:
        options.parameters.sampler = _enum(_SAMPLERS, "sampler", kw.pop("sampler"))
    if "seed" in kw:
        options.seed = kw.pop("seed")
    if "num_variations" in kw:
        options.num_variations = kw.pop("num_variations")


def build_request(rpc: str, **kw: Any) -> Message:
    """The request message of `rpc` ("Generate", "GenerateStream", "Infill", "Edit", "Template", "Tokenize",
    "ListModels", "Score") from the SDK's keywords. None means unset. Conversions: chat=[(role, content)],
    token_ids=[...], spans=[(start, end[, length_tokens])], parts=[literal | (name, type, length)],
    sampler="reference"|"fast"; option keywords (GenerationKwargs) go into `options`."""
    kw = {k: v for k, v in kw.items() if v is not None}
    msg = _REQUESTS[rpc]()
    if sum(k in kw for k in ("text", "chat", "token_ids")) > 1:
        raise ValueError("give one prompt: text, chat or token_ids")
    if "skeleton" in kw and "parts" in kw:
        raise ValueError("give the template as skeleton or as parts, not both")
    if "chat" in kw:
        msg.chat.CopyFrom(_chat(kw.pop("chat")))
    if "token_ids" in kw:
        msg.token_ids.ids.extend(kw.pop("token_ids"))
    for name in ("context_ids", "continuation_ids"):  # Score's TokenIds
        if name in kw:
            getattr(msg, name).ids.extend(kw.pop(name))
    if "spans" in kw:
        msg.editable.extend(_span(s) for s in kw.pop("spans"))
    if "parts" in kw:
        msg.parts.extend(_part(p) for p in kw.pop("parts"))
    if "options" in msg.DESCRIPTOR.fields_by_name:
        _set_options(msg.options, kw)
    for name, value in kw.items():
        if name not in msg.DESCRIPTOR.fields_by_name:
            raise TypeError(f"{rpc}: unexpected keyword {name!r}")
        if msg.DESCRIPTOR.fields_by_name[name].is_repeated:  # stop="x" or stop=[...], stop_token_ids=[...]
            getattr(msg, name).extend([value] if isinstance(value, str) else value)
        else:
            setattr(msg, name, value)
    return msg


# ---------------------------------------------------------------------------------------------------
# Channel set-up (shared)

def _credentials(tls: bool, root_certificates: bytes | None, client_certificate: bytes | None,
                 client_key: bytes | None) -> grpc.ChannelCredentials | None:
    if (client_certificate is None) != (client_key is None):
        raise ValueError("give client_certificate and client_key together")
    if not (tls or root_certificates or client_certificate):
        return None
    return grpc.ssl_channel_credentials(root_certificates, private_key=client_key, certificate_chain=client_certificate)


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class _Base:
    def __init__(self, target: str, api_key: str | None, timeout: float | None) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = _metadata(api_key)

    def _kwargs(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": self._metadata}


# ---------------------------------------------------------------------------------------------------
# Blocking client

class Client(_Base):
    """Blocking client over one channel. Use as a context manager, or call close()."""

    def __init__(self, target: str = DEFAULT_TARGET, *, api_key: str | None = None,
                 root_certificates: bytes | None = None, client_certificate: bytes | None = None,
                 client_key: bytes | None = None, tls: bool = False, timeout: float | None = None) -> None:
        super().__init__(target, api_key, timeout)
        creds = _credentials(tls, root_certificates, client_certificate, client_key)
        self._channel = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
        self._stub = pb_grpc.DiffusionGemmaStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Message, timeout: float | None) -> Any:
        try:
            return method(request, **self._kwargs(timeout))
        except grpc.RpcError as e:
            raise _client_error(e) from e

    def generate(self, text: str | None = None, *, chat: Iterable[tuple[str, str]] | None = None,
                 token_ids: Iterable[int] | None = None, max_new_tokens: int | None = None,
                 timeout: float | None = None, **options: Unpack[GenerationKwargs]) -> pb.GenerateResponse:
        request = build_request("Generate", text=text, chat=chat, token_ids=token_ids,
                                max_new_tokens=max_new_tokens, **options)
        return self._call(self._stub.Generate, request, timeout)

    def generate_stream(self, text: str | None = None, *, chat: Iterable[tuple[str, str]] | None = None,
                        token_ids: Iterable[int] | None = None, max_new_tokens: int | None = None,
                        return_drafts: bool = False, timeout: float | None = None,
                        **options: Unpack[GenerationKwargs]) -> Iterator[pb.GenerateStreamResponse]:
        """Streams events; closing the iterator early (or dropping it) cancels the call."""
        request = build_request("GenerateStream", text=text, chat=chat, token_ids=token_ids,
                                max_new_tokens=max_new_tokens, return_drafts=return_drafts, **options)
        return _iterate(self._stub.GenerateStream(request, **self._kwargs(timeout)))

    def infill(self, prefix: str, suffix: str, gap_tokens: int, *, timeout: float | None = None,
               **options: Unpack[GenerationKwargs]) -> pb.InfillResponse:
        request = build_request("Infill", prefix=prefix, suffix=suffix, gap_tokens=gap_tokens, **options)
        return self._call(self._stub.Infill, request, timeout)

    def edit(self, text: str, spans: Iterable[Sequence[int]], instruction: str = "", *,
             timeout: float | None = None, **options: Unpack[GenerationKwargs]) -> pb.EditResponse:
        request = build_request("Edit", text=text, spans=spans, instruction=instruction, **options)
        return self._call(self._stub.Edit, request, timeout)

    def template(self, skeleton: str | None = None, parts: Iterable[Any] | None = None, instruction: str = "", *,
                 timeout: float | None = None, **options: Unpack[GenerationKwargs]) -> pb.TemplateResponse:
        request = build_request("Template", skeleton=skeleton, parts=parts, instruction=instruction, **options)
        return self._call(self._stub.Template, request, timeout)

    def tokenize(self, text: str | None = None, chat: Iterable[tuple[str, str]] | None = None, *,
                 model: str | None = None, timeout: float | None = None) -> pb.TokenizeResponse:
        return self._call(self._stub.Tokenize, build_request("Tokenize", text=text, chat=chat, model=model), timeout)

    def list_models(self, *, timeout: float | None = None) -> pb.ListModelsResponse:
        return self._call(self._stub.ListModels, build_request("ListModels"), timeout)

    def score(self, context: str | Sequence[int], continuation: str | Sequence[int], *,
              score_samples: int | None = None, seed: int | None = None, top_logprobs: int | None = None,
              timeout: float | None = None) -> pb.ScoreResponse:
        """The continuation's estimated log-probabilities after the context (text, or token ids); docs/api.md."""
        request = build_request("Score", **_score_kwargs(context, continuation, score_samples=score_samples, seed=seed,
                                                         top_logprobs=top_logprobs))
        return self._call(self._stub.Score, request, timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 Check: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN"."""
        reply = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _iterate(call: Any) -> Iterator[pb.GenerateStreamResponse]:
    try:
        for event in call:
            yield event
    except grpc.RpcError as e:
        raise _client_error(e) from e
    finally:
        call.cancel()  # a no-op once the stream has ended


# ---------------------------------------------------------------------------------------------------
# asyncio client

class AsyncClient(_Base):
    """The same methods as Client over grpc.aio: coroutines, and generate_stream an async iterator.

    Create it inside the running event loop; `async with AsyncClient(...) as c:` closes it.
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, api_key: str | None = None,
                 root_certificates: bytes | None = None, client_certificate: bytes | None = None,
                 client_key: bytes | None = None, tls: bool = False, timeout: float | None = None) -> None:
        super().__init__(target, api_key, timeout)
        creds = _credentials(tls, root_certificates, client_certificate, client_key)
        self._channel = grpc.aio.secure_channel(target, creds) if creds else grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.DiffusionGemmaStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Message, timeout: float | None) -> Any:
        try:
            return await method(request, **self._kwargs(timeout))
        except grpc.RpcError as e:
            raise _client_error(e) from e

    async def generate(self, text: str | None = None, *, chat: Iterable[tuple[str, str]] | None = None,
                       token_ids: Iterable[int] | None = None, max_new_tokens: int | None = None,
                       timeout: float | None = None, **options: Unpack[GenerationKwargs]) -> pb.GenerateResponse:
        request = build_request("Generate", text=text, chat=chat, token_ids=token_ids,
                                max_new_tokens=max_new_tokens, **options)
        return await self._call(self._stub.Generate, request, timeout)

    def generate_stream(self, text: str | None = None, *, chat: Iterable[tuple[str, str]] | None = None,
                        token_ids: Iterable[int] | None = None, max_new_tokens: int | None = None,
                        return_drafts: bool = False, timeout: float | None = None,
                        **options: Unpack[GenerationKwargs]) -> AsyncIterator[pb.GenerateStreamResponse]:
        """An async iterator of events; aclose() on it (e.g. via contextlib.aclosing) cancels the call."""
        request = build_request("GenerateStream", text=text, chat=chat, token_ids=token_ids,
                                max_new_tokens=max_new_tokens, return_drafts=return_drafts, **options)
        return _aiterate(self._stub.GenerateStream(request, **self._kwargs(timeout)))

    async def infill(self, prefix: str, suffix: str, gap_tokens: int, *, timeout: float | None = None,
                     **options: Unpack[GenerationKwargs]) -> pb.InfillResponse:
        request = build_request("Infill", prefix=prefix, suffix=suffix, gap_tokens=gap_tokens, **options)
        return await self._call(self._stub.Infill, request, timeout)

    async def edit(self, text: str, spans: Iterable[Sequence[int]], instruction: str = "", *,
                   timeout: float | None = None, **options: Unpack[GenerationKwargs]) -> pb.EditResponse:
        request = build_request("Edit", text=text, spans=spans, instruction=instruction, **options)
        return await self._call(self._stub.Edit, request, timeout)

    async def template(self, skeleton: str | None = None, parts: Iterable[Any] | None = None,
                       instruction: str = "", *, timeout: float | None = None,
                       **options: Unpack[GenerationKwargs]) -> pb.TemplateResponse:
        request = build_request("Template", skeleton=skeleton, parts=parts, instruction=instruction, **options)
        return await self._call(self._stub.Template, request, timeout)

    async def tokenize(self, text: str | None = None, chat: Iterable[tuple[str, str]] | None = None, *,
                       model: str | None = None, timeout: float | None = None) -> pb.TokenizeResponse:
        request = build_request("Tokenize", text=text, chat=chat, model=model)
        return await self._call(self._stub.Tokenize, request, timeout)

    async def list_models(self, *, timeout: float | None = None) -> pb.ListModelsResponse:
        return await self._call(self._stub.ListModels, build_request("ListModels"), timeout)

    async def score(self, context: str | Sequence[int], continuation: str | Sequence[int], *,
                    score_samples: int | None = None, seed: int | None = None, top_logprobs: int | None = None,
                    timeout: float | None = None) -> pb.ScoreResponse:
        request = build_request("Score", **_score_kwargs(context, continuation, score_samples=score_samples, seed=seed,
                                                         top_logprobs=top_logprobs))
        return await self._call(self._stub.Score, request, timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        reply = await self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def _aiterate(call: Any) -> AsyncIterator[pb.GenerateStreamResponse]:
    try:
        async for event in call:
            yield event
    except grpc.RpcError as e:
        raise _client_error(e) from e
    finally:
        call.cancel()
