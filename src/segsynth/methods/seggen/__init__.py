"""SegGen (Ye et al., 2023) building blocks: colour-coded masks (colour), captions per real mask (captions)
and the quality of generated masks against the real ones (mask_quality)."""
