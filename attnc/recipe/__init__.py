"""Recipes: the schema, selectors, the pass interface and the pass manager."""
