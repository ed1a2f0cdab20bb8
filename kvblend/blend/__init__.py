"""Blending: chunk encoding, prompt planning, token selection and the layer-wise executor."""
