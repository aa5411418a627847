"""Training, above the core: the LightningModule, `train(cfg)`, loggers, checkpoints, resumes and the guards that end
a run cleanly (divergence, SIGTERM, DDP timeouts, memory, SLURM requeue). It knows nothing of Hydra or the analyses."""
