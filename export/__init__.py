"""attar export: students to ONNX INT4 for onnxruntime-genai, with a parity check (needs attar[export])."""
