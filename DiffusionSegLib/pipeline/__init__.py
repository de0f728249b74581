"""One image through a model: read -> preprocess -> sample (a method) -> ensemble -> refine -> restore -> result."""
