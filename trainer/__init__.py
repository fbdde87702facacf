"""Offline side: model definition, data and synthesis, training, evaluation, export to bundles."""
