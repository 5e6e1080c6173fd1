"""RL with rollouts from the engine and updates from the trainer, aligned so their logprobs agree."""
