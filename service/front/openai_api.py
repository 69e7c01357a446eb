"""The OpenAI-compatible HTTP API (Starlette): the same request layer as the gRPC servicer.

Each generation route validates its body into a `Job` (service/request/jobs.py) and runs it on the shared
`Dispatcher`; errors go through the one error table (service/request/errors.py) into OpenAI's error body. A
client that disconnects, mid-stream or while waiting, cancels its Triton streams (the engine frees the
slots within one step).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.errors import DeadlineExceeded, InvalidArgument, PayloadTooLarge, RequestTimeout, Unauthenticated
from service.request import jobs, layout, structured
from service.front.auth import BearerKeys
from service.front.call_limit import CallLimit
from service.request.jobs import OPENAI_PATHS, Job
from service.request.limits import utf8_sizes
from service.front.observe import Call
from service.front.openai_logprobs import (Offsets, TokenTexts, chat_logprobs, completion_logprobs, echoed_logprobs,
                                           joined)
from service.front.openai_schema import (
    DEFAULT_GAP_TOKENS,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_extras,
    chat_of,
    parse,
    prompts_of,
)
from service.front.openai_structured import StructuredAsk, delta_of, message_of, response_format_ask, tool_ask
from service.request.dispatch import Dispatcher, Usage, cached_of, usage_of
from service.request.triton_client import BackendEvent
from service.telemetry.metrics import FrontMetrics
from service.telemetry.tracing import context_from_traceparent, get_tracer

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
OWNER = "diffusiongemma-nim"
MAX_COUNTED_FIELDS = 64  # distinct ignored-field names counted by name; the rest as "other"
log = logging.getLogger("dgemma.front")
DEFAULT_BODY_TIMEOUT_S = 30.0  # NIM_HTTP_BODY_TIMEOUT
MAX_TIMEOUT_S = 1e6  # X-Request-Timeout's cap when the server's (NIM_MAX_REQUEST_SECONDS) is 0 or larger


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _param(e: BaseException) -> str | None:
    return e.field if isinstance(e, InvalidArgument) else None


def _usage(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def _sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


class _Produced:
    """What a route produced: a JSON body, or (stream) SSE chunks."""

    def __init__(self, body: dict | None = None, chunks: AsyncIterator[dict] | None = None) -> None:
        self.body, self.chunks = body, chunks


class _Exchange:
    """One API call as an ASGI response: auth, a slot of the front's call limit, the body (size- and
    time-limited), the route's work raced against the client's disconnect, errors in OpenAI's shape, and the
    call's span, metrics and log lines. Its deadline counts from its arrival."""

    def __init__(self, api: "OpenAIApi", request: Request, method: str,
                 work: Callable[[bytes, Call, float | None], Awaitable[_Produced]]) -> None:
        self.arrived = asyncio.get_running_loop().time()
        self.api, self.request, self.method, self.work = api, request, method, work
        h = request.headers
        raw = h.get("x-request-id", "")
        self.refused: InvalidArgument | None = None
        self.release: Callable[..., None] | None = None  # the call's slot of the front's call limit
        try:  # validated before anything logs or traces it (a control character would forge log lines)
            self.rid = jobs.request_id_of(raw) if raw else uuid.uuid4().hex
        except InvalidArgument as e:
            self.rid, self.refused = uuid.uuid4().hex, e.renamed("x-request-id")
        parent = context_from_traceparent(h.get("traceparent"), h.get("tracestate"))
        self.call = Call(api.metrics, api.tracer, method, method, parent, self.rid,
                         {"http.request.method": request.method, "url.path": request.url.path})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self._serve(receive, send)
        finally:
            if self.release is not None:
                self.release()
            self.call.done("CANCELLED", 499)  # unless an outcome was recorded: the client left, or shutdown
            self.call.end()

    async def _serve(self, receive, send) -> None:
        if self.refused is not None:
            return await self._error(send, self.refused)
        if self.api.keys and not self.api.keys.accepts(self.request.headers.get("authorization", "")):
            return await self._error(send, Unauthenticated("missing or invalid bearer token"))
        self.release = self.api.slots.acquire()  # given back by __call__, however the call ends
        if self.release is None:
            return await self._error(send, self.api.slots.refusal)
        try:
            deadline = self._deadline()
            body = await self._body(receive, deadline)
        except (InvalidArgument, RequestTimeout, DeadlineExceeded) as e:  # the rest of the body is not read
            return await self._error(send, e, close=True)
        if body is None:  # the client left while sending
            return
        work = asyncio.create_task(self._respond(body, deadline, send))
        gone = asyncio.create_task(_disconnected(receive))
        try:  # a client that leaves cancels `work`, and with it the Triton streams
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (work, gone):
                t.cancel()
            await asyncio.gather(work, gone, return_exceptions=True)

    async def _body(self, receive, deadline: float | None) -> bytes | None:
        """The whole body within NIM_HTTP_BODY_TIMEOUT of the call's arrival (and its deadline)."""
        limit = self.api.max_body_bytes
        declared = self.request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge("body", f"larger than this server's limit of {limit} bytes")
        read_by = self.arrived + self.api.body_timeout_s
        try:
            async with asyncio.timeout_at(read_by if deadline is None else min(read_by, deadline)):
                return await self._read(receive, limit)
        except TimeoutError:
            if deadline is not None and deadline < read_by:
                raise DeadlineExceeded("x-request-timeout passed while the body was being read") from None
            raise RequestTimeout(f"the request body did not arrive within {self.api.body_timeout_s:g} s") from None

    @staticmethod
    async def _read(receive, limit: int) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge("body", f"larger than this server's limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _deadline(self) -> float | None:
        """X-Request-Timeout as a deadline on the loop's clock, counted from the call's arrival. A finite number
        of seconds > 0; above the server's cap (NIM_MAX_REQUEST_SECONDS) it is the cap."""
        raw = self.request.headers.get("x-request-timeout")
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise InvalidArgument("x-request-timeout", f"must be a finite number of seconds > 0, got {raw[:40]!r}")
        return self.arrived + min(value, self.api.max_timeout_s)

    async def _error(self, send, e: BaseException, close: bool = False) -> None:
        status, message = self.call.failed(e)
        await _send_json(send, status.http, error_body(message, status.type, _param(e), status.grpc.name.lower()),
                         self.rid, close)

    async def _respond(self, body: bytes, deadline: float | None, send) -> None:
        try:
            produced = await self.work(body, self.call, deadline)
        except Exception as e:  # noqa: BLE001 (the error table decides what the client reads)
            return await self._error(send, e)
        if produced.chunks is None:
            await _send_json(send, 200, produced.body, self.rid)
            self.call.done("OK", 200)
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-request-id", self.rid.encode())]})
        self.call.span.set_attribute("http.response.status_code", 200)
        async with contextlib.aclosing(produced.chunks) as chunks:
            try:
                async for chunk in chunks:
                    await send({"type": "http.response.body", "body": _sse(chunk), "more_body": True})
            except Exception as e:  # noqa: BLE001 (after the headers: an error event ends the stream)
                status, message = self.call.failed(e)
                tail = _sse(error_body(message, status.type, _param(e), status.grpc.name.lower()))
            else:
                self.call.done("OK")
                tail = _sse("[DONE]")
        await send({"type": "http.response.body", "body": tail, "more_body": False})


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_json(send, status: int, body: dict, rid: str, close: bool = False) -> None:
    """`close`: the connection is closed after it (the rest of a request body is never read)."""
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
               (b"x-request-id", rid.encode())]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"connection", b"close")] * close})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def _primed(chunks: AsyncIterator[dict]) -> AsyncIterator[dict]:
    """`chunks` with its first item already produced: errors before the first event (validation by the
    backend, overload) become an HTTP status instead of an event in a 200 stream."""
    first = await anext(chunks)

    async def rest():
        async with contextlib.aclosing(chunks):
            yield first
            async for c in chunks:
                yield c

    return rest()


