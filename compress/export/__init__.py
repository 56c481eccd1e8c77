"""What ships: ONNX files, fp32 and int8, and running them in onnxruntime."""
