"""From a training run to a model bundle: the exported program, compiled packages, the manifest."""
