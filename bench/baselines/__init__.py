"""Baselines for bench/bench_e2e.py: the ideal loop, the naive monolith, the Ray Serve peer.

They import nothing from tagpipe's services: each reimplements decode and
inference on Pillow and onnxruntime directly, so a bug or trick in tagpipe
cannot leak into the yardsticks it is measured against.
"""
