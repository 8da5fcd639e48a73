"""Timings: measured ceilings and the CPU and GPU benchmarks."""
