"""Parallelism: the mesh, the logical-axis rules table, multi-process runs."""
