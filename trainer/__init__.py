"""cxr-gradcam trainer: fine-tune ResNet-50 for Pneumonia vs No Finding on
ChestX-ray14 (or synthetic phantoms), evaluate it, and export one ONNX model
that returns the probability and its exact Grad-CAM."""

__version__ = "0.1.0"
