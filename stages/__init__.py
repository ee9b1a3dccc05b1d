"""Thin Typer commands, one module per DVC stage, over the library ``dmp_core``."""
