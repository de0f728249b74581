"""The ``diffusionseg`` command line."""
