"""Numerical ops the model and objectives share: attention, cross-entropy."""
