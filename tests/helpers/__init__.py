"""Helpers shared by test files (not tests themselves); fixtures live in tests/conftest.py."""
