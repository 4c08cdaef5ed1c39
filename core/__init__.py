"""core library: plain PyTorch, never imports ComfyUI."""
