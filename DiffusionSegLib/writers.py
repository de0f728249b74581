"""Writers of a SegmentationResult: NIfTI maps, .seg.nrrd, JSON report, PNG overview.

SPEC (to implement): ``write_outputs(result, outdir, keep_samples=False) -> dict[str, Path]``
writes, each to a temporary name then renamed, into ``outdir`` (created if needed):
fused.nii.gz, crf.nii.gz (when result.refined is not None), consistency.nii.gz, ambiguity.nii.gz
(label maps: value i+1 for label i, overlaps resolved by the higher probability),
probability_<label>.nii.gz and uncertainty_<label>.nii.gz (float32), samples/sample_<k>.nii.gz when
keep_samples, segmentation.seg.nrrd (slicerio; one segment per (label, region): "<label> fused",
"<label> consistency", "<label> ambiguity", with colors; Slicer opens it as a segmentation),
report.json, overview.png (matplotlib Agg, the most informative slices with the overlays).
All outputs share the geometry of result.reference (RGB inputs: the scalar geometry of it).
Returns the paths written (name -> path).
"""
