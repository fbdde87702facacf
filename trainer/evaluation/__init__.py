"""The field's metrics, threshold calibration on validation data, and picture reports."""
