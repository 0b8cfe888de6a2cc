"""What a run reports: metrics.jsonl, log.to's sinks (wandb, TensorBoard, MLflow), the terminal, the summary."""
