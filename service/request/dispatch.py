"""The request layer both fronts (gRPC and HTTP) call: admission, one Triton stream per variation, metrics.

A front validates its request into a `Job` (service/request/jobs.py) and iterates `Dispatcher.run`. Leaving the
iteration early (an error, a client cancel or disconnect, a deadline) cancels every Triton stream, which
frees the engine's slots within one denoising step.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, TypeVar

from opentelemetry.context import Context

from service.errors import InvalidArgument, Overloaded, UnknownModel
from service.request import layout
from service.request.catalog import ServedModel
from service.request.jobs import Job, tokenizer_of
from service.request.limits import PromptLimits
from service.request.stopping import Stopper
from service.request.triton_client import BackendEvent, TritonClient
from service.sampler.params import request_params
from service.telemetry.metrics import RequestMetrics
from service.telemetry.tracing import traceparent_metadata

T = TypeVar("T")
DEFAULT_TOKENIZER_THREADS = 4  # NIM_TOKENIZER_THREADS


class Usage(NamedTuple):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens the engine's prefix cache served (OpenAI's prompt_tokens_details)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_of(job: Job, finals: list[BackendEvent], completion: int | None = None) -> Usage:
    """The prompt counted once; completion: the tokens returned (after a Stopper's cut, else the generated
    ones) unless given."""
    if completion is None:
        completion = sum(f.completion_tokens if f.completion_tokens is not None
                         else int(f.stats.get("generated_tokens", 0)) for f in finals)
    return Usage(len(job.prompt_ids), completion, cached_of(finals))


def cached_of(finals: list[BackendEvent]) -> int:
    """Prompt tokens served from the prefix cache: the most any of the job's variations reused."""
    return max((int(f.stats.get("cached_prompt_tokens", 0)) for f in finals), default=0)


class Filled(NamedTuple):
    """A pinned-canvas job's result: its finals, each one's (text, values, named values) and the usage."""

    finals: list[BackendEvent]
    filled: list[tuple[str, list[str], dict[str, str]]]
    usage: Usage


