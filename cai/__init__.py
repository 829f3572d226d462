"""cai: a Constitutional AI / RLAIF pipeline."""

__version__ = "0.1.0"
