"""opd.client.teacher: the torch-free HTTP client of a teacher scoring service.

`TeacherClient` / `AsyncTeacherClient` (client.py) only do I/O; what both share (splitting under
the server's limits, encoding, backoff) is in base.py, the exception tree in errors.py, several
replica URLs in replicas.py, and `LocalTeacher` (launch.py) runs `opd serve` as a subprocess.
Nothing here imports torch, transformers, FastAPI or matplotlib (a test checks it).
"""

from opd.client.teacher.client import AsyncTeacherClient, TeacherClient

__all__ = ["AsyncTeacherClient", "TeacherClient"]
