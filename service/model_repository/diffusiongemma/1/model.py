"""Triton Python backend for DiffusionGemma: a thin adapter over service.triton.adapter and the scheduler.

Decoupled: `execute` hands each request to the scheduler and returns at once; the scheduler's thread
sends every response through the request's response sender. Each request gets exactly one FINAL flag:
when building or sending a response fails, a FINAL error goes out instead (and, if even that fails, the
loss is logged). Errors go out as TritonError whose message leads with a code of service.errors.WIRE_CODES,
never a traceback.
"""

import json
import logging
import os
import site
import sys
import threading
import time

# The backend's stub interpreter ignores PYTHONPATH; the launcher passes the serving environment's
# import path here instead (site dirs first, so their packages win over the system's).
for _p in reversed([p for p in os.environ.get("DGEMMA_PYTHONPATH", "").split(os.pathsep) if p]):
    if _p not in sys.path:
        sys.path.insert(0, _p)
        site.addsitedir(_p)

import triton_python_backend_utils as pb_utils  # noqa: E402

from service.engine.api import CanvasEvent, FinalEvent  # noqa: E402
from service.engine.registry import create_engine  # noqa: E402
from service.engine.scheduler import Limits  # noqa: E402
from service.errors import DGemmaError, InvalidArgument, Unavailable  # noqa: E402
from service.telemetry.tracing import emit_span, setup_tracing  # noqa: E402
from service.triton.launcher import HEARTBEAT_METRIC as HEARTBEAT  # noqa: E402
from service.triton.adapter import (  # noqa: E402
    INPUT_NAMES,
    backend_spans,
    deadline_from_inputs,
    error_code,
    input_error,
    outputs_for_event,
    request_from_inputs,
    triton_status,
)

log = logging.getLogger("dgemma.triton")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
HEARTBEAT_PERIOD_S = 1.0


