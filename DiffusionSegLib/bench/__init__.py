"""The benchmarks (synthetic and real data). Not packaged into the Slicer extension; uses the library's public functions only."""
