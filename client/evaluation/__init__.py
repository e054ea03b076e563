"""opd.client.evaluation: outcome metrics: does the student answer more questions right?

Distillation losses say how close the student is to the teacher; this package asks the
question that matters, on held-out sets with checkable answers.

    data.py         evaluation sets: prompt + gold answer rows (the prompt sets' sources)
    tasks.py        generated tasks with exact answers ("task:NAME"), shipped, no download
    verifiers.py    grades one completion against a gold answer (math via math-verify, exact,
                    numeric, regex, or a user's module:function), keeping "no answer could be
                    extracted" apart from "wrong answer"
    stats.py        pass@k, Wilson and prompt-bootstrap intervals, AUROC, gap recovery
    sources.py      who answers: a student through a rollout engine, a teacher through
                    POST /v1/generate; one seed rule (prompt i: seed + i)
    run.py          one source on one set: sample, verify, summarise, per-prompt records
    in_training.py  `opd train --eval-set`: accuracy over training, teacher once, gap recovery
    rewards.py      the sequence mean reward and its AUROC against correctness (`opd probe`)
    depth.py        the teacher-continuation depth probe (`opd probe --depth`)

The `opd eval` command is opd.client.recipes.evaluate.
"""
