"""The OPQ core: pure NumPy, imports neither TensorFlow nor any Keras.

Everything both frontends must agree on bit for bit lives here: the frontend
contract (`contract`), the grid, the Laplace model and the allocation, the
reconstruction solver, the packed file, the report and its ratios, and the
atomic file writes. docs/architecture.md says which folder may import what.
"""
