"""The `looped_gpt` trunk: the SP8192 frontier records' U-Net GPT (pg_mechanics.md §4.6, §6).

    x = tok_emb(ids) (-> input SmearGate, BOS-masked) -> RMSNorm = x0
    the virtual layer order splits in half: encoder positions push their outputs, decoder
        position j first merges skip j (LIFO): x <- lerp(w_j * skip, x, sigmoid(g_j))  (gated)
                                           or  x <- x + w_j * skip                    (plain)
    block l: x <- m0 x + m1 x0; x <- x + a * Attn(n(x) s_l); x <- x + c * MLP(n(x) s_l)
    RMSNorm -> tied head -> softcap

Looped layers (`model.loop`). Physical layers start..end run `passes` times in a row once looping
is on, e.g. 11 layers, 3..5 x 3: 0 1 2 [3 4 5] [3 4 5] [3 4 5] 6 7 8 9 10, 17 virtual layers,
encoder = the first 8 positions, decoder the other 9 (PR #1493 and every later record). Before
that the order is 0..10 (encoder 5, decoder 6). The skip tensors are sized for the looped order
(8) in both, as the record does; the plain order uses the first 5.

When looping turns on. The record switches it on once 35% of its wall-clock budget has passed
(`ENABLE_LOOPING_AT`), and at step/ITERATIONS >= 0.35 when it runs without a clock (its fixed-step
hyperparameter trials). pgolf uses the step rule always: looping is on for training steps
>= `loop.enable_at` x `train.max_steps` (0-based). A step count is the same for one process and
for eight (world-size independent), the same on any hardware, and the step is in every
checkpoint, so a resumed run switches at the same step (resumable, bitwise). The trainer tells the
model max_steps once, through `plan_training`; `training_loss` refuses to run before it. Evaluation,
TTT and the audit (`forward`) always run the looped order, the architecture the run ends with
(the record evaluates with looping on as well). A wall-clock-capped run that stops before
enable_at x max_steps has trained only the plain order: set train.max_steps to the steps the
budget allows (the record ran ~4,930 in 600 s on 8xH100).

Parallel residuals (`model.parallel`, from physical layer `start_layer` on):
- `two_lane` (PR #1530, the 1.0611 record from layer 8): two residual lanes, both starting as x.
  Attention reads m0 lane0 + m1 x0, the MLP reads lane1, both from the lanes before the block;
  lane0 <- r0 lane0 + p00 attn + p10 mlp, lane1 <- r1 lane1 + p01 attn + p11 mlp; skips merge
  into lane0; the final hidden state is the lanes' mean. r [L, 2] (init 1.1) and p [L, 2, 2]
  (init 1) exist for every layer, as in the record, whose parameter count (35,945,671) counts
  them; rows of layers before start_layer are never read. The layers from start_layer must be
  the decoder's last positions in both orders (checked when the recipe loads).
- `gptj` (PR #1412, the 04-06..04-09 records): both sublayers read the same normalised input,
  x <- x + a * Attn(n(x) s) + c * MLP(n(x) s) (after the resid mix); no extra parameters.

Sigmoid-gated skips (`model.skip_gates`, PR #1089; every record from 04-01): g_j [D] starts at
0, a 50/50 blend of the block input and the weighted skip.

Code read for all of it: records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_
9HpStack_1.0611/train_gpt.py (GPT.__init__, _forward_hidden, _parallel_block; our own code). Its
attention (XSA, sparse gate) and MLP (LeakyReLU^2) are registry parts (parts/xsa_attention.py,
parts/leaky_mlp.py), its SmearGate parts/input_smear.py. Settings: `model.loop`,
`model.parallel`, `model.skip_gates` (LoopedGPTConfig) and the shared `model.unet_skips`,
`model.resid_mix`, `model.ln_scale`, `model.init`, `model.input_smear`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig, constrained
from pipeline.model.base import LanguageModel, rms_norm, softcap
from pipeline.model.parts.input_smear import InputSmearGate
from pipeline.model.registry import register, resolve, settings
from pipeline.model.roles import set_roles


@dataclass(frozen=True)
class LoopConfig:
    """Physical layers start..end run `passes` times once training reaches enable_at x max_steps."""

    start: int = constrained(3, ge=0)  # LOOP_START
    end: int = constrained(5, ge=0)  # LOOP_END, inclusive
    passes: int = constrained(3, ge=2, le=16)  # NUM_LOOPS + 1: the record's NUM_LOOPS=2 runs the segment 3 times
    enable_at: float = constrained(0.35, ge=0, lt=1)  # fraction of train.max_steps (ENABLE_LOOPING_AT)


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel residuals from physical layer start_layer on."""

    start_layer: int = constrained(8, ge=0)  # PARALLEL_START_LAYER
    mode: Literal["two_lane", "gptj"] = "two_lane"
    resid_init: float = 1.1  # two_lane: r, the lanes' own residual scalars
    post_init: float = 1.0  # two_lane: p, how much each sublayer writes into each lane


