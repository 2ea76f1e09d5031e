"""exportminers: hard-example miners that script, export to ONNX and run anywhere."""
__version__ = "0.1.0"
