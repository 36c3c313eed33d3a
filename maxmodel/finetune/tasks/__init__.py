"""Small verifiable tasks for RL on a CPU: a seeded prompt generator and exact reward functions each."""
