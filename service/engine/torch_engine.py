"""The torch backend: runs requests on our DiffusionGemma network, in process."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from service.engine.api import Event, Request
from service.engine.sequence import Sequence
from service.errors import InvalidArgument
from service.model.config import read_generation_config, special_ids
from service.model.loading import load_model
from service.text.tokenizer import Tokenizer, load_tokenizer
from service.sampler.constraints import build_class_masks, check_classes
from service.sampler.params import GenerationParams, params_from_generation_config

log = logging.getLogger(__name__)


class TorchEngine:
    """Loads a checkpoint and runs one request at a time (the scheduler batches many)."""

    name = "torch"

    def __init__(
        self,
        checkpoint_dir: str | Path,
        device: str = "cpu",
        dtype: str | None = None,
        threads: int | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.device = torch.device(device)
        self.config, self.model = load_model(self.checkpoint_dir, dtype=dtype, device=self.device)
        gen = read_generation_config(self.checkpoint_dir)
        self.eos_ids, self.pad_id = special_ids(self.config, gen)
        # What a request that sets nothing gets: the checkpoint's generation config over the reference's defaults.
        self.default_params: GenerationParams = params_from_generation_config(gen)
        self.tokenizer: Tokenizer | None = load_tokenizer(self.checkpoint_dir)
        self._class_masks: torch.Tensor | None = None
        self._class_masks_lock = threading.Lock()

    def class_masks(self) -> torch.Tensor:
        """Allowed ids per token class, bool [C, V] on the model's device; built once from the tokenizer."""
        if self.tokenizer is None:
            raise InvalidArgument("constraints", "this model has no tokenizer; token classes need one")
        with self._class_masks_lock:
            if self._class_masks is None:
                special = {*self.eos_ids, self.pad_id, self.tokenizer.bos_id}
                masks = build_class_masks(self.tokenizer, self.config.vocab_size, special)
                self._class_masks = masks.to(self.device)
        return self._class_masks

    def validate(self, request: Request) -> Request:
        """The request's own checks, plus what needs this engine: a tokenizer and non-empty classes."""
        request.validate(self.config)
        if request.constrained:
            check_classes(self.class_masks(), request.constraints)
        return request

    def new_sequence(self, request: Request) -> Sequence:
        self.validate(request)
        masks = self.class_masks() if request.constrained else None
        return Sequence(request, self.config, self.eos_ids, self.pad_id, masks)

    def generate(self, request: Request) -> Iterator[Event]:
        seq = self.new_sequence(request)
        model = self.model
        cache = model.new_cache(Sequence.max_tokens(request, self.config.canvas_length))
        while not seq.done:
            ids = seq.to_encode.to(self.device)
            model.encode(ids[None], [ids.numel()], [cache])
            seq.begin_canvas()
            while seq.denoising:
                soft = seq.soft[None] if seq.soft is not None else None
                hidden = model.decode(seq.canvas[None].to(self.device), soft, [cache])
                yield from seq.after_decode(model, hidden[0])
