"""Vanilla conditional DPM: the image concatenated to the noisy mask, no conditioning encoder."""
