"""featalign: preference optimisation with SAE feature-level constraints (FPO and the DPO family)."""

__version__ = "0.1.0"
