"""Analyses of trained models: head orthogonality, the positional matrix P, the structure of C = B^T A, figures."""
