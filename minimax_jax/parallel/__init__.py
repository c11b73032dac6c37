"""Mesh, logical-axis sharding rules and the collective algorithms (expert parallelism) of the model."""
