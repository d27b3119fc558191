"""Scaffolding for tests, benchmarks and end-to-end scripts; nothing on the request path imports it."""
