"""`opd replicate`: the method's findings reproduced on a CPU with models the project trains.

A verifiable task (3-digit addition with a scratchpad), tiny transformers trained from scratch
in two scratchpad styles, and opd's own probe / train / coldstart / eval run on them; the
results are written as one table per finding (docs/replication.md).
"""
