"""The one list of stages, in order. `pgolf run` (pipeline.run) loops over it with content-keyed
caching; the shipped train_gpt.py (pipeline.script_entry) loops over it with none.

    train (+EMA) -> export (quantize, pack, read back) -> score (sliding window, score-first TTT) -> report
"""

from pipeline.stages.export import EXPORT
from pipeline.stages.report import REPORT
from pipeline.stages.score import SCORE
from pipeline.stages.train_stage import TRAIN

STAGES = (TRAIN, EXPORT, SCORE, REPORT)
