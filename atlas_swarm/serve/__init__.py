"""Serving what a run trained: `python -m atlas_swarm.serve` (OpenAI-compatible HTTP, several adapters over one base,
dynamic batching, hot swap to each newer adapter the run vouches for)."""
