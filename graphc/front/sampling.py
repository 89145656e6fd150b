"""How the next token is chosen from a decoder's last logits: greedy, or sampled.

The order is Hugging Face's and onnxruntime-genai's: the logits divided by the temperature, then
the ``top_k`` largest kept, then the smallest set of the most probable tokens whose probabilities
add up to ``top_p`` (the most probable token is always kept), then the tokens at least ``min_p``
times as probable as the most probable one, renormalized, one draw per batch row from a seeded
generator (``seed``: the same tokens on every run with the same model and machine).
Temperature 0 is greedy (the arg max), whatever ``top_k``/``top_p`` say. A repetition penalty,
greedy or sampled, first makes every token already in the row (prompt included) less likely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from graphc.core.errors import GraphcError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int = 0  # 0: every token
    top_p: float = 1.0  # 1: every token
    seed: int | None = None  # None: a fresh draw each run
    min_p: float = 0.0  # 0: every token; else those at least min_p times as probable as the likeliest

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise GraphcError(f"temperature={t!r}: a number >= 0 (0: greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise GraphcError(f"top_k={self.top_k!r}: a whole number >= 0 (0: every token)")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise GraphcError(f"top_p={p!r}: a number in (0, 1] (1: every token)")
        m = self.min_p
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m <= 1:
            raise GraphcError(f"min_p={m!r}: a number in [0, 1] (0: every token)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise GraphcError(f"seed={self.seed!r}: a whole number >= 0")

    def picker(self):
        """A function from logits [batch, vocab] to tokens [batch] (int64), drawing from one generator."""
        if self.temperature == 0:
            return greedy
        rng = np.random.default_rng(self.seed)

        def pick(logits: np.ndarray) -> np.ndarray:
            probs = self.probabilities(logits)
            u = rng.random((probs.shape[0], 1))
            # inverse CDF; the min keeps float rounding at the top end inside the vocabulary
            return np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), probs.shape[-1] - 1).astype(np.int64)

        return pick

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution each row is drawn from [batch, vocab] (float64, rows sum to 1)."""
        z = np.asarray(logits, dtype=np.float64) / self.temperature
        vocab = z.shape[-1]
        if 0 < self.top_k < vocab:
            kth = np.partition(z, vocab - self.top_k, axis=-1)[:, vocab - self.top_k][:, None]
            z = np.where(z >= kth, z, -np.inf)
        z = z - z.max(axis=-1, keepdims=True)
        probs = np.exp(z)
        probs /= probs.sum(axis=-1, keepdims=True)
        if self.top_p < 1:
            order = np.argsort(-probs, axis=-1, kind="stable")
            sorted_p = np.take_along_axis(probs, order, axis=-1)
            before = np.cumsum(sorted_p, axis=-1) - sorted_p  # the mass of the more probable tokens
            keep_sorted = before < self.top_p  # the first token always (0 before it)
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, axis=-1)
            probs = np.where(keep, probs, 0.0)
            probs /= probs.sum(axis=-1, keepdims=True)
        if self.min_p > 0:  # relative to the likeliest token: the most probable one always stays
            probs = np.where(probs >= self.min_p * probs.max(axis=-1, keepdims=True), probs, 0.0)
            probs /= probs.sum(axis=-1, keepdims=True)
        return probs


def greedy(logits: np.ndarray) -> np.ndarray:
    return np.asarray(logits).argmax(-1).astype(np.int64)


def check_repetition_penalty(penalty: float) -> float:
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not math.isfinite(penalty) or penalty <= 0:
        raise GraphcError(f"repetition_penalty={penalty!r}: a number > 0 (1: none)")
    return float(penalty)


def penalize_repeats(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """The logits [batch, vocab] with each row's already seen tokens (``seen`` [batch, n]: the
    prompt and what was generated) made less likely, as Hugging Face's and onnxruntime-genai's
    repetition penalty does: a positive logit divided by ``penalty``, a negative one multiplied."""
    out = np.array(logits, dtype=np.float32, copy=True)
    rows = np.arange(out.shape[0])[:, None]
    hit = out[rows, seen]
    out[rows, seen] = np.where(hit > 0, hit / penalty, hit * penalty)
    return out
