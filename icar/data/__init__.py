"""Data: context matrices, autoregressive sequences, token encodings, and the streaming DataModule."""
