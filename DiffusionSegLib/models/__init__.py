"""Models as files: the model card (JSON), the store (bundled, installed and downloaded models) and the catalogue. Knows nothing of networks or torch."""
