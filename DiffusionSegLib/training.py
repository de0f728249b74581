"""Training loop for diffusion segmentation models.

SPEC (to implement) - see the helper brief.
"""
