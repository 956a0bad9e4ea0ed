"""Inference: the latent KV cache, sampling, and the batched, continuously batching engine on token ids."""
