"""Datasets: Megatron indexed token files, GPT samples over them, and resumable samplers."""
