"""DiffusionSegLib: diffusion-model segmentation with uncertainty outputs.

The package imports no Slicer and no Qt. Heavy dependencies (torch, monai) are imported
inside the modules of the compute path, so ``import DiffusionSegLib`` stays cheap.
"""

__version__ = "0.1.0"
