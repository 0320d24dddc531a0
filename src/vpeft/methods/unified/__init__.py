"""Unified methods: one search space over several methods."""
