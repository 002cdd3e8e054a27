"""Benchmark harnesses (not part of the installed library): `tinymoe bench` runs them from a source checkout."""