def _triton_error(err: BaseException):
    # Streamed errors reach clients as a message only, so the code also leads the message.
    name = error_code(err)
    code = getattr(pb_utils.TritonError, triton_status(name), pb_utils.TritonError.INTERNAL)
    message = err.message if isinstance(err, DGemmaError) else "internal error"
    return pb_utils.TritonError(f"{name}: {message}", code)


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        def opt(name, kind=int):  # 0 or absent: no setting (the engine's default)
            return kind(params.get(name) or 0) or None

        limits = Limits(
            max_live_canvases=int(params.get("max_live_canvases", 16)),
            max_queue=int(params.get("max_engine_queue", 64)),
            max_memory_bytes=opt("max_memory_bytes"),  # None: the runner's default
            max_prompt_tokens=opt("max_prompt_tokens") or Limits.max_prompt_tokens,
            max_request_seconds=opt("max_request_seconds", float),
            max_new_tokens=opt("max_new_tokens_limit"),
            max_denoising_steps=opt("max_denoising_steps_limit"),
        )
        prefix_bytes = int(params.get("prefix_cache_bytes") or -1)
        self.engine = create_engine(
            params.get("engine_backend", "torch"), checkpoint_dir=params["checkpoint_dir"], limits=limits,
            on_step=self._update_gauges, device=params.get("device", "cpu"), dtype=params.get("dtype") or None,
            threads=int(params.get("threads") or 0) or None, tile_rows=int(params.get("tile_rows") or 0) or None,
            batch_invariant=params.get("batch_invariant") == "1",
            prefix_cache_bytes=prefix_bytes if prefix_bytes >= 0 else None,  # -1: the runner's default
            prefix_chunk=int(params.get("prefix_chunk_tokens") or 256),
        )
        self.scheduler = self.engine.scheduler
        self.step_timeout_s = opt("engine_step_timeout", float)  # a longer step: hung (None: no limit)
        # Spans of the denoising work, under Triton's own request span (OTEL_* from `dgemma serve`).
        self.tracing = setup_tracing("dgemma-backend")
        self.tokenizer = self.engine.tokenizer
        self.outputs = [o["name"] for o in cfg["output"]]
        labels = {"model": cfg["name"]}
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        # Families must outlive their metrics: keep both.
        self.families = {
            name: pb_utils.MetricFamily(name, text, kind)
            for name, text, kind in [
                ("dgemma_live_canvases", "Canvases in the running batch", gauge),
                ("dgemma_queue_depth", "Requests waiting for a slot in the engine", gauge),
                ("dgemma_denoising_steps_total", "Denoising steps run over committed canvases", counter),
                ("dgemma_canvases_total", "Canvases committed", counter),
                ("dgemma_generated_tokens_total", "Generated tokens, pad excluded", counter),
                ("dgemma_decoder_passes_total", "Decoder passes summed over requests", counter),
                ("dgemma_prefix_cache_queried_tokens_total", "Prompt tokens looked up in the prefix cache", counter),
                ("dgemma_prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache", counter),
                ("dgemma_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache over those looked up, "
                 "since start", gauge),
                ("dgemma_prefix_cache_bytes", "KV bytes the prefix cache holds", gauge),
                (HEARTBEAT, "Unix time of the engine's last sign of life (every second while its scheduler runs)",
                 gauge),
            ]
        }
        m = {name: fam.Metric(labels) for name, fam in self.families.items()}
        self.m_live, self.m_queue = m["dgemma_live_canvases"], m["dgemma_queue_depth"]
        self.m_steps, self.m_canvases = m["dgemma_denoising_steps_total"], m["dgemma_canvases_total"]
        self.m_tokens, self.m_passes = m["dgemma_generated_tokens_total"], m["dgemma_decoder_passes_total"]
        self.metrics = m
        self._prefix_seen = {}  # the prefix cache's counters as last exported
        self.scheduler.start()
        # The supervisor's view of the engine: this stops advancing when the stub or the scheduler dies.
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, args=(m[HEARTBEAT],), name="dgemma-heartbeat",
                                      daemon=True)
        self._beat.start()

    def _heartbeat(self, metric):
        while not self._stop.is_set():
            fault = self.scheduler.fault(self.step_timeout_s)
            if fault is not None:  # the supervisor sees the gauge go stale and restarts Triton
                log.error("%s; heartbeat stopped", fault)
                return
            metric.set(time.time())
            self._stop.wait(HEARTBEAT_PERIOD_S)

    def _update_gauges(self):
        self.m_live.set(self.scheduler.live_canvases)
        self.m_queue.set(self.scheduler.queue_depth)
        stats = getattr(self.engine.runner, "prefix_stats", dict)()
        if stats:
            m, seen = self.metrics, self._prefix_seen
            for name, key in (("dgemma_prefix_cache_queried_tokens_total", "tokens_queried"),
                              ("dgemma_prefix_cache_hit_tokens_total", "tokens_reused")):
                if stats[key] > seen.get(key, 0):
                    m[name].increment(stats[key] - seen.get(key, 0))
                    seen[key] = stats[key]
            m["dgemma_prefix_cache_hit_rate"].set(stats["tokens_reused"] / max(1, stats["tokens_queried"]))
            m["dgemma_prefix_cache_bytes"].set(stats["bytes"])

    def _detok(self, ids):
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def _trace_context(self, request):
        if not self.tracing:
            return None
        try:
            return request.trace().get_context()  # {"traceparent": ...} while Triton traces this request
        except Exception:
            return None

    def _emit_spans(self, parent, submitted_ns, canvases, request_id, error=None, stats=None):
        if parent is None:
            return
        try:
            end = time.time_ns()
            attrs = {"dgemma.request_id": request_id, "dgemma.canvases": len(canvases),
                     "dgemma.steps_per_canvas": [c.steps for c in canvases]}
            ctx = emit_span("dgemma.generate", submitted_ns, end, attrs, parent, error=error)
            for name, start, stop, a in backend_spans(submitted_ns, end, canvases, stats):
                emit_span(name, start, stop, a, ctx)
        except Exception:  # tracing never fails a request
            log.warning("could not record spans", exc_info=True)

    def _sink(self, sender, trace_parent=None, request_id=""):
        """The request's on_event: one response per event, and exactly one FINAL flag. A response that
        cannot be built or sent ends the request with a FINAL error and raises (the scheduler stops it)."""
        submitted_ns, canvases, state = time.time_ns(), [], {"final": False}

        def response_for(item):
            if isinstance(item, BaseException):
                self._emit_spans(trace_parent, submitted_ns, canvases, request_id, error=error_code(item))
                return pb_utils.InferenceResponse(error=_triton_error(item)), True
            tensors = outputs_for_event(item, self._detok)
            out = [pb_utils.Tensor(name, tensors[name]) for name in self.outputs if name in tensors]  # logprobs: if asked
            if isinstance(item, CanvasEvent):
                canvases.append(item)
                self.m_canvases.increment(1)
                self.m_steps.increment(item.steps)
            if isinstance(item, FinalEvent):
                self.m_tokens.increment(item.stats.generated_tokens)
                self.m_passes.increment(item.stats.decoder_passes)
                self._emit_spans(trace_parent, submitted_ns, canvases, request_id, stats=item.stats)
                return pb_utils.InferenceResponse(output_tensors=out), True
            return pb_utils.InferenceResponse(output_tensors=out), False

        def on_event(item):
            if state["final"]:
                return
            try:
                response, final = response_for(item)
                sender.send(response, flags=FINAL if final else 0)
                state["final"] = final
                return
            except Exception:
                log.warning("could not build or send a response; ending the request", exc_info=True)
            state["final"] = True  # the FINAL that failed, or a response before it: end with an error
            try:
                sender.send(pb_utils.InferenceResponse(error=_triton_error(Unavailable(
                    "the response could not be sent"))), flags=FINAL)
            except Exception:  # the client went away: nothing can reach it
                log.warning("could not send the FINAL error either; the request's end is lost", exc_info=True)
            raise Unavailable("the request's stream is closed")

        return on_event

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = {}
                for name in INPUT_NAMES:
                    t = pb_utils.get_input_tensor_by_name(request, name)
                    inputs[name] = None if t is None else t.as_numpy()
                deadline = deadline_from_inputs(inputs, time.monotonic())
                req = request_from_inputs(inputs, self.engine.config, self.tokenizer, self.engine.default_params)
                sink = self._sink(sender, self._trace_context(request), req.request_id)
                self.scheduler.submit(req, deadline=deadline, on_event=sink, cancel_check=sender.is_cancelled)
            except Exception as e:
                if isinstance(e, InvalidArgument):
                    e = input_error(e, inputs)
                elif not isinstance(e, DGemmaError):
                    log.exception("request failed")
                try:
                    sender.send(pb_utils.InferenceResponse(error=_triton_error(e)), flags=FINAL)
                except Exception:
                    log.warning("could not send the request's FINAL error", exc_info=True)
        self.m_queue.set(self.scheduler.queue_depth)
        return None

    def finalize(self):
        self._stop.set()
        self.scheduler.stop(drain=False, timeout=10)
