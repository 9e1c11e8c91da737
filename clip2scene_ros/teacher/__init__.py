"""The CLIP teacher: text banks, MaskCLIP dense pixel-text labels and the teacher cache."""
