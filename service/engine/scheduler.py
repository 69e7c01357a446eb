"""In-flight batching at denoising-step granularity.

Every iteration: drop cancelled and expired requests, admit waiting ones within the budget, run one
batched encoder pass for every sequence that needs one (new prompts and just-committed canvases), then
one batched decoder step over every live canvas, whatever its settings. Requests join and leave at
these step boundaries. Events go to each request's stream as they happen.

Every accepted request ends exactly once: a FinalEvent or one error. A fault in one request's work
(its sequence, its sampling, its callbacks) fails that request only; a fault of the whole step (the
network raising) fails the step's requests, each once. The loop itself never dies of an exception; if
the thread ends anyway, `alive` turns false, waiting streams get Unavailable and new submissions too.

The scheduler reaches the network only through its engine's runner (service/engine/runner.py): it
holds no module and no tensor of the model. This is the one denoising loop of the codebase: in-process
generation drives it too (`generate`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from service.engine.api import Event, FinalEvent, Request
from service.engine.scoring import ScoreRequest, ScoreSequence, cache_tokens
from service.engine.sequence import Sequence
from service.model.kv_pool import BLOCK
from service.sampler.params import MAX_NEW_TOKENS
from service.errors import Cancelled, DeadlineExceeded, DGemmaError, InvalidArgument, Overloaded, Unavailable

if TYPE_CHECKING:
    from service.engine.local import LocalEngine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_live_canvases: int = 16  # canvases denoised in one decoder pass
    max_queue: int = 64  # requests waiting for a slot; past this, Overloaded
    # KV caches of live requests plus the next step's transient buffers; None: the runner's default
    # (2 GiB on a CPU, 85% of the GPU memory left free after the weights)
    max_memory_bytes: int | None = None
    max_prompt_tokens: int = 8192
    max_request_seconds: float | None = None  # a request's longest run, whatever deadline it brings; None: none
    max_new_tokens: int | None = None  # refused (InvalidArgument) above these; None: the API's own maxima
    max_denoising_steps: int | None = None


class Stream:
    """A request's events, in order. Iterate it, or pass `on_event` to receive them on the scheduler's
    thread instead; `cancel()` (or a true `cancel_check()`) stops the work within one step."""

    def __init__(
        self,
        request: Request,
        deadline: float | None,
        on_event: Callable[[object], None] | None = None,
        cancel_check: Callable[[], bool] | None = None,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        self.request = request
        self.deadline = deadline
        self.cancelled = threading.Event()
        self.ended = False  # a terminal item (FinalEvent or error) was put: nothing more is
        self._on_event = on_event
        self._cancel_check = cancel_check
        self._alive = alive  # the producer's liveness: iteration stops with Unavailable once it is false
        self._events: queue.SimpleQueue = queue.SimpleQueue()

    def cancel(self) -> None:
        self.cancelled.set()

    def is_cancelled(self) -> bool:
        """Cancelled by `cancel()` or by `cancel_check()`; a raising `cancel_check` counts as cancelled."""
        if not self.cancelled.is_set() and self._cancel_check is not None:
            try:
                if self._cancel_check():
                    self.cancelled.set()
            except Exception:
                log.warning("cancel_check failed; cancelling the request", exc_info=True)
                self.cancelled.set()
        return self.cancelled.is_set()

    def put(self, item: object) -> None:
        """Deliver one event or the ending error. Never raises; nothing after a terminal item. A failing
        `on_event` cancels the request and is told its end once (Unavailable), if it was not a terminal."""
        if self.ended:
            return
        terminal = isinstance(item, (FinalEvent, BaseException))
        self.ended = terminal
        if self._on_event is None:
            self._events.put(item)
            return
        try:
            self._on_event(item)
        except Exception:
            log.warning("on_event failed; ending the request", exc_info=True)
            self.cancelled.set()
            if not terminal:
                self.ended = True
                try:
                    self._on_event(Unavailable("the response could not be delivered"))
                except Exception:
                    log.warning("on_event failed again; the request's end is lost", exc_info=True)

    def __iter__(self) -> Iterator[Event]:
        while True:
            item = self.next_event(timeout=0.5)
            if item is None:
                if self._alive is not None and not self._alive():
                    raise Unavailable("the engine stopped")
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, FinalEvent):
                return

    def next_event(self, timeout: float | None = None) -> Event | BaseException | None:
        """One event (or the error that ended the stream); None on timeout."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None


