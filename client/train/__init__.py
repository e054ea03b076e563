"""opd.client.train: `opd train`, the student side of on-policy distillation (needs torch).

Reading order: config.py (TrainConfig) -> trainer.py (run, the step) -> objectives.py (the
registry of per-token losses) and diagnostics.py (the method's diagnostics) -> rollouts.py
(student sampling and the per-position arrays) -> bridge.py / pipeline.py (teacher scoring
overlapped with sampling) -> student, prompts, checkpoint, distributed, metric_log.
"""
