"""Helpers for tests: tiny models and a synthetic knowledge world."""
