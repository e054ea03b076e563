"""Research harnesses that use opd but do not ship in its wheel (run from a clone)."""
