"""training library: plain PyTorch, never imports ComfyUI."""
