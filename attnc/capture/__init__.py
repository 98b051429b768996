"""Capture: torch.export into a Program, canonicalising hand-written attention, masks."""
