"""Does the teacher's dense reward know right from wrong? The AUROC of the sequence mean reward.

For a student rollout y, the method's sequence mean reward is r(y) = (1/T) sum_t [log q_t(y_t) -
log p_t(y_t)], the teacher's per-token log-prob gain over the student averaged over the
completion. If the teacher's token-level signal carries outcome information, right answers get
a higher r than wrong ones: the AUROC of r against the student's answer correctness measures it
(0.5 = no information; the paper reports 0.73 and 0.75 for its two teachers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from opd.client.evaluation.stats import PromptOutcome, auroc, summarize

if TYPE_CHECKING:
    from opd.client.evaluation.data import EvalItem
    from opd.client.evaluation.verifiers import Verifier
    from opd.client.train.rollouts import Rollout


def student_outcome(
    rollouts: Sequence[Rollout],
    items: Sequence[EvalItem] | None,
    verifier: Verifier | None,
    tokenizer: Any,
) -> dict[str, Any]:
    """Each rollout's correctness (by its prompt's gold answer) and the student's accuracy
    summary over prompts (mean@n, pass@n, extraction failures). An episode with a reward from
    its environment is graded by it (correct = full reward), any other by the verifier on its
    completion (an episode's: its last assistant turn)."""
    from opd.client.evaluation.run import FULL_REWARD
    from opd.client.evaluation.verifiers import Verdict
    from opd.client.train.rollouts import last_turn_text

    correct: list[bool] = []
    per_prompt: dict[int, list[bool]] = {}
    failures: dict[int, int] = {}
    for r in rollouts:
        if r.episode is not None and r.episode.reward is not None:
            reward = r.episode.reward
            v = Verdict(correct=reward >= FULL_REWARD, extracted=f"reward {reward:g}")
        elif items is None or verifier is None:
            raise ValueError("an episode without a reward needs --answer-field to be graded")
        else:
            text = last_turn_text(tokenizer, r.token_ids, r.scored_spans)
            v = verifier(text, items[r.prompt_index].answer)
        correct.append(bool(v.correct))
        per_prompt.setdefault(r.prompt_index, []).append(bool(v.correct))
        failures[r.prompt_index] = failures.get(r.prompt_index, 0) + (v.extracted is None)
    outcomes = [
        PromptOutcome(n=len(oks), c=sum(oks), n_extraction_failures=failures[i])
        for i, oks in per_prompt.items()
    ]
    return {"correct": correct, "summary": summarize(outcomes, interval="wilson")}


def reward_auroc(rollouts: Sequence[Rollout], correct: Sequence[bool]) -> dict[str, Any]:
    """AUROC of r(y) (opd.client.train.diagnostics.sequence_rewards, the trainer's own
    reward/seq_mean) against correctness over the rollouts (empty completions left out and
    counted), with the mean reward of right and wrong answers beside it."""
    from opd.client.train.diagnostics import sequence_rewards
    from opd.client.train.positions import PositionStats

    rewards = sequence_rewards(PositionStats.from_rollouts(rollouts)).astype(np.float64)
    labels = np.asarray(correct, dtype=bool)
    keep = np.isfinite(rewards)
    r, y = rewards[keep], labels[keep]
    out = {
        "auroc": auroc(r.tolist(), y.tolist()) if r.size else float("nan"),
        "rollouts": int(r.size),
        "correct": int(y.sum()),
        "left_out_empty": int((~keep).sum()),
        "reward_mean_correct": float(r[y].mean()) if y.any() else float("nan"),
        "reward_mean_wrong": float(r[~y].mean()) if (~y).any() else float("nan"),
    }
    if y.all() or not y.any():  # one class only: there is nothing to rank
        out["undefined"] = f"all {int(y.size)} rollouts are {'right' if y.all() else 'wrong'}"
    else:
        out["auroc_interval"] = auroc_interval(r, y)
    return out


def auroc_interval(
    scores: np.ndarray, labels: np.ndarray, n_resamples: int = 1000, seed: int = 0
) -> list[float]:
    """A percentile-bootstrap 95% interval of the AUROC over rollouts (resamples with one class
    only are skipped): with few right answers the AUROC alone says little, the width says how
    little."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):
        idx = rng.integers(0, scores.size, scores.size)
        ys = labels[idx]
        if ys.any() and not ys.all():
            values.append(auroc(scores[idx].tolist(), ys.tolist()))
    if not values:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]
