import streamgen  # noqa: F401  (sets the OpenMP wait policy before any test imports torch)
