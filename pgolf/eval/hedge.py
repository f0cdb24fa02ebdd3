"""The Hedge mixer of the #430 line, made legal (docs/records/hedge-stack.md §5.6-5.7).

Experts, each a full distribution over the V token ids (V from the model / tokenizer, never from
the data), built only from tokens already scored:
- neural: softmax of the model's soft-capped logits;
- unigram: (u + a) / (n + a V);
- bigram: (C[x_t] + a) / (R[x_t] + a V);
- hashed trigram: (T[h] + a) / (R_T[h] + a V), h = hash(x_{t-1}, x_t) mod buckets: the key holds
  context only, and an empty bucket gives the uniform distribution (no max(R, 1) clamp).
The mixture p = sum_k w_k p_k with w = softmax(log-weights); the score is -log p(y). Only after a batch
is scored do the count tables take its tokens and the weights move by Hedge, l_k -= eta * mean
-log p_k(y) over the scored tokens. `assert_normalised` refuses any expert (and the mixture) whose
rows do not sum to 1. The mixer rides on score-first SGD TTT (set `ttt.sgd_epochs=0` for a frozen model).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pgolf.eval.legality import assert_normalised
from pgolf.eval.sgd_ttt import SGDTTT

EXPERTS = ("neural", "unigram", "bigram", "trigram")


def trigram_bucket(prev2: torch.Tensor, prev1: torch.Tensor, buckets: int) -> torch.Tensor:
    """((x_{t-1} * 36313) XOR (x_t * 27191)) mod buckets: the #430 hash (context only)."""
    return torch.bitwise_xor(prev2 * 36313, prev1 * 27191) % buckets


class HedgeMixer:
    """Count tables and Hedge weights; all state changes go through `update` (after scoring)."""

    def __init__(self, vocab_size: int, *, alpha: float = 0.1, eta: float = 0.1, buckets: int = 65_536,
                 neural_prior: float = 2.0, device: torch.device | str = "cpu"):
        V = vocab_size
        self.V, self.alpha, self.eta, self.buckets = V, alpha, eta, buckets
        self.uni = torch.zeros(V, dtype=torch.float64, device=device)
        self.big = torch.zeros(V, V, dtype=torch.float32, device=device)  # counts < 2^24 stay exact
        self.big_rows = torch.zeros(V, dtype=torch.float64, device=device)
        self.tri = torch.zeros(buckets, V, dtype=torch.float32, device=device)
        self.tri_rows = torch.zeros(buckets, dtype=torch.float64, device=device)
        self.logw = torch.zeros(len(EXPERTS), dtype=torch.float64, device=device)
        self.logw[0] = neural_prior

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logw, 0)  # (4,) on the simplex

    def experts(self, logp_neural: torch.Tensor, prev2: torch.Tensor, prev1: torch.Tensor) -> torch.Tensor:
        """(M, V) neural log-probs and the contexts (M,) -> (4, M, V) float64 probabilities."""
        a, V = self.alpha, self.V
        p_uni = ((self.uni + a) / (self.uni.sum() + a * V)).expand(prev1.numel(), V)
        p_big = (self.big[prev1].double() + a) / (self.big_rows[prev1] + a * V)[:, None]
        h = trigram_bucket(prev2, prev1, self.buckets)
        p_tri = (self.tri[h].double() + a) / (self.tri_rows[h] + a * V)[:, None]  # empty bucket: uniform
        return torch.stack([logp_neural.double().exp(), p_uni, p_big, p_tri])

    def mix(self, p: torch.Tensor) -> torch.Tensor:
        """(4, M, V) expert distributions -> (M, V) log of the normalised mixture; refuses bad experts."""
        for k, name in enumerate(EXPERTS):
            assert_normalised(p[k], vocab_size=self.V, what=f"hedge expert {name!r}")
        mixture = torch.einsum("k,kmv->mv", self.weights(), p)
        assert_normalised(mixture, vocab_size=self.V, what="hedge mixture")
        return mixture.log()

    def expert_nll(self, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(4, M, V), (M,) -> (4, M) -log p_k(y)."""
        return -p.gather(2, y.expand(len(EXPERTS), -1)[..., None]).squeeze(-1).log()

    def update_tables(self, prev2: torch.Tensor, prev1: torch.Tensor, y: torch.Tensor) -> None:
        ones = torch.ones_like(y, dtype=torch.float64)
        self.uni.index_add_(0, y, ones)
        self.big.index_put_((prev1, y), ones.float(), accumulate=True)
        self.big_rows.index_add_(0, prev1, ones)
        h = trigram_bucket(prev2, prev1, self.buckets)
        self.tri.index_put_((h, y), ones.float(), accumulate=True)
        self.tri_rows.index_add_(0, h, ones)

    def update_weights(self, nll: torch.Tensor) -> None:
        """Hedge: l_k -= eta * mean loss_k over the scored tokens."""
        self.logw -= self.eta * nll.mean(1)


class HedgeTTT(SGDTTT):
    """Score-first SGD TTT whose scores come from the normalised Hedge mixture."""
    name = "hedge"

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        tc = self.tc
        self.mixer = HedgeMixer(self.V, alpha=tc.hedge_alpha, eta=tc.hedge_eta, buckets=tc.hedge_trigram_buckets,
                                neural_prior=tc.hedge_neural_prior, device=self.device)
        self.tok = torch.from_numpy(self.tokens).to(self.device)  # (N+1,)
        self._experts: torch.Tensor | None = None  # (4, M, V) of the batch being scored

    def contexts(self, pos: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_{t-1}, x_t) of target positions t (token 0 before the stream's start)."""
        pos = torch.as_tensor(pos, device=self.device).reshape(-1)
        prev1 = self.tok[pos]
        prev2 = torch.where(pos > 0, self.tok[(pos - 1).clamp_min(0)], torch.zeros_like(prev1))
        return prev2, prev1

    def distribution(self, logits: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        B, K, V = logits.shape
        p = self.mixer.experts(self.neural(logits).reshape(B * K, V), *self.contexts(positions))  # (4, BK, V)
        self._experts = p
        return self.mixer.mix(p).reshape(B, K, V)

    def after_score_batch(self, pos: np.ndarray, y: torch.Tensor, nll: torch.Tensor, valid: np.ndarray) -> None:
        """Only now may the tables and the weights see the batch's tokens (condition 3); after the
        deadline's fallback the mixer stays as it is."""
        assert self._experts is not None  # distribution() ran on this batch
        p = self._experts[:, torch.from_numpy(valid.reshape(-1)).to(self.device)]  # (4, M, V) scored rows
        self._experts = None
        if self.adapting():
            self.mix_update(pos, y, p)

    def mix_update(self, pos: np.ndarray, y: torch.Tensor, p: torch.Tensor | None) -> None:
        """Hedge weights from the experts' losses at the scored targets, then the count tables.

        The update's outcomes are the scored targets `pos`; their contexts x_t, x_{t-1} are inputs
        (the strict prefix of every later position this rank scores), as in a scoring window."""
        self.stream.declare_update(pos)
        if p is not None:
            self.mixer.update_weights(self.mixer.expert_nll(p, y))
        self.mixer.update_tables(*self.contexts(pos), y)