@dataclass
class _Live:
    stream: Stream
    seq: Sequence | ScoreSequence


class Scheduler:
    """Owns the batch. `start()` runs it on a thread; tests may call `step()` directly instead."""

    def __init__(self, engine: "LocalEngine", limits: Limits | None = None,
                 on_step: Callable[[], None] | None = None) -> None:
        self.engine = engine  # validation and per-request state (new_sequence)
        self.runner = engine.runner  # the network
        self.on_step = on_step  # called after every step, on the scheduler's thread
        self.cfg = engine.config
        limits = limits or Limits()
        if limits.max_memory_bytes is None:
            limits = dataclasses.replace(limits, max_memory_bytes=self.runner.default_memory_budget())
        self.limits = limits
        # The KV pool: the budget less the largest step's transients, allocated once (service/model/kv_pool.py)
        kv_budget = max(0, limits.max_memory_bytes - self.runner.step_bytes(limits.max_live_canvases))
        if self.runner.pool is None:  # never more than every live request's largest cache, a tenth for idle prefix
            # chunks, and the null block
            most = limits.max_prompt_tokens + (limits.max_new_tokens or MAX_NEW_TOKENS) + self.cfg.canvas_length
            needed = limits.max_live_canvases * -(-most // BLOCK)
            self.runner.reserve_kv(kv_budget, max_blocks=needed + needed // 10 + 1)
        self._kv_budget = min(kv_budget, self.runner.pool.nbytes() - self.runner.pool.block_bytes())
        self._waiting: deque[Stream] = deque()
        self._live: list[_Live] = []
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead = False  # the thread ended on a fault: nothing is served any more
        self._busy_since: float | None = None  # time.monotonic() when the running step's network work began
        self.decoder_passes = 0
        self.canvases_in_last_pass = 0
        self._kv_bytes_per_token = self.runner.kv_bytes_per_token()

    # ---- admission ---------------------------------------------------------------------------

    def submit(
        self,
        request: Request | ScoreRequest,
        deadline: float | None = None,
        on_event: Callable[[object], None] | None = None,
        cancel_check: Callable[[], bool] | None = None,
    ) -> Stream:
        """Validate and queue a request. Raises InvalidArgument, Overloaded or Unavailable at once.

        `deadline` (time.monotonic()) is the caller's; the server's cap (max_request_seconds) shortens it."""
        self.engine.validate(request)
        lim = self.limits
        if len(request.prompt_ids) > lim.max_prompt_tokens:
            raise InvalidArgument("prompt_ids", f"longer than the limit of {lim.max_prompt_tokens} tokens")
        for name in () if isinstance(request, ScoreRequest) else ("max_new_tokens", "max_denoising_steps"):
            cap = getattr(lim, name)
            if cap is not None and getattr(request.params, name) > cap:
                raise InvalidArgument(name, f"exceeds this server's limit of {cap}")
        if self._cache_bytes(request) > self._kv_budget:
            field = "target_ids" if isinstance(request, ScoreRequest) else "max_new_tokens"
            raise InvalidArgument(field, "prompt plus output exceed this server's memory budget")
        if lim.max_request_seconds is not None:
            cap_at = time.monotonic() + lim.max_request_seconds
            deadline = cap_at if deadline is None else min(deadline, cap_at)
        stream = Stream(request, deadline, on_event, cancel_check, self._alive_for_stream)
        with self._lock:
            if self._dead:
                raise Unavailable("the engine stopped after a fault")
            if self._stopping:
                raise Unavailable("the engine is shutting down")
            if len(self._waiting) >= self.limits.max_queue:
                raise Overloaded(f"engine overloaded: {len(self._waiting)} requests already waiting")
            self._waiting.append(stream)
            self._lock.notify_all()
        return stream

    def generate(self, request: Request) -> Iterator[Event]:
        """Submit and iterate; closing the iterator early cancels the request. Without a running thread
        (`start()`), the caller's thread drives the steps."""
        stream = self.submit(request)
        try:
            if self._thread is not None:
                yield from stream
                return
            while True:
                item = stream.next_event(timeout=0)
                if item is None:
                    if not self.step():
                        raise RuntimeError("the scheduler went idle with a request unanswered")
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, FinalEvent):
                    return
        finally:
            stream.cancel()

    def _cache_bytes(self, request: Request) -> int:
        """The KV bytes a request reserves: its most tokens, in whole pool blocks."""
        return -(-cache_tokens(request, self.cfg.canvas_length) // BLOCK) * BLOCK * self._kv_bytes_per_token

    @property
    def alive(self) -> bool:
        """False once the scheduler's thread ended on a fault (the engine's heartbeat reads this)."""
        return not self._dead and (self._thread is None or self._thread.is_alive())

    def _alive_for_stream(self) -> bool:
        return self.alive or self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def live_canvases(self) -> int:
        return len(self._live)

    def live_cache_bytes(self) -> int:
        return sum(item.seq.cache.nbytes() for item in self._live if item.seq.cache is not None)

    # ---- the loop ---------------------------------------------------------------------------

    def step(self) -> bool:
        """One iteration at a step boundary. Returns whether there was any work."""
        try:
            return self._step()
        finally:
            if self.on_step is not None:  # the batch's final state for this step (gauges)
                try:
                    self.on_step()
                except Exception:
                    log.warning("on_step hook failed", exc_info=True)

    def _step(self) -> bool:
        now = time.monotonic()
        self._drop_finished(now)
        self._admit()
        if not self._live:
            return False
        self._busy_since = time.monotonic()
        try:
            self._encode_pending()
            self._decode_live()
        except Exception as e:  # the whole step failed: its requests end (each once), the loop goes on
            self._fail_all(self._as_error(e, "engine step failed; failing the requests in flight"))
        finally:
            self._busy_since = None
        return True

    def step_seconds(self) -> float:
        """How long the running step's network work has taken so far; 0.0 between steps. A step that never
        returns (a hung kernel, a deadlocked collective) shows here while `alive` stays true."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def fault(self, step_timeout_s: float | None = None) -> str | None:
        """Why the engine cannot serve, or None: the thread is dead, or the running step has taken longer than
        `step_timeout_s` (None: no limit). The model's heartbeat stops on either."""
        if not self.alive:
            return "the engine's scheduler is not running"
        busy = self.step_seconds()
        if step_timeout_s is not None and busy > step_timeout_s:
            return f"a denoising step has run for {busy:.1f}s, over the step timeout of {step_timeout_s:g}s"
        return None

    @staticmethod
    def _as_error(e: Exception, what: str) -> DGemmaError:
        if isinstance(e, DGemmaError):
            return e
        log.exception(what)
        return Unavailable("internal engine error")

    def _fail(self, item: _Live, e: Exception) -> None:
        """One request's fault: that request alone ends with an error and leaves the batch."""
        item.stream.put(self._as_error(e, "a request failed; failing it alone"))
        item.seq.done = True
        self._live = [x for x in self._live if x is not item]
        self._release(item)

    @staticmethod
    def _release(item: _Live) -> None:
        """Give a leaving request's KV blocks back to the pool (at once, not at garbage collection)."""
        if item.seq.cache is not None:
            item.seq.cache.release()

    def _drop_finished(self, now: float) -> None:
        """Free cancelled and expired requests first, then tell their streams."""
        dropped: list[tuple[Stream, DGemmaError]] = []
        keep = []
        for item in self._live:
            err = self._ended(item.stream, now)
            if err is None:
                keep.append(item)
            else:
                dropped.append((item.stream, err))
                self._release(item)
        self._live = keep
        with self._lock:
            waiting = deque()
            for s in self._waiting:
                err = self._ended(s, now)
                if err is None:
                    waiting.append(s)
                else:
                    dropped.append((s, err))
            self._waiting = waiting
        for s, err in dropped:
            s.put(err)

    @staticmethod
    def _ended(s: Stream, now: float) -> DGemmaError | None:
        if s.is_cancelled():
            return Cancelled("request cancelled")
        if s.deadline is not None and now >= s.deadline:
            return DeadlineExceeded("deadline exceeded")
        return None

    def _admit(self) -> None:
        with self._lock:
            used = sum(self._cache_bytes(item.stream.request) for item in self._live)
            while self._waiting and len(self._live) < self.limits.max_live_canvases:
                nxt = self._waiting[0]
                need = self._cache_bytes(nxt.request)
                if self._live and used + need > self._kv_budget:
                    break
                self._waiting.popleft()
                try:
                    seq = self.engine.new_sequence(nxt.request)
                except Exception as e:
                    nxt.put(self._as_error(e, "could not start a request; failing it alone"))
                    continue
                self._live.append(_Live(nxt, seq))
                used += need

    def _encode_pending(self) -> None:
        """Encoder passes, request by request: new prompts (prefill) and committed canvases (commit). A new request's
        cache is made just before its prompt is encoded, so it reuses the prefix chunks the requests before it in
        the same burst have just published (service/model/kv_pool.py)."""
        for item in [item for item in self._live if item.seq.to_encode is not None]:
            try:
                if item.seq.cache is None:
                    request = item.seq.request
                    item.seq.cache = self.runner.new_cache(cache_tokens(request, self.cfg.canvas_length),
                                                           prompt=list(request.prompt_ids))
                    item.seq.to_encode = item.seq.to_encode[item.seq.cache.reused:]  # the prefix cache's share
            except Exception as e:
                self._fail(item, e)
                continue
            self.runner.prefill([item.seq.to_encode], [item.seq.cache])
            try:
                item.seq.begin_canvas()
            except Exception as e:
                self._fail(item, e)

    def _decode_live(self) -> None:
        live, inputs = [], []
        for item in [item for item in self._live if item.seq.denoising]:
            try:
                inputs.append(item.seq.step_input())
                live.append(item)
            except Exception as e:
                self._fail(item, e)
        if not live:
            return
        out = self.runner.step(inputs)
        self.decoder_passes += 1
        self.canvases_in_last_pass = len(live)
        shared = len(live) > 1
        rows, flags = [], []
        for b, item in enumerate(live):
            try:
                flags.append(item.seq.stop_flags(out.argmax[b], out.entropy[b]))
                rows.append((b, item))
            except Exception as e:
                self._fail(item, e)
        # every canvas's stop flags in one host transfer
        host = torch.stack(flags).tolist() if flags else []
        for (b, item), (stable, confident) in zip(rows, host):
            try:
                lp = out.logprobs[b] if out.logprobs is not None else None
                events = list(item.seq.after_step(out.canvas[b], out.argmax[b], out.soft[b], stable, confident,
                                                  shared, lp))
            except Exception as e:
                self._fail(item, e)
                continue
            for ev in events:
                item.stream.put(ev)
        for item in self._live:
            if item.seq.done:
                self._release(item)
        self._live = [item for item in self._live if not item.seq.done]

    def _fail_all(self, error: DGemmaError, waiting: bool = False) -> None:
        """End every live request (and the waiting ones too with `waiting`) with `error`."""
        streams = [item.stream for item in self._live]
        for item in self._live:
            self._release(item)
        self._live = []
        if waiting:
            with self._lock:
                streams += list(self._waiting)
                self._waiting.clear()
        for s in streams:
            s.put(error)

    # ---- thread ------------------------------------------------------------------------------

    def start(self) -> "Scheduler":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dgemma-scheduler", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopping and not self._waiting and not self._live:
                        self._lock.wait(timeout=0.5)
                    if self._stopping and not self._live and not self._waiting:
                        return
                try:
                    self.step()
                except Exception as e:  # a fault outside a step's work (dropping, admitting): end all, go on
                    self._fail_all(self._as_error(e, "scheduler iteration failed; failing every request"),
                                   waiting=True)
        except BaseException:
            log.critical("the scheduler thread died; the engine is down", exc_info=True)
            raise
        finally:
            if not (self._stopping and not self._live and not self._waiting):
                self._dead = True
                self._fail_all(Unavailable("the engine stopped"), waiting=True)

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop accepting; finish (drain) or cancel what is in flight; join the thread."""
        with self._lock:
            self._stopping = True
            if not drain:
                for s in itertools.chain(self._waiting, (item.stream for item in self._live)):
                    s.cancel()
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
