"""Data: corpora, token shards and loaders (`corpus`), and the verifiable task suite (`tasks`)."""
