"""Model card templates (package data)."""
