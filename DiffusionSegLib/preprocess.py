"""Per-model-card preprocessing and its exact inverse.

SPEC (to implement):
- ``resample_to_model_grid(image, card) -> sitk.Image``: for a 2D model on a 3D volume resample
  the in-plane axes to ``card.spacing`` (keep the slice axis untouched, so each output slice is an
  input slice); for 3D models resample all axes; ``card.spacing is None`` = no resampling. Linear
  for images. Works for oblique directions (resample in the image's own index frame: same origin
  and direction, new spacing/size) and for RGB vector images.
- ``normalize(array, card) -> np.ndarray``: float32 (C, *spatial) -> normalized per
  ``card.normalization``: ``ct_window`` (clip to center +- width/2, map to [-1, 1]), ``zscore``
  (over voxels > the 1st percentile... or all voxels; document choice), ``rgb`` (0..255 -> [-1, 1]),
  ``minmax`` (1st..99th percentile -> [-1, 1]). Raise InputImageError if channels != card.in_channels.
- ``resample_labels_to_model_grid(label_image, card, reference_resampled)``: nearest-neighbour
  version for training labels.
- ``prepare(image, card, size_divisor) -> PreparedInput``: resample + normalize + pad. For 2D
  models: ``batch`` (S, C, H, W) with S slices along ``card.slice_axis`` (a 2D input gives S=1);
  for 3D models: ``batch`` (1, C, D, H, W). Pads (reflect or constant at the normalized minimum)
  so H, W (and D) are multiples of ``size_divisor`` and at least ``card.patch_size`` when that is set
  (an image smaller than the model input is padded, never rejected).
- ``restore(prepared, maps, interpolation) -> np.ndarray``: undo padding and resampling of network
  outputs ``maps`` with the shape of ``batch`` but L channels instead of C ((S, L, H, W) or
  (1, L, D, H, W)), returning (L, *spatial of the input image in SimpleITK array order), on exactly
  the input's size, origin, spacing and direction. ``interpolation`` is ``linear`` (continuous maps)
  or ``nearest``. Binary masks are restored with linear interpolation then > 0.5 by the caller.
"""
