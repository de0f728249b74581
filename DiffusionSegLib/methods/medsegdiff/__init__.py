"""MedSegDiff: conditional DPM with dynamic conditional encoding and the FF-Parser."""
