"""Training data: MVTec-layout folders, object foregrounds and synthetic anomalies."""
