"""The typed, frozen configuration of a pgolf run.

These are plain standard-library dataclasses so that the generated, self-contained
`train_gpt.py` (which may only import torch, numpy, sentencepiece and zstandard) can use
them. Strict validation of YAML into these classes (unknown keys, wrong types, did-you-mean)
lives in `pipeline.recipe`, which is the only module that needs pydantic.

Every field carries a comment saying what it is and, where it matters, why the default. A model
part's own settings are declared next to the part (pipeline/model/parts/*.py, through
`pipeline.model.registry.settings`); `ModelConfig` holds them without listing them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field
from typing import Literal, Optional

# --------------------------------------------------------------------------------------
# load-time constraints
#
# A field declares what values it accepts with `constrained(default, **rules)`;
# `pipeline.recipe` checks every declared rule of every field when a recipe loads, so
# `pgolf check` refuses what `pgolf run` would fail on. Rules (None values are not checked):
#   ge, gt, le, lt   numeric bounds; for a tuple, bounds of each item
#   min_len          fewest items of a tuple, or characters of a string
#   unique           a tuple's items must differ
#   regex            the string must compile as a regular expression
#   pattern          the string must match this regular expression in full
#   why              the reason, appended to the error message
# Every float must also be finite and every int fit in int64 (torch and numpy take them).
CONSTRAINT_KEYS = frozenset({"ge", "gt", "le", "lt", "min_len", "unique", "regex", "pattern", "why"})


def constrained(default=MISSING, *, factory=MISSING, **rules):
    """A dataclass field with load-time constraints `rules` (keys: CONSTRAINT_KEYS)."""
    unknown = set(rules) - CONSTRAINT_KEYS
    if unknown:  # a misspelt rule would otherwise silently check nothing
        raise TypeError(f"unknown constraint(s) {sorted(unknown)}; known: {sorted(CONSTRAINT_KEYS)}")
    return field(default=default, default_factory=factory, metadata={"constraints": rules})


# Token ids are stored as uint16 in the shards (pg_mechanics.md §1.2).
MAX_VOCAB = 65_536
# A sanity bound on widths, far above any model that fits the 16 MB cap, which keeps
# `pgolf check` (it compresses stand-in rows of every tensor) fast and in memory.
MAX_WIDTH = 65_536

# --------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class DataConfig:
    # Directory produced by `pgolf data prepare` (shards + tokenizer.model). None means the
    # embedded corpus, which `make run` builds at set-up (see pipeline.data.corpus).
    dir: Optional[str] = None
    # Cap on validation tokens scored (0 = the whole split). Only for quick CPU runs; a
    # submission must score everything, and `submit` refuses a non-zero value.
    max_val_tokens: int = constrained(0, ge=0)


# --------------------------------------------------------------------------------------
# model


class Settings(Mapping):
    """A frozen, hashable mapping: the part settings a ModelConfig holds (see ModelConfig)."""

    __slots__ = ("_items",)

    def __init__(self, items=()):
        object.__setattr__(self, "_items", {k: _freeze(v) for k, v in dict(items).items()})

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._items.items())))

    def __eq__(self, other) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __setattr__(self, name, value):
        raise AttributeError("Settings is read-only")

    def __reduce__(self):  # copy, deepcopy and pickle rebuild it through __init__
        return Settings, (dict(self._items),)

    def __repr__(self) -> str:
        return f"Settings({self._items!r})"


def _freeze(value):
    """Plain JSON-like values made hashable (a script's settings of parts it does not carry)."""
    if isinstance(value, dict):
        return Settings(value)
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class ModelConfig:
    """The model: its trunk, sizes and chosen parts, and every part's own settings.

    The fields below are what every trunk shares. Each part declares its own settings dataclass
    next to its code (pipeline.model.registry.settings); they live in `settings` under the keys a
    recipe writes (`k_gain`, `elita`, `rope`, ...) and read as attributes: `cfg.elita.ff_rank`,
    `cfg.k_gain`. A recipe builds it through pipeline.recipe; code builds and changes one with
    pipeline.model.compose's `model_config(trunk=..., k_gain=True, elita=...)` and
    `replace_model(cfg, ...)`, which refuse what the trunk does not implement, as a recipe does."""

    # The trunk: unet_gpt (baseline / #684 family) or depth_recurrent (#298).
    trunk: str = "unet_gpt"
    vocab_size: int = constrained(1024, ge=2, le=MAX_VOCAB, why="shards store token ids as uint16")
    num_layers: int = constrained(9, ge=1, le=256)  # blocks of unet_gpt (depth_recurrent: model.recurrent)
    model_dim: int = constrained(512, ge=1, le=16_384)
    num_heads: int = constrained(8, ge=1)
    num_kv_heads: int = constrained(4, ge=1)
    mlp_mult: float = constrained(2.0, gt=0, le=64)
    # Parts, resolved by pipeline.model.registry (a trunk takes only the kinds it resolves).
    attention: str = "causal"
    mlp: str = "relu2"
    residual: str = "standard"
    # How learned mixing weights (resid_mix's two sources) are normalised: "none" keeps them raw
    # (baseline); otherwise a registry "normalizer" (softmax, shiftmax_recon_*).
    mix_normalizer: str = "none"
    tie_embeddings: bool = True
    tied_embed_init_std: float = constrained(0.005, ge=0)
    logit_softcap: float = constrained(30.0, ge=0)  # 0 = no softcap
    # Every part setting, by recipe key, filled with its default where the recipe is silent, so a
    # model's identity (blob header, cache keys) is the whole resolved `model:` section.
    # `to_dict` writes them beside the fields above, as the recipe does.
    settings: Settings = field(default_factory=Settings, metadata={"flatten": True})

    def __post_init__(self):
        from pipeline.model.registry import complete_settings

        object.__setattr__(self, "settings", Settings(complete_settings(self.settings)))

    def __getattr__(self, key):
        # Only reached for names that are not fields: a part setting, or nothing.
        if key.startswith("__") or key == "settings":
            raise AttributeError(key)
        try:
            return self.settings[key]
        except KeyError:
            raise AttributeError(f"ModelConfig has no field or part setting {key!r}") from None

# --------------------------------------------------------------------------------------
# training


@dataclass(frozen=True)
class CoprimeLoaderConfig:
    """PR #684's memory-mapped, coprime-stride, adaptive-mixing loader (seed_prs.md §3.3)."""

    mix_warmup_batches: int = constrained(1800, ge=0)
    # Shards are drawn with weight remaining_blocks ** alpha: a large alpha overflows float64.
    alpha_start: float = constrained(0.9, ge=0, le=8)
    alpha_end: float = constrained(0.5, ge=0, le=8)
    queue_depth: int = constrained(8, ge=1, le=1024)
    # Pinned host buffers and a CUDA copy stream that stages the next batch during the current
    # step (PR #684). auto = on with CUDA; off = a plain synchronous copy; on needs CUDA.
    copy_stream: Literal["auto", "on", "off"] = "auto"


@dataclass(frozen=True)
class TrainConfig:
    seq_len: int = constrained(1024, ge=1)
    # Global tokens per optimizer step, summed over ranks and accumulation micro-steps.
    batch_tokens: int = constrained(524_288, ge=1)
    # Gradient accumulation = reference_world_size // world_size, so one process follows
    # the same trajectory as the reference multi-GPU run (modded-nanogpt's rule).
    reference_world_size: int = constrained(8, ge=1)
    # Sequences per forward/backward pass (0 = each rank's whole micro-step batch at once). The
    # trainer splits every loaded micro-batch into chunks of this many sequences and scales each
    # backward by the chunk's share, so the step's gradient is the same mean over the same tokens
    # (the same trajectory up to float rounding) with a fraction of the activation memory: how a
    # large recipe fits a smaller device. It must divide the sequences per rank per micro-step;
    # `pgolf check` prints the memory estimate and the preflight refusal names a value that fits.
    micro_batch_seqs: int = constrained(0, ge=0)
    max_steps: int = constrained(20_000, ge=1)
    # Wall-clock cap on training (0 = none). Validation and priming are not timed.
    max_wallclock_s: float = constrained(0.0, ge=0)
    # Linear LR warm-down to 0 over the last warmdown_steps steps. With warmdown_by=time the
    # length is warmdown_steps x (average step time) before the wall-clock cap (baseline rule).
    warmdown_steps: int = constrained(1200, ge=0)
    warmdown_by: Literal["steps", "time"] = "steps"
    # Floor of the LR multiplier, so the warm-down ends at min_lr_mul x base lr instead of 0 (MIN_LR
    # 0.1 from PR #1787, the records from 04-23 on; pg_mechanics.md §4.7.1). 0 = down to 0.
    min_lr_mul: float = constrained(0.0, ge=0, le=1)
    # Compile-priming steps run before the clock; model, optimizer and loader are then reset.
    prime_steps: int = constrained(0, ge=0)
    grad_clip: float = constrained(0.0, ge=0)  # global-norm clip (0 = off)
    nan_to_num_grads: bool = False  # PR #298 passes every gradient through nan_to_num
    loader: Literal["sequential", "coprime"] = "sequential"
    coprime: CoprimeLoaderConfig = field(default_factory=CoprimeLoaderConfig)
    log_every: int = constrained(50, ge=1)
    # Non-overlapping validation every N steps (0 = only at the end). Not timed.
    val_every: int = constrained(0, ge=0)
    checkpoint_every: int = constrained(200, ge=0)  # 0 = only at the end
    compile: Literal["auto", "on", "off"] = "auto"  # auto = on with CUDA only
    # ---- fast paths (pipeline/stages/train.py; tests/test_fast_path.py). "auto" = the CUDA fast path
    # on CUDA and the plain path on the CPU, so CPU numbers stay bitwise those of the plain path.
    # bf16 autocast of the forward/backward passes (the records' mixed precision).
    autocast: Literal["auto", "bf16", "off"] = "auto"
    # The scaled-dot-product-attention kernel: auto = PyTorch's choice; flash (CUDA needs bf16, which
    # takes grouped KV heads; on the CPU it is the CPU flash kernel), efficient, cudnn (CUDA only) or
    # math. A named kernel that cannot run the call is an error, never a silent fallback.
    attention_kernel: Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"
    # Steps between host reads of the loss, gradient norm and parameter health flags (on CUDA the
    # only host syncs of the loop, besides logging, validation and checkpoints). 0 = auto: every
    # step on the CPU (a sync costs nothing there), every log_every steps on CUDA. A non-finite
    # value is still named at the step it happened; training stops at the next read.
    host_sync_every: int = constrained(0, ge=0)
    # CPU only: run each step's forward/backward passes on this many threads of this process,
    # each single-threaded inside (no OpenMP barriers between tiny kernels), gradients summed in a
    # fixed order (deterministic; equal to one thread up to float rounding). Needs >= 2 passes per
    # step (gradient accumulation or train.micro_batch_seqs) and holds that many passes'
    # activations at once. 1 = off.
    cpu_workers: int = constrained(1, ge=1, le=256)


@dataclass(frozen=True)
class GradConditioningRule:
    """Per-tensor (s, b) for the parameters whose name matches; the first matching rule wins."""

    pattern: str = constrained(regex=True)  # regular expression searched in the parameter name
    scale: float = 1.0
    bias: float = 0.0


@dataclass(frozen=True)
class GradConditioningConfig:
    """lof310's gradient conditioning g <- s_p*g + b_p per tensor p (seed_components.md §2.2).

    Each tensor's (s_p, b_p) is that of its first matching rule, else the global (scale, bias).
    mode=fixed keeps them; mode=hypergradient starts from them and learns them online (our
    reading of v1, Baydin et al. 2018) with step sizes hyper_lr_scale / hyper_lr_bias, which
    already include the optimizer lr factor. The defaults are the identity (a bitwise no-op)."""

    mode: Literal["fixed", "hypergradient"] = "fixed"
    scale: float = 1.0
    bias: float = 0.0
    rules: tuple[GradConditioningRule, ...] = ()
    hyper_lr_scale: float = 0.0  # s_p <- s_p + hyper_lr_scale * <g_t, g_{t-1}>
    hyper_lr_bias: float = 0.0  # b_p <- b_p + hyper_lr_bias * sum_i g_t,i


@dataclass(frozen=True)
class OptimConfig:
    # Muon for 2-D block matrices.
    matrix_lr: float = constrained(0.04, ge=0)
    muon_momentum: float = constrained(0.95, ge=0, lt=1)
    muon_momentum_warmup_start: float = constrained(0.85, ge=0, lt=1)
    muon_momentum_warmup_steps: int = constrained(500, ge=0)
    muon_ns_steps: int = constrained(5, ge=1, le=100)
    muon_wd: float = constrained(0.0, ge=0)  # decoupled: p <- p * (1 - lr * wd)
    # Newton–Schulz coefficients: Keller Jordan's one tuple, or the Polar Express per-iteration
    # tuples (PR #1344, the records from 04-23; muon_ns_steps <= 5); muon_row_normalize divides each
    # row of the update by its norm first (MuonEq-R, PR #1260). pipeline/optim/muon_variants.py.
    muon_ns_coeffs: Literal["jordan", "polar_express"] = "jordan"
    muon_row_normalize: bool = False
    # Adam(W) for embeddings, the untied head and scalars/control tensors.
    embed_lr: float = constrained(0.05, ge=0)  # tied embedding (and other embedding tables)
    head_lr: float = constrained(0.008, ge=0)  # untied output head
    scalar_lr: float = constrained(0.04, ge=0)
    adam_beta1: float = constrained(0.9, ge=0, lt=1)
    adam_beta2: float = constrained(0.95, ge=0, lt=1)
    adam_eps: float = constrained(1e-8, ge=0)
    adam_wd: float = constrained(0.0, ge=0)  # > 0 makes it AdamW (decoupled)
    # Decoupled decay of the embedding tables alone (None: adam_wd). The records from PR #1218 on
    # decay the tied embedding at 0.085 and the scalars at adam_wd 0.02 (pg_mechanics.md §4.7.2).
    embed_wd: Optional[float] = constrained(None, ge=0)
    grad_conditioning: GradConditioningConfig = field(default_factory=GradConditioningConfig)
    # torch.compile Muon's Newton-Schulz iteration (as the baseline does). auto = on with CUDA.
    muon_compile: Literal["auto", "on", "off"] = "auto"


@dataclass(frozen=True)
class EmaConfig:
    enabled: bool = True
    decay: float = constrained(0.997, ge=0, lt=1)


# --------------------------------------------------------------------------------------
# export


@dataclass(frozen=True)
class QuantRule:
    """One row of the quantization plan; the first matching rule wins."""

    # A scheme of pipeline.export.codec's registry (int6, int8, fp16, fp32, ...); checked at load.
    scheme: str
    pattern: str = constrained(".*", regex=True)  # regular expression searched in the tensor name
    max_numel: int = constrained(0, ge=0)  # rule applies only to tensors with at most this many elements (0 = any)
    min_numel: int = constrained(0, ge=0)  # ... and at least this many
    # Per-row clip at this percentile of |w| (integer schemes only); None = row max.
    clip_percentile: Optional[float] = constrained(None, gt=0, le=100)
    # SD-clip (PR #1394, pg_mechanics.md §4.1.4): per-row clip at k standard deviations of the row,
    # scale = k * std(row) / qmax (integer schemes only; exclusive with clip_percentile). A larger k
    # keeps the outliers and spends more bytes; the 1.0611 record used 11.5 (MLP), 13 (attention),
    # 14 (int7 embedding).
    clip_sigmas: Optional[float] = constrained(None, gt=0)
    # Lower bound of the per-row scale (int8/int6 only). None = fp16's smallest normal. The
    # baseline and PR #684 floor at 1/127 (int8) and 1/31 (int6): rows with max|w| < 1 then
    # get a coarse fixed step, which shapes both their bytes and their error.
    scale_floor: Optional[float] = constrained(None, gt=0)
    # Parameter roles the rule applies to (pipeline.model.roles: matrix, embedding, head, control,
    # gate, other); empty = any tensor. Roles are declared where parameters are created, so a rule
    # on roles needs no name pattern to keep up with new parts.
    roles: tuple[str, ...] = constrained((), unique=True)


def _default_quant_rules() -> tuple[QuantRule, ...]:
    # PR #684's "mixed int6": fp32 control tensors (baseline CONTROL_TENSOR_NAME_PATTERNS and #684's
    # attention scalars, here every parameter whose part declared it control or gate), fp16 small
    # tensors, int6 attention/MLP matrices, int8 (99.99984th percentile clip) for the remaining
    # large tensors.
    return (
        QuantRule(scheme="fp32", roles=("control", "gate")),
        QuantRule(scheme="fp16", max_numel=65_536),
        QuantRule(scheme="int6", pattern=r"\.(attn|mlp)\."),
        QuantRule(scheme="int8", clip_percentile=99.99984),
    )


Compressor = Literal["zstd", "zlib", "brotli", "brotli_shuffle", "pergroup"]
_LEVEL_WHY = "zstd's levels; zlib uses min(level, 9), brotli min(level, 11), lrzip min(level, 9)"


@dataclass(frozen=True)
class ComparePlan:
    """Another export plan whose artifact size is reported beside the main one (not scored)."""

    name: str = constrained(min_len=1)
    rules: tuple[QuantRule, ...] = constrained(min_len=1)
    compressor: Compressor = "zstd"
    level: int = constrained(22, ge=1, le=22, why=_LEVEL_WHY)


@dataclass(frozen=True)
class LqerConfig:
    """LQER (PR #1797 -> the 1.0611 record, pg_mechanics.md §4.1.6): after quantization, the top_k
    integer-coded matrices by quantization error ||W - W_hat||_F get a rank-`rank` correction A.B of
    that error (A int2 with one scale, B int4 with one scale per 64 elements: the record's asymmetric
    packing), stored beside their codes and added back when the artifact is read (export/lqer.py)."""

    rank: int = constrained(4, ge=1, le=64)
    top_k: int = constrained(3, ge=1)


CLIP_FIT_MAX_SCALE = 10.0


@dataclass(frozen=True)
class ClipFitConfig:
    """Fit the artifact under the cap by widening SD-clip (pg_mechanics.md §7.1 step 4: "SDClip k is
    the single monotone knob to land just under the cap"). When the blob at the rules' own clip_sigmas
    would be over `package.cap_bytes - margin_bytes`, every rule's clip_sigmas is multiplied by one
    scale s in (1, max_scale], the smallest that fits, found by `steps` bisections, each a full
    quantize + pack (pipeline/export/clip_fit.py). A wider clip is a coarser step: fewer bytes, more
    quantization error. s = 1 when the blob fits as it is, so a run that fits is unchanged. Only
    quant.rules are widened; quant.compare plans keep their own clips."""

    max_scale: float = constrained(1.5, gt=1, le=CLIP_FIT_MAX_SCALE)
    steps: int = constrained(4, ge=1, le=20)
    margin_bytes: int = constrained(0, ge=0)


@dataclass(frozen=True)
class QuantConfig:
    rules: tuple[QuantRule, ...] = constrained(factory=_default_quant_rules, min_len=1)
    compare: tuple[ComparePlan, ...] = ()
    # Training micro-batches each process feeds a calibrating scheme's hook (GPTQ's Hessians) at the
    # end of training, inside the training budget; the records' GPTQ_CALIBRATION_BATCHES (16 from
    # 04-14 on, 64 before; pg_mechanics.md §4.1.4). Unused when no rule names a calibrating scheme.
    calibration_batches: int = constrained(16, ge=1)
    lqer: Optional[LqerConfig] = None  # low-rank error repair of the worst tensors (absent = off)
    fit_clip: Optional[ClipFitConfig] = None  # widen SD-clip until the artifact fits (absent = off)


@dataclass(frozen=True)
class PackageConfig:
    # zstd (one standard frame; the default), zlib, brotli (quality min(level, 11)), brotli_shuffle
    # (the records' stride-2 byte shuffle, then brotli), pergroup (the 1.0611 record's per-tensor-group
    # lrzip, which needs the `lrzip` program, brotli for the rest); pipeline/export/packagers.py.
    compressor: Compressor = "zstd"
    level: int = constrained(22, ge=1, le=22, why=_LEVEL_WHY)
    # Other compressors whose blob size (and compression seconds) on the same quantized model the
    # export stage reports beside the real one, unscored; pergroup is reported unavailable where
    # lrzip is not installed.
    compare_compressors: tuple[Compressor, ...] = constrained((), unique=True)
    cap_bytes: int = constrained(16_000_000, ge=1)  # decimal, code + model
    # Compression of the generated train_gpt.py's code (pipeline.codegen): "auto" ships the smaller
    # of brotli and LZMA (brotli must then be installed where the script runs, as it was for the
    # brotli records, pg_mechanics.md §4.2.2); "lzma" needs only the standard library.
    code_codec: Literal["auto", "lzma"] = "auto"


# --------------------------------------------------------------------------------------
# evaluation and TTT


@dataclass(frozen=True)
class EvalConfig:
    seq_len: int = constrained(1024, ge=1)
    # sliding: each token scored once with >= seq_len - stride context (fixed tail rule).
    # nonoverlap: baseline eval_val. pr298_all_positions: PR #298's mean over all positions
    # of overlapping windows, kept only to reproduce its number.
    mode: Literal["sliding", "nonoverlap", "pr298_all_positions"] = "sliding"
    stride: int = constrained(64, ge=1)  # <= seq_len
    batch_seqs: int = constrained(32, ge=1)
    # A diagnostic, off the evaluation clock: also score the first N training tokens with the
    # artifact's model, so the report sets training top-1 accuracy and bpb beside the held-out
    # ones (a claim made on training data says little; 0 = off).
    train_tokens: int = constrained(0, ge=0)


@dataclass(frozen=True)
class TTTConfig:
    enabled: bool = False
    # score_first: legal (PR #549). phased_lora: legal, per-document LoRA TTT with phased global
    # SGD on the scored documents (eval/ttt_lora.py, pg_mechanics.md §4.5.3-4.5.4); the fields
    # below up to freeze_blocks then configure its phases' SGD (chunk_tokens: targets per step).
    # pre_score_full_val: PR #684's train-then-score, illegal, kept only to reproduce its number
    # (ttt_compliant=false, submit refuses it).
    mode: Literal["score_first", "phased_lora", "pre_score_full_val"] = "score_first"
    chunk_tokens: int = constrained(32_768, ge=1)  # >= eval.seq_len
    epochs: int = constrained(3, ge=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = constrained(0.002, ge=0)
    min_lr: float = constrained(0.0, ge=0)
    momentum: float = constrained(0.9, ge=0, lt=1)  # SGD only
    weight_decay: float = constrained(0.0, ge=0)
    beta1: float = constrained(0.9, ge=0, lt=1)
    beta2: float = constrained(0.999, ge=0, lt=1)
    # LR schedule: cosine over chunks (score_first) or over steps (pre_score_full_val),
    # after warmup_epochs of linear warm-up (pre_score_full_val only).
    warmup_epochs: int = constrained(0, ge=0)
    grad_clip: float = constrained(1.0, ge=0)
    # Sequences per TTT optimizer step, over all processes (one process and K take the same
    # steps). The records' per-GPU batch times their 8 GPUs when each step is bigger than a rank's share.
    batch_seqs: int = constrained(32, ge=1)
    freeze_blocks: int = constrained(0, ge=0)  # freeze the first N blocks (PR #461)
    # phased_lora only. Defaults: R/2026-04-14_MultiPhaseGlobalSGD_PhasedTTT (its TTT_* settings).
    lora_rank: int = constrained(96, ge=1, le=4096)
    # Adapter output scale alpha / rank (PR #1767 uses 144); None: alpha = rank, scale 1 (04-14).
    lora_alpha: Optional[float] = constrained(None, gt=0)
    lora_lr: float = constrained(1e-4, ge=0)
    lora_beta1: float = constrained(0.0, ge=0, lt=1)  # AdamW
    lora_beta2: float = constrained(0.999, ge=0, lt=1)
    lora_eps: float = constrained(1e-10, gt=0)
    lora_weight_decay: float = constrained(0.5, ge=0)
    # Targets scored per chunk, each chunk inside a window of <= eval.seq_len tokens of its document.
    lora_chunk_tokens: int = constrained(48, ge=1)
    lora_steps: int = constrained(1, ge=1)  # optimizer steps per scored chunk (TTT_GRAD_STEPS)
    # Documents one process scores at once: memory and speed only (each has its own adapter).
    lora_batch_docs: int = constrained(64, ge=1)
    # Modules adapted (full match of the module name): Q, K, V, the attention output and the MLP of
    # every block, the records' set (eval/lora_adapters.py).
    lora_targets: str = constrained(r"blocks\.\d+\.(attn|attn\.c_q|attn\.c_k|attn\.c_v|mlp)", regex=True)
    lora_head: bool = True  # an adapter on the LM head (needs the model's hidden(ids))
    # After the first phase_prefix_docs * (p + 1) // phases documents are scored (p < phases), SGD on
    # all of them (PHASED_TTT_PREFIX_DOCS, PHASED_TTT_NUM_PHASES); 0 documents: LoRA TTT only.
    phase_prefix_docs: int = constrained(2000, ge=0)
    phases: int = constrained(3, ge=1, le=64)


# --------------------------------------------------------------------------------------
# the recipe


@dataclass(frozen=True)
class Recipe:
    # Names the run folder (artifacts/<name>/...) and the generated script: a plain file name.
    name: str = constrained(pattern=r"[A-Za-z0-9][A-Za-z0-9_.+-]*", why="letters, digits and _ . + - only")
    seed: int = constrained(1337, ge=0, le=2**32 - 1)
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    package: PackageConfig = field(default_factory=PackageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ttt: TTTConfig = field(default_factory=TTTConfig)


def to_dict(obj) -> dict:
    """A JSON-ready dict of any config dataclass (tuples become lists). A field marked
    `flatten` (ModelConfig.settings) is written beside its siblings, as the recipe writes it,
    less the settings declared `omit_default` that hold their default (registry.settings)."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            out = {}
            for f in dataclasses.fields(v):
                if f.metadata.get("flatten"):
                    from pipeline.model.registry import identity_settings

                    out.update(conv(identity_settings(getattr(v, f.name))))
                else:
                    out[f.name] = conv(getattr(v, f.name))
            return out
        if isinstance(v, Mapping):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(obj)


def from_dict(cls, data: dict):
    """Rebuild a config dataclass from `to_dict` output, without pydantic (for the submission
    script, whose recipe was already validated when it was generated). Keys that are not fields
    go to the `flatten` field if the class has one (ModelConfig's part settings)."""
    import typing

    hints = typing.get_type_hints(cls)
    kwargs = {}
    flat = [f.name for f in dataclasses.fields(cls) if f.metadata.get("flatten")]
    names = {f.name for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if f.name not in data or f.name in flat:
            continue
        kwargs[f.name] = _from_value(hints[f.name], data[f.name])
    if flat:
        kwargs[flat[0]] = {k: v for k, v in data.items() if k not in names}
    return cls(**kwargs)


def _from_value(tp, value):
    import typing

    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return _from_value(inner[0], value) if len(inner) == 1 else value
    if origin is tuple:
        return tuple(_from_value(args[0], v) for v in value) if args else tuple(value)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value)
    return value
