"""Local training, pure torch and no network: data reading and batching, gradient accumulation, evaluation."""
