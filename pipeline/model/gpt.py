"""The `unet_gpt` trunk: the challenge baseline's GPT, with every PR #684 part as an option.

    tok_emb (+ BigramHash) -> RMSNorm (-> SmearGate) = x0
    encoder blocks 0..E-1 push their outputs; decoder block i first adds w_i * skip (LIFO)
    each block: x <- m0 x + m1 x0; x <- x + a * Attn(norm(x) s); x <- x + c * MLP(norm(x) s)
      (m = resid_mix raw, or normalised over its two sources by `model.mix_normalizer`;
       "x + ..." is the registry residual part, `standard` by default)
    (optional shared sidecar after its site blocks)
    RMSNorm -> tied head -> softcap

E = num_layers // 2 (baseline 4 of 9, #684 5 of 11). Attention / MLP / residual are registry
parts; the trunk knows nothing of any one entry. Build with `build_model(cfg.model)`.

Settings: `model.unet_skips`, `model.resid_mix` (TrunkConfig, pipeline/model/base.py) and
UNetConfig's `model.ln_scale`, `model.smear_gate`, `model.bigram`, `model.sidecar`,
`model.init`, plus whatever the chosen attention / mlp / residual / normalizer parts read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.model.base import LanguageModel, rms_norm, softcap
from pipeline.model.parts.embeddings import BigramConfig, BigramHash, SmearGate
from pipeline.model.parts.sidecar import SharedSparseSidecar, SidecarConfig
from pipeline.model.registry import register, resolve, settings
from pipeline.model.roles import set_roles


@dataclass(frozen=True)
class UNetConfig:
    """Recipe keys model.<field> of the unet_gpt trunk: PR #684's input and depth extras."""

    ln_scale: bool = False  # norm output scaled by 1/sqrt(layer+1) (PR #315)
    smear_gate: bool = False  # static per-channel blend with the previous position
    bigram: Optional[BigramConfig] = None  # BigramHash input embedding (absent = off)
    sidecar: Optional[SidecarConfig] = None  # the shared sidecar after its site blocks (absent = off)
    # Weight init: "default" (PyTorch + zero-init output projections) or "orthogonal"
    # (#684: orthogonal for >=64x64 linears, .proj scaled by 1/sqrt(2L)).
    init: Literal["default", "orthogonal"] = "default"


settings(UNetConfig)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        D = cfg.model_dim
        self.attn = resolve("attention", cfg.attention)(cfg, layer_idx)
        self.mlp = resolve("mlp", cfg.mlp)(cfg, layer_idx)
        self.attn_residual = resolve("residual", cfg.residual)(cfg, layer_idx, "attn")
        self.mlp_residual = resolve("residual", cfg.residual)(cfg, layer_idx, "mlp")
        self.attn_scale = nn.Parameter(torch.ones(D))
        self.mlp_scale = nn.Parameter(torch.ones(D))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(D), torch.zeros(D)))) if cfg.resid_mix else None
        set_roles(self, control=("attn_scale", "mlp_scale", "resid_mix"))
        # Optional normalizer of the mix over its two sources (dim 0), per channel. The raw init
        # (1, 0) is kept whatever the normalizer: see parts/normalizers.py for what it becomes.
        self.mix_normalizer = None
        if cfg.mix_normalizer != "none":
            if not cfg.resid_mix:
                raise UserError(f"model.mix_normalizer {cfg.mix_normalizer!r} normalises resid_mix, "
                                "which model.resid_mix: false removes; set one of them back.")
            self.mix_normalizer = resolve("normalizer", cfg.mix_normalizer)(cfg)
        # LN scale (PR #315): damp the normalised input of deeper layers by 1/sqrt(l+1).
        self.norm_scale = 1.0 / math.sqrt(layer_idx + 1) if cfg.ln_scale else 1.0

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        if self.resid_mix is not None:
            mix = self.resid_mix if self.mix_normalizer is None else self.mix_normalizer(self.resid_mix, 0)
            mix = mix.to(x.dtype)
            x = mix[0] * x + mix[1] * x0
        y = self.attn(rms_norm(x) * self.norm_scale)
        x = self.attn_residual(x, self.attn_scale.to(y.dtype) * y)
        y = self.mlp(rms_norm(x) * self.norm_scale)
        return self.mlp_residual(x, self.mlp_scale.to(y.dtype) * y)


