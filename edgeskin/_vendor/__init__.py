"""Third-party code kept as shipped (see each file's header)."""
