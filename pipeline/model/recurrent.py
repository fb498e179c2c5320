"""The `depth_recurrent` trunk: PR #298's 3 shared blocks run for 3 passes, with all its extras.

Build with `build_model(ModelConfig.of(trunk="depth_recurrent", ...))`; every extra is switched by
`model.recurrent` (RecurrentConfig), and the published future leak by `model.leaky_selective_state`.
The trunk reads those two, `model.rope`, `model.qk_gain_init`, `model.unet_skips`,
`model.resid_mix` and resolves only an `mlp` part: a recipe setting anything else of the unet_gpt
family (bigram, sidecar, k_gain, ..., an attention or residual part) is refused when it loads.
The forward pass (seed_prs.md §2.1, in this order; x is [B, T, D], P passes of N blocks):

    x0 = RMSNorm(tok_emb[ids] + value_embeds[ids])            value_embeds: second table, init 0
    x_prev = detach(x0)
    for p in 0..P-1:
        x <- x + s_p [cos(t f_p), cos(t f_p)] * x            `resonant`
        p >= 1: x <- x + sigmoid(g_p) GRU(S)                  `selective_state` -> S, `gru`
        p >= 1: x <- x + c_prev(t) C_p                        `confidence`
        x <- x + m_p |x - x_prev|                             `grad_memory`
        x_in = detach(x)
        blocks 0..N-1 with U-Net skips and control set p*N+l  `blocks`, `control`, `skip_weight`
        p >= 1: x <- x + Delta, Delta = sigmoid(a_p)(B A x - x_in)   `td` (+ 0.001 mean Delta^2)
        x_prev = x_in;  S = SelectiveState(x)
        p < P-1: g = sigmoid(w x_t + b); x <- value x, gradient g   `exit_proj` (+ 0.005 mean H(g))
                 c_prev = detach(g)
    logits = softcap(RMSNorm(x) tok_emb^T, 30)

`training_loss` adds the thermodynamic entropy bonus weight * (-T(k) * mean softmax entropy),
T(k) = t0 exp(-k / tau), to cross-entropy and the two auxiliary terms.

Causality: everything is per position or causal, except PR #298's Selective State, which
averaged over the whole window. The default here is the causal prefix mean; the leaky mean is
reproduced only with `leaky_selective_state: true`, and then `model.causal` is False.

At D = 768, V = 1024, 8/2 heads, MLP 2x, rank-32 K this is exactly 12,836,767 parameters, the
count of PR #298's code. Per-pass tensors are sized P even where pass 0 never reads them (GRU
gate, C_0, alpha_0), as in #298, to keep that count and state-dict layout; those rows get
zero gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import MAX_WIDTH, ModelConfig, constrained
from pipeline.model.base import LanguageModel, rms_norm, softcap
from pipeline.model.parts.attention import zero_init
from pipeline.model.parts.rotary import rope_problems
from pipeline.model.recurrent_parts import (
    ConfidenceConditioning,
    ExitGate,
    GradientMemory,
    GRUCarry,
    PassLayerControl,
    RecurrentBlock,
    ResonantPE,
    SelectiveState,
    TemporalDifference,
    binary_entropy,
    gate_gradient,
)
from pipeline.model.registry import register, settings
from pipeline.model.roles import set_roles


@dataclass(frozen=True)
class RecurrentConfig:
    """PR #298's depth-recurrent trunk (3 unique blocks x 3 passes) and its extras: model.recurrent.*"""

    unique_layers: int = constrained(3, ge=1, le=256)
    passes: int = constrained(3, ge=1, le=256)
    k_rank: int = constrained(32, ge=1, le=MAX_WIDTH)  # low-rank key projection D -> r -> kv_dim
    td_rank: int = constrained(16, ge=1, le=MAX_WIDTH)  # temporal-difference low-rank path
    gru_rank: int = constrained(16, ge=1, le=MAX_WIDTH)  # selective-state GRU low-rank gates
    value_embeds: bool = True  # second, zero-initialised input table
    spectral_embed_init: bool = True  # tok_emb ~ N(0, (0.1/sqrt(D))^2)
    resonant_pe: bool = True
    selective_state: bool = True
    confidence: bool = True
    grad_memory: bool = True
    temporal_difference: bool = True
    td_loss_weight: float = constrained(0.001, ge=0)
    exit_gate: bool = True
    exit_gate_bias_init: float = 2.0
    exit_gate_loss_weight: float = constrained(0.005, ge=0)
    # Thermodynamic entropy term: loss += weight * (-T(k) * mean entropy), T(k)=t0*exp(-k/tau).
    thermo: bool = True
    thermo_weight: float = constrained(0.05, ge=0)
    thermo_t0: float = constrained(0.5, ge=0)
    thermo_tau: float = constrained(5000.0, gt=0)


