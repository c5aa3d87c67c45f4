"""Test and demo harness: a real ComfyUI host, tiny checkpoints, a server and an API client.

Never imported by ComfyUI itself; only by tests, the demo and benchmarks (run with .venv's Python).
"""
