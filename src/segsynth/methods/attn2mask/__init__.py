"""Attn2mask / DiffuMask / Dataset Diffusion: label text -> image samples from the generator's own attention.

`segsynth.generators.attention` captures the UNet's cross-/self-attention while it draws; `pseudo_mask` turns
the maps into a label map and a confidence map (recipes in `PRESETS`); `reliability` trains on such noisy
labels by trusting each class's most confident pixels (BECO-style).
"""
