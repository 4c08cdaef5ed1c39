"""Thin ComfyUI nodes (V3 schema) on top of the Cinetune library."""
