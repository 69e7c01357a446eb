"""The torch backend: runs requests on our DiffusionGemma network, in process."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from service.engine.api import Event, Request
from service.engine.sequence import Sequence
from service.model.loading import load_model
from service.model.tokenizer import Tokenizer, load_tokenizer
from service.sampler.params import GenerationParams, params_from_generation_config

log = logging.getLogger(__name__)


def generation_defaults(checkpoint_dir: Path) -> dict:
    """The checkpoint's generation_config.json (eos/pad ids and sampler defaults), or {}."""
    path = Path(checkpoint_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("ignoring unreadable generation_config.json")
        return {}
    return raw if isinstance(raw, dict) else {}


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
        gen = generation_defaults(self.checkpoint_dir)
        eos = gen.get("eos_token_id")
        self.eos_ids = tuple(eos if isinstance(eos, list) else [eos]) if eos is not None else self.config.eos_token_ids
        pad = gen.get("pad_token_id")
        self.pad_id = int(pad) if isinstance(pad, int) else self.config.pad_token_id
        # What a request that sets nothing gets: the checkpoint's generation config over the reference's defaults.
        self.default_params: GenerationParams = params_from_generation_config(gen)
        self.tokenizer: Tokenizer | None = load_tokenizer(self.checkpoint_dir)

    def new_sequence(self, request: Request) -> Sequence:
        request.validate(self.config)
        return Sequence(request, self.config, self.eos_ids, self.pad_id)

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
