"""MobileMoE model: config presets, the transformer, quantization format, Hugging Face interop."""
