"""`opd bench`: scoring throughput, latency, memory and payload, measured side by side.

Every contender scores the same sequences; rounds alternate between contenders (A B C A B C ...)
and the table reports medians, so machine noise hits all of them alike. See docs/benchmarks.md.
"""
