"""Which teacher scores each prompt of a multi-teacher run, decided once, before step 1.

Why: a team distilling one student from several specialists (a math teacher, a code teacher)
sends each prompt's rollouts to the teacher of its domain. A prompt that routes to no teacher
must stop the run before any compute is spent, naming the prompts, not be skipped silently
(a silent skip changes the data mix without anyone noticing).

Three ways to say it, tried in this order for every prompt:
1. **A prompt file per teacher** (`--teacher-prompts math=data/math.jsonl`): every prompt of
   that file goes to that teacher.
2. **A column** (`--teacher-field`, default `teacher`): its value names the teacher, directly
   or through a rule (`--route algebra=math --route python=code` maps values to teachers).
3. **One teacher:** with a single teacher, every prompt is its own, and no column is needed.

Everything else is an UnroutablePrompts error listing the first offenders by position.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opd.client.configs.groups import parse_pairs

if TYPE_CHECKING:
    from opd.client.configs.train import TrainConfig


class UnroutablePrompts(ValueError):
    """Prompts that no rule sends to a configured teacher; raised before training starts."""


@dataclass(frozen=True)
class Router:
    """The routing rules of a run, checked against its teacher names."""

    teachers: tuple[str, ...]
    field: str = "teacher"
    rules: tuple[tuple[str, str], ...] = ()  # (column value, teacher)

    def __post_init__(self) -> None:
        if not self.teachers:
            raise ValueError("a run needs at least one teacher")
        known = set(self.teachers)
        for value, teacher in self.rules:
            if teacher not in known:
                raise ValueError(
                    f"--route {value}={teacher}: no teacher named {teacher!r} "
                    f"(teachers: {', '.join(self.teachers)})"
                )

    def route_row(self, row: dict, file_teacher: str | None = None) -> str | None:
        """The teacher of one prompt row, or None when nothing routes it."""
        if file_teacher is not None:
            return file_teacher
        value = row.get(self.field)
        if value is not None:
            value = str(value)
            mapped = dict(self.rules).get(value, value)
            return mapped if mapped in self.teachers else None
        return self.teachers[0] if len(self.teachers) == 1 else None

    def assign(
        self, rows: Sequence[dict], file_teachers: Sequence[str | None] | None = None
    ) -> list[str]:
        """The teacher of every row, or UnroutablePrompts naming the first that have none.
        `file_teachers[i]` is the teacher the file of row i was given (None: no file rule)."""
        files = file_teachers or [None] * len(rows)
        out: list[str] = []
        bad: list[str] = []
        for i, (row, file_teacher) in enumerate(zip(rows, files, strict=True)):
            teacher = self.route_row(row, file_teacher)
            if teacher is None:
                value = row.get(self.field)
                bad.append(f"#{i} ({self.field}={value!r})" if value is not None else f"#{i}")
                continue
            out.append(teacher)
        if bad:
            raise UnroutablePrompts(
                f"{len(bad)} of {len(rows)} prompts route to no teacher (teachers: "
                f"{', '.join(self.teachers)}; column {self.field!r}"
                + (f"; rules {dict(self.rules)}" if self.rules else "")
                + f"): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. Give each prompt "
                f"a {self.field!r} value naming a teacher, add --route VALUE=TEACHER, or use "
                "--teacher-prompts TEACHER=FILE"
            )
        return out


def share(assigned: Sequence[str], teachers: Sequence[str]) -> dict[str, float]:
    """Fraction of the prompts each teacher gets (every teacher listed, 0 when none)."""
    counts = Counter(assigned)
    total = max(1, len(assigned))
    return {t: counts.get(t, 0) / total for t in teachers}


def training_prompts(config: TrainConfig) -> tuple[list[str], list[str] | None]:
    """The prompt texts of a run and, with named teachers (--teacher), each prompt's teacher.

    Prompts come from --prompts and from each --teacher-prompts file, in that order; --prompts
    is left out when it is the default shipped set and files are given. Raises
    UnroutablePrompts before anything is trained."""
    from opd.client.train.prompts import column_texts

    sources = _sources(config)
    texts = [
        text
        for rows, where, _ in sources
        for text in column_texts(rows, config.data.prompt_field, where)
    ]
    return texts, _owners(config, sources)


def training_rows(config: TrainConfig) -> tuple[list[dict], list[str] | None]:
    """The data rows of a run (what an environment's reset reads, --env) and, with named
    teachers, each row's teacher; same sources and order as training_prompts."""
    sources = _sources(config)
    return [row for rows, _, _ in sources for row in rows], _owners(config, sources)


def _sources(config: TrainConfig) -> list[tuple[list[dict], str, str | None]]:
    """(rows, where, the teacher its file names or None) per prompt source, in order."""
    from opd.client.train.prompts import SHIPPED, load_rows

    data, teachers = config.data, config.teacher
    if not teachers.named:
        return [(*load_rows(data.prompts), None)]
    files = parse_pairs(teachers.prompts, "--teacher-prompts")
    sources: list[tuple[str, str | None]] = []
    if not files or data.prompts != SHIPPED:
        sources.append((data.prompts, None))
    sources += [(path, teacher) for teacher, path in files.items()]
    return [(*load_rows(source), teacher) for source, teacher in sources]


def _owners(
    config: TrainConfig, sources: list[tuple[list[dict], str, str | None]]
) -> list[str] | None:
    """Each row's teacher with named teachers (None without); raises UnroutablePrompts."""
    teachers = config.teacher
    if not teachers.named:
        return None
    router = Router(
        tuple(name for name, _ in teachers.specs() if name is not None),
        teachers.field,
        tuple(parse_pairs(teachers.route, "--route").items()),
    )
    rows_all = [row for rows, _, _ in sources for row in rows]
    file_teachers = [teacher for rows, _, teacher in sources for _ in rows]
    return router.assign(rows_all, file_teachers)
