"""The pieces of PR #298's depth-recurrent trunk (seed_prs.md §2.1-2.2), one module each.

`pipeline.model.recurrent.DepthRecurrentGPT` wires them together; nothing here is registered.
Every piece is its own `nn.Module` so that forward hooks (the causality audit) can watch each
sub-computation on its own. Per-pass parameters live as one [P, ...] tensor per piece and the
pass index `p` is an argument of `forward`: PR #298 stores them this way, and it keeps the
parameter count and the state-dict layout identical to the published model.

Build: each class takes plain sizes (passes P, width D, rank r) except the attention and the
block, which read a `ModelConfig`. Roles (pipeline.model.roles) follow PR #298's routing: per-pass
vectors and gains are control tensors (fp32, scalar Adam group; the GRU gate a gate), the
low-rank factors and the exit gate's weight row are matrices (Muon), the exit gate's bias `other`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig
from pipeline.model.base import head_dim, rms_norm
from pipeline.model.parts.attention import zero_init
from pipeline.model.parts.rotary import Rotary
from pipeline.model.registry import resolve
from pipeline.model.roles import set_roles

# Low-rank "A" factors start small and random, "B" factors at zero (the LoRA convention
# PR #298 uses for its GRU and TD paths), so each path starts as an exact zero.
LOW_RANK_A_STD = 0.01


def low_rank_pair(dim_in: int, rank: int, dim_out: int) -> tuple[nn.Linear, nn.Linear]:
    """(A: dim_in -> rank, B: rank -> dim_out) with A ~ N(0, 0.01^2) and B = 0."""
    a = nn.Linear(dim_in, rank, bias=False)
    b = nn.Linear(rank, dim_out, bias=False)
    nn.init.normal_(a.weight, std=LOW_RANK_A_STD)
    zero_init(b)
    return a, b


# --------------------------------------------------------------------------------------
# attention and block


class LowRankKAttention(nn.Module):
    """PR #298's attention: full q and v, a rank-r bottleneck for k, GQA, causal SDPA.

    q = W_q x [H x hd]; k = W_kb (W_ka x) [KV x hd] through rank `k_rank` (at D = 768, rank 32,
    kv_dim 192 that is 30,720 weights instead of 147,456 per block); v = W_v x. Per-head RMSNorm
    on q and k, RoPE (whole head unless cfg.rope.dims says otherwise), a learned per-head gain
    on q (init cfg.qk_gain_init), causal SDPA with grouped KV heads, zero-init output.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        D, H, KV = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads
        self.H, self.KV, self.hd = H, KV, head_dim(cfg)
        r = cfg.recurrent.k_rank
        self.c_q = nn.Linear(D, D, bias=False)
        self.c_k_a = nn.Linear(D, r, bias=False)
        self.c_k_b = nn.Linear(r, KV * self.hd, bias=False)
        self.c_v = nn.Linear(D, KV * self.hd, bias=False)
        self.proj = zero_init(nn.Linear(D, D, bias=False))
        self.q_gain = nn.Parameter(torch.full((H,), cfg.qk_gain_init))
        set_roles(self, control=("q_gain",))
        self.rotary = Rotary(self.hd, cfg.rope)

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        # PR #298 rotates each (i, i + d/2) pair by -theta_t (x1 cos + x2 sin, x2 cos - x1 sin),
        # the mirror of pipeline.model.parts.rotary's +theta_t. The two are equivalent up to a
        # sign flip of half the q/k weights, but we keep #298's direction so that a state dict
        # carried over from its code computes the same function. The settings (base, optional
        # partial dims, NTK rescale) come from the shared Rotary, but the angles are rebuilt on
        # each call instead of read from its Python-dict cache: [T, dims/2] is tiny next to the
        # matmuls, and a dict lookup keyed on runtime state breaks torch.compile's graph inside
        # the pass loop, which then recompiles for every pass index.
        T, dims = x.size(1), self.rotary.dims
        inv_freq = self.rotary.effective_base(T) ** (
            -torch.arange(0, dims, 2, device=x.device, dtype=torch.float32) / dims)
        angles = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), inv_freq)
        cos = angles.cos().to(x.dtype)[None, :, None, :]
        sin = angles.sin().to(x.dtype)[None, :, None, :]
        half = dims // 2
        x1, x2, rest = x[..., :half], x[..., half:dims], x[..., dims:]
        rotated = torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)
        return torch.cat((rotated, rest), dim=-1) if rest.size(-1) else rotated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q = self.c_q(x).view(B, T, self.H, self.hd)
        k = self.c_k_b(self.c_k_a(x)).view(B, T, self.KV, self.hd)
        v = self.c_v(x).view(B, T, self.KV, self.hd)
        q, k = self._rope(rms_norm(q)), self._rope(rms_norm(k))
        q = q * self.q_gain.to(q.dtype)[:, None]
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            enable_gqa=self.KV != self.H)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class RecurrentBlock(nn.Module):
    """One shared block. It owns no control tensors: PR #298 gives every (pass, layer) call its
    own resid_mix / attn_scale / mlp_scale (see PassLayerControl), passed in by the trunk."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn = LowRankKAttention(cfg, layer_idx)
        # The MLP is a registry part (relu2 for #298: relu(W1 x)^2 -> zero-init W2).
        self.mlp = resolve("mlp", cfg.mlp)(cfg, layer_idx)

    def forward(self, x, x0, resid_mix, attn_scale, mlp_scale):
        if resid_mix is not None:
            mix = resid_mix.to(x.dtype)
            x = mix[0] * x + mix[1] * x0
        y = self.attn(rms_norm(x))
        x = x + attn_scale.to(y.dtype) * y
        y = self.mlp(rms_norm(x))
        return x + mlp_scale.to(y.dtype) * y


class PassLayerControl(nn.Module):
    """PR #298's per-(pass, layer) control sets, indexed by s = p * N + l.

    resid_mix [S, 2, D] init (1, 0); attn_scale and mlp_scale [S, D] init 1: control tensors
    (fp32, scalar group)."""

    def __init__(self, steps: int, dim: int, resid_mix: bool = True):
        super().__init__()
        self.attn_scale = nn.Parameter(torch.ones(steps, dim))
        self.mlp_scale = nn.Parameter(torch.ones(steps, dim))
        mix = torch.stack((torch.ones(steps, dim), torch.zeros(steps, dim)), dim=1)
        self.resid_mix = nn.Parameter(mix) if resid_mix else None
        set_roles(self, control=("attn_scale", "mlp_scale", "resid_mix"))

    def forward(self, s: int):
        mix = self.resid_mix[s] if self.resid_mix is not None else None
        return mix, self.attn_scale[s], self.mlp_scale[s]


# --------------------------------------------------------------------------------------
# per-pass extras, in the order the trunk applies them


class ResonantPE(nn.Module):
    """Resonant position encoding (PR #298 #19): x <- x + s_p * [cos(t f_p), cos(t f_p)] * x.

    f_p in R^{D/2} ~ N(0, 0.01^2), s_p init 0.1. A multiplicative, per-position modulation: causal.
    """

    def __init__(self, passes: int, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"resonant PE needs an even model_dim, got {dim}")
        self.freq = nn.Parameter(torch.randn(passes, dim // 2) * 0.01)
        self.scale = nn.Parameter(torch.full((passes,), 0.1))
        set_roles(self, control=("freq", "scale"))

    def forward(self, x: torch.Tensor, p: int) -> torch.Tensor:
        T = x.size(1)
        # PR #298 ran a bf16 residual stream and built t with the stream's dtype, so positions
        # above 256 were rounded to bf16's 8-bit mantissa (2048 -> steps of 8). Our stream is
        # fp32 under autocast, so we round t through bf16 explicitly: one cheap cast that keeps
        # #298's positional aliasing. Frequencies and the cosine stay in the stream's dtype.
        t = torch.arange(T, device=x.device, dtype=torch.float32).to(torch.bfloat16).to(x.dtype)
        r = torch.cos(t[:, None] * self.freq[p].to(x.dtype)[None, :])
        r = torch.cat((r, r), dim=-1)  # [T, D]
        return x + self.scale[p].to(x.dtype) * r * x


class SelectiveState(nn.Module):
    """The sequence summary S that PR #298's "Selective State" (#20) carries between passes.

    Returns a [B, T, D] state, one row per position:
    - causal (default): the prefix mean S_t = mean(x_0..x_t), so position t sees only <= t;
    - leaky=True: PR #298's published mean over all T positions, broadcast to every position.
      Every position then reads the tokens it must predict: the future leak of seed_prs.md §2.4.
    Kept as its own module so an audit can hook exactly this output.
    """

    def __init__(self, leaky: bool = False):
        super().__init__()
        self.leaky = leaky

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.leaky:
            return x.mean(dim=1, keepdim=True).expand_as(x)
        # Running sums in at least fp32 so that long windows (T = 2048) do not drift under bf16
        # (and fp64 audits keep fp64).
        acc = torch.promote_types(x.dtype, torch.float32)
        counts = torch.arange(1, x.size(1) + 1, device=x.device, dtype=acc)
        return (x.to(acc).cumsum(dim=1) / counts[None, :, None]).to(x.dtype)


class GRUCarry(nn.Module):
    """The GRU-style update that injects S into the next pass (PR #298 #20), for p >= 1.

    z = sigmoid(B_z A_z S), h = tanh(B_h A_h S), through rank-r factors (A ~ N(0, 0.01^2), B = 0);
    u = (1 - z) S + z h; returns sigmoid(g_p) * u with g_p (`gru_gate`) init 0. At init z = 0.5 and
    h = 0, so the term is 0.25 S. Causal exactly when S is.
    """

    def __init__(self, passes: int, dim: int, rank: int):
        super().__init__()
        self.z_a, self.z_b = low_rank_pair(dim, rank, dim)
        self.h_a, self.h_b = low_rank_pair(dim, rank, dim)
        self.gru_gate = nn.Parameter(torch.zeros(passes, dim))
        set_roles(self, gate=("gru_gate",))

    def forward(self, state: torch.Tensor, p: int) -> torch.Tensor:
        z = torch.sigmoid(self.z_b(self.z_a(state)))
        h = torch.tanh(self.h_b(self.h_a(state)))
        u = (1 - z) * state + z * h
        return torch.sigmoid(self.gru_gate[p]).to(u.dtype) * u


class ConfidenceConditioning(nn.Module):
    """PR #298 #13, for p >= 1: returns c_prev(t) * C_p, C_p (`conf_vec`) init 0.

    c_prev [B, T] is the previous pass's detached exit-gate value, per token: causal."""

    def __init__(self, passes: int, dim: int):
        super().__init__()
        self.conf_vec = nn.Parameter(torch.zeros(passes, dim))
        set_roles(self, control=("conf_vec",))

    def forward(self, c_prev: torch.Tensor, p: int) -> torch.Tensor:
        return c_prev.unsqueeze(-1) * self.conf_vec[p].to(c_prev.dtype)


class GradientMemory(nn.Module):
    """PR #298 #15 "gradient memory": returns m_p * |x - x_prev|, m_p (`mem_vec`) init 0.1.

    x_prev is the detached input of the previous pass's blocks (the detached embedding for
    p = 0), so only m_p and the current x get gradient. Elementwise per position: causal."""

    def __init__(self, passes: int, dim: int):
        super().__init__()
        self.mem_vec = nn.Parameter(torch.full((passes, dim), 0.1))
        set_roles(self, control=("mem_vec",))

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor, p: int) -> torch.Tensor:
        return self.mem_vec[p].to(x.dtype) * (x - x_prev).abs()


class TemporalDifference(nn.Module):
    """PR #298 #17, for p >= 1: returns Delta = sigmoid(alpha_p) (B A x - x_in).

    A: D -> r ~ N(0, 0.01^2), B: r -> D = 0; alpha_p (`alpha_td`) init 0.1, so at init the
    pass subtracts 0.525 of its own (detached) input. The trunk adds Delta and a 0.001 mean(Delta^2)
    penalty."""

    def __init__(self, passes: int, dim: int, rank: int, alpha_init: float = 0.1):
        super().__init__()
        self.a, self.b = low_rank_pair(dim, rank, dim)
        self.alpha_td = nn.Parameter(torch.full((passes,), alpha_init))
        set_roles(self, control=("alpha_td",))

    def forward(self, x: torch.Tensor, x_in: torch.Tensor, p: int) -> torch.Tensor:
        target = self.b(self.a(x))
        return torch.sigmoid(self.alpha_td[p]).to(target.dtype) * (target - x_in.to(target.dtype))


class ExitGate(nn.Module):
    """PR #298's "adaptive depth" gate (#12): g(t) = sigmoid(w . x_t + b), w init 0, b init 2.

    Holds its weight [1, D] and bias [1] directly so that the state-dict names are `exit_proj.weight`
    (a 2-D matrix: Muon, as in #298) and `exit_proj.bias` (scalar group). Returns g [B, T].
    """

    def __init__(self, dim: int, bias_init: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, dim))
        self.bias = nn.Parameter(torch.full((1,), bias_init))
        set_roles(self, matrix=("weight",), other=("bias",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.linear(x, self.weight, self.bias)).squeeze(-1)


def gate_gradient(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Value x, gradient g * dL/dx: PR #298's x <- g x + (1 - g) detach(x), written so that the
    forward value is x bit for bit (g x + (1 - g) x rounds differently from x in floating point).
    dL/dg is x - detach(x) = 0 in both forms, so g learns only from the entropy penalty."""
    x_d = x.detach()
    return x_d + g.unsqueeze(-1).to(x.dtype) * (x - x_d)


def binary_entropy(g: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """-(g log g + (1 - g) log(1 - g)) with #298's +1e-8 inside each log, in fp32."""
    g = g.float()
    return -(g * torch.log(g + eps) + (1 - g) * torch.log(1 - g + eps))
