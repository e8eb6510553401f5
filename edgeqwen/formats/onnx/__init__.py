"""ONNX builds, run by onnxruntime-genai: the streamed exporter, the initializer layout as data (which plan
reads too), the int4 k-quant search (numba-compiled when available) and the genai runner.

May import: the shared core (edgeqwen.*) and the formats table; never another format's folder, measure, serve
or cli.
"""
