"""Export formats: GGUF (llama.cpp) and ONNX (onnxruntime), each written and run in its runtime."""
