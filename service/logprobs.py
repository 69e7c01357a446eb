"""Per-token log-probabilities as the engine returns them: plain lists, shared by the engine, the Triton adapter and
the request layer (no torch here: the front imports it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Logprobs:
    """Per committed id, in order: its log-probability at the step its canvas was committed, and the likeliest
    ids there with theirs (largest first). Pinned positions were not sampled: 0.0 (see docs/api.md)."""

    token: list[float]  # [n]
    top_ids: list[list[int]]  # [n, k]
    top: list[list[float]]  # [n, k]

    def __len__(self) -> int:
        return len(self.token)

    def __getitem__(self, index: slice) -> "Logprobs":
        return Logprobs(self.token[index], self.top_ids[index], self.top[index])

    @staticmethod
    def join(parts: "list[Logprobs]") -> "Logprobs":
        return Logprobs([v for p in parts for v in p.token], [r for p in parts for r in p.top_ids],
                        [r for p in parts for r in p.top])


# Scoring (service/engine/scoring.py, docs/api.md "Score"): Monte Carlo samples (decoder passes) per canvas of
# continuation. Here, without torch, so the fronts validate with the engine's numbers.
DEFAULT_SCORE_SAMPLES = 8
MAX_SCORE_SAMPLES = 128
