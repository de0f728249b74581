"""Datasets, the training loop, metrics and evaluation on labelled cases."""