@dataclass(frozen=True)
class LoopedGPTConfig:
    """Recipe keys model.<field> of the looped_gpt trunk."""

    loop: Optional[LoopConfig] = None  # absent = no looped segment
    parallel: Optional[ParallelConfig] = None  # absent = sequential blocks throughout
    skip_gates: bool = False  # sigmoid-gated U-Net skips (needs model.unet_skips)


settings(LoopedGPTConfig, omit_default=True)


def layer_order(num_layers: int, loop: Optional[LoopConfig], looped: bool) -> tuple[list[int], list[int]]:
    """(encoder, decoder) physical layer indices in virtual order."""
    if loop is None or not looped:
        order = list(range(num_layers))
    else:
        segment = list(range(loop.start, loop.end + 1))
        order = list(range(loop.start)) + segment * loop.passes + list(range(loop.end + 1, num_layers))
    half = len(order) // 2
    return order[:half], order[half:]


class LoopedBlock(nn.Module):
    """One physical layer: sequential, GPT-J parallel, or the two-lane form's two branches."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, parallel: Optional[str]):
        super().__init__()
        D = cfg.model_dim
        self.attn = resolve("attention", cfg.attention)(cfg, layer_idx)
        self.mlp = resolve("mlp", cfg.mlp)(cfg, layer_idx)
        self.attn_scale = nn.Parameter(torch.ones(D))
        self.mlp_scale = nn.Parameter(torch.ones(D))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(D), torch.zeros(D)))) if cfg.resid_mix else None
        set_roles(self, control=("attn_scale", "mlp_scale", "resid_mix"))
        self.parallel = parallel  # None, "gptj" or "two_lane"
        # LN scale (PR #315): by physical layer, so every pass of a looped layer uses its own factor.
        self.norm_scale = 1.0 / math.sqrt(layer_idx + 1) if cfg.ln_scale else 1.0

    def mix(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        if self.resid_mix is None:
            return x
        mix = self.resid_mix.to(x.dtype)
        return mix[0] * x + mix[1] * x0

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        x = self.mix(x, x0)
        if self.parallel == "gptj":
            n = rms_norm(x) * self.norm_scale
            return x + self.attn_scale.to(x.dtype) * self.attn(n) + self.mlp_scale.to(x.dtype) * self.mlp(n)
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * self.norm_scale)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.norm_scale)

    def branches(self, lane0: torch.Tensor, lane1: torch.Tensor, x0: torch.Tensor):
        """Two-lane form: attention on the mixed lane 0, the MLP on lane 1 (no mix), both scaled."""
        a = self.attn(rms_norm(self.mix(lane0, x0)) * self.norm_scale)
        m = self.mlp(rms_norm(lane1) * self.norm_scale)
        return self.attn_scale.to(a.dtype) * a, self.mlp_scale.to(m.dtype) * m


def structure_problems(m: ModelConfig) -> list[tuple[list[str], str]]:
    """The trunk's cross-field rules: the loop segment and the parallel layers fit the model."""
    out = []
    L, loop, par = m.num_layers, m.loop, m.parallel
    if loop is not None and not loop.start <= loop.end < L:
        out.append((["model.loop.start", "model.loop.end", "model.num_layers"],
                    f"model.loop: start ({loop.start}) <= end ({loop.end}) < num_layers ({L}) must hold."))
        return out
    if m.skip_gates and not m.unet_skips:
        out.append((["model.skip_gates", "model.unet_skips"],
                    "model.skip_gates gates the U-Net skips, which model.unet_skips: false removes; set one of them "
                    "back."))
    if par is not None and par.start_layer >= L:
        out.append((["model.parallel.start_layer", "model.num_layers"],
                    f"model.parallel.start_layer ({par.start_layer}) is not a layer of the {L}-layer model."))
    elif par is not None and par.mode == "two_lane":
        for looped in (False, True) if loop is not None else (False,):
            enc, dec = layer_order(L, loop, looped)
            lanes = [i >= par.start_layer for i in dec]
            first = lanes.index(True) if any(lanes) else len(lanes)
            # Once the lanes exist every later position must update them (a sequential block
            # there would read a stale stream), and an encoder block has no lanes to read.
            if any(i >= par.start_layer for i in enc) or not all(lanes[first:]):
                out.append((["model.parallel.start_layer", "model.num_layers", "model.loop"],
                            f"model.parallel.start_layer ({par.start_layer}): the two-lane layers must be the "
                            f"decoder's last positions, but the {'looped' if looped else 'plain'} order is encoder "
                            f"{enc}, decoder {dec}; raise start_layer or move the loop."))
                break
    return out


