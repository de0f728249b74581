"""3D pretraining components (issue 15)."""
