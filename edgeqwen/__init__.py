"""edgeqwen: build, run and measure Qwen2-family models on the CPU you have."""

__version__ = "0.1.0"
