"""Checkpoints on disk: reading them (safetensors, or pickle when allowed), renaming keys, writing shards."""
