"""Online RL on the generation engine: prompts (prompts.py) -> rollouts with the policy's current weights
(rollout.py) -> rewards from user functions or a reward model (rewards.py) -> the step's batch; the objectives
(objectives/grpo.py, objectives/ppo.py) are the losses on that batch."""
