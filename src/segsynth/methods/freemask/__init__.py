"""FreeMask (Yang et al., NeurIPS 2023): synthesize images for real masks, filter noisy synthetic pixels, re-sample hard masks."""
