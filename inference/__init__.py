"""Inference workers: consumer-group members that batch, generate and reply."""
