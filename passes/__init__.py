"""attnc passes: one file per method, found through the `attnc.passes` entry-point group."""
