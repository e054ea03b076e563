"""The API key the strict test servers require (a test value, never a real secret)."""

TEST_API_KEY = "test-secret-key"
