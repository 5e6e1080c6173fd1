"""Studies behind the architecture: the hybrid-ratio scaling study and its synthetic recall task."""
