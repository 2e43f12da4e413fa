"""Making models small: quantization (quant/) run block by block (pipeline.py)."""