class UNetGPT(LanguageModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        D, L = cfg.model_dim, cfg.num_layers
        self.tok_emb = nn.Embedding(cfg.vocab_size, D)
        self.bigram = BigramHash(cfg.bigram, D) if cfg.bigram else None
        self.smear = SmearGate(D) if cfg.smear_gate else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(L))
        self.num_encoder = L // 2 if cfg.unet_skips else 0
        num_skips = min(self.num_encoder, L - self.num_encoder)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, D)) if num_skips else None
        self.sidecar = SharedSparseSidecar(cfg.sidecar, D) if cfg.sidecar else None
        if self.sidecar is not None and max(self.sidecar.layers) >= L:
            raise ValueError(f"sidecar layers {self.sidecar.layers} exceed num_layers {L}")
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(D, cfg.vocab_size, bias=False)
        set_roles(self, control=("skip_weights",))
        if self.lm_head is not None:
            set_roles(self.lm_head, head=("weight",))
        self._init_weights()

    def _init_weights(self) -> None:
        cfg = self.config
        if self.tok_emb.weight.is_meta:
            return
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        if self.lm_head is not None:
            nn.init.zeros_(self.lm_head.weight)
        if cfg.init == "orthogonal":
            # PR #684 / #65: orthogonal init for every >=64x64 linear that is not zero-init,
            # then muP-style 1/sqrt(2L) on names ending in ".proj" (only bigram.proj in practice).
            for name, mod in self.named_modules():
                if isinstance(mod, nn.Linear) and min(mod.weight.shape) >= 64 and mod is not self.lm_head:
                    if getattr(mod.weight, "_pgolf_zero_init", False):
                        continue
                    nn.init.orthogonal_(mod.weight, gain=1.0)
                    if name.endswith(".proj"):
                        with torch.no_grad():
                            mod.weight.mul_(1.0 / math.sqrt(2 * cfg.num_layers))
        elif cfg.init != "default":
            raise ValueError(f"model.init must be 'default' or 'orthogonal', got {cfg.init!r}")

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(ids)
        if self.bigram is not None:
            x = x + self.bigram(ids)
        x = rms_norm(x)
        if self.smear is not None:
            x = self.smear(x)
        x0 = x
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            if i >= self.num_encoder and skips:
                w = self.skip_weights[i - self.num_encoder].to(x.dtype)
                x = x + w * skips.pop()
            x = block(x, x0)
            if i < self.num_encoder:
                skips.append(x)
            if self.sidecar is not None:
                site = self.sidecar.site_of(i)
                if site is not None:
                    x = x + self.sidecar(rms_norm(x), site)
        return rms_norm(x)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.hidden(ids)
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = h @ weight.to(h.dtype).t()
        return softcap(logits.float(), self.config.logit_softcap)


def _sidecar_problems(m: ModelConfig, ok) -> list[tuple[list[str], str]]:
    # Sidecar sites are blocks of this trunk.
    if m.sidecar is None or not ok("model.sidecar.layers", "model.num_layers"):
        return []
    over = [i for i in m.sidecar.layers if i >= m.num_layers]
    if not over:
        return []
    return [(["model.sidecar.layers", "model.num_layers"],
             f"model.sidecar.layers {list(m.sidecar.layers)}: layers {over} do not exist; model.num_layers is "
             f"{m.num_layers}, so sites must be below {m.num_layers}.")]


@register("trunk", "unet_gpt", kinds=("attention", "mlp", "residual", "normalizer"),
          reads=("unet_skips", "resid_mix", "ln_scale", "smear_gate", "bigram", "sidecar", "init"),
          check=_sidecar_problems)
def unet_gpt(cfg: ModelConfig) -> LanguageModel:
    return UNetGPT(cfg)
