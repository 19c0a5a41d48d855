"""The OCR engine whose handles are released before anything is deleted.

One module per backend (none, aspose), the host process the aspose backend
runs in, and a small chooser (auto). May import ocrd.core.
"""
