"""Networks: the ε-prediction denoiser U-Net and the segmentation U-Net."""