class EventBuffer:
    """One request's events on their way to its reader, bounded: at most `bound` canvases, finals and errors
    (their producers wait beyond that) and at most one draft per variation, since a new draft replaces its
    variation's unsent one. A slow reader of drafts gets the latest draft, never unbounded memory; canvases,
    finals and errors are never dropped, and each variation's order is kept."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.coalesced = 0  # drafts replaced before they were read
        self._items: deque[tuple[int, object, bool]] = deque()
        self._kept = 0  # items that are not drafts
        self._changed = asyncio.Condition()

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, variation: int, item: "BackendEvent | BaseException") -> None:
        draft = isinstance(item, BackendEvent) and item.kind == "draft"
        async with self._changed:
            if draft:
                for k, (i, _, was_draft) in enumerate(self._items):
                    if i == variation and was_draft:
                        del self._items[k]
                        self.coalesced += 1
                        break
            else:
                await self._changed.wait_for(lambda: self._kept < self.bound)
                self._kept += 1
            self._items.append((variation, item, draft))
            self._changed.notify_all()

    async def get(self) -> tuple[int, "BackendEvent | BaseException"]:
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._items))
            i, item, draft = self._items.popleft()
            self._kept -= not draft
            self._changed.notify_all()
            return i, item  # type: ignore[return-value]


class Dispatcher:
    def __init__(self, model: ServedModel, triton: TritonClient, max_inflight: int = 64,
                 limits: PromptLimits | None = None, stream_buffer: int = 64,
                 tokenizer_threads: int = DEFAULT_TOKENIZER_THREADS) -> None:
        self.model = model
        self.triton = triton
        self.max_inflight = max_inflight  # backend streams (variations) in flight at once, over both fronts
        self.inflight = 0
        self.limits = limits or PromptLimits()
        self.stream_buffer = stream_buffer  # events (drafts aside) buffered per request for its reader
        # tokenizing and layout before admission, for both fronts (NIM_TOKENIZER_THREADS): a fixed number of
        # threads, so a crowd of large prompts queues here instead of growing threads or taking the loop's pool
        self.tokenizer_pool = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="dgemma-tokenize")

    async def offload(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on the tokenizer pool, in the caller's context (as asyncio.to_thread)."""
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, call)

    def close(self) -> None:
        """Stop the tokenizer pool's threads (queued work is dropped)."""
        self.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    def check_model(self, name: str | None, field: str = "model") -> None:
        if name and name != self.model.id:
            shown = name if len(name) <= 64 else name[:64] + "…"
            raise UnknownModel(field, f"unknown model {shown!r}; this server serves {self.model.id!r}")

    def check_params(self, job: Job) -> None:
        """The job's parameters over the model's defaults, validated as the engine will (its own caps aside), under
        the request's field names."""
        length = {} if job.max_new_tokens is None else {"max_new_tokens": job.max_new_tokens}
        try:
            request_params(self.model.defaults, {**job.options.params, **length}).validate()
        except InvalidArgument as e:
            raise e.renamed(job.field_names.get(e.field, e.field)) from None

    def stopper(self, job: Job) -> Stopper | None:
        """A variation's Stopper when the job has a cap or stop conditions."""
        if job.stopping is None:
            return None
        tok = self.model.tokenizer
        return Stopper(job.stopping, tok.decode if tok is not None else None, self.model.pad_id)

    async def run(self, job: Job, *, timeout: float | None = None, trace_context: Context | None = None,
                  metrics: RequestMetrics | None = None) -> AsyncIterator[tuple[int, BackendEvent]]:
        """Every variation's events as (variation, event), interleaved, until each has its final event.

        With `job.stopping`, each variation's canvases and final are cut by its Stopper (service/request/
        stopping.py): a canvas carries the ids up to the cut and only text that is final; the final carries
        the cut result, `tail` (text no canvas released), `stop_reason` and `completion_tokens`. A variation
        that stops early has its stream cancelled (no further canvas is generated) and gets a final made
        from the canvases seen."""
        n = job.options.num_variations
        self.check_params(job)  # bad values are refused as such, never as overload, whatever the load
        if n > self.max_inflight:
            raise InvalidArgument(job.field_names.get("num_variations", "options.num_variations"),
                                  f"exceeds this server's limit of {self.max_inflight} concurrent generations")
        if self.inflight + n > self.max_inflight:
            raise Overloaded(f"the server is at its limit of {self.max_inflight} concurrent generations; retry later")
        events = EventBuffer(self.stream_buffer)

        async def pump(i: int, metadata) -> None:
            try:
                async for ev in self.triton.stream(job.inputs(i), request_id=f"{job.request_id}/{i}", timeout=timeout,
                                                   metadata=metadata, field_names=job.field_names):
                    await events.put(i, ev)
            except Exception as e:  # noqa: BLE001 (re-raised by the reader)
                await events.put(i, e)

        tasks: list[asyncio.Task] = []
        self.inflight += n
        try:  # nothing between the increment and the `try` whose `finally` takes it back
            metadata = traceparent_metadata(trace_context)
            tasks = [asyncio.create_task(pump(i, metadata)) for i in range(n)]
            stoppers = [self.stopper(job) for _ in range(n)]
            ended: set[int] = set()  # variations that have had their final event
            while len(ended) < n:
                i, item = await events.get()
                if i in ended:  # what a stream sent before it was cancelled
                    continue
                if isinstance(item, BaseException):
                    raise item
                out = [item]
                stopper = stoppers[i]
                if stopper is not None and item.kind == "canvas":
                    out = [stopper.on_canvas(item)]
                    if stopper.done:
                        tasks[i].cancel()
                        out.append(stopper.on_final(None, len(job.prompt_ids)))
                elif stopper is not None and item.kind == "final":
                    out = [stopper.on_final(item)]
                for ev in out:
                    if metrics is not None:
                        metrics.first_event()
                        if ev.kind == "canvas":
                            metrics.canvas(steps=ev.step)
                        elif ev.kind == "final":
                            metrics.canvas(tokens=int(ev.stats.get("generated_tokens", 0)))
                    if ev.kind == "final":
                        ended.add(i)
                    yield i, ev
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.inflight -= n
            if metrics is not None:
                metrics.coalesced(events.coalesced)

    async def finals(self, job: Job, **kw) -> list[BackendEvent]:
        """Each variation's final event (`kw`: as `run`)."""
        finals: list[BackendEvent | None] = [None] * job.options.num_variations
        async for i, ev in self.run(job, **kw):
            if ev.kind == "final":
                finals[i] = ev
        return finals  # type: ignore[return-value]

    async def fill(self, job: Job, lay: layout.CanvasLayout, **kw) -> Filled:
        """Run a pinned-canvas job (Infill, Edit, Template); completion tokens are those the holes received,
        pins excluded."""
        finals = await self.finals(job, **kw)
        tok = tokenizer_of(self.model, "model")
        skip = {self.model.pad_id, self.model.eos_id, *lay.skip_ids}
        completion = sum(t not in skip for f in finals for ids in lay.slot_token_ids(f.ids) for t in ids)
        return Filled(finals, [layout.assemble(lay, f.ids, tok) for f in finals], usage_of(job, finals, completion))
