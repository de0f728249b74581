"""Training/evaluation datasets: discovery of image/label pairs and sampling of training items.

SPEC (to implement) - see training.py.
"""
