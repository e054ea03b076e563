"""The main diagnostics as people read them: key, label, and which way is "closer to the
teacher". One list for the quickstart's before/after table and the run report (importing it
costs nothing: no torch)."""

from __future__ import annotations

MAIN_METRICS: tuple[tuple[str, str, str], ...] = (
    ("kl/sampled", "reverse KL, sampled-token estimate (nats/token)", "down"),
    ("kl/student_topk", "reverse KL on the student's top-k", "down"),
    ("overlap/ratio", "top-k overlap ratio", "up"),
    ("overlap/token_advantage", "overlap-token advantage", "toward 0"),
    ("overlap/mass_student", "overlap mass, student", "up"),
    ("overlap/mass_teacher", "overlap mass, teacher", "up"),
    ("entropy/student", "student entropy (nats)", ""),
    ("entropy/teacher", "teacher entropy on student rollouts", ""),
    ("entropy/gap", "entropy gap |H(q) - H(p)|", "down"),
    ("reward/seq_mean", "sequence mean reward", "up"),
)
