"""GRPO training of the planner: rewards (stage-1 format, stage-2 planning), remote reward clients, data, trainer."""
