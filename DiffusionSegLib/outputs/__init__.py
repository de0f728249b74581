"""Results as files: writers (NIfTI, .seg.nrrd, report.json, overview.png, written atomically) and readers."""
