"""The review and operations web application (``cxr-worker dashboard``)."""
