"""Measuring fidelity: parity between models and checkpoints."""
