"""The alternatives the end-to-end benchmark measures runwire against, built as their designs describe."""
