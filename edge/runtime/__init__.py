"""Bundle loading and inference backends: verify a bundle, pick a backend, run it."""
