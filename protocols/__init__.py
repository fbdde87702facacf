"""Contracts between the trainer, the edge daemon and the outside world (wire payloads, bundle
manifest). Imports neither `trainer` nor `edge`."""
