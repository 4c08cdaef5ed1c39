"""k5 library: plain PyTorch, never imports ComfyUI."""
