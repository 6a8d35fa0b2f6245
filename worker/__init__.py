"""cxr-gradcam worker: a DICOM C-STORE service that answers chest X-rays with a
pneumonia probability, a Grad-CAM Secondary Capture and a TID 1500 Structured Report.

Research software: not a medical device.
"""

__version__ = "0.1.0"
