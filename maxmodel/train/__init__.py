"""Training: optimizer and schedules, loss, the jitted step, metrics, checkpoints and the loop."""
