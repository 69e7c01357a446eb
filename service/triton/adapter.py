"""Pure translation between Triton tensors (numpy) and engine requests/events. No Triton import here.

The model's interface is documented in docs/api.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

import numpy as np

from service.engine.api import CanvasEvent, DraftEvent, Event, FinalEvent, Logprobs, Request, Stats
from service.engine.scoring import DEFAULT_SAMPLES, ScoreRequest
from service.errors import InvalidArgument, wire_code
from service.model.config import ModelConfig
from service.text.tokenizer import Tokenizer
from service.sampler.constraints import FREE
from service.text.token_classes import choices_of
from service.sampler.params import FLOAT_PARAMS, INT_PARAMS, GenerationParams, Pins, request_params

# The Triton status (pb_utils.TritonError.<NAME>) of the wire codes Triton has no name for; the others
# (service.errors.WIRE_CODES) are Triton's names too. The code also leads the message: clients of a stream
# read the message only.
TRITON_STATUS = {"OVERLOADED": "UNAVAILABLE", "DEADLINE_EXCEEDED": "UNAVAILABLE"}

# `timeout_ms`: milliseconds left of the caller's deadline (0 or absent: none); not a field of Request.
INPUT_NAMES = ("text_input", "input_ids", "pin_ids", "pin_mask", "constraint_ids", "choice_ids", "seed",
               "return_drafts", "ignore_eos", "request_id", "sampler", "apply_chat_template", "timeout_ms", "logprobs",
               "score_ids", "score_samples", *INT_PARAMS, *FLOAT_PARAMS)
# A scoring request (`score_ids` set) takes these inputs only; its `logprobs` is the alternatives per position.
SCORE_INPUTS = ("text_input", "input_ids", "apply_chat_template", "seed", "request_id", "timeout_ms", "logprobs",
                "score_ids", "score_samples")
# Outputs only a request with `logprobs` gets, on its canvas and final responses (one row per output id).
LOGPROB_OUTPUTS = ("logprobs", "top_logprob_ids", "top_logprobs")


def error_code(err: BaseException) -> str:
    """The wire code of an error (service.errors.WIRE_CODES)."""
    return wire_code(err)


def triton_status(code: str) -> str:
    """The Triton status name for a wire code."""
    return TRITON_STATUS.get(code, code)


def deadline_from_inputs(inputs: Mapping[str, np.ndarray | None], now: float) -> float | None:
    """The request's deadline on the clock of `now` (time.monotonic()), from `timeout_ms`; None: none."""
    ms = _scalar(inputs, "timeout_ms")
    if ms is None or int(ms) == 0:
        return None
    if int(ms) < 0:
        raise InvalidArgument("timeout_ms", f"must be >= 0, got {ms}")
    return now + int(ms) / 1000.0


def _scalar(inputs: Mapping[str, np.ndarray | None], name: str):
    arr = inputs.get(name)
    if arr is None:
        return None
    flat = np.asarray(arr).reshape(-1)
    if flat.size != 1:
        raise InvalidArgument(name, f"expects one value, got {flat.size}")
    v = flat[0]
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v


def _ids(inputs: Mapping[str, np.ndarray | None], name: str) -> list[int] | None:
    arr = inputs.get(name)
    return None if arr is None else [int(x) for x in np.asarray(arr).reshape(-1)]


