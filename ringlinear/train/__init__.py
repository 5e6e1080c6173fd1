"""Training: packed varlen data, the trainer (fp32 masters, AdamW, cosine schedule), aux-loss-free MoE
balancing, crash-safe checkpoints, FSDP2 data parallel, and the FP8 recipe."""
