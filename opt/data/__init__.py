"""Data: shard I/O, the synthetic world, the audio front end and the training pipeline.

Nothing here imports the model.
"""
