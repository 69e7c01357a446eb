"""One request's denoising state between steps, and its bookkeeping after each step.

The state kept between steps is small: the canvas [L], the self-conditioning input [L, H], the
argmax history and counters, all on the runner's device. The vocabulary work of a step happens in the
runner, in tiles (service/sampler/tiles.py); this holds what follows it: stopping, commits and events.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from service.engine.api import CanvasEvent, DraftEvent, Event, FinalEvent, Logprobs, Request, Stats
from service.engine.runner import Cache, CanvasStep
from service.model.config import ModelConfig
from service.sampler import ops
from service.sampler.constraints import FREE, canvas_classes
from service.sampler.tiles import CanvasDraw, StepLogprobs


class Sequence:
    def __init__(
        self,
        request: Request,
        cfg: ModelConfig,
        eos_ids: tuple[int, ...],
        pad_id: int,
        generator: torch.Generator,
        device: torch.device,
        class_masks: Tensor | None = None,
    ) -> None:
        """generator: the request's own, on `device`; class_masks: bool [C, V] on `device`, needed when the
        request has constraints."""
        self.request = request
        self.params = request.params
        self.cfg = cfg
        self.device = device
        self.length = cfg.canvas_length
        # ignore_eos: no id ends the request or pads the canvas after it
        self.eos = torch.tensor([] if request.ignore_eos else list(eos_ids), dtype=torch.long, device=device)
        self.pad_id = pad_id
        self.generator = generator
        # Per-request scalars on the device, made once here: a step reads views of them (no host copy in a step).
        self.temperatures = ops.temperature_schedule(self.params.max_denoising_steps, *self.params.schedule(),
                                                     device)  # [N]
        self.entropy_bound = torch.full((1,), self.params.entropy_bound, dtype=torch.float32, device=device)  # [1]
        self.max_canvases = math.ceil(self.params.max_new_tokens / self.length)  # the reference's count
        pins = request.pins.full(self.length) if request.pins is not None else None
        self.pins = (pins[0].to(device), pins[1].to(device)) if pins is not None else (None, None)
        # Class ids of the first canvas [L] (pins win), or None when nothing is constrained.
        self.first_classes: Tensor | None = None
        if request.constrained:
            if class_masks is None:
                raise ValueError("a request with constraints needs class_masks")
            pin_mask = pins[1] if pins is not None else None
            self.first_classes = canvas_classes(request.constraints, self.length, pin_mask).to(device)
        self.class_masks = class_masks
        self.committed: list[list[int]] = []
        self.committed_logprobs: list[Logprobs] = []  # per committed canvas, when the request asked
        self.step_logprobs: StepLogprobs | None = None  # the last step's, on the device: a commit keeps them
        self.steps_per_canvas: list[int] = []
        self.decoder_passes = 0
        self.shared_passes = 0
        # Tokens waiting for an encoder pass before the next canvas: the prompt, then each committed canvas.
        self.to_encode: Tensor | None = torch.tensor(request.prompt_ids, dtype=torch.long, device=device)
        self.cache: Cache | None = None
        self.done = False
        self.finish_reason = "length"
        self.canvas: Tensor | None = None  # [L]
        self.soft: Tensor | None = None  # [L, H]

    @staticmethod
    def max_tokens(request: Request, canvas_length: int) -> int:
        """Prompt plus every canvas the request may generate: the most its KV cache can hold."""
        return len(request.prompt_ids) + math.ceil(request.params.max_new_tokens / canvas_length) * canvas_length

    @property
    def canvas_index(self) -> int:
        return len(self.committed)

    @property
    def denoising(self) -> bool:
        return self.canvas is not None

    def state_nbytes(self) -> int:
        """Bytes this request keeps between steps (canvas, argmax, stable-run counter, self-conditioning input)."""
        tensors = [self.canvas, self.soft, getattr(self, "argmax", None), getattr(self, "stable_run", None)]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def begin_canvas(self) -> None:
        """Start a canvas after its prefix is encoded: uniform noise, pins on the first canvas."""
        self.to_encode = None
        self.started_ns = time.time_ns()
        canvas = ops.init_canvas(self.length, self.cfg.vocab_size, self.generator, self.device)
        pin_ids, pin_mask = self.pins if self.canvas_index == 0 else (None, None)
        self.pin_ids, self.pin_mask = pin_ids, pin_mask
        self.class_ids = self.first_classes if self.canvas_index == 0 else None
        # Positions EOS does not pad over: pinned ones, and constrained ones (they hold their class).
        self.keep_mask = pin_mask
        if self.class_ids is not None:
            constrained = self.class_ids != FREE
            self.keep_mask = constrained if pin_mask is None else pin_mask | constrained
        self.canvas = ops.apply_pins(canvas, pin_ids, pin_mask)
        self.argmax = self.canvas
        self.soft = None
        self.step = self.params.max_denoising_steps  # n counts down N..1
        self.steps = 0
        # Steps in a row whose argmax equalled the one before: "unchanged for stability_threshold steps" is
        # this count reaching the threshold, in O(1) memory and work whatever the threshold. The first
        # step's argmax has no predecessor (the canvas is noise), so the count starts at 0 there.
        self.stable_run = torch.zeros((), dtype=torch.long, device=self.device)
        self._next_run = self.stable_run

    def step_input(self) -> CanvasStep:
        """What the runner needs of this canvas for the next decoder step."""
        p = self.params
        temperature = self.temperatures[p.max_denoising_steps - self.step]  # T(n), a view
        logprobs = -1 if self.request.logprobs is None else self.request.logprobs
        draw = CanvasDraw(temperature, self.generator, p.sampler == "reference", self.class_ids, p.greedy, p.top_k,
                          logprobs)
        return CanvasStep(self.canvas, self.soft, self.cache, draw, self.entropy_bound, self.pin_ids, self.pin_mask,
                          self.class_masks if self.class_ids is not None else None)

    def stop_flags(self, argmax: Tensor, entropy: Tensor) -> Tensor:
        """bool [2] on the device: (argmax stable over the history, mean free entropy under the threshold).
        The scheduler reads every canvas's flags in one host transfer."""
        p = self.params
        same = (argmax == self.argmax).all() if self.steps else torch.zeros((), dtype=torch.bool, device=argmax.device)
        self._next_run = torch.where(same, self.stable_run + 1, 0)
        stable = self._next_run >= p.stability_threshold
        return torch.stack([stable, ops.mean_entropy(entropy, self.pin_mask) < p.confidence_threshold])

    def after_step(self, canvas: Tensor, argmax: Tensor, soft: Tensor, stable: bool, confident: bool,
                   shared: bool = False, logprobs: StepLogprobs | None = None) -> list[Event]:
        """Take one step's result for this canvas (runner's StepOutput row, stop_flags read on the host)."""
        p = self.params
        self.step_logprobs = logprobs
        self.decoder_passes += 1
        self.shared_passes += int(shared)
        self.steps += 1
        self.canvas = canvas
        self.stable_run = self._next_run
        self.argmax = argmax
        events: list[Event] = []
        if self.request.return_drafts:
            events.append(DraftEvent(self.canvas_index, self.steps, argmax.tolist()))
        self.step -= 1
        if (stable and confident) or self.step == 0:
            events.extend(self._commit())
        else:
            self.soft = soft  # [L, H]: all that survives of the logits
        return events

    def _commit(self) -> list[Event]:
        tokens, hit_eos = ops.finalize_canvas(self.argmax, self.eos, self.pad_id, self.keep_mask)
        index = self.canvas_index
        ids = tokens.tolist()
        self.committed.append(ids)
        self.steps_per_canvas.append(self.steps)
        logprobs = self._commit_logprobs()
        self.canvas, self.soft = None, None
        events: list[Event] = [CanvasEvent(index, ids, self.steps, self.started_ns, time.time_ns(), logprobs)]
        if hit_eos or len(self.committed) >= self.max_canvases:
            self.finish_reason = "eos" if hit_eos else "length"
            events.append(self.finish())
        else:
            self.to_encode = tokens
        return events

    def _commit_logprobs(self) -> Logprobs | None:
        """The commit step's log-probs on the host (every position commits at its canvas's last step: the
        committed ids are that step's argmax); pinned positions were not sampled: 0.0."""
        lp, self.step_logprobs = self.step_logprobs, None
        if lp is None:
            return None
        chosen = lp.chosen if self.pin_mask is None else lp.chosen.masked_fill(self.pin_mask, 0.0)  # [L]
        out = Logprobs(chosen.tolist(), lp.top_ids.tolist(), lp.top.tolist())
        self.committed_logprobs.append(out)
        return out

    def finish(self) -> FinalEvent:
        self.done = True
        self.to_encode = None
        ids = [t for canvas in self.committed for t in canvas]
        stats = Stats(
            prompt_tokens=len(self.request.prompt_ids),
            generated_tokens=sum(1 for t in ids if t != self.pad_id),
            decoder_passes=self.decoder_passes,
            steps_per_canvas=list(self.steps_per_canvas),
            shared_decoder_passes=self.shared_passes,
            cached_prompt_tokens=getattr(self.cache, "reused", 0),
        )
        logprobs = Logprobs.join(self.committed_logprobs) if self.request.logprobs is not None else None
        return FinalEvent(ids, self.finish_reason, stats, logprobs)
