"""Training stages: pretraining, SFT, GRPO, distillation, and the loop helpers they share."""
