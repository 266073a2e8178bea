"""Constants shared by the client tests (a uniquely named module: test files never import conftest)."""

API_KEY = "sk-client-test"
