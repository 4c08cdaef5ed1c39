"""ltx2 library: the LTX-2 19B audio+video model family in plain PyTorch; never imports ComfyUI."""
