"""Training: the loop, the Trainer and its run folder (config, run state, log, checkpoints), optimizers,
LR schedules, fine-tuning controls."""
