"""Stop sequences, stop token ids and the hard token cap of one variation, applied to its committed canvases.

The engine generates whole canvases, and its ids stay those of the reference; this layer cuts what a
client gets. A `Stopper` takes a variation's committed canvases in order and returns each one cut to
what the client may see: every id up to the cut, and the text that is final (text that could still turn
into a stop sequence is held back until it cannot, then released). When it reports `done`, the
variation needs no further canvas and its stream can be cancelled. Both fronts use it through
`Dispatcher.run` (a `Job` with `stopping` set).

Returned ids run to the cap, or through the token that completed the stop sequence (or the stop token);
the text ends before the stop sequence (or the stop token).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from service.logprobs import Logprobs
from service.errors import InvalidArgument
from service.request.triton_client import BackendEvent

MAX_STOP = 4  # stop sequences per request
MAX_STOP_CHARS = 256  # characters per stop sequence
MAX_STOP_TOKEN_IDS = 64
_INCOMPLETE = "\ufffd"  # what decode makes of a character whose bytes are split across tokens


@dataclass(frozen=True)
class StopSpec:
    """A variation's limits: at most `max_tokens` ids, ending at the first `stop` string or `stop_token_ids` id."""

    max_tokens: int
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()


def stop_spec(max_tokens: int, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (), *,
              vocab_size: int, has_tokenizer: bool = True, stop_field: str = "stop",
              ids_field: str = "stop_token_ids") -> StopSpec:
    """Validate a request's stop settings (errors name `stop_field[i]` / `ids_field[i]`); `max_tokens` is
    checked with the other generation parameters."""
    stop = tuple(stop)
    if len(stop) > MAX_STOP:
        raise InvalidArgument(stop_field, f"at most {MAX_STOP} stop sequences, got {len(stop)}")
    if stop and not has_tokenizer:
        raise InvalidArgument(stop_field, "this model has no tokenizer; use stop token ids")
    for i, s in enumerate(stop):
        if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
            raise InvalidArgument(f"{stop_field}[{i}]", f"must be 1 to {MAX_STOP_CHARS} characters")
    ids = tuple(stop_token_ids)
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidArgument(ids_field, f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}")
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise InvalidArgument(f"{ids_field}[{i}]", f"id {t!r} is outside the vocabulary [0, {vocab_size})")
    return StopSpec(max_tokens, stop, ids)


@dataclass(frozen=True)
class Cut:
    """One canvas as the client may see it."""

    ids: list[int]  # the canvas's ids up to the cut
    text: str  # text that became final with this canvas
    done: bool  # the variation needs no further canvas
    finish_reason: str = ""  # when done: "stop" or "length"
    stop_reason: str | int | None = None  # the stop sequence or stop token id that ended it


