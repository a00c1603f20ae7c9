"""The OPT model: encoders, cross-modal encoder, decoders, VQ image tokenizer, towers.

Models return dicts of tensors and never compute losses; the pretext tasks
own masking, losses and metrics.
"""
