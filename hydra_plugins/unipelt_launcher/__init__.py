"""unipelt's Hydra launcher plugin: `hydra/launcher=gpus` runs a sweep's jobs in parallel, one GPU per job."""
