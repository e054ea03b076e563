"""Long horizons: opd's adaptive horizon and teacher re-anchoring against plain OPD, on a task
whose teacher signal is expected to fade with depth (a chain of additions played as an episode,
with a teacher trained on shorter episodes), over several seeds, judged by rules fixed before
the run (docs/long-horizons.md).
"""
