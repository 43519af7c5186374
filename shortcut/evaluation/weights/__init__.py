"""Shipped weights of the digits classifier (data only)."""
