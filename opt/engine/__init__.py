"""Training loops. DeepSpeed is imported only by the pretraining engine module."""
