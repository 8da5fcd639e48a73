"""Reports: Markdown and PNG figures regenerated from stored results alone (no recomputation)."""
