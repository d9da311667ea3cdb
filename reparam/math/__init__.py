"""Layer 1, kernel math: pure float64 tensor functions, one per transform. Imports nothing of reparam."""
