"""Helpers the tests share: in-thread servers, Prometheus readers, the float64 reference model,
a small TrainConfig factory, and the test API key. Fixtures stay in tests/conftest.py."""
