"""One request's denoising state between steps, and what happens to it after each decoder pass.

The state kept between steps is small: the canvas [L], the self-conditioning input [L, H], the
argmax history and counters. Full-vocabulary logits exist only inside `after_decode`, one canvas at a time.
"""

from __future__ import annotations

import math
import time
from collections import deque

import torch
from torch import Tensor

from service.engine.api import CanvasEvent, DraftEvent, Event, FinalEvent, Request, Stats
from service.model.config import ModelConfig
from service.model.network import DiffusionGemma
from service.sampler import ops
from service.sampler.constraints import FREE, canvas_classes, constrain_logits_


class Sequence:
    def __init__(
        self,
        request: Request,
        cfg: ModelConfig,
        eos_ids: tuple[int, ...],
        pad_id: int,
        class_masks: Tensor | None = None,
    ) -> None:
        """class_masks: bool [C, V] from the engine's tokenizer; needed when the request has constraints."""
        self.request = request
        self.params = request.params
        self.cfg = cfg
        self.length = cfg.canvas_length
        self.eos = torch.tensor(list(eos_ids), dtype=torch.long)
        self.pad_id = pad_id
        self.generator = torch.Generator().manual_seed(request.seed)
        self.max_canvases = math.ceil(self.params.max_new_tokens / self.length)  # the reference's count
        self.pins = request.pins.full(self.length) if request.pins is not None else (None, None)
        # Class ids of the first canvas [L] (pins win), or None when nothing is constrained.
        self.first_classes: Tensor | None = None
        if request.constrained:
            if class_masks is None:
                raise ValueError("a request with constraints needs class_masks")
            self.first_classes = canvas_classes(request.constraints, self.length, self.pins[1])
        self.class_masks = class_masks
        self.committed: list[Tensor] = []
        self.steps_per_canvas: list[int] = []
        self.decoder_passes = 0
        self.shared_passes = 0
        # Tokens waiting for an encoder pass before the next canvas: the prompt, then each committed canvas.
        self.to_encode: Tensor | None = torch.tensor(request.prompt_ids, dtype=torch.long)
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
        """Bytes this request keeps between steps (canvas, argmax, history, self-conditioning input)."""
        tensors = [self.canvas, self.soft, getattr(self, "argmax", None), *getattr(self, "history", [])]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def begin_canvas(self) -> None:
        """Start a canvas after its prefix is encoded: uniform noise, pins on the first canvas."""
        self.to_encode = None
        self.started_ns = time.time_ns()
        canvas = ops.init_canvas(self.length, self.cfg.vocab_size, self.generator)
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
        thr = self.params.stability_threshold
        self.history: deque[Tensor] = deque([torch.full((self.length,), -1)] * thr, maxlen=max(thr, 1))

    @torch.no_grad()
    def after_decode(self, model: DiffusionGemma, hidden: Tensor, shared: bool = False) -> list[Event]:
        """Sample from this canvas's decoder output hidden [L, H]; returns the events it produced."""
        p = self.params
        self.decoder_passes += 1
        self.shared_passes += int(shared)
        self.steps += 1
        # [L, V] float32, this canvas only; divided in place (the same bits as logits / T)
        processed = model.logits(hidden).div_(ops.temperature(self.step, p.max_denoising_steps, p.t_min, p.t_max))
        if self.class_ids is not None:  # before sampling, entropy, argmax and self-conditioning see them
            self.class_ids = self.class_ids.to(processed.device)
            constrain_logits_(processed, self.class_ids, self.class_masks.to(processed.device))
        probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
        fast = p.sampler == "fast"
        entropy = ops.fast_token_entropy(processed, probs) if fast else ops.token_entropy(processed)
        accepted = ops.accept_mask(entropy, p.entropy_bound, self.pin_mask)
        # The reference sampler draws for every position (its stream); both make ids only where they are kept.
        sampled = (ops.fast_sample_tokens if fast else ops.sample_tokens)(probs, self.generator, accepted)
        argmax = ops.apply_pins(processed.argmax(dim=-1), self.pin_ids, self.pin_mask)
        accepted_canvas = torch.where(accepted, sampled, self.canvas)
        self.canvas = ops.apply_pins(
            ops.renoise(accepted_canvas, accepted, self.cfg.vocab_size, self.generator), self.pin_ids, self.pin_mask
        )
        stable = p.stability_threshold == 0 or ops.is_stable(list(self.history), argmax)
        if p.stability_threshold:
            self.history.append(argmax)
        confident = ops.mean_entropy(entropy, self.pin_mask) < p.confidence_threshold
        self.argmax = argmax
        events: list[Event] = []
        if self.request.return_drafts:
            events.append(DraftEvent(self.canvas_index, self.steps, argmax.tolist()))
        self.step -= 1
        if (stable and confident) or self.step == 0:
            events.extend(self._commit())
        else:
            self.soft = model.soft_embedding(probs)  # [L, H]: all that survives of the logits
        return events

    def _commit(self) -> list[Event]:
        tokens, hit_eos = ops.finalize_canvas(self.argmax, self.eos, self.pad_id, self.keep_mask)
        index = self.canvas_index
        self.committed.append(tokens)
        self.steps_per_canvas.append(self.steps)
        self.canvas, self.soft = None, None
        events: list[Event] = [CanvasEvent(index, tokens.tolist(), self.steps, self.started_ns, time.time_ns())]
        if hit_eos or len(self.committed) >= self.max_canvases:
            self.finish_reason = "eos" if hit_eos else "length"
            events.append(self.finish())
        else:
            self.to_encode = tokens
        return events

    def finish(self) -> FinalEvent:
        self.done = True
        self.to_encode = None
        ids = torch.cat(self.committed).tolist() if self.committed else []
        stats = Stats(
            prompt_tokens=len(self.request.prompt_ids),
            generated_tokens=sum(1 for t in ids if t != self.pad_id),
            decoder_passes=self.decoder_passes,
            steps_per_canvas=list(self.steps_per_canvas),
            shared_decoder_passes=self.shared_passes,
        )
        return FinalEvent(ids, self.finish_reason, stats)
