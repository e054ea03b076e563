"""Run a command while `opd serve` serves a teacher; `{url}` in the command becomes its URL.

    python deploy/gpu_check/with_teacher.py --model DIR --device cuda --log serve.log \
        -- python -m torch.distributed.run ... --teacher-url {url}

The teacher is opd.client.teacher.launch.LocalTeacher (the `opd serve` process the tests and
`opd quickstart` use): it dies with this process, even a killed one, so a phase that times out
leaves no server holding the GPU for the phases after it. Exit status: the command's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SystemExit("with_teacher.py: no command after --")
    from opd.client.teacher.launch import LocalTeacher

    teacher = LocalTeacher(
        args.model,
        env={"OPD_LOG_LEVEL": "warning"},
        log_path=args.log,
        extra_args=["--device", args.device, "--dtype", args.dtype],
    )
    with teacher as url:
        print(f"teacher {args.model} on {args.device} at {url}", flush=True)
        code = subprocess.run([part.replace("{url}", url) for part in command]).returncode
    sys.exit(code)


if __name__ == "__main__":
    main()
