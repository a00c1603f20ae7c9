"""Downstream evaluation: scoring what a trained model generates or predicts."""
