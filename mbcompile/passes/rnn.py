"""Recurrent layers (filled in by the RNN rules)."""
