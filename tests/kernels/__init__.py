"""The Triton kernels (kernels/) against their PyTorch reference, and their GPU compile."""
