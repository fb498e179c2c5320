"""Stage `score`: the artifact read back from disk, scored on the whole validation split.

    diagnostic (off the clock): the exported weights before quantization, sliding window
    scored passes (on the clock): read the blob back -> sliding window -> score-first TTT
    diagnostic (off the clock, with eval.train_tokens): the artifact's model on training tokens

`eval_time_s` is the time of the scored passes, from reading the blob to the last score, as the
challenge's 600-second evaluation limit counts it; the pre-quantization diagnostic is timed apart
(`diagnostic_time_s`). A non-finite score is an error, never a result. Runtime-pure.
"""

from __future__ import annotations

import math
import time

from eval.windows import truncate_for_eval
from pipeline.config import to_dict
from pipeline.errors import UserError
from pipeline.export.artifact import roundtrip_into
from pipeline.model import build_model
from pipeline.stages import evaluate as ev
from pipeline.stages.base import Context, Stage
from pipeline.stages.export import BLOB, load_weights


class NonFiniteScoreError(UserError):
    """A scoring pass produced NaN or inf: nothing to report."""


def _check_finite(label: str, res: dict) -> dict:
    if not (math.isfinite(res["val_loss"]) and math.isfinite(res["val_bpb"])):
        raise NonFiniteScoreError(
            f"the {label} pass scored val_loss={res['val_loss']} val_bpb={res['val_bpb']}: not a number, so there "
            "is no result. The model diverged (lower the learning rates) or its weights overflowed at export.")
    return res


def _run_score(ctx: Context) -> dict:
    r, data, dist, log = ctx.recipe, ctx.data, ctx.dist, ctx.log

    def fresh():
        return build_model(r.model).to(dist.device)

    source = data.byte_source
    # The whole stream, then what the scores cover: the challenge cuts it to whole eval.seq_len
    # sequences (eval.windows.truncate_for_eval), so up to seq_len - 1 final targets go unscored.
    scored = truncate_for_eval(data.val_tokens.size, r.eval.seq_len) - 1
    log(f"score byte_source={source} stream_tokens={data.val_tokens.size} stream_bytes={data.val_stream_bytes} "
        f"scored_targets={scored} (whole eval.seq_len sequences, as the challenge scores)"
        + (" (per-token raw bytes from the byte sidecar)" if source == "sidecar" else ""))
    t0 = time.perf_counter()
    weights = fresh()
    weights.load_state_dict(load_weights(ctx))
    prequant = _check_finite("prequant", ev.score(weights, data, r, dist, log, label="prequant"))
    del weights
    diagnostic_time = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = roundtrip_into(fresh, ctx.path("export", BLOB), ctx.outputs["export"]["sha256"])
    roundtrip = _check_finite("roundtrip", ev.score(model, data, r, dist, log, label="roundtrip"))
    train_slice = None
    if r.eval.train_tokens:  # a diagnostic between the scored passes: taken off their clock
        t1 = time.perf_counter()
        train_slice = ev.score_train_slice(model, data, r, dist, log)
        diagnostic_time += time.perf_counter() - t1
        t0 += time.perf_counter() - t1
    ttt = _check_finite("ttt", ev.score_ttt(model, data, r, dist, log)) if r.ttt.enabled else None
    eval_time = time.perf_counter() - t0
    log(f"eval_done eval_time={eval_time:.1f}s diagnostic_time={diagnostic_time:.1f}s (diagnostic off the clock)")
    return {"prequant": prequant, "roundtrip": roundtrip, "ttt": ttt, "train_slice": train_slice,
            "eval_time_s": eval_time, "diagnostic_time_s": diagnostic_time}


def score_config(ctx: Context) -> dict:
    r = ctx.recipe
    return {"eval": to_dict(r.eval), "ttt": to_dict(r.ttt), "data": to_dict(r.data), "model": to_dict(r.model)}


SCORE = Stage("score", depends_on=score_config, data_inputs=("val", "tokenizer"), files=(), run=_run_score)
