"""Leaf helpers: rank-aware console output, metric sinks (JSONL, TensorBoard), phase timers."""