class OpenAIApi:
    def __init__(self, dispatcher: Dispatcher, metrics: FrontMetrics, keys: BearerKeys, ready: Callable[[], bool],
                 render_metrics: Callable[[], bytes], max_body_bytes: int = 1 << 20, slots: CallLimit | None = None,
                 body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S, max_timeout_s: float = 0.0) -> None:
        """`slots`: the call limit shared with the gRPC front (None: no limit); `body_timeout_s`: how long a
        body may take to arrive (NIM_HTTP_BODY_TIMEOUT); `max_timeout_s`: X-Request-Timeout's cap, the server's
        NIM_MAX_REQUEST_SECONDS (never above MAX_TIMEOUT_S; 0: none, then MAX_TIMEOUT_S)."""
        self.dispatcher, self.model = dispatcher, dispatcher.model
        self.metrics, self.keys, self.ready = metrics, keys, ready
        self.render_metrics = render_metrics
        self.max_body_bytes = max_body_bytes
        self.slots = slots or CallLimit(1 << 62)
        self.body_timeout_s = body_timeout_s
        self.max_timeout_s = min(max_timeout_s, MAX_TIMEOUT_S) if max_timeout_s > 0 else MAX_TIMEOUT_S
        self.tracer = get_tracer("dgemma.front.http")
        self.token_texts = TokenTexts(self.model.tokenizer, self.model.pad_id)
        routes = [
            Route("/v1/completions", self._route("POST /v1/completions", self._completions), methods=["POST"]),
            Route("/v1/chat/completions", self._route("POST /v1/chat/completions", self._chat), methods=["POST"]),
            Route("/v1/tokenize", self._route("POST /v1/tokenize", self._tokenize), methods=["POST"]),
            Route("/v1/detokenize", self._route("POST /v1/detokenize", self._detokenize), methods=["POST"]),
            Route("/v1/models", self._route("GET /v1/models", self._models), methods=["GET"]),
            Route("/v1/models/{model_id:path}", self._model_route, methods=["GET"]),
            Route("/v1/health/live", self._live, methods=["GET"]),
            Route("/v1/health/ready", self._ready, methods=["GET"]),
            Route("/v1/metrics", self._metrics, methods=["GET"]),
            # vLLM's routes at the root, which clients (lm-evaluation-harness's remote tokenizer, guidellm) probe
            Route("/health", self._ready, methods=["GET"]),
            Route("/tokenize", self._route("POST /tokenize", self._tokenize), methods=["POST"]),
            Route("/detokenize", self._route("POST /detokenize", self._detokenize), methods=["POST"]),
            Route("/tokenizer_info", self._route("GET /tokenizer_info", self._tokenizer_info), methods=["GET"]),
        ]
        self._counted_fields: set[str] = set()
        self.app = Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_allowed})

    def _route(self, method: str, work):
        async def endpoint(request: Request):
            return _Exchange(self, request, method, work)
        return endpoint

    def _parse(self, model, body: bytes):
        """The body as `model`; the fields it ignored are counted by name and logged at DEBUG."""
        r, ignored = parse(model, body)
        for name in ignored:
            name = name[:64]
            if name not in self._counted_fields and len(self._counted_fields) < MAX_COUNTED_FIELDS:
                self._counted_fields.add(name)
            self.metrics.ignored_fields.labels(name if name in self._counted_fields else "other").inc()
        if ignored:
            log.debug("ignored fields: %s", ", ".join(repr(n[:64]) for n in ignored[:16]))
        return r

    # ---- open routes ---------------------------------------------------------------------------

    async def _live(self, request: Request) -> Response:
        return JSONResponse({"object": "health.response", "message": "Service is live."})

    async def _ready(self, request: Request) -> Response:
        if self.ready():
            return JSONResponse({"object": "health.response", "message": "Service is ready."})
        return JSONResponse({"object": "health.response", "message": "Service is not ready."}, status_code=503)

    async def _metrics(self, request: Request) -> Response:
        return Response(await asyncio.to_thread(self.render_metrics), media_type=CONTENT_TYPE_LATEST)

    # ---- models, tokenize -----------------------------------------------------------------------

    def _card(self) -> dict:
        m, d = self.model, self.model.defaults
        params = {k: getattr(d, k) for k in (*jobs.PARAM_FIELDS, "sampler")}
        return {"id": m.id, "object": "model", "created": 0, "owned_by": OWNER, "canvas_length": m.config.canvas_length,
                "vocab_size": m.config.vocab_size, "profile": m.profile, "default_parameters": params,
                "default_max_tokens": d.max_new_tokens, "max_model_len": self.dispatcher.limits.max_tokens}

    async def _models(self, body: bytes, call: Call, deadline: float | None) -> _Produced:
        return _Produced({"object": "list", "data": [self._card()]})

    async def _model_route(self, request: Request):
        async def work(body: bytes, call: Call, deadline: float | None) -> _Produced:
            self.dispatcher.check_model(request.path_params["model_id"] or "?", "model")
            return _Produced(self._card())
        return _Exchange(self, request, "GET /v1/models/{id}", work)

    async def _tokenize(self, body: bytes, call: Call, deadline: float | None) -> _Produced:
        r = self._parse(TokenizeRequest, body)
        self.dispatcher.check_model(r.model)
        if (r.prompt is None) == (r.messages is None):
            raise InvalidArgument("prompt", "give prompt or messages")
        if r.prompt is not None:
            self.dispatcher.limits.check_text(utf8_sizes({"prompt": r.prompt}))
            ids = await self.dispatcher.offload(jobs.text_ids, self.model, r.prompt, "prompt")
            if not r.add_special_tokens:
                ids = ids[1:]  # text_ids prepends the BOS
        else:
            ids = await self.dispatcher.offload(jobs.chat_ids, self.model, self._turns(r.messages), "messages",
                                                chat_extras(r.messages))
        tok = jobs.tokenizer_of(self.model, "prompt")
        return _Produced({"model": self.model.id, "tokens": ids, "token_strs": [tok.id_to_token(i) or "" for i in ids],
                          "count": len(ids), "max_model_len": self.dispatcher.limits.max_tokens})

    async def _detokenize(self, body: bytes, call: Call, deadline: float | None) -> _Produced:
        r = self._parse(DetokenizeRequest, body)
        self.dispatcher.check_model(r.model)
        self.dispatcher.limits.check_ids("tokens", len(r.tokens))
        ids = jobs.checked_ids(self.model, r.tokens, "tokens") if r.tokens else []
        tok = jobs.tokenizer_of(self.model, "tokens")
        return _Produced({"prompt": await self.dispatcher.offload(tok.decode, ids, False)})

    async def _tokenizer_info(self, body: bytes, call: Call, deadline: float | None) -> _Produced:
        """vLLM's shape: the special tokens and the chat template (lm-evaluation-harness's remote tokenizer)."""
        tok, m = jobs.tokenizer_of(self.model, "model"), self.model
        text = lambda i: tok.id_to_token(i) if i is not None else None  # noqa: E731
        return _Produced({"tokenizer_class": "PreTrainedTokenizerFast", "model": m.id, "bos_token": text(tok.bos_id),
                          "eos_token": text(m.eos_id), "pad_token": text(m.pad_id),
                          "chat_template": tok.chat_template, "vocab_size": m.config.vocab_size,
                          "model_max_length": self.dispatcher.limits.max_tokens})

    # ---- completions ---------------------------------------------------------------------------

    def _job(self, r, rid: str, prompt_ids: list[int], prompt_field: str, length_field: str,
             max_new_tokens: int | None, **kw) -> Job:
        options = jobs.options_of(r.diffusion_params(), r.sampler, r.seed, r.n, OPENAI_PATHS)
        names = jobs.field_names(prompt_field, length_field, OPENAI_PATHS)
        names["logprobs"] = "top_logprobs" if isinstance(r, ChatRequest) else "logprobs"
        return Job(request_id=rid, prompt_ids=prompt_ids, options=options, max_new_tokens=max_new_tokens,
                   field_names=names, **kw)

    def _logprobs(self, ev: BackendEvent, chat: bool, offsets: Offsets | None = None) -> dict | None:
        """An event's tokens' log-probs in OpenAI's shape for the route (None: not asked); `offsets`: the choice's
        so far (a stream's), else its text starts here."""
        if ev.logprobs is None:
            return None
        if chat:
            return chat_logprobs(ev.ids, ev.logprobs, self.token_texts)
        return completion_logprobs(ev.ids, ev.logprobs, self.token_texts, offsets or Offsets(self.token_texts))

    def _cut(self, r) -> dict:
        """A generation's hard cap (max_tokens), stop sequences, stop ids and ignore_eos, as Job fields."""
        spec = jobs.stopping_of(self.model, r.length()[0], r.stops(), r.stop_token_ids or ())
        return dict(stopping=spec, ignore_eos=r.ignore_eos)

    def _turns(self, messages) -> list[tuple[str, str]]:
        """The conversation's turns, their text within the limits (checked before tokenizing)."""
        turns = chat_of(messages)
        self.dispatcher.limits.check_text(utf8_sizes({f"messages[{i}].content": c for i, (_, c) in enumerate(turns)}))
        return turns

    def _run_kw(self, call: Call, deadline: float | None) -> dict:
        """The dispatcher's arguments: the time left of the call's deadline (counted from its arrival), its trace
        and metrics."""
        timeout = None
        if deadline is not None:
            timeout = deadline - asyncio.get_running_loop().time()
            if timeout <= 0:
                raise DeadlineExceeded("x-request-timeout passed before the request reached the model")
        return dict(timeout=timeout, trace_context=call.trace_context, metrics=call.rm)

    async def _completions(self, body: bytes, call: Call, deadline: float | None) -> _Produced:
        r = self._parse(CompletionRequest, body)
        self.dispatcher.check_model(r.model)
        r.checked_stream_options()
        prompts = prompts_of(r.prompt)
        fields = ["prompt"] if len(prompts) == 1 else [f"prompt[{k}]" for k in range(len(prompts))]
        for p, field in zip(prompts, fields):  # every prompt within the limits before any is tokenized
            if isinstance(p, str):
                self.dispatcher.limits.check_text(utf8_sizes({field: p, "suffix": r.suffix}))
            else:
                self.dispatcher.limits.check_ids(field, len(p))
        head = {"id": f"cmpl-{call.rid}", "object": "text_completion", "created": int(time.time()),
                "model": self.model.id}
        logprobs = r.logprob_count()
        if r.echo:
            for name, given in (("suffix", r.suffix is not None), ("stream", r.stream),
                                ("response_format", response_format_ask(r.response_format) is not None)):
                if given:
                    raise InvalidArgument("echo", f"not supported with {name}")
            return await self._echo(r, prompts, fields, head, call, deadline)
        if r.suffix is not None:
            if len(prompts) > 1:
                raise InvalidArgument("prompt", "with suffix, give one prompt")
            if logprobs is not None:
                raise InvalidArgument("logprobs", "not supported with suffix (an infill's tokens are not one run)")
            return await self._infill(r, prompts[0], head, call, deadline)
        ask = response_format_ask(r.response_format)
        if ask is not None:
            if len(prompts) > 1:
                raise InvalidArgument("prompt", "with response_format, give one prompt")
            ids = await self._prompt_ids(prompts[0], "prompt")
            return await self._structured(r, ask, ids, "prompt", head, call, deadline, chat=False)
        max_new, length_field = r.length()
        cut = {**self._cut(r), "logprobs": logprobs}
        batch = []
        for k, (p, field) in enumerate(zip(prompts, fields)):
            ids = await self._prompt_ids(p, field)
            rid = call.rid if len(prompts) == 1 else f"{call.rid}-p{k}"
            batch.append(self._job(r, rid, ids, field, length_field, max_new, return_drafts=r.stream and r.return_drafts,
                                   **cut))
        if r.stream:
            return _Produced(chunks=await _primed(self._stream(batch, r, head, call, deadline, chat=False)))
        finals = await self._finals(batch, call, deadline)
        n = batch[0].options.num_variations
        choices = [{"index": k * n + i, "text": f.text, "logprobs": self._logprobs(f, chat=False),
                    "finish_reason": FINISH.get(f.finish_reason),
                    "stop_reason": f.stop_reason, "token_ids": f.ids, "seed": job.seed(i)}
                   for k, (job, fs) in enumerate(zip(batch, finals)) for i, f in enumerate(fs)]
        return _Produced({**head, "choices": choices, "usage": _usage(_total(batch, finals))})

    async def _echo(self, r: CompletionRequest, prompts: list, fields: list[str], head: dict, call: Call,
                    deadline: float | None) -> _Produced:
        """echo: each choice's text starts with its prompt; with logprobs, the prompt's tokens are scored (the
        first given nothing, each other after the ones before it: docs/api.md, "Score") and the generated ones,
        if any (max_tokens > 0), have the generation's log-probs as without echo."""
        logprobs = r.logprob_count()
        max_new, length_field = r.length()
        prompt_ids = [await self._prompt_ids(p, f) for p, f in zip(prompts, fields)]
        scored = [k for k, ids in enumerate(prompt_ids) if logprobs is not None and len(ids) > 1]
        scores = [jobs.score_job(f"{call.rid}-s{k}", prompt_ids[k][:1], prompt_ids[k][1:], r.score_samples, r.seed,
                                 logprobs, {"input_ids": fields[k], "score_ids": fields[k], "score_samples":
                                            "score_samples", "seed": "seed", "logprobs": "logprobs"})
                  for k in scored]
        batch = [] if max_new == 0 else [
            self._job(r, call.rid if len(prompts) == 1 else f"{call.rid}-p{k}", ids, fields[k], length_field, max_new,
                      **self._cut(r), logprobs=logprobs) for k, ids in enumerate(prompt_ids)]
        score_finals, finals = await asyncio.gather(self._finals(scores, call, deadline),
                                                    self._finals(batch, call, deadline))
        prompt_lp = dict(zip(scored, (f[0].logprobs for f in score_finals)))
        n = r.n if batch else 1
        tok = self.model.tokenizer
        choices = []
        for k, (p, ids) in enumerate(zip(prompts, prompt_ids)):
            text = p if isinstance(p, str) else tok.decode(ids) if tok is not None else ""
            for i in range(n):
                f = finals[k][i] if batch else None
                lp = None
                if logprobs is not None:
                    offsets = Offsets(self.token_texts)
                    lp = echoed_logprobs(ids, prompt_lp.get(k), self.token_texts, offsets)
                    lp = joined(lp, f and self._logprobs(f, chat=False, offsets=offsets))
                choices.append({"index": k * n + i, "text": text + (f.text if f else ""), "logprobs": lp,
                                "finish_reason": FINISH.get(f.finish_reason) if f else "length",
                                "stop_reason": f.stop_reason if f else None,
                                "token_ids": ids + (f.ids if f else []), "seed": (r.seed or 0) + i})
        usage = _total(batch, finals) if batch else Usage(sum(len(ids) for ids in prompt_ids), 0)
        return _Produced({**head, "choices": choices, "usage": _usage(usage)})

    async def _prompt_ids(self, prompt: str | list[int], field: str) -> list[int]:
        """One completions prompt's ids: text tokenized (BOS first), or ids checked against the vocabulary."""
        return await self.dispatcher.offload(jobs.text_ids if isinstance(prompt, str) else jobs.checked_ids,
                                             self.model, prompt, field)

    def _at_once(self, batch: list[Job]) -> int:
        """Prompts run at once: as many as the concurrent-generation limit holds; the rest wait their turn."""
        return self.dispatcher.max_inflight // batch[0].options.num_variations

    async def _finals(self, batch: list[Job], call: Call, deadline: float | None) -> list[list[BackendEvent]]:
        """Each job's variations' final events, the jobs run at once."""
        if not batch:
            return []
        kw = self._run_kw(call, deadline)
        finals: list[list] = [[None] * j.options.num_variations for j in batch]
        async for k, (i, ev) in _merge([self.dispatcher.run(j, **kw) for j in batch], self._at_once(batch)):
            if ev.kind == "final":
                finals[k][i] = ev
        return finals

    async def _infill(self, r: CompletionRequest, prompt, head: dict, call: Call, deadline: float | None) -> _Produced:
        if not isinstance(prompt, str):
            raise InvalidArgument("prompt", "with suffix, the prompt (the text before the gap) must be a string")
        if r.stream:
            raise InvalidArgument("stream", "not supported with suffix (an infill is one canvas)")
        tok = jobs.tokenizer_of(self.model, "prompt")
        gap, length_field = r.length()
        gap = gap if gap is not None else DEFAULT_GAP_TOKENS
        try:
            lay = await self.dispatcher.offload(layout.infill_layout, tok, self.model.config.canvas_length, prompt,
                                                r.suffix, gap, eos_id=self.model.eos_id, pad_id=self.model.pad_id)
        except InvalidArgument as e:
            raise (e.renamed(length_field) if e.field == "gap_tokens" else e) from None
        job = self._job(r, call.rid, lay.prompt_ids, "prompt", length_field, lay.max_new_tokens, pin_ids=lay.pin_ids,
                        pin_mask=lay.pin_mask, constraint_ids=lay.constraint_ids)
        finals, filled, usage = await self.dispatcher.fill(job, lay, **self._run_kw(call, deadline))
        choices = [{"index": i, "text": values[0], "logprobs": None, "finish_reason": FINISH.get(f.finish_reason),
                    "token_ids": lay.slot_token_ids(f.ids)[0], "seed": job.seed(i)}
                   for i, (f, (_, values, _)) in enumerate(zip(finals, filled))]
        return _Produced({**head, "choices": choices, "usage": _usage(usage)})

    async def _chat(self, body: bytes, call: Call, deadline: float | None) -> _Produced:
        r = self._parse(ChatRequest, body)
        self.dispatcher.check_model(r.model)
        r.checked_stream_options()
        ask = tool_ask(r.tools, r.tool_choice)
        if ask is not None and r.response_format is not None:
            response_format_ask(r.response_format)  # checked all the same
            raise InvalidArgument("response_format", "give either a tool call (tool_choice) or a response_format")
        ask = ask or response_format_ask(r.response_format)
        ids = await self.dispatcher.offload(jobs.chat_ids, self.model, self._turns(r.messages), "messages",
                                            chat_extras(r.messages))
        head = {"id": f"chatcmpl-{call.rid}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model.id}
        if ask is not None:
            return await self._structured(r, ask, ids, "messages", head, call, deadline, chat=True)
        max_new, length_field = r.length()
        job = self._job(r, call.rid, ids, "messages", length_field, max_new, return_drafts=r.stream and r.return_drafts,
                        logprobs=r.logprob_count(), **self._cut(r))
        if r.stream:
            head["object"] = "chat.completion.chunk"
            return _Produced(chunks=await _primed(self._stream([job], r, head, call, deadline, chat=True)))
        (finals,) = await self._finals([job], call, deadline)
        choices = [{"index": i, "message": {"role": "assistant", "content": f.text},
                    "logprobs": self._logprobs(f, chat=True),
                    "finish_reason": FINISH.get(f.finish_reason), "stop_reason": f.stop_reason, "token_ids": f.ids,
                    "seed": job.seed(i)}
                   for i, f in enumerate(finals)]
        return _Produced({**head, "choices": choices, "usage": _usage(usage_of(job, finals))})

    def _structured_layout(self, r, ask: StructuredAsk, ids: list[int]) -> structured.Structured | str:
        """The document's canvas, or the document itself when the schema fixes every value."""
        compiled = structured.compile_schema(ask.schema, ask.field)
        if not any(isinstance(x, structured.Value) for x in compiled.items):
            return "".join(compiled.items)
        canvas = self.model.config.canvas_length
        cap, length_field = r.length()
        budget = canvas if cap is None else min(canvas, cap + 1)  # the document and its EOS
        try:
            return structured.structured_layout(jobs.tokenizer_of(self.model, ask.field), canvas, ids, compiled,
                                                ask.field, eos_id=self.model.eos_id, pad_id=self.model.pad_id,
                                                budget=budget)
        except InvalidArgument as e:
            raise (e.renamed(length_field) if budget < canvas and e.field == ask.field else e) from None

    async def _structured(self, r, ask: StructuredAsk, ids: list[int], prompt_field: str, head: dict, call: Call,
                          deadline: float | None, chat: bool) -> _Produced:
        """One JSON document per choice (response_format, or a tool call's arguments): the schema's skeleton
        pinned, its values generated in typed holes (service/request/structured.py). Stop sequences do not apply
        (the schema ends the document); streamed, each choice is one chunk."""
        if r.stops() or r.stop_token_ids:
            raise InvalidArgument("stop" if r.stops() else "stop_token_ids",
                                  "does not apply to a structured document (the schema ends it); leave it unset")
        if r.logprobs not in (None, False):
            raise InvalidArgument("logprobs", "not supported with a structured document (its tokens are pinned and "
                                              "holes, not one run)")
        opts = r.checked_stream_options()
        s = await self.dispatcher.offload(self._structured_layout, r, ask, ids)
        options = jobs.options_of({}, None, r.seed, r.n, OPENAI_PATHS)  # n and seed checked for both branches
        seeds = [options.seed + i for i in range(options.num_variations)]  # job.seed(i)
        if isinstance(s, str):
            documents, usage = [s] * len(seeds), Usage(len(ids), 0)
        else:
            lay = s.layout
            job = self._job(r, call.rid, ids, prompt_field, r.length()[1], lay.max_new_tokens, pin_ids=lay.pin_ids,
                            pin_mask=lay.pin_mask, constraint_ids=lay.constraint_ids, choices=lay.choices)
            finals, _, usage = await self.dispatcher.fill(job, lay, **self._run_kw(call, deadline))
            tok = jobs.tokenizer_of(self.model, prompt_field)
            documents = [structured.render(s, f.ids, tok, self.model.pad_id) for f in finals]
        choices = []
        for i, (doc, seed) in enumerate(zip(documents, seeds)):
            if chat:
                message, finish = message_of(ask, doc)
                choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": finish,
                                "seed": seed})
            else:
                choices.append({"index": i, "text": doc, "logprobs": None, "finish_reason": "stop", "seed": seed})
        body = {**head, "choices": choices, "usage": _usage(usage)}
        if not r.stream:
            return _Produced(body)
        return _Produced(chunks=_chunks_of(body, opts, chat))

    async def _stream(self, batch: list[Job], r, head: dict, call: Call, deadline: float | None, chat: bool
                      ) -> AsyncIterator[dict]:
        """One chunk per committed canvas (its text as an increment), a draft chunk per step with
        return_drafts, each variation's last chunk with its finish_reason, then usage if asked for. Choice
        indexes are prompt-major (prompt k's variation i is k * n + i)."""
        n = batch[0].options.num_variations
        started = [False] * (len(batch) * n)
        generated = [0] * len(started)  # tokens returned so far, per choice (pad excluded)
        finals: list[list[BackendEvent]] = [[] for _ in batch]  # per prompt, its variations' finals so far
        prompt_tokens = sum(len(j.prompt_ids) for j in batch)
        opts = r.checked_stream_options()
        pad = self.model.pad_id
        offsets = [Offsets(self.token_texts) for _ in started]  # each choice's text offsets, across its chunks

        def choice(i: int, text: str, logprobs: dict | None = None, **extra) -> dict:
            if chat:
                delta = {"content": text}
                if not started[i]:
                    delta = {"role": "assistant", **delta}
                started[i] = True
                return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": None, **extra}
            return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": None, **extra}

        kw = self._run_kw(call, deadline)
        async for k, (v, ev) in _merge([self.dispatcher.run(j, **kw) for j in batch], self._at_once(batch)):
            i = k * n + v
            if ev.kind == "draft":
                c = choice(i, "", draft={"canvas_index": ev.canvas_index, "step": ev.step, "text": ev.text,
                                         "token_ids": ev.ids})
            elif ev.kind == "canvas":  # its text is what became final (the request layer holds back a possible stop)
                generated[i] += sum(t != pad for t in ev.ids)
                c = choice(i, ev.text, self._logprobs(ev, chat, offsets[i]), canvas_index=ev.canvas_index,
                           steps=ev.step)
            else:  # the text no canvas released, and the choice's end
                generated[i] = ev.completion_tokens if ev.completion_tokens is not None else generated[i]
                finals[k].append(ev)
                c = choice(i, ev.tail, token_ids=ev.ids, seed=batch[k].seed(v), stop_reason=ev.stop_reason)
                c["finish_reason"] = FINISH.get(ev.finish_reason)
            chunk = {**head, "choices": [c]}
            if opts.continuous_usage_stats:
                chunk["usage"] = _usage(Usage(prompt_tokens, sum(generated), sum(map(cached_of, finals))))
            elif opts.include_usage:
                chunk["usage"] = None  # OpenAI's: null on every chunk but the last
            yield chunk
        if opts.include_usage:
            yield {**head, "choices": [], "usage": _usage(Usage(prompt_tokens, sum(generated),
                                                                sum(map(cached_of, finals))))}


