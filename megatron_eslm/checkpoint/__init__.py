"""Checkpoints outside the training loop: one reader that turns any of our layouts (any TP x PP, or a
DeepSpeed ZeRO directory) into whole, unsharded tensors (`reader.read_checkpoint` -> `FullCheckpoint`), one
writer that shards them into any layout (`writer.write_checkpoint`), and the HuggingFace mapping (`hf.py`).
Export, import, reshape, averaging and generation are thin tools on top of these. The trainer's own
save/resume stays in `training/checkpointing.py`."""
