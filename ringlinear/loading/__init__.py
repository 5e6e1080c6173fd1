"""Loading a model for inference: each rank's slices of a safetensors checkpoint (or random weights), and FP8
weights (quantized at load, or read as a checkpoint ships them)."""