def _structure_check(m: ModelConfig, ok) -> list[tuple[list[str], str]]:
    if not ok("model.num_layers", "model.loop", "model.parallel", "model.skip_gates", "model.unet_skips"):
        return []
    return structure_problems(m)


class LoopedGPT(LanguageModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        problems = structure_problems(cfg)
        if problems:
            raise ValueError(" ".join(msg for _, msg in problems))
        self.config = cfg
        D, L = cfg.model_dim, cfg.num_layers
        self.tok_emb = nn.Embedding(cfg.vocab_size, D)
        self.smear = InputSmearGate(cfg.input_smear, D) if cfg.input_smear else None
        par = cfg.parallel
        self.blocks = nn.ModuleList(
            LoopedBlock(cfg, i, par.mode if par is not None and i >= par.start_layer else None) for i in range(L))
        self.loop = cfg.loop
        self.orders = {False: layer_order(L, cfg.loop, False), True: layer_order(L, cfg.loop, True)}
        enc, dec = self.orders[cfg.loop is not None]  # skips are sized for the longest order
        self.num_skips = min(len(enc), len(dec)) if cfg.unet_skips else 0
        self.skip_weights = nn.Parameter(torch.ones(self.num_skips, D)) if self.num_skips else None
        self.skip_gates = nn.Parameter(torch.zeros(self.num_skips, D)) if self.num_skips and cfg.skip_gates else None
        two_lane = par is not None and par.mode == "two_lane"
        self.lane_post = nn.Parameter(torch.full((L, 2, 2), par.post_init)) if two_lane else None
        self.lane_resid = nn.Parameter(torch.full((L, 2), par.resid_init)) if two_lane else None
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(D, cfg.vocab_size, bias=False)
        set_roles(self, control=("skip_weights", "lane_post", "lane_resid"), gate=("skip_gates",))
        if self.lm_head is not None:
            set_roles(self.lm_head, head=("weight",))
        self._loop_from_step: Optional[int] = None
        self._init_weights()

    def _init_weights(self) -> None:
        cfg = self.config
        if self.tok_emb.weight.is_meta:
            return
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        if self.lm_head is not None:
            nn.init.zeros_(self.lm_head.weight)
        if cfg.init == "orthogonal":
            # The record: orthogonal for every >= 64 x 64 matrix that is not zero-initialised (q, k,
            # v, MLP up); output projections stay zero (its 1/sqrt(2L) factor multiplies zeros).
            for mod in self.modules():
                if isinstance(mod, nn.Linear) and min(mod.weight.shape) >= 64 and mod is not self.lm_head \
                        and not getattr(mod.weight, "_pgolf_zero_init", False):
                    nn.init.orthogonal_(mod.weight, gain=1.0)
        elif cfg.init != "default":
            raise ValueError(f"model.init must be 'default' or 'orthogonal', got {cfg.init!r}")

    # ------------------------------------------------------------------ the loop schedule
    def plan_training(self, max_steps: int) -> None:
        """Looping is on for training steps >= enable_at x max_steps (the record's fixed-step rule)."""
        if self.loop is not None:
            self._loop_from_step = math.ceil(self.loop.enable_at * max_steps)

    def looped_at(self, step: int) -> bool:
        if self.loop is None:
            return False
        if self._loop_from_step is None:
            raise RuntimeError("looped_gpt: training_loss before plan_training(max_steps); the trainer calls it "
                               "once, so that model.loop.enable_at has a step to count from")
        return step >= self._loop_from_step

    # ------------------------------------------------------------------ forward
    def _merge_skip(self, x: torch.Tensor, skip: torch.Tensor, j: int) -> torch.Tensor:
        scaled = self.skip_weights[j].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + scaled
        return torch.lerp(scaled, x, torch.sigmoid(self.skip_gates[j].to(x.dtype)))

    def hidden(self, ids: torch.Tensor, looped: Optional[bool] = None) -> torch.Tensor:
        """The final normalised hidden state [B, T, D]; `looped` None: the evaluation order."""
        if looped is None:
            looped = self.loop is not None
        x = self.tok_emb(ids)
        if self.smear is not None:
            x = self.smear(x, ids)
        x = rms_norm(x)
        x0 = x
        encoder, decoder = self.orders[looped]
        skips: list[torch.Tensor] = []
        for i in encoder:
            x = self.blocks[i](x, x0)
            if self.num_skips:
                skips.append(x)
        lanes = None
        for j, i in enumerate(decoder):
            block = self.blocks[i]
            if block.parallel == "two_lane" and lanes is None:
                lanes = (x, x)
            if j < self.num_skips and skips:
                if lanes is None:
                    x = self._merge_skip(x, skips.pop(), j)
                else:
                    lanes = (self._merge_skip(lanes[0], skips.pop(), j), lanes[1])
            if lanes is None:
                x = block(x, x0)
            else:
                a, m = block.branches(lanes[0], lanes[1], x0)
                r, p = self.lane_resid[i].to(lanes[0].dtype), self.lane_post[i].to(lanes[0].dtype)
                lanes = (r[0] * lanes[0] + p[0, 0] * a + p[1, 0] * m, r[1] * lanes[1] + p[0, 1] * a + p[1, 1] * m)
        if lanes is not None:
            x = 0.5 * (lanes[0] + lanes[1])
        return rms_norm(x)

    def logits(self, ids: torch.Tensor, looped: Optional[bool]) -> torch.Tensor:
        h = self.hidden(ids, looped)
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        return softcap((h @ weight.to(h.dtype).t()).float(), self.config.logit_softcap)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Scoring, TTT and the audit: the looped order whenever the model has one."""
        return self.logits(ids, None)

    def training_loss(self, ids: torch.Tensor, targets: torch.Tensor, step: int = 0):
        logits = self.logits(ids, self.looped_at(step))
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1)), {}


@register("trunk", "looped_gpt", kinds=("attention", "mlp"),
          reads=("unet_skips", "resid_mix", "ln_scale", "init", "loop", "parallel", "skip_gates", "input_smear"),
          check=_structure_check)
def looped_gpt(cfg: ModelConfig) -> LanguageModel:
    return LoopedGPT(cfg)
