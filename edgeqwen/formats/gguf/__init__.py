"""GGUF builds, run by llama.cpp (llama-cpp-python): the converter (safetensors -> f16/bf16 GGUF), the
quantizer (libllama's llama_model_quantize), the runner, the GGUF header reader, the page-cache release of
repacked originals, and llama.cpp's RPC workers (several devices).

May import: the shared core (edgeqwen.*) and the formats table; never another format's folder, measure, serve
or cli.
"""
