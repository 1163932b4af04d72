"""Choosing the next token from logits (greedy, temperature, top-k, top-p) and rendering a
chat prompt with the tokenizer's chat template."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["Sampler", "render_chat"]


class Sampler:
    """``temperature`` 0 is greedy; otherwise softmax(logits / T) restricted to the ``top_k``
    most likely tokens and then to the smallest set whose probability reaches ``top_p``."""

    def __init__(self, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0):
        if not temperature >= 0:
            raise ValueError(f"--temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"--top-k must be >= 1 (or 0/None for all tokens), got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
        self.temperature, self.top_k, self.top_p = float(temperature), top_k, top_p
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        z = np.asarray(logits, dtype=np.float64) / self.temperature
        if self.top_k is not None and self.top_k < z.size:
            kth = np.partition(z, -self.top_k)[-self.top_k]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.top_p is not None and self.top_p < 1:
            order = np.argsort(-p, kind="stable")
            csum = np.cumsum(p[order])
            keep = order[:int(np.searchsorted(csum, self.top_p)) + 1]  # first index reaching top_p
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return p

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        p = self.probabilities(logits)
        return int(self.rng.choice(p.size, p=p))


def render_chat(template: str, messages: Sequence[Mapping[str, str]], settings: Mapping[str, Any],
                add_generation_prompt: bool = True) -> str:
    """The chat prompt text, rendered the way transformers renders chat templates
    (``rustane.chat_template``)."""
    from rustane.chat_template import render

    return render(template, messages, settings, add_generation_prompt=add_generation_prompt)
