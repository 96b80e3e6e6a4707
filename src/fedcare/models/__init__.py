"""Model builders (PyTorch), the flat-parameter view, and the wire format.

Submodules are imported directly, so that code that only moves payloads
(``fedcare.models.wire``) does not load PyTorch.
"""
