"""make bench: times forward + backward of the generated kernels against hand-tuned NumPy, the seed's
NumPy and, when installed, PyTorch and JAX; measures their peak extra memory; prints and saves a table."""
