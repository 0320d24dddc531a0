"""Temporal methods: a frozen image backbone learns to reason over the frames of a clip."""
