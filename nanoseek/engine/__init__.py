"""Inference: the latent KV cache (and, later, batched generation on token ids)."""
