import os
import sys

# tests/ holds helper modules (onnx_conformance, gradcheck) imported by the test files.
sys.path.insert(0, os.path.dirname(__file__))
