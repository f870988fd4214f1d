"""Export formats and the runtimes that run them: gguf and onnx write and quantize files;
runtime holds the interface every backend implements (hf_torch, llama_cpp, ort, ort_genai) and
registry lists them."""
