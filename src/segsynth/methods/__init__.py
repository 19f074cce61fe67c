"""Training-data methods built from segsynth's parts: one subpackage per paper."""
