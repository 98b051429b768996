"""The graph: attention sites, graph edits, taps for streaming statistics."""
