"""GPT model: transformer blocks, embeddings and the selective LM head."""