@dataclass(frozen=True)
class RecurrentTrunkConfig:
    """Recipe key model.leaky_selective_state of this trunk."""

    # PR #298's published Selective State is a mean over *all* positions: a future leak.
    # Off = causal prefix mean. On = reproduce the leak; every report marks the run non-causal.
    leaky_selective_state: bool = False


settings(RecurrentConfig, section="recurrent")
settings(RecurrentTrunkConfig)


def thermo_temperature(step, rc: RecurrentConfig, device=None) -> torch.Tensor:
    """T(k) = t0 exp(-k / tau): PR #298's annealed "temperature" (0.5 -> ~0.13 by step 7000).

    A 0-d tensor, not a Python float: under torch.compile the step is a symbolic int, and
    math.exp on it would pin the graph to each step's value (a recompile every step)."""
    k = torch.scalar_tensor(step, dtype=torch.float32, device=device)
    return rc.thermo_t0 * torch.exp(-k / rc.thermo_tau)


def mean_softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of H(softmax(logits)), in fp32 (the softcapped logits, as #298 does)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


def thermo_term(logits: torch.Tensor, step: int, rc: RecurrentConfig) -> torch.Tensor:
    """weight * (-T(k) * H): an entropy *bonus* (a confidence penalty), -0.025 H at step 0.

    #298 names it free-energy minimisation; in effect it rewards spread-out predictions early in
    training and fades with T(k). Its "compression" loss (+0.05 H) sat in an `elif` behind this
    one and never ran, so it is not reproduced."""
    return rc.thermo_weight * (-thermo_temperature(step, rc, logits.device) * mean_softmax_entropy(logits))


class DepthRecurrentGPT(LanguageModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        rc = cfg.recurrent
        D, V = cfg.model_dim, cfg.vocab_size
        P, N = rc.passes, rc.unique_layers
        self.passes, self.unique_layers = P, N
        self.tok_emb = nn.Embedding(V, D)
        # #298's "value embeddings" are an untied additive input table, not modded-nanogpt's
        # value-stream embeddings: they let the input embedding drift from the tied head.
        self.value_embeds = nn.Embedding(V, D) if rc.value_embeds else None
        self.blocks = nn.ModuleList(RecurrentBlock(cfg, i) for i in range(N))
        self.control = PassLayerControl(P * N, D, resid_mix=cfg.resid_mix)
        # U-Net skips inside each pass: the first N // 2 blocks push, the next ones pop (LIFO);
        # one weight vector per (pass, skip), init 1. N = 3 gives one skip, into layer 1.
        self.num_encoder = N // 2 if cfg.unet_skips else 0
        num_skips = min(self.num_encoder, N - self.num_encoder)
        self.skip_weight = nn.Parameter(torch.ones(P, num_skips, D)) if num_skips else None
        self.resonant = ResonantPE(P, D) if rc.resonant_pe else None
        self.selective_state = SelectiveState(leaky=cfg.leaky_selective_state) if rc.selective_state else None
        self.gru = GRUCarry(P, D, rc.gru_rank) if rc.selective_state else None
        self.confidence = ConfidenceConditioning(P, D) if rc.confidence else None
        self.grad_memory = GradientMemory(P, D) if rc.grad_memory else None
        self.td = TemporalDifference(P, D, rc.td_rank) if rc.temporal_difference else None
        self.exit_proj = ExitGate(D, rc.exit_gate_bias_init) if rc.exit_gate else None
        self.lm_head = None if cfg.tie_embeddings else zero_init(nn.Linear(D, V, bias=False))
        set_roles(self, control=("skip_weight",))
        if self.lm_head is not None:
            set_roles(self.lm_head, head=("weight",))
        self._init_weights()

    def _init_weights(self) -> None:
        cfg = self.config
        if self.tok_emb.weight.is_meta:  # shapes only (`pgolf check`): nothing to draw
            return
        # Spectral embed init (#298 #7): std 0.1 / sqrt(D), about 0.0036 at D = 768.
        std = 0.1 / math.sqrt(cfg.model_dim) if cfg.recurrent.spectral_embed_init else cfg.tied_embed_init_std
        nn.init.normal_(self.tok_emb.weight, std=std)
        if self.value_embeds is not None:
            nn.init.zeros_(self.value_embeds.weight)

    @property
    def causal(self) -> bool:
        return not (self.config.leaky_selective_state and self.selective_state is not None)

    # ------------------------------------------------------------------ the trunk
    def _pass_blocks(self, x: torch.Tensor, x0: torch.Tensor, p: int) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for layer, block in enumerate(self.blocks):
            dec = layer - self.num_encoder
            if self.skip_weight is not None and 0 <= dec < self.skip_weight.size(1) and skips:
                x = x + self.skip_weight[p, dec].to(x.dtype) * skips.pop()
            x = block(x, x0, *self.control(p * self.unique_layers + layer))
            if layer < self.num_encoder:
                skips.append(x)
        return x

    def _run(self, ids: torch.Tensor):
        """(logits, sum of mean Delta^2 over TD passes, sum of mean gate entropy over gates).

        Pure: every carried quantity (S, c_prev, x_prev) is local to this call."""
        x = self.tok_emb(ids)
        if self.value_embeds is not None:
            x = x + self.value_embeds(ids)
        x = rms_norm(x)
        x0 = x
        x_prev = x0.detach()
        state = c_prev = None
        td_sq = x.new_zeros((), dtype=torch.float32)
        gate_h = x.new_zeros((), dtype=torch.float32)
        for p in range(self.passes):
            if self.resonant is not None:
                x = self.resonant(x, p)
            if self.gru is not None and state is not None:
                x = x + self.gru(state, p)
            if self.confidence is not None and c_prev is not None:
                x = x + self.confidence(c_prev, p).to(x.dtype)
            if self.grad_memory is not None:
                x = x + self.grad_memory(x, x_prev, p)
            x_in = x.detach()
            x = self._pass_blocks(x, x0, p)
            if self.td is not None and p > 0:
                delta = self.td(x, x_in, p)
                x = x + delta
                td_sq = td_sq + delta.float().square().mean()
            x_prev = x_in
            last = p == self.passes - 1
            # The state is read after TD and before the exit gate, as in #298: the gate only
            # rescales gradient, and S must keep its full gradient path. The last pass has no
            # reader for S, so it is not computed there.
            if self.selective_state is not None and not last:
                state = self.selective_state(x)
            if self.exit_proj is not None and not last:
                g = self.exit_proj(x)
                gate_h = gate_h + binary_entropy(g).mean()
                c_prev = g.detach()
                x = gate_gradient(x, g)
        h = rms_norm(x)
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = softcap((h @ weight.to(h.dtype).t()).float(), self.config.logit_softcap)
        return logits, td_sq, gate_h

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._run(ids)[0]

    def training_loss(self, ids: torch.Tensor, targets: torch.Tensor, step: int = 0):
        """CE + TD aux + gate-entropy aux + thermodynamic term; the dict holds each weighted term,
        so loss == ce + td_aux + gate_aux + thermo."""
        rc = self.config.recurrent
        logits, td_sq, gate_h = self._run(ids)
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        td_aux = rc.td_loss_weight * td_sq
        gate_aux = rc.exit_gate_loss_weight * gate_h
        thermo = thermo_term(logits, step, rc) if rc.thermo else torch.zeros_like(ce)
        loss = ce + td_aux + gate_aux + thermo
        # One host sync for all four diagnostics instead of four.
        values = torch.stack([ce, td_aux, gate_aux, thermo]).detach().float().tolist()
        return loss, dict(zip(("ce", "td_aux", "gate_aux", "thermo"), values))


@register("trunk", "depth_recurrent", kinds=("mlp",),
          reads=("unet_skips", "resid_mix", "rope", "qk_gain_init", "recurrent", "leaky_selective_state"),
          check=rope_problems)
def depth_recurrent(cfg: ModelConfig) -> LanguageModel:
    return DepthRecurrentGPT(cfg)
