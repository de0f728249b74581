"""Supervised MONAI UNet baseline (Dice + BCE): one deterministic forward pass, not a diffusion model."""
