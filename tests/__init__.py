"""Tests for the fine-tuning kit (a package so `from tests.tiny_model import ...` works)."""