def request_from_inputs(
    inputs: Mapping[str, np.ndarray | None],
    cfg: ModelConfig,
    tokenizer: Tokenizer | None,
    defaults: GenerationParams | None = None,
) -> Request | ScoreRequest:
    """Build and validate an engine Request (a ScoreRequest when `score_ids` is set); unset parameters take
    `defaults`; errors name the input."""
    defaults = defaults or GenerationParams()
    unknown = [k for k, v in inputs.items() if v is not None and k not in INPUT_NAMES]
    if unknown:
        raise InvalidArgument(unknown[0], "is not an input of this model")
    ids = _prompt(inputs, tokenizer)
    if inputs.get("score_ids") is not None:
        return _score_request(inputs, ids, cfg)
    if inputs.get("score_samples") is not None:
        raise InvalidArgument("score_samples", "given without score_ids")
    given: dict = {}  # the parameters this request sets
    for name in INT_PARAMS:
        v = _scalar(inputs, name)
        if v is not None:
            given[name] = int(v)
    for name in FLOAT_PARAMS:
        v = _scalar(inputs, name)
        if v is not None:
            given[name] = float(v)
    sampler = _scalar(inputs, "sampler")
    if sampler is not None:
        given["sampler"] = str(sampler)
    pins = None
    pin_ids = _ids(inputs, "pin_ids")
    if pin_ids is not None:
        mask_arr = inputs.get("pin_mask")
        mask = None if mask_arr is None else [bool(x) for x in np.asarray(mask_arr).reshape(-1)]
        pins = Pins.from_lists(pin_ids, mask)
    elif inputs.get("pin_mask") is not None:
        raise InvalidArgument("pin_mask", "given without pin_ids")
    constraints = _ids(inputs, "constraint_ids")
    if tokenizer is None and any(c != FREE for c in constraints or ()):
        raise InvalidArgument("constraint_ids", "this model has no tokenizer; token classes need one")
    seed = _scalar(inputs, "seed")
    logprobs = _scalar(inputs, "logprobs")
    req = Request(
        prompt_ids=ids,
        params=request_params(defaults, given),
        seed=int(seed) if seed is not None else 0,
        pins=pins,
        return_drafts=bool(_scalar(inputs, "return_drafts") or False),
        ignore_eos=bool(_scalar(inputs, "ignore_eos") or False),
        request_id=str(_scalar(inputs, "request_id") or ""),
        constraints=constraints,
        choices=choices_of(_ids(inputs, "choice_ids")),
        logprobs=None if logprobs is None else int(logprobs),
    )
    try:
        return req.validate(cfg)
    except InvalidArgument as e:
        raise input_error(e, inputs) from None


def _prompt(inputs: Mapping[str, np.ndarray | None], tokenizer: Tokenizer | None) -> list[int]:
    """The prompt's ids, from text_input (tokenized, chat template on request) or input_ids."""
    text = _scalar(inputs, "text_input")
    ids = _ids(inputs, "input_ids")
    if (text is None) == (ids is None):
        raise InvalidArgument("text_input", "give exactly one of text_input or input_ids")
    if text is not None:
        if not text:
            raise InvalidArgument("text_input", "the prompt is empty")
        if tokenizer is None:
            raise InvalidArgument("text_input", "this model has no tokenizer; send input_ids")
        chat = bool(_scalar(inputs, "apply_chat_template") or False)
        return tokenizer.chat_prompt([("user", text)]) if chat else tokenizer.encode(text)
    if not ids:
        raise InvalidArgument("input_ids", "the prompt is empty")
    return ids


def _score_request(inputs: Mapping[str, np.ndarray | None], ids: list[int], cfg: ModelConfig) -> ScoreRequest:
    """A scoring request: the prompt is the context, score_ids the continuation (docs/api.md, "Score")."""
    extra = [k for k, v in inputs.items() if v is not None and k not in SCORE_INPUTS]
    if extra:
        raise InvalidArgument(extra[0], "is not an input of a scoring request (score_ids is set)")
    seed, samples, top = (_scalar(inputs, n) for n in ("seed", "score_samples", "logprobs"))
    req = ScoreRequest(ids, _ids(inputs, "score_ids") or [], DEFAULT_SAMPLES if samples is None else int(samples),
                       int(seed) if seed is not None else 0, int(top) if top is not None else 0,
                       str(_scalar(inputs, "request_id") or ""))
    try:
        return req.validate(cfg)
    except InvalidArgument as e:
        raise input_error(e, inputs) from None


