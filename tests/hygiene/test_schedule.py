"""The files that tests/conftest.py keeps together on one xdist worker exist: a renamed one
would silently go back to running beside the other long files (slower, and more memory)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import _LONG_FILES, _file_unit

ROOT = Path(__file__).resolve().parents[2]


def test_every_long_file_named_in_conftest_exists():
    missing = [path for path in _LONG_FILES if not (ROOT / path).is_file()]
    assert missing == [], "rename them in tests/conftest.py's _LONG_FILES"


def test_long_files_are_one_unit_and_other_files_their_own():
    units = {_file_unit(f"{path}::test_x") for path in _LONG_FILES}
    assert units == {"long-files"}
    assert _file_unit("tests/shared/test_codec.py::test_y[a::b]") == "tests/shared/test_codec.py"
