"""The `diffusiongemma.v1.DiffusionGemma` servicer: protobuf in, a Job to Triton, protobuf out.

Errors are raised as domain errors; the interceptor (service/front/interceptors.py) maps them to status
codes. Every RPC's variations run as concurrent Triton streams, so the engine batches them together.
A request's size is checked first (service/request/limits.py); tokenizing and layout run on a worker thread,
so a large prompt does not hold up the event loop and the other calls on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb
from service.api.diffusiongemma.v1 import diffusiongemma_pb2_grpc as pb_grpc
from service.errors import InvalidArgument
from service.front.openai_logprobs import TokenTexts, finite
from service.request import jobs, layout
from service.front.interceptors import current_request_metrics, current_trace_context
from service.request.jobs import Job
from service.request.dispatch import Dispatcher, Usage, usage_of
from service.request.triton_client import BackendEvent

FINISH = {"eos": pb.FINISH_REASON_EOS, "length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP}


def _stats(stats: dict) -> pb.DiffusionStats:
    return pb.DiffusionStats(
        decoder_passes=int(stats.get("decoder_passes", 0)), steps_per_canvas=stats.get("steps_per_canvas", []),
        tokens_per_forward=float(stats.get("tokens_per_forward", 0.0)),
        shared_decoder_passes=int(stats.get("shared_decoder_passes", 0)),
    )


def _usage(u: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens,
                    cached_prompt_tokens=u.cached_tokens)


def _options(o: pb.GenerationOptions) -> jobs.Options:
    params = {name: getattr(o.parameters, name) if o.parameters.HasField(name) else None
              for name in jobs.PARAM_FIELDS}
    return jobs.options_of(params, o.parameters.sampler, o.seed if o.HasField("seed") else None, o.num_variations)


def _chat(c: pb.Chat) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in c.messages]


class DiffusionGemmaServicer(pb_grpc.DiffusionGemmaServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.model = dispatcher.model
        self.token_texts = TokenTexts(self.model.tokenizer, self.model.pad_id)

    def _admit(self, r) -> None:
        """Before any tokenizing: the model asked for, and the request's text and ids within the limits."""
        self.dispatcher.check_model(r.model)
        self.dispatcher.limits.check_message(r)

    @staticmethod
    def _call(context: grpc.aio.ServicerContext) -> dict:
        """The RPC's deadline, trace and metrics, for the dispatcher."""
        return dict(timeout=context.time_remaining(), trace_context=current_trace_context(),
                    metrics=current_request_metrics())

    async def _finals(self, job: Job, context: grpc.aio.ServicerContext) -> list[BackendEvent]:
        return await self.dispatcher.finals(job, **self._call(context))

    # ---- Generate ------------------------------------------------------------------------------

    def _generate_job(self, r: pb.GenerateRequest) -> Job:
        self._admit(r)
        kind = r.WhichOneof("prompt")
        if kind == "token_ids":
            self.dispatcher.limits.check_ids("token_ids.ids", len(r.token_ids.ids))
        ids, prompt_field = jobs.prompt_ids(
            self.model, r.text if kind == "text" else None, _chat(r.chat) if kind == "chat" else None,
            list(r.token_ids.ids) if kind == "token_ids" else None)
        max_new_tokens = r.max_new_tokens if r.HasField("max_new_tokens") else None
        spec = jobs.stopping_of(self.model, max_new_tokens, r.stop, r.stop_token_ids)
        return Job(request_id=jobs.request_id_of(r.request_id), prompt_ids=ids, options=_options(r.options),
                   max_new_tokens=max_new_tokens, return_drafts=r.return_drafts, stopping=spec,
                   ignore_eos=r.ignore_eos, field_names=jobs.field_names(prompt_field))

    @staticmethod
    def _choice(job: Job, i: int, f: BackendEvent) -> pb.Choice:
        stop = ({"stop_sequence": f.stop_reason} if isinstance(f.stop_reason, str) else
                {"stop_token_id": f.stop_reason} if f.stop_reason is not None else {})
        return pb.Choice(index=i, text=f.text, token_ids=f.ids, finish_reason=FINISH.get(f.finish_reason, 0),
                         seed=job.seed(i), stats=_stats(f.stats), **stop)

    def _generate_response(self, job: Job, finals: list[BackendEvent]) -> pb.GenerateResponse:
        choices = [self._choice(job, i, f) for i, f in enumerate(finals)]
        return pb.GenerateResponse(request_id=job.request_id, model=self.model.id, choices=choices,
                                   usage=_usage(usage_of(job, finals)))

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        job = await self.dispatcher.offload(self._generate_job, request)
        job.return_drafts = False
        return self._generate_response(job, await self._finals(job, context))

    async def GenerateStream(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateStreamResponse]:
        job = await self.dispatcher.offload(self._generate_job, request)
        finals: list[BackendEvent | None] = [None] * job.options.num_variations
        rid = job.request_id
        async for i, ev in self.dispatcher.run(job, **self._call(context)):
            if ev.kind == "draft":
                yield pb.GenerateStreamResponse(request_id=rid, draft=pb.Draft(
                    variation=i, canvas_index=ev.canvas_index, step=ev.step, text=ev.text, token_ids=ev.ids))
            elif ev.kind == "canvas":
                yield pb.GenerateStreamResponse(request_id=rid, canvas=pb.CommittedCanvas(
                    variation=i, canvas_index=ev.canvas_index, steps=ev.step, text=ev.text, token_ids=ev.ids))
            else:
                finals[i] = ev
        yield pb.GenerateStreamResponse(request_id=rid, final=self._generate_response(job, finals))

    # ---- Infill, Edit, Template: pinned canvases -------------------------------------------------

    def _layout_job(self, r, lay: layout.CanvasLayout, prompt_field: str, length_field: str) -> Job:
        return Job(request_id=jobs.request_id_of(r.request_id), prompt_ids=lay.prompt_ids, options=_options(r.options),
                   max_new_tokens=lay.max_new_tokens, pin_ids=lay.pin_ids, pin_mask=lay.pin_mask,
                   constraint_ids=lay.constraint_ids, field_names=jobs.field_names(prompt_field, length_field))

    async def _filled(self, r, lay: layout.CanvasLayout, context, prompt_field: str, length_field: str):
        """Run a pinned-canvas job; returns the job, the finals, each one's (text, values, named) and usage."""
        job = self._layout_job(r, lay, prompt_field, length_field)
        finals, filled, usage = await self.dispatcher.fill(job, lay, **self._call(context))
        return job, finals, filled, _usage(usage)

    def _infill_layout(self, r: pb.InfillRequest) -> layout.CanvasLayout:
        self._admit(r)
        return layout.infill_layout(jobs.tokenizer_of(self.model, "prefix"), self.model.config.canvas_length,
                                    r.prefix, r.suffix, r.gap_tokens, eos_id=self.model.eos_id,
                                    pad_id=self.model.pad_id)

    async def Infill(self, request: pb.InfillRequest, context) -> pb.InfillResponse:
        lay = await self.dispatcher.offload(self._infill_layout, request)
        job, finals, filled, usage = await self._filled(request, lay, context, "prefix", "gap_tokens")
        choices = [pb.InfillChoice(index=i, infill=values[0], text=text, infill_token_ids=lay.slot_token_ids(f.ids)[0],
                                   seed=job.seed(i), stats=_stats(f.stats))
                   for i, (f, (text, values, _)) in enumerate(zip(finals, filled))]
        return pb.InfillResponse(request_id=job.request_id, model=self.model.id, choices=choices, usage=usage)

    def _edit_layout(self, r: pb.EditRequest) -> layout.CanvasLayout:
        self._admit(r)
        spans = [(s.start, s.end, s.length_tokens) for s in r.editable]
        return layout.edit_layout(jobs.tokenizer_of(self.model, "text"), self.model.config.canvas_length, r.text,
                                  spans, r.instruction, eos_id=self.model.eos_id, pad_id=self.model.pad_id)

    async def Edit(self, request: pb.EditRequest, context) -> pb.EditResponse:
        lay = await self.dispatcher.offload(self._edit_layout, request)
        job, finals, filled, usage = await self._filled(request, lay, context, "instruction", "editable")
        choices = [pb.EditChoice(index=i, text=text, replacements=values, seed=job.seed(i), stats=_stats(f.stats))
                   for i, (f, (text, values, _)) in enumerate(zip(finals, filled))]
        return pb.EditResponse(request_id=job.request_id, model=self.model.id, choices=choices, usage=usage)

    def _template_parts(self, r: pb.TemplateRequest) -> str | list:
        if r.parts and r.skeleton:
            raise InvalidArgument("skeleton", "give either parts or skeleton, not both")
        if r.skeleton:
            return r.skeleton
        if not r.parts:
            raise InvalidArgument("skeleton", "give a skeleton or parts")
        parts: list = []
        for i, p in enumerate(r.parts):
            kind = p.WhichOneof("part")
            if kind is None:
                raise InvalidArgument(f"parts[{i}]", "set literal or hole")
            parts.append(p.literal if kind == "literal" else
                         layout.Hole(p.hole.name or None, p.hole.type, p.hole.length_tokens))
        return parts

    def _template_layout(self, r: pb.TemplateRequest) -> layout.CanvasLayout:
        self._admit(r)
        return layout.template_layout(jobs.tokenizer_of(self.model, "skeleton"), self.model.config.canvas_length,
                                      self._template_parts(r), r.instruction, eos_id=self.model.eos_id,
                                      pad_id=self.model.pad_id)

    async def Template(self, request: pb.TemplateRequest, context) -> pb.TemplateResponse:
        lay = await self.dispatcher.offload(self._template_layout, request)
        job, finals, filled, usage = await self._filled(request, lay, context, "instruction", "skeleton")
        choices = [pb.TemplateChoice(index=i, text=text, values=values, named_values=named, seed=job.seed(i),
                                     stats=_stats(f.stats))
                   for i, (f, (text, values, named)) in enumerate(zip(finals, filled))]
        return pb.TemplateResponse(request_id=job.request_id, model=self.model.id, choices=choices, usage=usage)

    # ---- Score ---------------------------------------------------------------------------------

    def _score_job(self, r: pb.ScoreRequest) -> Job:
        self._admit(r)
        kind, cont = r.WhichOneof("context"), r.WhichOneof("continuation")
        if kind is None:
            raise InvalidArgument("context_text", "give context_text or context_ids")
        if cont is None:
            raise InvalidArgument("continuation_text", "give continuation_text or continuation_ids")
        limits = self.dispatcher.limits
        if kind == "context_ids":
            limits.check_ids("context_ids.ids", len(r.context_ids.ids))
            context = jobs.checked_ids(self.model, list(r.context_ids.ids), "context_ids.ids")
        else:
            context = jobs.text_ids(self.model, r.context_text, "context_text")
        if cont == "continuation_ids":
            limits.check_ids("continuation_ids.ids", len(r.continuation_ids.ids))
            continuation = jobs.checked_ids(self.model, list(r.continuation_ids.ids), "continuation_ids.ids")
        else:
            continuation = jobs.tokenizer_of(self.model, cont).encode(r.continuation_text, add_bos=False)
            if not continuation:
                raise InvalidArgument("continuation_text", "is empty")
        fields = {"input_ids": kind if kind == "context_text" else "context_ids.ids",
                  "score_ids": cont if cont == "continuation_text" else "continuation_ids.ids",
                  "score_samples": "score_samples", "seed": "seed", "logprobs": "top_logprobs"}
        return jobs.score_job(jobs.request_id_of(r.request_id), context, continuation,
                              r.score_samples if r.HasField("score_samples") else None,
                              r.seed if r.HasField("seed") else None, r.top_logprobs, fields)

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        job = await self.dispatcher.offload(self._score_job, request)
        final = (await self._finals(job, context))[0]
        texts = self.token_texts

        def entry(token_id: int, value: float) -> pb.TokenLogprob:
            return pb.TokenLogprob(token_id=token_id, token=texts.text(token_id), logprob=finite(value))

        lp = final.logprobs
        tokens = [pb.ScoredToken(token_id=t, token=texts.text(t), logprob=finite(v),
                                 top_logprobs=[entry(i, x) for i, x in zip(ids, top)])
                  for t, v, ids, top in zip(job.score_ids, lp.token, lp.top_ids, lp.top)]
        usage = Usage(len(job.prompt_ids), len(job.score_ids))
        return pb.ScoreResponse(request_id=job.request_id, model=self.model.id, tokens=tokens,
                                total_logprob=sum(lp.token), score_samples=int(final.stats.get("steps_per_canvas", [0])[0]),
                                seed=job.options.seed, stats=_stats(final.stats), usage=_usage(usage))

    # ---- Tokenize, ListModels ------------------------------------------------------------------

    def _tokenized(self, r: pb.TokenizeRequest) -> pb.TokenizeResponse:
        self._admit(r)
        kind = r.WhichOneof("input")
        if kind is None:
            raise InvalidArgument("text", "give text or chat")
        ids, _ = jobs.prompt_ids(self.model, r.text if kind == "text" else None,
                                 _chat(r.chat) if kind == "chat" else None, None)
        tok = jobs.tokenizer_of(self.model, kind)
        return pb.TokenizeResponse(token_ids=ids, tokens=[tok.id_to_token(i) or "" for i in ids])

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        return await self.dispatcher.offload(self._tokenized, request)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        m, d = self.model, self.model.defaults
        params = pb.DiffusionParameters(
            max_denoising_steps=d.max_denoising_steps, entropy_bound=d.entropy_bound, t_min=d.t_min, t_max=d.t_max,
            stability_threshold=d.stability_threshold, confidence_threshold=d.confidence_threshold,
            temperature=d.temperature, top_k=d.top_k,
            sampler=pb.SAMPLER_FAST if d.sampler == "fast" else pb.SAMPLER_REFERENCE)
        info = pb.ModelInfo(id=m.id, canvas_length=m.config.canvas_length, vocab_size=m.config.vocab_size,
                            profile=m.profile, default_parameters=params, default_max_new_tokens=d.max_new_tokens)
        return pb.ListModelsResponse(models=[info])
