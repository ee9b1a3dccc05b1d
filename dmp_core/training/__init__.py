"""Training: the one loop (``loop.run_training``) for pretrain and finetune, the
meta-architecture (``meta_arch.Pretrainer``), masking, optimiser and schedule,
checkpoints, DDP helpers and the memory-mapped pair dataset."""
