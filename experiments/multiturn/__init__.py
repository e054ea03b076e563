"""The teacher's signal by turn on the multi-turn follow-up environment, before and after OPD.

A pair that follows the environment's protocol (SmolLM2-135M-Instruct fine-tuned on scripted
episodes as the teacher, its layer subset as the student), then opd's own probe / train / eval
on it; the tables by turn index go to OUT/multiturn.md (docs/training.md).
"""