async def _chunks_of(body: dict, opts, chat: bool) -> AsyncIterator[dict]:
    """A finished response as a stream: each choice's content (or tool calls) in one chunk, then its end."""
    head = {k: v for k, v in body.items() if k not in ("choices", "usage")}
    if chat:
        head["object"] = "chat.completion.chunk"
    usage = body["usage"] if opts.include_usage or opts.continuous_usage_stats else None
    extra = {"usage": usage if opts.continuous_usage_stats else None} if usage is not None else {}
    for c in body["choices"]:
        part = {"delta": delta_of(c["message"])} if chat else {"text": c["text"]}
        yield {**head, "choices": [{"index": c["index"], **part, "logprobs": None, "finish_reason": None}], **extra}
        end = {"delta": {}} if chat else {"text": ""}
        yield {**head, "choices": [{"index": c["index"], **end, "logprobs": None, "finish_reason": c["finish_reason"],
                                    "seed": c["seed"]}], **extra}
    if opts.include_usage:
        yield {**head, "choices": [], "usage": usage}


def _total(batch: list[Job], finals: list[list[BackendEvent]]) -> Usage:
    """The usage of several jobs (prompts) together."""
    parts = [usage_of(j, f) for j, f in zip(batch, finals)]
    return Usage(sum(u.prompt_tokens for u in parts), sum(u.completion_tokens for u in parts),
                 sum(u.cached_tokens for u in parts))


async def _merge(runs: list[AsyncIterator], at_once: int) -> AsyncIterator[tuple[int, object]]:
    """Items of several async iterators as (which, item), as they come, at most `at_once` of them running (the
    others start as those end); the first error ends all of them (each is closed, which cancels its Triton
    streams). A bounded queue keeps each run's own backpressure."""
    if len(runs) == 1:
        async with contextlib.aclosing(runs[0]) as run:
            async for item in run:
                yield 0, item
        return
    done = object()
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(runs))
    room = asyncio.Semaphore(max(1, at_once))

    async def pump(k: int, run: AsyncIterator) -> None:
        try:
            async with room, contextlib.aclosing(run):
                async for item in run:
                    await queue.put((k, item))
            await queue.put((k, done))
        except Exception as e:  # noqa: BLE001 (raised by the reader)
            await queue.put((k, e))

    tasks = [asyncio.create_task(pump(k, run)) for k, run in enumerate(runs)]
    try:
        left = len(runs)
        while left:
            k, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse(error_body(f"no route {request.url.path}", "invalid_request_error", None, "not_found"), 404)


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return JSONResponse(error_body(f"{request.method} is not allowed on {request.url.path}", "invalid_request_error",
                                   None, "method_not_allowed"), 405)
