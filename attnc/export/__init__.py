"""Export: lowering to attnc:: ops, the .pt2 and the ONNX file."""
