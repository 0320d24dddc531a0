"""Measuring methods: profiles (parameters, FLOPs, latency, step time, memory), suites, reports."""
