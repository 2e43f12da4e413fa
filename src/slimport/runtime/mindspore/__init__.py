"""MindSpore Cells for each family, loading from any checkpoint slimport reads, and generation."""
