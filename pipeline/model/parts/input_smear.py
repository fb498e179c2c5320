"""The input-dependent SmearGate with the BOS fix: each token's embedding takes in a gated share of
the previous token's, never across a document boundary.

    x_t <- x_t + lambda * sigmoid(w . x_t[:window]) * x_{t-1} * [id_t != BOS]      (t >= 1)

on the raw token embedding, before the embedding RMSNorm; w [1, window] and lambda start at zero,
so the gate is the identity at init. Sources (pg_mechanics.md §4.6, "SmearGate, third
generation"): the input-dependent form is modded-nanogpt's, brought in by PR #1667
(records/track_10min_16mb/2026-04-16_SmearGate_AttentionOutputGate_ScoreFirstTTT); the BOS mask is
PR #1851's fix, kept by the 1.0611 record (…_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611,
`GPT._forward_hidden`; written here in our own words). Without the mask, in a packed stream the
last token of document N leaks into the BOS that starts document N+1, so the first prediction of
every document depends on the previous one: causal, but document-dependent, which a scorer that
evaluates documents independently would not see (tests/test_frontier.py shows both).

Settings: `model.input_smear` (InputSmearConfig; absent = off), read by the `looped_gpt` trunk,
which calls the gate with the token ids. `mask_bos: false` reproduces PR #1667's unmasked gate.
Roles: w is a `gate` (the record trains it with the scalar Adam, not Muon), lambda `control`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import MAX_VOCAB, MAX_WIDTH, constrained
from pipeline.model.parts.attention import zero_init
from pipeline.model.registry import settings
from pipeline.model.roles import set_roles


@dataclass(frozen=True)
class InputSmearConfig:
    """The input-dependent SmearGate (PR #1667) with PR #1851's BOS mask."""

    window: int = constrained(12, ge=1, le=MAX_WIDTH)  # leading embedding channels that feed the gate
    mask_bos: bool = True  # false: PR #1667's gate, which smears across document boundaries
    # The challenge's shards put BOS at id 1 (pad 0 / bos 1 / eos 2 / unk 3; pipeline.data.tokenizer).
    bos_id: int = constrained(1, ge=0, lt=MAX_VOCAB)


@dataclass(frozen=True)
class InputSmearSettings:
    input_smear: Optional[InputSmearConfig] = None  # absent = no smear


settings(InputSmearSettings, omit_default=True)


class InputSmearGate(nn.Module):
    def __init__(self, cfg: InputSmearConfig, model_dim: int):
        super().__init__()
        if cfg.window > model_dim:
            raise ValueError(f"input_smear.window {cfg.window} exceeds model_dim {model_dim}")
        self.window, self.mask_bos, self.bos_id = cfg.window, cfg.mask_bos, cfg.bos_id
        self.gate = zero_init(nn.Linear(cfg.window, 1, bias=False))
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        set_roles(self, gate=("gate.weight",), control=("smear_lambda",))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] (the raw token embeddings of `ids` [B, T]) -> the smeared embeddings."""
        cur = x[:, 1:]
        g = self.smear_lambda.to(x.dtype) * torch.sigmoid(F.linear(cur[..., :self.window],
                                                                   self.gate.weight.to(x.dtype)))
        prev = x[:, :-1]
        if self.mask_bos:
            prev = prev * (ids[:, 1:] != self.bos_id).to(x.dtype).unsqueeze(-1)
        return torch.cat((x[:, :1], cur + g * prev), dim=1)
