"""Decoding engines: continue generation from a fused KV cache."""
