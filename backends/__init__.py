"""Backend registry (filled in by the backends issue)."""
