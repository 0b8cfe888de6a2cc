"""What a run reports: metrics.jsonl, the terminal, the model summary, and wandb (in its own process)."""
