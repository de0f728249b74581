"""Reading and writing images (SimpleITK). The only module that opens image files.

SPEC (to implement):
- ``read_image(path) -> sitk.Image``: any file SimpleITK reads (NIfTI, NRRD, MHA, ...), a DICOM
  folder (first/largest series via ImageSeriesReader), or a 2D PNG/JPEG (grayscale or RGB; RGBA ->
  RGB, alpha dropped). Returns a 2D or 3D image, scalar or 3-component vector (RGB). Raises
  InputImageError (one clear line, file name in it) for: missing path, unreadable/corrupt file,
  4D images or vector images with a component count other than 1 or 3, images with a size-1
  dimension that is not the last (treat a 3D image with one slice as 2D), NaN/Inf voxels, empty
  (0 voxels) or constant images.
- ``validate_image(image, name) -> None``: the checks above on an in-memory image (used for
  images that do not come from a file, e.g. the Slicer bridge).
- ``write_image_atomic(image, path) -> None``: writes to a temporary name in the same folder
  (same extension so SimpleITK picks the format) and renames when complete; on failure nothing is left.
- ``array_with_channels(image) -> np.ndarray``: float32 array (C, *spatial) in SimpleITK array
  order ((z, y, x) or (y, x)); C = 1 for scalar, 3 for RGB.
- ``image_from_array(array, reference, pixel_type) -> sitk.Image``: a scalar image (spatial array
  in SimpleITK order) with exactly the reference's origin, spacing and direction.
"""
