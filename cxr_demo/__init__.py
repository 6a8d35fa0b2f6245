"""Demo and test tooling: Orthanc as a local PACS, and the end-to-end demo."""
