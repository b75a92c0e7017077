"""einfuse's version: one place, below every layer (the package root imports the compiler)."""
__version__ = "0.1.0"
