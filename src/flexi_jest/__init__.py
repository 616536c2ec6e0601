"""flexi-jest: joint example selection (JEST) and Flexi-JEST for SigLIP-style image-text training."""

__version__ = "0.1.0"