def input_error(e: InvalidArgument, inputs: Mapping[str, np.ndarray | None]) -> InvalidArgument:
    """An engine error under this interface's input names (the engine's prompt_ids is input_ids or text_input)."""
    if e.field == "prompt_ids":
        return e.renamed("text_input" if inputs.get("text_input") is not None else "input_ids")
    if e.field == "constraints":
        return e.renamed("constraint_ids")
    if e.field == "choices":
        return e.renamed("choice_ids")
    names = {"target_ids": "score_ids", "samples": "score_samples", "top_logprobs": "logprobs"}
    return e.renamed(names[e.field]) if e.field in names else e


def outputs_for_event(event: Event, detokenize: Callable[[list[int]], str] | None) -> dict[str, np.ndarray]:
    """One response's output tensors for an engine event."""
    if isinstance(event, DraftEvent):
        kind, ids, index, step, stats, reason = "draft", event.tokens, event.canvas_index, event.step, {}, ""
    elif isinstance(event, CanvasEvent):
        kind, ids, index, step, stats, reason = "canvas", event.tokens, event.canvas_index, event.steps, {}, ""
    elif isinstance(event, FinalEvent):
        kind, ids, index, step = "final", event.token_ids, -1, 0
        stats, reason = event.stats.as_dict(), event.finish_reason
    else:
        raise TypeError(f"not an engine event: {type(event).__name__}")
    text = detokenize(ids) if detokenize is not None else ""
    lp = getattr(event, "logprobs", None)
    return {
        **(_logprob_outputs(lp) if lp is not None else {}),
        "event": np.array([kind.encode()], dtype=np.object_),
        "output_ids": np.asarray(ids, dtype=np.int32),
        "text_output": np.array([text.encode()], dtype=np.object_),
        "canvas_index": np.array([index], dtype=np.int32),
        "step": np.array([step], dtype=np.int32),
        "stats": np.array([json.dumps(stats).encode()], dtype=np.object_),
        "finish_reason": np.array([reason.encode()], dtype=np.object_),
    }


def _logprob_outputs(lp: Logprobs) -> dict[str, np.ndarray]:
    """A canvas's or final's log-probs: [n] and [n, k] arrays (n output ids, k alternatives)."""
    n, k = len(lp), len(lp.top[0]) if len(lp) else 0
    return {"logprobs": np.asarray(lp.token, dtype=np.float32).reshape(n),
            "top_logprob_ids": np.asarray(lp.top_ids, dtype=np.int32).reshape(n, k),
            "top_logprobs": np.asarray(lp.top, dtype=np.float32).reshape(n, k)}


def backend_spans(submitted_ns: int, ended_ns: int, canvases: list[CanvasEvent],
                  stats: Stats | None = None) -> list[tuple[str, int, int, dict]]:
    """The denoising work of one request as (name, start_ns, end_ns, attributes), children of its
    `dgemma.generate` span: the prefill (with its prompt tokens and those the prefix cache served, once the request
    ended with `stats`), each canvas's steps, and each commit pass that followed a canvas."""
    spans = []
    first = canvases[0].started_ns if canvases else ended_ns
    prefill = {} if stats is None else {"dgemma.prompt_tokens": stats.prompt_tokens,
                                        "dgemma.prompt_tokens_cached": stats.cached_prompt_tokens}
    spans.append(("dgemma.prefill", submitted_ns, first, prefill))
    for i, c in enumerate(canvases):
        spans.append(("dgemma.canvas", c.started_ns, c.committed_ns,
                      {"dgemma.canvas_index": c.canvas_index, "dgemma.steps": c.steps}))
        if i + 1 < len(canvases):
            spans.append(("dgemma.commit", c.committed_ns, canvases[i + 1].started_ns,
                          {"dgemma.canvas_index": c.canvas_index}))
    return spans
