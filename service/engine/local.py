"""A checkpoint served in this process: its metadata, a runner, and the scheduler that batches requests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from service.engine.api import Event, Request
from service.engine.runner import Runner
from service.engine.scheduler import Limits, Scheduler
from service.engine.scoring import ScoreRequest, ScoreSequence
from service.engine.sequence import Sequence
from service.errors import InvalidArgument
from service.model.config import read_generation_config, special_ids
from service.text.tokenizer import Tokenizer, load_tokenizer
from service.sampler.constraints import build_class_masks, check_classes, choice_masks
from service.sampler.params import GenerationParams, params_from_generation_config


class LocalEngine:
    """The Engine protocol over one runner. `generate` goes through the scheduler: start it (a thread)
    to serve concurrent requests, or let each `generate` call drive it."""

    def __init__(self, checkpoint_dir: str | Path, runner: Runner, limits: Limits | None = None,
                 on_step=None) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.runner = runner
        self.config = runner.config
        gen = read_generation_config(self.checkpoint_dir)
        self.eos_ids, self.pad_id = special_ids(self.config, gen)
        # What a request that sets nothing gets: the checkpoint's generation config over the serving defaults.
        self.default_params: GenerationParams = params_from_generation_config(gen)
        self.tokenizer: Tokenizer | None = load_tokenizer(self.checkpoint_dir)
        self._class_masks: torch.Tensor | None = None
        self._class_masks_lock = threading.Lock()
        self.scheduler = Scheduler(self, limits, on_step)

    def class_masks(self) -> torch.Tensor:
        """Allowed ids per token class, bool [C, V] on the runner's device; built once from the tokenizer."""
        if self.tokenizer is None:
            raise InvalidArgument("constraints", "this model has no tokenizer; token classes need one")
        with self._class_masks_lock:
            if self._class_masks is None:
                special = {*self.eos_ids, self.pad_id, self.tokenizer.bos_id}
                masks = build_class_masks(self.tokenizer, self.config.vocab_size, special, self.pad_id)
                self._class_masks = masks.to(self.runner.device)
        return self._class_masks

    def validate(self, request: Request | ScoreRequest) -> Request | ScoreRequest:
        """The request's own checks, plus what needs this engine: a tokenizer and non-empty classes."""
        request.validate(self.config)
        if isinstance(request, Request) and request.constrained:
            check_classes(self.class_masks(), request.constraints)
        return request

    def new_sequence(self, request: Request | ScoreRequest) -> Sequence | ScoreSequence:
        self.validate(request)
        if isinstance(request, ScoreRequest):
            return ScoreSequence(request, self.config, self.runner.new_generator(request.seed), self.runner.device)
        masks = self.class_masks() if request.constrained else None
        if masks is not None and request.choices:  # the request's own classes after the checkpoint's: [C + K, V]
            masks = torch.cat([masks, choice_masks(request.choices, self.config.vocab_size, masks.device)])
        seed = 0 if request.params.greedy else request.seed  # greedy output does not depend on the seed
        return Sequence(request, self.config, self.eos_ids, self.pad_id, self.runner.new_generator(seed),
                        self.runner.device, masks)

    def generate(self, request: Request | ScoreRequest) -> Iterator[Event]:
        """Validate and run one request: drafts (if asked), canvases, then one FinalEvent (a ScoreRequest: one
        FinalEvent whose logprobs are the continuation's estimates, finish_reason "score")."""
        return self.scheduler.generate(request)
