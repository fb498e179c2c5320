"""pgolf's scorer: byte tables, evaluation windows, bpb, and the TTT drivers.

This package is part of the runtime bundled into the self-contained submission script, so it
imports only the standard library, torch, numpy, sentencepiece and, from pipeline, nothing but
plain types: `pipeline.config` (config dataclasses) and `pipeline.errors` (exception classes).
The pipeline imports eval, never the other way round.

    from eval import ByteTables, evaluate, score_first_ttt
    tables = ByteTables.from_sentencepiece("tokenizer.model", vocab_size=1024)
    res = evaluate(model, val_tokens, tables, recipe.eval, device)   # res.val_bpb

Modules: `byte_tables` (tokens -> bytes), `sp_model` (a SentencePiece model's settings),
`windows` (which targets each forward scores), `scorer` (float64 sums, one all-reduce), `ttt`
(score-first TTT, PR #684's illegal variant, and the score-before-update checker).
"""

from eval.byte_tables import ByteTables
from eval.scorer import EvalResult, evaluate, score_tokens
from eval.ttt import check_score_before_update, pre_score_full_val_ttt, score_first_ttt
from eval.windows import (Window, Windows, build_windows, nonoverlap_windows, pr298_windows,
                          sliding_windows, truncate_for_eval)

__all__ = [
    "ByteTables", "EvalResult", "evaluate", "score_tokens", "score_first_ttt",
    "pre_score_full_val_ttt", "check_score_before_update", "Window", "Windows",
    "build_windows", "nonoverlap_windows", "sliding_windows", "pr298_windows",
    "truncate_for_eval",
]
