"""%%harp profile: one timeline of the notebook and its GPU agents (ARCHITECTURE.md section 6)."""
