"""DenseCRF refinement of the fused mask, with a pure-torch fallback.

SPEC (to implement):
- ``refine(probability, image, spatial_dims, backend="auto", settings=CRFSettings()) -> (mask, backend_name)``
  probability (L, *spatial) float32 in [0, 1]; image (C, *spatial) normalized to [-1, 1] (C = 1 or 3);
  ``spatial_dims`` = 2 means the model is 2D: when spatial has 3 axes, refine each slice along
  axis 0 independently; 3 means the 3D generic form (pydensecrf ``DenseCRF`` with
  ``create_pairwise_gaussian``/``create_pairwise_bilateral`` on 3D shapes). Each label is refined as
  a binary problem with unary from (1 - p, p). Returns uint8 mask (L, *spatial) and the name of
  the backend used: "pydensecrf" or "torch-meanfield".
- Defaults = DiffSeg published settings: bilateral sxy=80, srgb=13, compat=10; gaussian sxy=3,
  compat=3; 5 mean-field iterations. Image intensities for the bilateral term are mapped to 0..255.
- ``backend="auto"``: pydensecrf when importable, else the torch mean-field (local-window message
  passing approximating both kernels, runs on GPU when tensors are there).
- ``refine_from_samples(samples, image, spatial_dims, repeats=3, subset=4, seed=0, ...)``: the DiffSeg
  protocol (average of ``subset`` random samples -> CRF, ``repeats`` times, maps averaged, > 0.5).
"""