class Stopper:
    """One variation's cut: feed it committed canvases in order, then `finish` at the engine's final."""

    def __init__(self, spec: StopSpec, decode: Callable[[list[int]], str] | None, pad_id: int = 0) -> None:
        self.spec = spec
        self.decode = decode or (lambda ids: "")
        self.pad_id = pad_id
        self.ids: list[int] = []  # ids kept so far (cut)
        self.text = ""  # decoded text of the kept ids (stop tokens excluded), up to `_read`
        self.sent = 0  # characters of `text` released
        self.done = False
        self.finish_reason = ""
        self.stop_reason: str | int | None = None
        self.stopped_text: str | None = None  # the text cut before a stop sequence
        self.cut_tokens = False  # the cap cut off tokens that were not pad
        self.engine_tokens = 0  # non-pad ids the engine generated (stats of an early final)
        self.steps: list[int] = []
        self.logprobs: list[Logprobs] = []  # each canvas's, cut as its ids (when the request asked)
        self._prefix = self._read = 0  # incremental decoding: ids[_prefix:_read] decode to the text's tail

    # ---- decoding ----------------------------------------------------------------------------------

    def _decode_to(self, end: int, flush: bool = False) -> None:
        """Extend `text` with the ids up to `end` (a character split at the end waits unless `flush`)."""
        before = self.decode(self.ids[self._prefix:self._read])
        after = self.decode(self.ids[self._prefix:end])
        if not after.startswith(before):  # the decoder rewrote earlier text: decode it all again
            self.text = self.decode(self.ids[:end])
        elif flush or not after.endswith(_INCOMPLETE):
            self.text += after[len(before):]
        else:
            return
        self._prefix, self._read = self._read, end

    def _releasable(self) -> int:
        """Where the text stops being final: the start of its longest tail that begins a stop sequence."""
        end = len(self.text)
        for s in self.spec.stop:
            for n in range(min(len(s) - 1, len(self.text) - self.sent), 0, -1):
                if self.text.endswith(s[:n]):
                    end = min(end, len(self.text) - n)
                    break
        return end

    def _release(self, end: int) -> str:
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    # ---- canvases ------------------------------------------------------------------------------------

    def feed(self, canvas: list[int], steps: int = 0) -> Cut:
        """Take the next committed canvas."""
        if self.done:
            return Cut([], "", True, self.finish_reason, self.stop_reason)
        self.steps.append(steps)
        self.engine_tokens += sum(t != self.pad_id for t in canvas)
        start = len(self.ids)
        room = self.spec.max_tokens - start
        new = list(canvas[:room])
        self.cut_tokens = any(t != self.pad_id for t in canvas[room:])
        stop_at = next((k for k, t in enumerate(new) if t in self.spec.stop_token_ids), None)
        if stop_at is not None:
            new = new[:stop_at + 1]
        self.ids.extend(new)
        text_end = len(self.ids) - (stop_at is not None)  # a stop token is not part of the text
        self._decode_to(text_end, flush=stop_at is not None)
        hit = self._find_stop()
        if hit is not None:
            at, s = hit
            self.ids = self.ids[:self._ids_through(at + len(s), start)]
            self.stopped_text = self.text[:at]
            self._end("stop", s)
            return Cut(self.ids[start:], self._release(at), True, "stop", s)
        if stop_at is not None:
            self._end("stop", self.ids[-1])
            return Cut(new, self._release(len(self.text)), True, "stop", self.stop_reason)
        return Cut(new, self._release(self._releasable()), False)

    def _find_stop(self) -> tuple[int, str] | None:
        """The earliest stop sequence in the text not yet released (the first listed on a tie)."""
        found = [(at, s) for s in self.spec.stop if (at := self.text.find(s, self.sent)) >= 0]
        return min(found, key=lambda f: f[0]) if found else None

    def _ids_through(self, end: int, lo: int) -> int:
        """The fewest ids (at least `lo`) whose text reaches `end` characters."""
        hi = len(self.ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.decode(self.ids[:mid])) >= end:
                hi = mid
            else:
                lo = mid + 1
        return hi

    def _end(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.done, self.finish_reason, self.stop_reason = True, reason, stop_reason

    def finish(self, engine_reason: str) -> str:
        """The engine finished the variation (`engine_reason`: its finish reason); returns the text still
        held back. The finish reason is then `finish_reason`."""
        if not self.done:
            self._decode_to(len(self.ids), flush=True)
            self.text = self.decode(self.ids)  # the whole text exactly as the engine's final decodes it
            self._end("length" if self.cut_tokens else engine_reason or "length")
        return self._release(len(self.final_text))

    @property
    def final_text(self) -> str:
        return self.stopped_text if self.stopped_text is not None else self.text

    @property
    def completion_tokens(self) -> int:
        """Ids returned, pad excluded."""
        return sum(t != self.pad_id for t in self.ids)

    # ---- backend events --------------------------------------------------------------------------------

    def on_canvas(self, ev: BackendEvent) -> BackendEvent:
        """A committed canvas event, cut: its ids up to the cut, and the text that became final."""
        cut = self.feed(ev.ids, ev.step)
        logprobs = None if ev.logprobs is None else ev.logprobs[:len(cut.ids)]
        if logprobs is not None:
            self.logprobs.append(logprobs)
        return dataclasses.replace(ev, ids=cut.ids, text=cut.text, logprobs=logprobs)

    def on_final(self, ev: BackendEvent | None, prompt_tokens: int = 0) -> BackendEvent:
        """The variation's final event: the engine's (`ev`), or one made here when the Stopper ended it early
        (its stats from the canvases seen). `tail` holds the text that no canvas event released."""
        tail = self.finish(ev.finish_reason if ev is not None else "")
        if ev is None:
            passes = sum(self.steps)
            stats = {"prompt_tokens": prompt_tokens, "generated_tokens": self.engine_tokens,
                     "decoder_passes": passes, "steps_per_canvas": list(self.steps),
                     "tokens_per_forward": self.engine_tokens / passes if passes else 0.0, "shared_decoder_passes": 0}
            ev = BackendEvent("final", [], "", -1, 0, stats)
        asked = bool(self.logprobs) or ev.logprobs is not None
        logprobs = Logprobs.join(self.logprobs)[:len(self.ids)] if asked else None  # the kept ids' (a prefix)
        return dataclasses.replace(ev, ids=list(self.ids), text=self.final_text, finish_reason=self.finish_reason,
                                   tail=tail, stop_reason=self.stop_reason, completion_tokens=self.completion_tokens,
                                   logprobs=logprobs)
