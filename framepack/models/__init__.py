"""Neural network modules: the packed transformer, its attention backends and step caches."""
