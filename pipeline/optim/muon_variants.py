"""Muon's orthogonalisation variants of the frontier records: Polar Express coefficients and
MuonEq-R row normalisation, as drop-ins for `pipeline.optim.muon.newton_schulz`.

    fn = orthogonaliser("polar_express", row_normalize=True)   # None for the plain default
    Muon(params, ..., orthogonalise=fn)                          # optim.muon_ns_coeffs / muon_row_normalize

- Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932; PR #1344 -> records from
  R/2026-04-23_..._PolarNS_MinLR_FusedCE on, pg_mechanics.md §4.7.5): instead of one quintic
  (a, b, c) applied `steps` times, a different minimax-optimal quintic per iteration, which drives
  the singular values of the Frobenius-normalised update to ~1 faster than Keller Jordan's fixed
  tuple (that one leaves them in a band around 1). The five tuples are the ones the 1.0611 record
  runs (`_PE_COEFFS` in its train_gpt.py); fewer steps use the first ones, as there, and more
  than five are refused (the sequence is tuned for five).
- MuonEq-R (PR #1260/#1217, arXiv 2603.28254; on by default from PR #1394, pg_mechanics.md
  §4.7.4): before Newton–Schulz divide every row of the (Nesterov) update by its L2 norm (clamped at
  1e-7), so every output unit of a matrix gets an update of the same size.

Both keep Newton–Schulz's signature fn(G, steps, eps=1e-7, dtype=None), so Muon's distributed
split, momentum and scaling are unchanged. The default (Jordan tuple, no row normalisation) is not
routed through here at all: `orthogonaliser` returns None and Muon runs its own function.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from pipeline.optim.muon import newton_schulz, newton_schulz_sequence

POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NS_COEFF_CHOICES = ("jordan", "polar_express")


def polar_express(G: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Newton–Schulz with the first `steps` Polar Express tuples (1 <= steps <= 5)."""
    if not 1 <= steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"Polar Express has {len(POLAR_EXPRESS_COEFFS)} tuned iterations; got steps={steps} "
                         f"(set optim.muon_ns_steps between 1 and {len(POLAR_EXPRESS_COEFFS)})")
    return newton_schulz_sequence(G, POLAR_EXPRESS_COEFFS[:steps], eps=eps, dtype=dtype)


def row_normalize(G: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """MuonEq-R: each row (last dim) divided by its L2 norm, clamped at eps; norms in float32."""
    norms = G.float().norm(dim=-1, keepdim=True).clamp_min(eps)
    return G / norms.to(G.dtype)


def orthogonaliser(ns_coeffs: str = "jordan", row_normalize_rows: bool = False) -> Optional[Callable]:
    """The update orthogonaliser for these options, with newton_schulz's signature; None for the
    default (Jordan's tuple, no row normalisation), which Muon runs as its own function."""
    if ns_coeffs not in NS_COEFF_CHOICES:
        raise ValueError(f"muon_ns_coeffs must be one of {NS_COEFF_CHOICES}, got {ns_coeffs!r}")
    if ns_coeffs == "jordan" and not row_normalize_rows:
        return None
    ns = polar_express if ns_coeffs == "polar_express" else newton_schulz

    def orthogonalise(G: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                      dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return ns(row_normalize(G) if row_normalize_rows else G, steps, eps=eps, dtype=dtype)

    orthogonalise.__name__ = f"{ns.__name__}{'_row_normalized' if row_normalize_rows else ''}"
    return orthogonalise
