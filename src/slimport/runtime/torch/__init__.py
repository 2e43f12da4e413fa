"""PyTorch runtime: eager transformers models and packed quantized layers."""
