"""Helpers for testing apps that use gateway_guard (and gateway_guard itself)."""
